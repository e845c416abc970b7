"""Choose add_classes' --pseudo-labels threshold on val, and see what the missing annotations cost.

One K-shot draw of split1's novel classes is fine-tuned from the same expanded parent (the
ablation's regime: ``--freeze backbone``, 100 AdamW steps at lr 1e-4, batch 8) on its support
rows

* as sampled (``off``: every old-class object the sampler did not keep is background),
* with the parent's old-class pseudo-labels at each ``--thresholds`` value
  (:mod:`fewshot.learning.pseudo_labels`), and
* with ``--oracle``: with the old-class annotations the sampler dropped put back from the ground
  truth (a diagnostic only a labelled dataset allows),

and each child is scored on the first ``--images`` images of ``--split`` (val to choose; the
README's choice used draws 10 and 11 on val). Per threshold it also prints how good the labels
are against the support images' full ground truth: how many were added, how many name a real
object with its class (IoU >= 0.5), and the share of the missing old-class annotations they
give back. One JSON line per row::

    python benchmarks/pseudo_label_threshold.py --checkpoint base/dihedral.pt --seed 10 --split val
    python benchmarks/pseudo_label_threshold.py --checkpoint base/dihedral.pt --seed 11 --split val

Torch only: no Ray, no MLflow.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _draw_args import episode_parser  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = episode_parser(__doc__)
    p.add_argument("--class-split", default="split1", help="whose novel classes are added")
    p.add_argument("--shots", type=int, default=5, help="K")
    p.add_argument("--seed", type=int, default=10, help="the K-shot draw (the ablation uses 0-9)")
    p.add_argument("--thresholds", default="0.5,0.7,0.9", help="comma-separated score thresholds")
    p.add_argument("--oracle", action="store_true", help="also train with the dropped annotations restored")
    p.add_argument("--split", default="val", choices=["val", "test"], help="where the children are scored")
    p.add_argument("--images", type=int, default=150, help="images of --split scored")
    p.add_argument("--freeze", default="backbone", help="what trains (the ablation's default)")
    p.add_argument("--steps", type=int, default=100, help="fine-tuning steps")
    p.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    return p


def _same_box(box, boxes, iou: float = 0.99) -> bool:
    import torch
    from torchvision.ops import box_iou

    have = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return bool(len(have)) and float(box_iou(torch.tensor([box], dtype=torch.float32), have).max()) > iou


def restore_dropped(rows, full, keep_ids):
    """``rows`` with the annotations of ``keep_ids`` the sampler dropped put back (oracle)."""
    out = []
    for r in rows:
        boxes, cats = list(r["boxes"]), list(r["category_ids"])
        f = full[r["image_id"]]
        for b, c, crowd in zip(f["boxes"], f["category_ids"], f["iscrowd"]):
            if not crowd and c in keep_ids and not _same_box(b, r["boxes"]):
                boxes.append(b)
                cats.append(c)
        out.append({**r, "boxes": boxes, "category_ids": cats, "iscrowd": [False] * len(cats)})
    return out


def label_quality(plain, labelled, full, old_ids) -> dict:
    """Added labels against the full ground truth of the support images."""
    import torch
    from torchvision.ops import box_iou

    added = right = 0
    missing = 0
    for r0, r in zip(plain, labelled):
        f = full[r["image_id"]]
        missing += sum(c in old_ids for c in f["category_ids"]) - sum(c in old_ids for c in r0["category_ids"])
        gt = torch.tensor(f["boxes"], dtype=torch.float32).reshape(-1, 4)
        n = len(r0["boxes"])
        for b, c in zip(r["boxes"][n:], r["category_ids"][n:]):
            added += 1
            if len(gt):
                iou = box_iou(torch.tensor([b], dtype=torch.float32), gt)[0]
                j = int(iou.argmax())
                right += int(float(iou[j]) >= 0.5 and f["category_ids"][j] == c)
    return {"added": added, "correct": right, "precision": round(right / max(added, 1), 3),
            "missing_old": missing, "recall_of_missing": round(right / max(missing, 1), 3)}


def main(args: argparse.Namespace) -> None:
    import torch

    from catalog import Catalog
    from fewshot.learning.episode import expand_parent, fine_tune_episode, pseudo_label_episode, sample_episode, score
    from fewshot.learning.loop import TrainConfig
    from fewshot.learning.method import MethodConfig
    from fewshot.metrics.coco_eval import load_eval_split
    from fewshot.metrics.coco_eval import harmonic_mean
    from fewshot.model.checkpoint import load_checkpoint

    torch.set_num_threads(args.threads)
    catalog = Catalog(args.catalog)
    parent = load_checkpoint(args.checkpoint)
    novel = list(catalog.manifest(parent.dataset).class_split(args.class_split).novel)
    ep = sample_episode(catalog, parent, novel, args.shots, args.seed)
    full = {r["image_id"]: r for r in catalog.read_split(ep.dataset, "train")
            .select(["image_id", "boxes", "category_ids", "iscrowd"]).to_pylist()}
    old_ids = set(parent.category_ids)
    split = load_eval_split(catalog, ep.dataset, args.split, list(parent.classes), novel, args.images)
    parent_b = score(load_checkpoint(args.checkpoint), load_eval_split(
        catalog, ep.dataset, args.split, list(parent.classes), (), args.images), device="cpu").bAP50
    print(json.dumps({"shots": args.shots, "seed": args.seed, "split": args.split, "images": len(split.rows),
                      "support_images": len(ep.rows), "annotations": sum(len(r["boxes"]) for r in ep.rows),
                      "objects": sum(len(full[r["image_id"]]["boxes"]) for r in ep.rows),
                      "parent_bAP50": round(100 * parent_b, 2)}), flush=True)
    cfg = TrainConfig(steps=args.steps, batch_size=8, lr=args.lr, warmup_steps=min(20, args.steps),
                      log_every=args.steps)
    method = MethodConfig(freeze=args.freeze)
    start = expand_parent(ep, device="cpu")   # imprinted from the sampled boxes, as add_classes
    settings = [("off", None)] + [(f"{float(t):g}", float(t)) for t in args.thresholds.split(",") if t.strip()]
    if args.oracle:
        settings.append(("oracle", None))
    for name, threshold in settings:
        t0 = time.perf_counter()
        extra = {}
        train_ep = ep
        if threshold is not None:
            train_ep, _ = pseudo_label_episode(ep, threshold, device="cpu")
            extra = label_quality(ep.rows, train_ep.rows, full, old_ids)
        elif name == "oracle":
            rows = restore_dropped(ep.rows, full, old_ids)
            train_ep = replace(ep, novel_rows=rows[:len(ep.novel_rows)], replay_rows=rows[len(ep.novel_rows):])
        child = fine_tune_episode(train_ep, cfg, method, start=start, device="cpu")
        rep = score(child, split, device="cpu")
        print(json.dumps({"pseudo_labels": name, "shots": args.shots, "seed": args.seed, "split": args.split,
                          "bAP50": round(100 * rep.bAP50, 2), "nAP50": round(100 * rep.nAP50, 2),
                          "HM50": round(100 * harmonic_mean(rep.bAP50, rep.nAP50), 2), **extra,
                          "seconds": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
