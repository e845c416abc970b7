"""Ray Tune over add_classes fine-tuning; the best configuration is stored on the registered
model for ``jobs/add_classes.py --tuned-config best``.

    ray job submit --working-dir . -- python jobs/tune.py --model-name shapes-split1 --shots 5

``--help`` lists every flag; ``--config-file my.yaml`` reads them from a file.
"""
from __future__ import annotations

import sys

from fewshot.workflows.cli import parse
from fewshot.workflows.tune import TuneError, TuneOptions, run_tune


def main(argv: list[str] | None = None) -> int:
    opts = parse(TuneOptions, argv, prog="jobs/tune.py")
    try:
        result = run_tune(opts)
    except TuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    store = opts.store
    done = sum(t.completed for t in result.trials)
    print(f"trials: {len(result.trials)} ({done} ran all their steps, the rest stopped by ASHA or failed)")
    print(f"best config: {result.best_config}")
    print("best val: " + ", ".join(f"{k}={v:.4f}" for k, v in result.best_metrics.items()))
    print(f"MLflow parent run: {store.mlflow_uri}/#/experiments/{result.experiment_id}/runs/{result.parent_run_id}")
    print(f"stored as the best config of {store.model_name!r}: "
          f"python jobs/add_classes.py --tuned-config best --model-name {store.model_name} ...")
    if result.comparison is not None:
        c = result.comparison
        for name in ("best", "default"):
            s = getattr(c, name)["summary"]
            print(f"{name:7s} on {c.split} (seeds {c.seeds}): HM {s['HM']['mean']:.4f} ± {s['HM']['ci95']:.4f}, "
                  f"HM50 {s['HM50']['mean']:.4f} ± {s['HM50']['ci95']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
