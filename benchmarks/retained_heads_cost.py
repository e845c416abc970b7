"""What retained heads cost at inference: the same child with 0, 1, 2 and 3 retained heads.

``add_classes --retain-heads`` (the default) keeps a frozen copy of the parent's RoI head per
increment (:mod:`fewshot.model.retained_heads`); under per-increment scoring each one runs on
every proposal. This times the detector's forward on real val images of the embedded world,
side by side in one process: per-increment scoring with 0 (the live head alone), 1, 2 and 3
retained heads (a chain of expansions of the ``--checkpoint``, each keeping one more head), and
joint scoring (which never runs them). Each figure is the median over ``--repeats`` passes over
the same images after one warm-up pass; it also prints the parameters and checkpoint bytes the
heads add::

    python benchmarks/retained_heads_cost.py --checkpoint base/dihedral.pt --images 32 --threads 1

Torch only (no Ray, no MLflow); about a minute.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "platform"), str(ROOT)]

INCREMENTS = (["triangle", "star4"], ["crescent", "lshape"], ["gear"])   # split1's novel classes


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="the base detector (e.g. base_detector_budget.py --save)")
    p.add_argument("--catalog", default=os.path.join(tempfile.gettempdir(), "fewshot-quality-catalog"),
                   help="catalog holding the embedded world (dataset synthworld)")
    p.add_argument("--images", type=int, default=32, help="val images per pass")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward (1: as a request at a time)")
    p.add_argument("--repeats", type=int, default=5, help="timed passes; the median is reported")
    p.add_argument("--threads", type=int, default=1, help="torch threads (a 1-CPU replica runs 1)")
    return p


def chain(checkpoint, catalog):
    """The base, then one expansion per increment, each keeping the previous head (5 shots, seed 0,
    untrained new rows: the cost does not depend on what the heads learnt)."""
    from fewshot.learning.episode import expand_parent, sample_episode

    models, ckpt = [], checkpoint
    for classes in INCREMENTS:
        ckpt = expand_parent(sample_episode(catalog, ckpt, classes, 5, 0), device="cpu", scoring="per-increment",
                             retain_head=True)
        models.append(ckpt)
    return models


def timed(model, batches, repeats: int) -> float:
    """Median seconds per image over ``repeats`` passes (one warm-up pass first)."""
    per_pass = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            for b in batches:
                model(b)
            if i:
                per_pass.append(time.perf_counter() - t0)
    return statistics.median(per_pass) / sum(len(b) for b in batches)


def main(argv=None) -> None:
    args = get_args_parser().parse_args(argv)
    from catalog import Catalog
    from fewshot.metrics.coco_eval import load_eval_split
    from fewshot.model.checkpoint import load_checkpoint
    from fewshot.model.batches import decode_row_image_uint8

    torch.set_num_threads(args.threads)
    catalog = Catalog(args.catalog)
    base = load_checkpoint(args.checkpoint)
    rows = load_eval_split(catalog, "synthworld", "val", list(base.classes), [], args.images).rows
    images = [decode_row_image_uint8(r["image"]).float() / 255.0 for r in rows]
    batches = [images[i:i + args.batch_size] for i in range(0, len(images), args.batch_size)]
    expanded = chain(base, catalog)
    last = expanded[-1]
    cases = []
    for kept in range(len(expanded) + 1):   # the last child with its first `kept` heads (0: the live head alone)
        model = last.build_model().eval()
        model.roi_heads.retained.heads = model.roi_heads.retained.heads[:kept]
        cases.append((f"per-increment, {kept} retained", model))
    joint = last.build_model().eval()
    joint.roi_heads.box_predictor.cls_score.set_scoring("joint")
    cases.append(("joint (retained heads not run)", joint))
    print(f"{args.images} val images, batch {args.batch_size}, {args.threads} thread(s), torch {torch.__version__}, "
          f"median of {args.repeats} passes; {len(last.classes)} classes in the last child")
    print("| scoring | ms / image | × the live head alone | parameters | checkpoint MB |")
    print("|---|---|---|---|---|")
    alone = None
    for name, model in cases:
        s = timed(model, batches, args.repeats)
        alone = alone or s
        params = sum(p.numel() for p in model.parameters())
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        size_mb = buf.getbuffer().nbytes / 1e6
        print(f"| {name} | {1000 * s:.1f} | {s / alone:.2f} | {params / 1e6:.2f} M | {size_mb:.1f} |", flush=True)


if __name__ == "__main__":
    main()
