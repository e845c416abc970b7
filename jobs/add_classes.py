"""Teach the champion detector new classes from K labelled examples each.

    ray job submit --working-dir . -- python jobs/add_classes.py --classes star5,heart --shots 5

Validates first (unknown class, class already served, too few instances: a clear error, exit
code 2, registry untouched); then expands, fine-tunes on Ray Train, evaluates, registers
version N+1 and moves 'champion' only when the base classes held up.
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
    from fewshot.freezing import POLICIES
    from fewshot.registry import DEFAULT_MODEL_NAME

    p = argparse.ArgumentParser(
        description="Add classes to the served detector from K shots each: expand the champion's "
                    "classifier, fine-tune with Ray Train, evaluate (pycocotools bAP/nAP), register "
                    "version N+1 and promote it to 'champion' if base AP50 held up.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--classes", required=True, help="comma-separated class names from the catalog")
    p.add_argument("--shots", type=int, default=5, help="K: annotated instances per new class")
    p.add_argument("--seed", type=int, default=0, help="seed of the K-shot sample and of training")
    p.add_argument("--catalog", default=str(default_root()),
                   help="catalog root folder ($FEWSHOT_CATALOG)")
    p.add_argument("--dataset", default=None, help="dataset (default: the champion's dataset)")
    p.add_argument("--steps", type=int, default=150, help="fine-tuning steps")
    p.add_argument("--batch-size", type=int, default=8, help="images per step")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"], help="optimizer")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    p.add_argument("--freeze", default="head", choices=POLICIES,
                   help="what trains: head = only the new classifier rows (old classes untouched), "
                        "backbone = box head and regressor too (backbone and RPN frozen), none = all")
    p.add_argument("--no-replay", action="store_true",
                   help="fine-tune on the novel shots only (no replay exemplars of old classes)")
    p.add_argument("--max-base-drop", type=float, default=0.05,
                   help="promote to champion only if base AP50 drops by at most this much")
    add_method_flags(p)
    p.add_argument("--config", default=None,
                   help="'best': use the configuration jobs/tune.py stored for --model-name "
                        "(balancer, momentum, beta, lr, steps override the flags); or a JSON file "
                        "with those keys. The version records which configuration it came from")
    p.add_argument("--num-workers", type=int, default=1, help="Ray Train workers")
    p.add_argument("--cpus-per-worker", type=int, default=2, help="CPUs (torch threads) per worker")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--eval-split", default=None, choices=["test", "val"],
                   help="split to evaluate on (default: test if the dataset has one, else val)")
    p.add_argument("--max-eval-images", type=int, default=None,
                   help="evaluate on at most this many test images (default: all)")
    p.add_argument("--model-name", default=DEFAULT_MODEL_NAME, help="registered model name")
    p.add_argument("--experiment", default="fewshot-add-classes", help="MLflow experiment")
    p.add_argument("--mlflow-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLflow tracking server ($MLFLOW_TRACKING_URI)")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster address (default: the job's cluster, else the one running "
                        "on this machine, else a new local one)")
    p.add_argument("--storage-path", default=None, help="Ray Train storage for checkpoints")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fewshot.add_classes import AddClassesError, AddClassesOptions, run_add_classes
    from fewshot.cli import method_kwargs
    from fewshot.training import TrainConfig

    if not args.mlflow_uri:
        print("error: no MLflow server: pass --mlflow-uri or set MLFLOW_TRACKING_URI", file=sys.stderr)
        return 2
    opts = AddClassesOptions(
        catalog_root=args.catalog, mlflow_uri=args.mlflow_uri,
        classes=[c.strip() for c in args.classes.split(",") if c.strip()],
        shots=args.shots, seed=args.seed, dataset=args.dataset,
        train=TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                          warmup_steps=min(20, args.steps // 5), log_every=10),
        freeze=args.freeze, replay=not args.no_replay, max_base_drop=args.max_base_drop,
        num_workers=args.num_workers, cpus_per_worker=args.cpus_per_worker, use_gpu=args.gpu,
        model_name=args.model_name, experiment=args.experiment,
        max_eval_images=args.max_eval_images, eval_split=args.eval_split, config=args.config,
        **method_kwargs(args),
        ray_address=args.ray_address, storage_path=args.storage_path,
    )
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
