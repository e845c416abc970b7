"""Search the few-shot fine-tuning hyperparameters of add_classes with Ray Tune.

    ray job submit --working-dir . -- python jobs/tune.py --shots 5 --num-samples 16 \
        --max-concurrent 4 --compare-seeds 5

Each trial fine-tunes the champion on the same K-shot support draw with one sampled
configuration (balancer and its smoothing, distillation beta, learning rate, steps) and reports
its validation HM every --eval-every steps; ASHA stops the laggards. MLflow gets a parent run
(experiment fewshot-tune) with one nested run per trial; the best configuration is stored so
that `jobs/add_classes.py --config best` uses it.
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


# Kept here so that --help does not import Ray Tune; tests/test_tune.py checks they match
# fewshot.tuning's.
EXPERIMENT = "fewshot-tune"
METRICS = ("HM50", "HM")


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    from catalog import default_root
    from fewshot.freezing import POLICIES
    from fewshot.registry import DEFAULT_MODEL_NAME

    p = argparse.ArgumentParser(
        description="Ray Tune over add_classes fine-tuning: balancer (fixed / pgb / gradnorm) and its "
                    "smoothing momentum, CLIP distillation weight beta (0 included), learning rate "
                    "(log-uniform) and number of steps, scheduled by ASHA on the validation harmonic "
                    "mean of bAP and nAP (the test split is never used while searching). One MLflow "
                    "parent run, one nested run per trial; the best configuration is stored on the "
                    "registered model for `jobs/add_classes.py --config best`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("what to tune for")
    g.add_argument("--catalog", default=str(default_root()), help="catalog root folder ($FEWSHOT_CATALOG)")
    g.add_argument("--dataset", default=None, help="dataset; None: the champion's 'dataset' tag")
    g.add_argument("--model-name", default=DEFAULT_MODEL_NAME,
                   help="registered model whose 'champion' is fine-tuned; the best config is stored on it")
    g.add_argument("--classes", default=None,
                   help="comma-separated classes to add in every trial; None: the novel classes of "
                        "--class-split")
    g.add_argument("--class-split", default="split1",
                   help="class split of the dataset whose novel classes are added when --classes is not given")
    g.add_argument("--shots", type=_positive(int), default=5, help="K: annotated instances per new class")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the K-shot support draw, of training and of the random search; all "
                        "trials share the draw so they differ only in their hyperparameters")
    g.add_argument("--freeze", default="backbone", choices=POLICIES,
                   help="what trains in every trial. Default backbone (box head, classifier and "
                        "regressor train; backbone and RPN frozen): with add_classes' own default 'head' "
                        "only the new classifier rows train, so the balancer (it scales gradients into "
                        "the shared RoI feature) and distillation (it pulls on that feature) would change "
                        "nothing and the search would only tune lr and steps")
    g.add_argument("--batch-size", type=_positive(int), default=8, help="images per fine-tuning step")
    g.add_argument("--teacher", default="embedded",
                   help="CLIP teacher spec for the trials with distillation beta > 0 (see "
                        "fewshot.teacher: 'embedded', 'embedded:PATH', 'ViT-B-32:TAG', 'NAME@FILE', ...); "
                        "'none' tunes without distillation (beta fixed at 0)")
    g.add_argument("--base", action="store_true",
                   help="tune base training instead of add_classes fine-tuning: NOT SUPPORTED YET "
                        "(exits with an error); only add_classes fine-tuning is searched")

    g = p.add_argument_group("the search")
    g.add_argument("--num-samples", type=_positive(int), default=8, help="configurations (trials) to try")
    g.add_argument("--max-concurrent", type=_positive(int), default=1,
                   help="trials running at the same time (each also needs --cpus-per-trial free CPUs)")
    g.add_argument("--cpus-per-trial", type=_positive(int), default=2,
                   help="CPUs one trial reserves on the cluster (and torch threads it uses); one worker "
                        "per trial. Trials run on CPU (the fine-tuning loop has no GPU path yet)")
    g.add_argument("--max-steps", type=_positive(int), default=150,
                   help="longest fine-tune; the steps dimension samples ~1/4, 1/2, 3/4 and all of it "
                        "(multiples of --eval-every). ASHA's max_t")
    g.add_argument("--eval-every", type=_positive(int), default=25,
                   help="score on the val split and report to Tune every this many steps (ASHA's rungs "
                        "and the MLflow val curves are at these steps)")
    g.add_argument("--grace-period", type=_positive(int), default=None,
                   help="ASHA: steps every trial runs before it can be stopped; None: 2 x --eval-every")
    g.add_argument("--reduction-factor", type=float, default=2.0,
                   help="ASHA: keep the top 1/this of trials at each rung")
    g.add_argument("--metric", default="HM50", choices=METRICS,
                   help="validation figure ASHA maximizes and the best trial is chosen by: HM50 = harmonic "
                        "mean of bAP50 and nAP50 (default: with few shots and a small val set nAP at "
                        "IoU .5:.95 stays 0 for many steps, so HM ties across trials); HM = harmonic mean "
                        "of bAP and nAP (COCO AP@[.5:.95]). Both are always logged")
    g.add_argument("--val-images", type=_positive(int), default=50,
                   help="score trials on the first this many images of the val split")

    g = p.add_argument_group("after the search")
    g.add_argument("--compare-seeds", type=int, default=0,
                   help="N > 0: fine-tune with the best config and with add_classes' defaults (freeze "
                        "head, no balancer, beta 0, lr 5e-4, 150 steps) on N fresh support draws (seeds "
                        "--seed+1 .. --seed+N) each, score on the TEST split, print mean HM/HM50 with a "
                        "95%% t-interval and log them to the parent run")
    g.add_argument("--test-images", type=_positive(int), default=None,
                   help="score the comparison on at most this many test images; None: all")

    g = p.add_argument_group("services")
    g.add_argument("--mlflow-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLflow tracking server ($MLFLOW_TRACKING_URI)")
    g.add_argument("--experiment", default=EXPERIMENT, help="MLflow experiment of the parent run")
    g.add_argument("--ray-address", default=None,
                   help="Ray cluster address; None: the job's cluster, else the one running on this "
                        "machine, else a new local one")
    g.add_argument("--storage-path", default=None,
                   help="Ray Tune storage for trial results; None: ~/ray_results (give a shared path or "
                        "bucket on a multi-node cluster)")
    g.add_argument("--quiet", action="store_true",
                   help="no Ray Tune status table; only this job's one line per trial report")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.base:
        print("error: --base (tuning base training) is not supported yet; tune add_classes fine-tuning "
              "(drop --base)", file=sys.stderr)
        return 2
    if not args.mlflow_uri:
        print("error: no MLflow server: pass --mlflow-uri or set MLFLOW_TRACKING_URI", file=sys.stderr)
        return 2
    from fewshot.tuning import TuneError, TuneOptions, run_tune

    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    opts = TuneOptions(
        catalog_root=args.catalog, mlflow_uri=args.mlflow_uri, model_name=args.model_name,
        dataset=args.dataset, classes=classes, class_split=args.class_split, shots=args.shots,
        seed=args.seed, num_samples=args.num_samples, max_concurrent=args.max_concurrent,
        cpus_per_trial=args.cpus_per_trial, max_steps=args.max_steps, eval_every=args.eval_every,
        grace_period=args.grace_period, reduction_factor=args.reduction_factor,
        val_images=args.val_images, batch_size=args.batch_size, freeze=args.freeze,
        teacher=None if args.teacher.lower() == "none" else args.teacher, metric=args.metric,
        experiment=args.experiment, ray_address=args.ray_address, storage_path=args.storage_path,
        compare_seeds=args.compare_seeds, test_images=args.test_images, verbose=0 if args.quiet else 1)
    try:
        result = run_tune(opts)
    except TuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    done = sum(t.completed for t in result.trials)
    print(f"trials: {len(result.trials)} ({done} ran all their steps, the rest stopped by ASHA or failed)")
    print(f"best config: {result.best_config}")
    print("best val: " + ", ".join(f"{k}={v:.4f}" for k, v in result.best_metrics.items()))
    print(f"MLflow parent run: {args.mlflow_uri}/#/experiments/{result.experiment_id}/runs/{result.parent_run_id}")
    print(f"stored as the best config of {args.model_name!r}: "
          f"python jobs/add_classes.py --config best --model-name {args.model_name} ...")
    if result.comparison is not None:
        c = result.comparison
        for name in ("best", "default"):
            s = getattr(c, name)["summary"]
            print(f"{name:7s} on {c.split} (seeds {c.seeds}): HM {s['HM']['mean']:.4f} ± {s['HM']['ci95']:.4f}, "
                  f"HM50 {s['HM50']['mean']:.4f} ± {s['HM50']['ci95']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
