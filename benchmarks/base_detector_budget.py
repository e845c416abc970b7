"""Base-detector quality at a fixed CPU time budget: bAP50 of one preset on the embedded world.

Builds the embedded world into a catalog (a temporary one unless --catalog is given; reused when
it already holds the same world), trains a detector on one class split's base classes in this
process (fewshot.learning.loop.train, the same loop Ray Train workers run; no Ray), and evaluates
bAP50/bAP on the test split with pycocotools (fewshot.metrics.coco_eval).

The budget is CPU seconds of this process (time.process_time: with --threads 1 that is what a
core gave it, so other users of a shared machine change it far less than wall time): the first
--calibrate-steps steps measure the step cost, the schedule (warm-up + cosine,
fewshot.learning.loop.lr_at) is then laid over as many steps as fit in the budget, and training stops
at 1.15x the budget whatever happens. Wall time is reported beside it. Example:

    python benchmarks/base_detector_budget.py --preset cpu-small --budget-s 900 --threads 1
    python benchmarks/base_detector_budget.py --preset lite0-fpn --budget-s 900 --threads 1 \
        --override min_size=224 --override max_size=320
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-small")
    p.add_argument("--override", action="append", default=[],
                   help="DetectorConfig override KEY=JSON, e.g. min_size=224 or "
                        "anchor_sizes=[[12],[24],[48],[96],[192]] (repeatable)")
    p.add_argument("--catalog", default=os.path.join(tempfile.gettempdir(), "fewshot-quality-catalog"))
    p.add_argument("--class-split", default="split1")
    p.add_argument("--budget-s", type=float, default=900.0, help="training budget in CPU seconds of this process")
    p.add_argument("--steps", type=int, default=0, help="fixed step count instead of a time budget")
    p.add_argument("--calibrate-steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", default="adamw")
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--augment", default="flip", choices=["flip", "v2", "dihedral"],
                   help="flip: random horizontal flips (fewshot.model.batches); v2: fewshot.model.augment's "
                        "torchvision.transforms.v2 recipe (flip, photometric, zoom-out); dihedral: its "
                        "flips and right-angle rotations with the photometric distortion (the embedded "
                        "world's classes do not change under them)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default=None,
                   help="where to train and evaluate (default: CUDA when this process sees a GPU, else the CPU); "
                        "on CUDA the training runs in bf16 (--precision auto), the evaluation in fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-test-images", type=int, default=300)
    p.add_argument("--json-out", default="", help="append the result as one JSON line to this file")
    p.add_argument("--save", default="", help="save the trained detector (fewshot checkpoint) here")
    p.add_argument("--diagnose-images", type=int, default=100,
                   help="test images for the diagnostics (proposal recall, classification of true boxes)")
    return p


@torch.no_grad()
def diagnose(model, rows, index) -> dict:
    """What limits the detector: localisation (does the RPN propose each object? recall of its
    test-time proposals at IoU 0.5 and 0.7) or classification (the box head's class for the
    ground-truth box itself, argmax over the object classes)."""
    from torchvision.ops import box_iou

    from fewshot.model.batches import decode_row_image, row_to_target

    model.eval()
    device = next(model.parameters()).device
    hits50 = hits70 = correct = total = 0
    for row in rows:
        image = decode_row_image(row["image"]).to(device)
        target = {k: v.to(device) for k, v in row_to_target(row, index).items()}
        if not len(target["boxes"]):
            continue
        images, _ = model.transform([image])
        features = model.backbone(images.tensors)
        proposals, _ = model.rpn(images, features)
        h, w = images.image_sizes[0]
        sy, sx = h / image.shape[-2], w / image.shape[-1]
        gt = target["boxes"] * torch.tensor([sx, sy, sx, sy], device=device)
        iou = box_iou(gt, proposals[0]).max(dim=1).values if len(proposals[0]) else torch.zeros(len(gt), device=device)
        hits50 += int((iou >= 0.5).sum())
        hits70 += int((iou >= 0.7).sum())
        heads = model.roi_heads
        logits, _ = heads.box_predictor(heads.box_head(heads.box_roi_pool(features, [gt], images.image_sizes)))
        correct += int(((logits[:, 1:].argmax(dim=1) + 1) == target["labels"]).sum())
        total += len(gt)
    return {"objects": total, "proposal_recall50": hits50 / max(1, total),
            "proposal_recall70": hits70 / max(1, total), "gt_box_class_acc": correct / max(1, total)}


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        v = json.loads(value)
        if isinstance(v, list):
            v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
        out[key] = v
    return out


def main(args: argparse.Namespace) -> dict:
    from catalog import Catalog
    from catalog.world import build_world
    from fewshot.model.presets import preset
    from fewshot.model.batches import class_index, random_batches
    from fewshot.model.detector import build_detector
    from fewshot.metrics.coco_eval import load_eval_split, predict_rows
    from fewshot.learning.loop import TrainConfig, make_optimizer, train

    from fewshot.model.devices import resolve_device, resolve_precision

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    catalog = Catalog(args.catalog)
    manifest = build_world(catalog, progress=False, workers=1)
    classes = list(manifest.class_split(args.class_split).base)
    by_name = manifest.category_by_name()
    category_ids = [by_name[c].id for c in classes]
    rows = catalog.read_split(manifest.name, "train").to_pylist()

    config = preset(args.preset, **parse_overrides(args.override))
    model = build_detector(config, len(classes) + 1)
    index = class_index(category_ids)
    if args.augment != "flip":
        from fewshot.model.augment import RECIPES, augmented_batches

        batches = augmented_batches(rows, index, args.batch_size, args.seed, RECIPES[args.augment]())
    else:
        batches = random_batches(rows, index, args.batch_size, args.seed)

    cfg = TrainConfig(steps=args.steps or args.calibrate_steps + 1, batch_size=args.batch_size,
                      lr=args.lr, optimizer=args.optimizer, warmup_steps=args.warmup_steps, log_every=50)
    optimizer = make_optimizer(model, cfg)
    t0, c0 = time.perf_counter(), time.process_time()
    if not args.steps:
        train(model, batches, cfg.__class__(**{**cfg.to_dict(), "steps": args.calibrate_steps}),
              progress=False, optimizer=optimizer, device=device)
        per_step = (time.process_time() - c0) / args.calibrate_steps
        steps = max(args.calibrate_steps + 1, int(args.budget_s / per_step))
        cfg = cfg.__class__(**{**cfg.to_dict(), "steps": steps})
        start = args.calibrate_steps
    else:
        steps, start = args.steps, 0
    print(f"{args.preset} {' '.join(args.override)}: {steps} steps of "
          f"{args.batch_size} images", flush=True)
    hard_stop = c0 + 1.15 * args.budget_s if not args.steps else float("inf")
    done = {"steps": start}

    def timed(it):
        for batch in it:
            if time.process_time() > hard_stop:
                return
            done["steps"] += 1
            yield batch

    def log(step, m):
        print(f"  step {step}/{steps} loss {m['loss']:.3f} ({time.process_time() - c0:.0f} cpu s, "
              f"{time.perf_counter() - t0:.0f} wall s)", flush=True)

    try:
        train(model, timed(batches), cfg, on_log=log, progress=False, start_step=start, optimizer=optimizer,
              device=device)
    except (StopIteration, RuntimeError) as e:  # the hard stop ends the batch iterator
        if "StopIteration" not in repr(e) and not isinstance(e, StopIteration):
            raise
        print(f"  hard stop at {done['steps']} of {steps} steps", flush=True)
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0

    t1 = time.perf_counter()
    split = load_eval_split(catalog, manifest.name, "test", classes, max_images=args.max_test_images)
    results = predict_rows(model, split.rows, category_ids, device=device)
    report = split.evaluate(results)
    eval_s = time.perf_counter() - t1
    diag = diagnose(model, split.rows[: args.diagnose_images], index) if args.diagnose_images else {}
    if args.save:
        from fewshot.model.checkpoint import save_checkpoint

        save_checkpoint(args.save, model, config, classes, category_ids, manifest.name, "benchmark")
    out = {
        "preset": args.preset, "overrides": args.override, "augment": args.augment, "seed": args.seed,
        "threads": args.threads, "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "train_precision": resolve_precision("auto", device), "budget_s": args.budget_s, "steps_planned": steps,
        "steps_done": done["steps"], "batch_size": args.batch_size, "lr": args.lr,
        "train_cpu_s": round(train_cpu_s, 1), "train_wall_s": round(train_s, 1),
        "cpu_s_per_step": round(train_cpu_s / max(1, done["steps"]), 3),
        "eval_s": round(eval_s, 1), "test_images": report.num_images,
        "bAP50": round(report.bAP50, 4), "bAP": round(report.bAP, 4),
        "loadavg_1m_end": os.getloadavg()[0], **{k: round(v, 4) for k, v in diag.items()},
        "per_class_AP50": {k: round(v, 3) for k, v in report.per_class_AP50.items()},
    }
    print("| preset | overrides | augment | lr | steps | cpu s/step | train cpu s | train wall s | bAP50 | bAP |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.preset} | {' '.join(args.override) or '-'} | {args.augment} | {args.lr:g} | {done['steps']} | "
          f"{out['cpu_s_per_step']} | {out['train_cpu_s']} | {out['train_wall_s']} | {out['bAP50']:.3f} | "
          f"{out['bAP']:.3f} |")
    if diag:
        print(f"diagnostics on {diag['objects']} test objects: proposal recall@0.5 "
              f"{diag['proposal_recall50']:.3f}, @0.7 {diag['proposal_recall70']:.3f}; box head's class "
              f"for the true box {diag['gt_box_class_acc']:.3f}")
    print(json.dumps(out), flush=True)
    if args.json_out:
        with open(args.json_out, "a") as f:
            f.write(json.dumps(out) + "\n")
    return out


if __name__ == "__main__":
    main(get_args_parser().parse_args())
