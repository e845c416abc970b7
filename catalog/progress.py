"""The one progress-bar rule for every long loop (world building, teacher caches, training).

In a terminal the bar redraws ten times a second. Anywhere else — a Ray job log, a CI log,
a file — every redraw becomes a line of its own (Ray's log monitor turns tqdm's carriage
returns into newlines), so the bar prints at most one line every ``log_interval_s`` seconds
and postfix updates never force a redraw (``set_postfix(..., refresh=False)``).
"""
from __future__ import annotations

import sys

from tqdm.auto import tqdm

__all__ = ["progress_bar", "LOG_INTERVAL_S"]

LOG_INTERVAL_S = 5.0


def progress_bar(total: int, desc: str, unit: str = "it", *, initial: int = 0, disable: bool = False,
                 log_interval_s: float = LOG_INTERVAL_S) -> tqdm:
    """A tqdm bar on stderr that writes a line every few seconds outside a terminal.

    Call ``bar.set_postfix(..., refresh=False)`` in the loop: a refreshing postfix redraws
    on every step, whatever the interval."""
    interactive = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable,
                mininterval=0.1 if interactive else log_interval_s,
                maxinterval=max(10.0, log_interval_s * 2), dynamic_ncols=interactive)
