"""Teach the champion detector new classes from K labelled examples each.

    ray job submit --working-dir . -- python jobs/add_classes.py --classes star5,heart --shots 5

Validates first (unknown class, class already served, too few instances, a method that would
do nothing: a clear error, exit code 2, registry untouched); then expands, fine-tunes on Ray
Train, scores parent and child on val as each is served, registers version N+1 and moves
'champion' only when the base classes held up. ``--help`` lists every flag;
``--config-file my.yaml`` reads them from a file.
"""
from __future__ import annotations

import sys

from fewshot.workflows.add_classes import AddClassesError, AddClassesOptions, run_add_classes
from fewshot.workflows.cli import parse


def main(argv: list[str] | None = None) -> int:
    opts = parse(AddClassesOptions, argv, prog="jobs/add_classes.py")
    try:
        result = run_add_classes(opts)
    except AddClassesError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    v = result.version
    print(f"done: models:/{v.name}/{v.version} ({'champion' if result.promoted else 'candidate'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
