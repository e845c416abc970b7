"""Re-derive add_classes' fine-tuning defaults on the val split (never test).

Each candidate (freeze policy, learning rate) fine-tunes the same base model on the same K-shot
draws (seeds 0..N-1) in this process as add_classes did when it was written (imprinted rows,
replay exemplars, 150 steps; without the old-class pseudo-labels, parent distillation and bias
correction add_classes applies since, so the freeze default is now chosen from the increment
chains' val figures: ``three_increments.py --val-log``), and is scored on the first
``--val-images`` images of the val split.
Prints mean val HM50 / nAP50 / bAP50 with 95% t-intervals and the paired difference to the
first candidate; the candidate with the best mean val HM50 is the one to make the default.

    python benchmarks/add_classes_defaults_on_val.py --mlflow-uri http://127.0.0.1:5000 \\
        --catalog .state/catalog --model-name fewshot-detector --version 1 --seeds 3
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from catalog import Catalog
from fewshot.backends import registry
from fewshot.learning.episode import expand_parent, fine_tune_episode, sample_episode, score
from fewshot.learning.loop import TrainConfig
from fewshot.learning.method import MethodConfig
from fewshot.metrics.coco_eval import load_eval_split
from fewshot.metrics.stats import mean_ci95
from fewshot.model.checkpoint import load_checkpoint
from fewshot.workflows.add_classes import AddClassesOptions


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mlflow-uri", required=True, help="MLflow server holding the base model")
    p.add_argument("--catalog", required=True, help="catalog root")
    p.add_argument("--model-name", default="fewshot-detector", help="registered model")
    p.add_argument("--version", type=int, default=1, help="the base version to add classes to")
    p.add_argument("--class-split", default="split1", help="whose novel classes are added")
    p.add_argument("--shots", type=int, default=10, help="K (the demo's)")
    p.add_argument("--seeds", type=int, default=3, help="K-shot draws (seeds 0..N-1)")
    p.add_argument("--val-images", type=int, default=150, help="val images scored")
    p.add_argument("--candidates", default="head:5e-4,backbone:5e-4,backbone:1e-4",
                   help="comma-separated freeze:lr pairs; the first is the reference")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    return p


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    catalog = Catalog(args.catalog)
    with tempfile.TemporaryDirectory() as tmp:
        parent = load_checkpoint(registry.download_checkpoint(args.mlflow_uri, args.model_name, args.version, tmp))
    novel = list(catalog.manifest(parent.dataset).class_split(args.class_split).novel)
    val = load_eval_split(catalog, parent.dataset, "val", list(parent.classes), novel, max_images=args.val_images)
    base_train = AddClassesOptions().train
    candidates = [(c.split(":")[0], float(c.split(":")[1])) for c in args.candidates.split(",")]
    rows = {}
    for seed in range(args.seeds):
        ep = sample_episode(catalog, parent, novel, args.shots, seed)
        start = expand_parent(ep)
        for freeze, lr in candidates:
            t0 = time.time()
            cfg = TrainConfig(**{**base_train.to_dict(), "lr": lr})
            child = fine_tune_episode(ep, cfg, MethodConfig(freeze=freeze), start=start)
            r = score(child, val)
            rows[(freeze, lr, seed)] = r
            print(f"seed {seed} freeze={freeze} lr={lr:g}: val HM50={r.HM50:.4f} nAP50={r.nAP50:.4f} "
                  f"bAP50={r.bAP50:.4f} ({time.time() - t0:.0f}s)", flush=True)
    ref = candidates[0]
    print(f"\nbase v{args.version}, {len(novel)} new classes at {args.shots} shots, {len(val.rows)} val images, "
          f"seeds 0..{args.seeds - 1}; mean ± 95% CI; Δ = paired difference to {ref[0]}:{ref[1]:g}\n")
    print("| freeze | lr | val HM50 | val nAP50 | val bAP50 | Δ HM50 |")
    print("|---|---|---|---|---|---|")
    for freeze, lr in candidates:
        seeds = range(args.seeds)
        ci = {k: mean_ci95(getattr(rows[(freeze, lr, s)], k) for s in seeds) for k in ("HM50", "nAP50", "bAP50")}
        delta = mean_ci95(rows[(freeze, lr, s)].HM50 - rows[(*ref, s)].HM50 for s in seeds)
        print(f"| {freeze} | {lr:g} | {ci['HM50'].format()} | {ci['nAP50'].format()} | {ci['bAP50'].format()} | "
              f"{delta.format()} |")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
