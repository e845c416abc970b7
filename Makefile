# One command each: `make demo` runs the product end to end; `make test` runs the test suite.
# Both create the virtualenv and install the pinned dependencies first (once).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)

.PHONY: install demo test test-unit test-cluster stop clean-state

$(STAMP): pyproject.toml constraints.txt
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install -q -c constraints.txt -e ".[test]"
	@rm -f $(VENV)/.installed-*; touch $(STAMP)

install: $(STAMP)

demo: install
	bash infra/demo.sh

test: install
	$(VENV)/bin/python -m pytest -q

test-unit: install
	$(VENV)/bin/python -m pytest -q -m "not integration"

test-cluster: install
	$(VENV)/bin/python -m pytest -q -m slow tests/test_two_nodes.py

stop:
	bash infra/stop_local.sh

clean-state: stop
	rm -rf .state
