"""add_classes' math on one device, in one process (no Ray, no MLflow): expand a saved base
detector with imprinted rows, fine-tune it with the product's defaults (``--freeze head``, 150
AdamW steps at lr 5e-4, batch 8, K shots + K replay shots per old class) at ``--precision``, then
choose the bias correction on val, and score parent and child on test with pycocotools.

It checks what a GPU changes and the CPU suite cannot: how closely the cached second stage of
the bias correction gives the detections of the model with the offset set, under the same
autocast, next to how closely two passes of the model itself agree (bf16 kernels are not
bit-reproducible run to run: the yardstick); and that the classifier's logits stay fp32 under
bf16 autocast.

    python benchmarks/base_detector_budget.py --preset lite0-fpn --steps 711 --save /tmp/base.pt
    python benchmarks/gpu_episode.py --checkpoint /tmp/base.pt --shots 10 --seeds 0,1,2
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
    p.add_argument("--checkpoint", required=True, help="a saved base detector (fewshot checkpoint)")
    p.add_argument("--catalog", default=os.path.join(tempfile.gettempdir(), "fewshot-quality-catalog"),
                   help="the catalog holding the embedded world the checkpoint was trained on")
    p.add_argument("--class-split", default="split1", help="its novel classes are added")
    p.add_argument("--shots", type=int, default=10, help="K: annotated instances per new class")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, one episode (support draw) each")
    p.add_argument("--steps", type=int, default=150, help="fine-tuning steps (add_classes' default)")
    p.add_argument("--device", default=None, help="default: CUDA when this process sees a GPU, else the CPU")
    p.add_argument("--precision", default="auto", help="auto (bf16 on a GPU that has it, else fp32), fp32, bf16")
    p.add_argument("--bias-correction", type=float, default=0.01, help="the allowed base AP50 drop on val")
    p.add_argument("--val-images", type=int, default=150)
    p.add_argument("--test-images", type=int, default=300)
    p.add_argument("--json-out", default="", help="append one JSON line per seed to this file")
    return p


def agreement(a: list[dict], b: list[dict], min_iou: float = 0.95) -> tuple[float, float]:
    """How far two passes' COCO results agree: the fraction of detections (of the larger list)
    that have a partner in the other (same image and class, box IoU >= ``min_iou``, greedy by
    score), and the largest score difference between partners."""
    from collections import defaultdict

    from torchvision.ops import box_iou

    def xyxy(r):
        x, y, w, h = r["bbox"]
        return [x, y, x + w, y + h]

    groups: dict = defaultdict(lambda: ([], []))
    for r in a:
        groups[(r["image_id"], r["category_id"])][0].append(r)
    for r in b:
        groups[(r["image_id"], r["category_id"])][1].append(r)
    matched, worst = 0, 0.0
    for left, right in groups.values():
        if not left or not right:
            continue
        iou = box_iou(torch.tensor([xyxy(r) for r in left]), torch.tensor([xyxy(r) for r in right]))
        used: set[int] = set()
        for i in sorted(range(len(left)), key=lambda i: -left[i]["score"]):
            order = [j for j in iou[i].argsort(descending=True).tolist() if j not in used and iou[i, j] >= min_iou]
            if order:
                used.add(order[0])
                matched += 1
                worst = max(worst, abs(left[i]["score"] - right[order[0]]["score"]))
    return matched / max(1, len(a), len(b)), worst


def main(args: argparse.Namespace) -> list[dict]:
    from catalog import Catalog
    from fewshot.learning.bias_correction import collect_second_stage, detections_with_offset, fit_new_row_offset
    from fewshot.learning.episode import expand_parent, fine_tune_episode, sample_episode
    from fewshot.learning.loop import TrainConfig
    from fewshot.learning.method import MethodConfig
    from fewshot.metrics.coco_eval import load_eval_split, predict_rows
    from fewshot.model.checkpoint import load_checkpoint
    from fewshot.model.devices import resolve_device, resolve_precision

    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    catalog = Catalog(args.catalog)
    parent = load_checkpoint(args.checkpoint)
    novel = list(catalog.manifest(parent.dataset).class_split(args.class_split).novel)
    val = load_eval_split(catalog, parent.dataset, "val", parent.classes, novel, max_images=args.val_images)
    test = load_eval_split(catalog, parent.dataset, "test", parent.classes, novel, max_images=args.test_images)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, precision {precision}, torch {torch.__version__}; adding {novel} at {args.shots} shots",
          flush=True)
    parent_model = parent.build_model()
    parent_val = val.evaluate(predict_rows(parent_model, val.rows, parent.category_ids, device=device,
                                           precision=precision)).bAP50
    parent_test = test.evaluate(predict_rows(parent_model, test.rows, parent.category_ids, device=device,
                                             precision=precision)).bAP50
    out = []
    for seed in (int(s) for s in args.seeds.split(",")):
        t0 = time.perf_counter()
        ep = sample_episode(catalog, parent, novel, shots=args.shots, seed=seed)
        start = expand_parent(ep, device=device)
        cfg = TrainConfig(steps=args.steps, batch_size=8, lr=5e-4, warmup_steps=20, log_every=50)
        child = fine_tune_episode(ep, cfg, MethodConfig(freeze="head"), start=start, device=device,
                                  precision=precision)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        finetune_s = time.perf_counter() - t0
        model = child.build_model().to(device)
        t1 = time.perf_counter()
        choice = fit_new_row_offset(model, val, child.category_ids, parent_val, args.bias_correction,
                                    device=device, precision=precision)
        correction_s = time.perf_counter() - t1
        # the check: the grid's detections are the model's own under the same autocast. The kept
        # logits carry the classifier's offsets, so they are collected at offset 0 (as the fit does)
        first_new = len(parent.classes) + 1
        model.roi_heads.box_predictor.cls_score.set_new_bias(0.0)
        stages = collect_second_stage(model, test.rows[:30], device=device, precision=precision)
        cached = detections_with_offset(model, stages, first_new, choice.offset, child.category_ids)
        model.roi_heads.box_predictor.cls_score.set_new_bias(choice.offset)
        direct = predict_rows(model, test.rows[:30], child.category_ids, device=device, precision=precision)
        again = predict_rows(model, test.rows[:30], child.category_ids, device=device, precision=precision)
        # cached vs the model's own pass, and (the yardstick) the model's pass against itself
        cached_match, cached_diff = agreement(cached, direct)
        rerun_match, rerun_diff = agreement(again, direct)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model.roi_heads.box_predictor.cls_score(torch.randn(4, model.roi_heads.box_predictor
                                                                         .cls_score.in_features, device=device))
        corrected = test.evaluate(predict_rows(model, test.rows, child.category_ids, device=device,
                                               precision=precision))
        model.roi_heads.box_predictor.cls_score.set_new_bias(0.0)
        plain = test.evaluate(predict_rows(model, test.rows, child.category_ids, device=device, precision=precision))
        row = {"seed": seed, "device": name, "precision": precision, "shots": args.shots,
               "finetune_s": round(finetune_s, 1), "bias_correction_s": round(correction_s, 1),
               "offset": choice.offset, "met_on_val": choice.met,
               "parent_test_bAP50": round(parent_test, 4),
               "test_bAP50": round(plain.bAP50, 4), "test_nAP50": round(plain.nAP50, 4),
               "corrected_test_bAP50": round(corrected.bAP50, 4), "corrected_test_nAP50": round(corrected.nAP50, 4),
               "detections_checked": len(direct), "cached_matched": round(cached_match, 4),
               "cached_max_score_diff": cached_diff, "rerun_matched": round(rerun_match, 4),
               "rerun_max_score_diff": rerun_diff,
               "logits_dtype": str(logits.dtype).replace("torch.", "")}
        print(json.dumps(row), flush=True)
        out.append(row)
        if args.json_out:
            with open(args.json_out, "a") as f:
                f.write(json.dumps(row) + "\n")
    print("| seed | fine-tune s | correction s | offset | parent bAP50 | bAP50 | nAP50 | corrected bAP50 | "
          "corrected nAP50 | cached vs direct: matched, max score diff | direct twice: matched, max score diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in out:
        print(f"| {r['seed']} | {r['finetune_s']} | {r['bias_correction_s']} | {r['offset']:g} | "
              f"{r['parent_test_bAP50']:.3f} | {r['test_bAP50']:.3f} | {r['test_nAP50']:.3f} | "
              f"{r['corrected_test_bAP50']:.3f} | {r['corrected_test_nAP50']:.3f} | "
              f"{r['cached_matched']:.3f}, {r['cached_max_score_diff']:.1e} | "
              f"{r['rerun_matched']:.3f}, {r['rerun_max_score_diff']:.1e} |")
    return out


if __name__ == "__main__":
    main(get_args_parser().parse_args())
