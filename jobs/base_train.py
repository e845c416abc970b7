"""Train the base detector on a Ray cluster and register it as the champion version.

    ray job submit --working-dir . -- python jobs/base_train.py --dataset synthworld

``--help`` lists every flag; ``--config-file my.yaml`` reads them from a file.
"""
from __future__ import annotations

import sys

from fewshot.workflows.base_train import BaseTrainOptions, run_base_training
from fewshot.workflows.cli import parse


def main(argv: list[str] | None = None) -> int:
    opts = parse(BaseTrainOptions, argv, prog="jobs/base_train.py")
    try:
        version = run_base_training(opts)
    except (KeyError, ValueError) as err:
        print(f"error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    print(f"done: models:/{version.name}/{version.version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
