"""Train the base detector on a Ray cluster and register it as the champion version.

    ray job submit --working-dir . -- python jobs/base_train.py --dataset synthworld
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# The library lives in platform/ (fewshot) and at the repo root (catalog, serving).
for _p in (Path(__file__).resolve().parents[1], Path(__file__).resolve().parents[1] / "platform"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))


def build_parser() -> argparse.ArgumentParser:
    from catalog import default_root
    from fewshot.cli import add_method_flags
    from fewshot.config import PRESETS
    from fewshot.registry import DEFAULT_MODEL_NAME

    p = argparse.ArgumentParser(
        description="Train the base detector with Ray Train (DDP), evaluate it with pycocotools "
                    "on the test split, log to MLflow and register it as version N with alias "
                    "'champion'.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--catalog", default=str(default_root()),
                   help="catalog root folder (datasets and class sets; $FEWSHOT_CATALOG)")
    p.add_argument("--dataset", default="synthworld", help="dataset name in the catalog")
    p.add_argument("--class-split", default="split1",
                   help="the dataset's base/novel split whose base classes to train on")
    p.add_argument("--classes", default="",
                   help="comma-separated base classes (overrides --class-split; for imported datasets)")
    p.add_argument("--preset", default="cpu-small", choices=sorted(PRESETS),
                   help="detector preset: cpu-small trains on CPU in minutes, r50-fpn is for GPUs")
    p.add_argument("--steps", type=int, default=700, help="training steps (per worker)")
    p.add_argument("--batch-size", type=int, default=8, help="images per step per worker")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"], help="optimizer")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=50, help="linear warm-up steps")
    p.add_argument("--num-workers", type=int, default=2, help="Ray Train workers (DDP processes)")
    p.add_argument("--cpus-per-worker", type=int, default=1, help="CPUs (torch threads) per worker")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (on a GPU cluster)")
    add_method_flags(p)
    p.add_argument("--checkpoint-every", type=int, default=200,
                   help="report a Ray Train checkpoint every N steps (0: only at the end)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--eval-split", default=None, choices=["test", "val"],
                   help="split to evaluate on (default: test if the dataset has one, else val)")
    p.add_argument("--max-eval-images", type=int, default=None,
                   help="evaluate on at most this many test images (default: all)")
    p.add_argument("--model-name", default=DEFAULT_MODEL_NAME, help="registered model name")
    p.add_argument("--experiment", default="fewshot-base", help="MLflow experiment")
    p.add_argument("--mlflow-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLflow tracking server ($MLFLOW_TRACKING_URI)")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster address (default: the job's cluster, else the one running "
                        "on this machine, else a new local one)")
    p.add_argument("--storage-path", default=None,
                   help="Ray Train storage for checkpoints (shared storage on a multi-node cluster)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fewshot.base_training import BaseTrainOptions, run_base_training
    from fewshot.cli import method_kwargs
    from fewshot.training import TrainConfig

    if not args.mlflow_uri:
        print("error: no MLflow server: pass --mlflow-uri or set MLFLOW_TRACKING_URI", file=sys.stderr)
        return 2
    opts = BaseTrainOptions(
        catalog_root=args.catalog, dataset=args.dataset, mlflow_uri=args.mlflow_uri,
        base_classes=[c.strip() for c in args.classes.split(",") if c.strip()],
        class_split=args.class_split, preset=args.preset,
        train=TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                          warmup_steps=args.warmup_steps),
        num_workers=args.num_workers, cpus_per_worker=args.cpus_per_worker, use_gpu=args.gpu,
        seed=args.seed, model_name=args.model_name, experiment=args.experiment,
        max_eval_images=args.max_eval_images, eval_split=args.eval_split, **method_kwargs(args),
        checkpoint_every=args.checkpoint_every, ray_address=args.ray_address,
        storage_path=args.storage_path,
    )
    try:
        version = run_base_training(opts)
    except (KeyError, ValueError) as err:
        print(f"error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    print(f"done: models:/{version.name}/{version.version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
