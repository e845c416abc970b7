"""The ablation of the seed methods: baseline / +PGB / +gradient-norm / +distillation /
+refinement / all, at several shot counts and seeds, as mean nAP50 and bAP50 with 95% CIs.

    python jobs/ablation.py --teacher embedded --shots 1,5,10 --seeds 5

Each (shots, seed) draw is one Ray task (one CPU) that fine-tunes every variant from the same
expanded base model on the same support set (fewshot.learning.ablation). The driver shows the
progress, prints the table, and logs it (markdown + CSV + a plot, and one metric per cell) to
an MLflow run in the experiment ``fewshot-ablation``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path



def build_parser() -> argparse.ArgumentParser:
    from catalog import default_root
    from fewshot.learning.ablation import VARIANTS
    from fewshot.learning.freezing import POLICIES
    from fewshot.backends.registry import DEFAULT_MODEL_NAME
    from fewshot.model.devices import PRECISIONS
    from fewshot.learning.parent_distillation import DEFAULT_PARENT_DISTILL

    p = argparse.ArgumentParser(
        description="Ablation of the seed methods on a class split: every variant fine-tunes the "
                    "same base model on the same K-shot draws; prints mean nAP50/bAP50 with 95%% "
                    "confidence intervals over seeds and logs the table to MLflow.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--catalog", default=str(default_root()), help="catalog root ($FEWSHOT_CATALOG)")
    p.add_argument("--dataset", default="synthworld", help="dataset in the catalog")
    p.add_argument("--class-split", default="split1",
                   help="class split whose novel classes are added (its base classes must be the "
                        "base model's)")
    p.add_argument("--mlflow-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLflow tracking server ($MLFLOW_TRACKING_URI); the base model comes from "
                        "its registry unless --checkpoint is given")
    p.add_argument("--model-name", default=DEFAULT_MODEL_NAME, help="registered detector")
    p.add_argument("--base-version", type=int, default=None,
                   help="registered version to start from (default: the newest base_train version)")
    p.add_argument("--checkpoint", default=None, help="a detector.pt to start from instead of the registry")
    p.add_argument("--shots", default="1,5,10", help="comma-separated shot counts K")
    p.add_argument("--seeds", type=int, default=5, help="K-shot draws (seeds 0..N-1) per shot count")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {list(VARIANTS)}")
    p.add_argument("--teacher", default="embedded",
                   help="CLIP teacher spec for distillation and refinement (see jobs/add_classes.py)")
    p.add_argument("--freeze", default="backbone", choices=POLICIES,
                   help="what trains in every variant; balancers and distillation act on the "
                        "shared RoI feature, so the box head must train (backbone or none)")
    p.add_argument("--steps", type=int, default=100, help="fine-tuning steps per variant")
    p.add_argument("--batch-size", type=int, default=8, help="images per step")
    p.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate")
    p.add_argument("--balancer-momentum", type=float, default=0.9, help="balancer smoothing")
    p.add_argument("--distill-beta", type=float, default=1.0, help="distillation weight beta")
    p.add_argument("--pseudo-label-threshold", type=float, default=0.9,
                   help="the *-pseudo variants (and 'pseudo') add the base model's detections of its own "
                        "classes with at least this score to the support images as annotations "
                        "(fewshot.learning.pseudo_labels); chosen on val (see the README's ablation)")
    p.add_argument("--parent-distill", type=float, default=DEFAULT_PARENT_DISTILL,
                   help="the *-parent variants hold the old classes' outputs to the base model's with this "
                        "weight lambda (fewshot.learning.parent_distillation; add_classes' default, chosen on val)")
    p.add_argument("--bias-correction", type=float, default=0.01,
                   help="also score every variant after add_classes' bias correction: the new rows' logit "
                        "offset chosen on the val images as the smallest keeping val bAP50 within this much of "
                        "the base model's (0.01: one point); a negative value turns it off")
    p.add_argument("--test-images", type=int, default=150, help="test images scored per draw")
    p.add_argument("--val-images", type=int, default=100,
                   help="val images the refinement fusion weight is chosen on")
    p.add_argument("--cpus-per-task", type=int, default=1, help="CPUs (torch threads) per draw")
    p.add_argument("--gpu", action="store_true",
                   help="run every draw on a GPU (each task holds --gpus-per-worker GPUs)")
    p.add_argument("--gpus-per-worker", type=float, default=1.0,
                   help="GPUs per draw with --gpu; a fraction (e.g. 0.5) runs several draws on one GPU")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="fp32, bf16 or fp16 (GPU only) autocast; auto: bf16 on a GPU that supports it, "
                        "fp32 on CPU")
    p.add_argument("--ray-address", default=None, help="Ray cluster (default: this machine's, else a new one)")
    p.add_argument("--experiment", default="fewshot-ablation", help="MLflow experiment")
    p.add_argument("--out", default=None, help="also write the markdown table to this file")
    return p


def resolve_parent(args, work: Path):
    from fewshot.backends import registry
    from fewshot.model.checkpoint import load_checkpoint

    if args.checkpoint:
        return load_checkpoint(args.checkpoint), f"file:{Path(args.checkpoint).resolve()}"
    version = args.base_version
    if version is None:
        base = [v for v in registry.list_versions(args.mlflow_uri, args.model_name)
                if v.tags.get("job") == "base_train"]
        if not base:
            raise SystemExit(f"error: {args.model_name!r} has no base_train version; pass --base-version")
        version = max(v.version for v in base)
    path = registry.download_checkpoint(args.mlflow_uri, args.model_name, version, work)
    return load_checkpoint(path), f"models:/{args.model_name}/{version}"


def summarize(rows: list[dict], variants: list[str], shots: list[int], suffix: str = "") -> tuple[str, list[dict]]:
    """The markdown table and its cells (mean and 95% CI of nAP50 and bAP50, in points);
    ``suffix="_corrected"``: the figures after bias correction."""
    from fewshot.metrics.stats import mean_ci95

    cells = []
    lines = ["| variant | " + " | ".join(f"{k}-shot nAP50 | {k}-shot bAP50" for k in shots) + " |",
             "|---|" + "---|---|" * len(shots)]
    for v in variants:
        parts = []
        for k in shots:
            sel = [r for r in rows if r["variant"] == v and r["shots"] == k]
            n = mean_ci95(r["nAP50" + suffix] for r in sel)
            b = mean_ci95(r["bAP50" + suffix] for r in sel)
            cells.append({"variant": v, "shots": k, "nAP50": n, "bAP50": b})
            parts += [n.format(), b.format()]
        lines.append(f"| {v} | " + " | ".join(parts) + " |")
    return "\n".join(lines), cells


def verdicts(rows: list[dict], cells: list[dict], shots: list[int],
             parent_bAP50: float | None = None, suffix: str = "") -> list[str]:
    """The issue's goals, checked per shot count: the full method against 'baseline' as the two
    intervals and as the paired difference over the same draws (same seed, same support set):
    'all' (with refinement) and 'pgb-distill' (its detector unrefined: the detector's own
    learning), and the same with old-class pseudo-labels ('pseudo' alone, 'pgb-distill-pseudo',
    'all-pseudo') and with parent distillation ('parent', 'pseudo-parent', 'pgb-distill-pseudo-parent');
    with ``parent_bAP50``, each variant's bAP50 against the parent's. ``suffix``: as in :func:`summarize`."""
    from fewshot.metrics.stats import mean_ci95

    out = []
    get = {(c["variant"], c["shots"]): c for c in cells}
    by = {(r["variant"], r["shots"], r["seed"]): r for r in rows}
    for k in shots:
        for full in ("all", "pgb-distill", "pseudo", "pgb-distill-pseudo", "all-pseudo", "parent",
                     "pseudo-parent", "pgb-distill-pseudo-parent"):
            a, b = get.get((full, k)), get.get(("baseline", k))
            if a is None or b is None:
                continue
            seeds = sorted({s for (v, kk, s) in by if v == full and kk == k and ("baseline", k, s) in by})
            paired = {m: mean_ci95(by[(full, k, s)][m + suffix] - by[("baseline", k, s)][m + suffix]
                                   for s in seeds)
                      for m in ("nAP50", "bAP50")}
            sep = "non-overlapping" if not a["nAP50"].overlaps(b["nAP50"]) else "overlapping"
            out.append(f"{k}-shot: {full} - baseline = {paired['nAP50'].format()} nAP50 (paired over "
                       f"{len(seeds)} draws; the two intervals are {sep}), {paired['bAP50'].format()} bAP50")
        if parent_bAP50 is not None:
            drops = ", ".join(f"{c['variant']} {100 * (c['bAP50'].mean - parent_bAP50):+.1f}"
                              for c in cells if c["shots"] == k)
            out.append(f"{k}-shot: bAP50 - parent's ({100 * parent_bAP50:.1f}) in points: {drops}")
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import mlflow
    import ray
    from catalog.progress import progress_bar

    from catalog import Catalog
    from fewshot.backends import tracking
    from fewshot.backends.cluster import ensure_ray
    from fewshot.learning.ablation import UnitSpec, check_variants, run_unit
    from fewshot.metrics.plots import ablation_figure
    from fewshot.learning.loop import TrainConfig

    shots = [int(k) for k in args.shots.split(",") if k.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    try:
        check_variants(variants, args.teacher)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not 0.0 < args.pseudo_label_threshold <= 1.0:
        print(f"error: --pseudo-label-threshold must be in (0, 1], got {args.pseudo_label_threshold}",
              file=sys.stderr)
        return 2
    if args.gpu and not args.gpus_per_worker > 0:
        print(f"error: --gpus-per-worker must be > 0, got {args.gpus_per_worker}", file=sys.stderr)
        return 2
    if args.precision == "fp16" and not args.gpu:
        print("error: --precision fp16 needs --gpu (use bf16 or fp32 on CPU)", file=sys.stderr)
        return 2
    gpus = float(args.gpus_per_worker) if args.gpu else 0.0
    if not args.mlflow_uri:
        print("error: no MLflow server: pass --mlflow-uri or set MLFLOW_TRACKING_URI", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="fewshot-ablation-"))
    parent, parent_ref = resolve_parent(args, work)
    split = Catalog(args.catalog).manifest(args.dataset).class_split(args.class_split)
    if sorted(parent.classes) != sorted(split.base):
        print(f"error: the base model's classes {parent.classes} are not the base classes of "
              f"{args.class_split} {list(split.base)}", file=sys.stderr)
        return 2
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      warmup_steps=20, log_every=max(1, args.steps))

    from fewshot.learning.episode import score
    from fewshot.metrics.coco_eval import load_eval_split

    print(f"scoring the parent on {args.test_images} test images ...", flush=True)
    parent_bAP50 = score(parent, load_eval_split(Catalog(args.catalog), args.dataset, "test", parent.classes,
                                                 (), args.test_images), device="cpu").bAP50
    print(f"parent bAP50 {100 * parent_bAP50:.1f}", flush=True)

    ensure_ray(args.ray_address)
    parent_ref_obj = ray.put(parent)

    @ray.remote(num_cpus=args.cpus_per_task, num_gpus=gpus)
    def unit(spec: UnitSpec, parent_ckpt) -> list[dict]:
        import torch

        torch.set_num_threads(args.cpus_per_task)
        return run_unit(spec, parent_ckpt)

    specs = [UnitSpec(catalog_root=args.catalog, dataset=args.dataset, new_classes=tuple(split.novel),
                      shots=k, seed=s, variants=tuple(variants), train=cfg, freeze=args.freeze,
                      balancer_momentum=args.balancer_momentum, distill_beta=args.distill_beta,
                      teacher_spec=args.teacher, pseudo_label_threshold=args.pseudo_label_threshold,
                      parent_distill=args.parent_distill,
                      bias_correction=args.bias_correction if args.bias_correction >= 0 else None,
                      test_images=args.test_images,
                      val_images=args.val_images, gpus=gpus, precision=args.precision)
             for k in shots for s in range(args.seeds)]
    started = time.time()
    pending = {unit.remote(spec, parent_ref_obj): spec for spec in specs}
    rows: list[dict] = []
    with progress_bar(len(specs), "ablation draws", "draw") as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            spec = pending.pop(done[0])
            got = ray.get(done[0])
            rows += got
            bar.update(1)
            bar.write(f"{spec.shots}-shot seed {spec.seed}: " + ", ".join(
                f"{r['variant']} n{r['nAP50'] * 100:.1f}/b{r['bAP50'] * 100:.1f}" for r in got))
    elapsed = time.time() - started

    table, cells = summarize(rows, variants, shots)
    notes = verdicts(rows, cells, shots, parent_bAP50)
    if args.bias_correction >= 0:
        corrected, corrected_cells = summarize(rows, variants, shots, "_corrected")
        met = sum(bool(r["rule_met"]) for r in rows)
        table += (f"\n\nafter bias correction (offset chosen on {args.val_images} val images: the smallest "
                  f"keeping val bAP50 within {100 * args.bias_correction:g} point(s) of the base model's; "
                  f"met in {met} of {len(rows)} rows):\n\n" + corrected)
        notes += [f"corrected: {n}" for n in verdicts(rows, corrected_cells, shots, parent_bAP50, "_corrected")]
        auto, auto_cells = summarize(rows, variants, shots, "_auto")
        chose = sum(r["scoring_auto"] == "per-increment" for r in rows)
        table += (f"\n\nas add_classes serves it by default (--scoring auto: joint or per-increment scoring, each "
                  f"with its own offset, chosen on the same val images; per-increment in {chose} of {len(rows)} rows):"
                  "\n\n" + auto)
        notes += [f"auto: {n}" for n in verdicts(rows, auto_cells, shots, parent_bAP50, "_auto")]
    grouped, grouped_cells = summarize(rows, variants, shots, "_per_increment")
    table += ("\n\nthe same detectors with per-increment scoring (add_classes --scoring per-increment: each class scored "
              "against the classes that existed when it was added), no offset:\n\n" + grouped)
    notes += [f"per-increment: {n}" for n in verdicts(rows, grouped_cells, shots, parent_bAP50, "_per_increment")]
    print("\nmean nAP50 / bAP50 in points, ± the 95% confidence interval over "
          f"{args.seeds} seeds ({args.test_images} test images each):\n")
    print(table)
    for n in notes:
        print(n)
    print(f"\n{len(specs)} draws in {elapsed / 60:.1f} min")

    with tracking.start_run(args.mlflow_uri, args.experiment, f"ablation-{args.class_split}",
                            tags={"job": "ablation", "base_model": parent_ref}):
        tracking.log_params({"class_split": args.class_split, "shots": shots, "seeds": args.seeds,
                             "variants": variants, "teacher": args.teacher, "freeze": args.freeze,
                             "distill_beta": args.distill_beta,
                             "pseudo_label_threshold": args.pseudo_label_threshold, "test_images": args.test_images,
                             "parent_distill": args.parent_distill, "bias_correction": args.bias_correction,
                             "val_images": args.val_images, "base_model": parent_ref,
                             "parent_test_bAP50": round(parent_bAP50, 4),
                             "gpus_per_task": gpus, "precision": args.precision,
                             **cfg.to_dict()})
        for c in cells:
            for metric in ("nAP50", "bAP50"):
                mlflow.log_metric(f"{metric}_{c['variant']}_{c['shots']}shot", c[metric].mean)
                if c[metric].n > 1:
                    mlflow.log_metric(f"{metric}_{c['variant']}_{c['shots']}shot_ci95", c[metric].half_width)
        mlflow.log_text(table + "\n\n" + "\n".join(notes) + "\n", "ablation.md")
        mlflow.log_table({k: [r[k] for r in rows] for k in rows[0]}, "ablation_runs.json")
        fig = ablation_figure(cells, variants, shots)
        mlflow.log_figure(fig, "ablation.png")
    if args.out:
        Path(args.out).write_text(table + "\n\n" + "\n".join(notes) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
