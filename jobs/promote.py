"""Promote a registered version to 'champion', or roll back to the champion's parent.

    python jobs/promote.py --model-name fewshot-detector --version 3 --reason "v4 misses gears"
    python jobs/promote.py --rollback --reason "v4 misses gears"

Refuses (exit code 2, nothing changed) a version that does not exist, is unfinished, or whose
class set the catalog does not know. Serve follows the alias within its poll interval.
"""
from __future__ import annotations

import sys

from fewshot.workflows.cli import parse
from fewshot.workflows.promote import PromoteError, PromoteOptions, run_promote


def main(argv: list[str] | None = None) -> int:
    opts = parse(PromoteOptions, argv, prog="jobs/promote.py")
    try:
        decision = run_promote(opts)
    except PromoteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{opts.store.model_name}: champion v{decision.champion_before} -> v{decision.version} "
          f"({decision.reason})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
