"""One module per job (base_train, add_classes, tune, promote): validate -> plan -> run, the
plan carrying what validation read; the option groups the jobs share and the typed command
line built from them (``cli.parse``)."""
