"""Named points where a job can be made to die, for the failure tests.

``FEWSHOT_KILL_AT=after_finetune`` (or ``after_register``) in a job's environment makes the job
SIGKILL itself when it reaches that point, the way a lost node or an OOM kill would end it: no
``finally``, no cleanup, no atexit. ``tests/test_integration_loop.py`` uses it to check that a
job killed there leaves the aliases, the catalog and the served model as they were. Unset (the
normal case) it does nothing.
"""
from __future__ import annotations

import os
import signal

ENV = "FEWSHOT_KILL_AT"
POINTS = ("after_finetune", "after_register")


def kill_point(name: str) -> None:
    """SIGKILL this process if ``$FEWSHOT_KILL_AT`` names this point."""
    if name not in POINTS:
        raise ValueError(f"unknown kill point {name!r}; known: {POINTS}")
    if os.environ.get(ENV) == name:
        print(f"{ENV}={name}: killing this job now (failure test)", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
