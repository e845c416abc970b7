"""Why a seed method does or does not move the detector: what it changes inside one fine-tune.

    python benchmarks/method_diagnostics.py --checkpoint detector.pt \
        --teacher embedded:teacher.pt --shots 1,5,10 --seed 0

For one K-shot draw of split1's novel classes per ``--shots``, fine-tunes the ablation's
variants (baseline, pgb, gradnorm, distill; ``--freeze backbone``, the ablation's schedule) from
the same expanded parent and the same random stream, and measures where the methods act:

- the gradients of the classification and box-regression losses at the shared RoI feature
  (``||dL_cls/dx||``, ``||dL_reg/dx||``, mean over steps) and the weights each balancer applied
  there (mean and range over steps): PGB and gradient-norm scaling only rescale these two;
- how far training moved the shared feature's layers (box head fc6 + fc7):
  ``||W - W_start|| / ||W_start||``, and how far each variant's weights ended from the
  baseline's, relative to the baseline's own move;
- feature drift on ground-truth boxes of ``--test-images`` test images: the mean cosine between
  the trained and the starting box-head feature, and between each variant's and the baseline's.

Prints one table per shot count and, with ``--json-out``, appends one JSON line per variant.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _draw_args import episode_parser  # noqa: E402

VARIANTS = ("baseline", "pgb", "gradnorm", "distill")


def build_parser() -> argparse.ArgumentParser:
    p = episode_parser(__doc__)
    p.add_argument("--teacher", default="", help="teacher spec for the distill variant (omit: no distill)")
    p.add_argument("--shots", default="1,5,10", help="comma-separated K, one draw each")
    p.add_argument("--seed", type=int, default=0, help="seed of every draw")
    p.add_argument("--steps", type=int, default=100, help="fine-tuning steps (the ablation's)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate (the ablation's)")
    p.add_argument("--distill-beta", type=float, default=1.0, help="distillation weight (the ablation's)")
    p.add_argument("--test-images", type=int, default=50, help="test images whose GT boxes measure drift")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--json-out", default="", help="append one JSON line per (shots, variant) here")
    return p


def _box_head_weights(model):
    import torch

    return torch.cat([p.detach().flatten() for p in model.roi_heads.box_head.parameters()])


def _gt_features(model, images, targets):
    from fewshot.model.expansion import support_roi_features

    feats, _ = support_roi_features(model, images, targets)
    return feats


def run_variant(name, start, rows, cfg, args, teacher, cache, record_norms=True):
    """Fine-tune one variant like fewshot.learning.method.finetune, with probes on the split."""
    import torch

    from fewshot.learning.loop import make_optimizer, train
    from fewshot.learning.method import MethodConfig, prepare_for_training
    from fewshot.model.batches import class_index, random_batches
    from fewshot.model.trunk_cache import cached_trunk

    balancer = "fixed" if name in ("baseline", "distill") else name
    method = MethodConfig(freeze="backbone", balancer=balancer, balancer_momentum=0.9,
                          distill_beta=args.distill_beta if name == "distill" else 0.0,
                          teacher_dim=teacher.embed_dim if (teacher is not None and name == "distill") else None)
    torch.manual_seed(args.seed)
    model = start.build_model()
    bal = prepare_for_training(model, method)
    probe = {"n_cls": [], "n_reg": [], "w_cls": [], "w_loc": []}
    plain = bal.backward_weights

    def probed(g_cls, g_reg):
        w = plain(g_cls, g_reg)
        probe["n_cls"].append(float(g_cls.norm()))
        probe["n_reg"].append(float(g_reg.norm()))
        probe["w_cls"].append(float(w[0]))
        probe["w_loc"].append(float(w[1]))
        return w

    bal.backward_weights = probed
    optimizer = make_optimizer(model, cfg)
    batches = random_batches(list(rows), class_index(start.category_ids), cfg.batch_size, args.seed, uint8=True)
    with cached_trunk(model, cache):
        train(model, batches, cfg, optimizer=optimizer, device="cpu", precision="fp32", progress=False)
    model.eval()
    return model, probe


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch
    import torch.nn.functional as F

    from catalog import Catalog
    from catalog.world import build_world
    from fewshot.learning.episode import expand_parent, sample_episode
    from fewshot.learning.loop import TrainConfig
    from fewshot.learning.method import TeacherEmbedder
    from fewshot.metrics.coco_eval import load_eval_split
    from fewshot.model.batches import class_index, rows_to_batch
    from fewshot.model.checkpoint import load_checkpoint
    from fewshot.model.trunk_cache import TrunkCache

    torch.set_num_threads(args.threads)
    catalog = Catalog(args.catalog)
    build_world(catalog, progress=False, workers=1)
    parent = load_checkpoint(args.checkpoint)
    split = catalog.manifest("synthworld").class_split("split1")
    teacher = None
    variants = [v for v in VARIANTS if v != "distill" or args.teacher]
    if args.teacher:
        from fewshot.clip.teacher import load_teacher

        teacher = load_teacher(args.teacher, device="cpu")
    cfg = TrainConfig(steps=args.steps, batch_size=8, lr=args.lr, warmup_steps=20, log_every=args.steps)
    test = load_eval_split(catalog, "synthworld", "test", parent.classes, split.novel, args.test_images)

    for k in [int(x) for x in args.shots.split(",") if x.strip()]:
        ep = sample_episode(catalog, parent, list(split.novel), k, args.seed, "synthworld")
        start = expand_parent(ep, device="cpu")
        start_model = start.build_model().eval()
        images, targets = rows_to_batch(test.rows, class_index(ep.child_ids))
        with torch.no_grad():
            f0 = _gt_features(start_model, images, targets)
        w0 = _box_head_weights(start_model)
        cache = TrunkCache()
        out = {}
        for name in variants:
            rows = TeacherEmbedder(teacher)(ep.rows) if name == "distill" else ep.rows
            model, probe = run_variant(name, start, rows, cfg, args, teacher, cache)
            with torch.no_grad():
                f = _gt_features(model, images, targets)
            out[name] = {"probe": probe, "w": _box_head_weights(model), "f": f}
        base = out["baseline"]
        lines = []
        print(f"\n{k}-shot draw (seed {args.seed}), {len(ep.rows)} support images, {f0.shape[0]} "
              f"test GT boxes; {args.steps} steps, lr {args.lr:g}, --freeze backbone\n")
        print("| variant | mean ‖dL_cls/dx‖ | mean ‖dL_reg/dx‖ | w_cls mean [min, max] | w_loc mean [min, max] "
              "| ‖ΔW‖/‖W₀‖ (fc6+fc7) | ‖W − W_baseline‖ / ‖ΔW_baseline‖ | cos(f, f₀) | cos(f, f_baseline) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name, r in out.items():
            p = r["probe"]
            move = float((r["w"] - w0).norm() / w0.norm())
            rel = float((r["w"] - base["w"]).norm() / (base["w"] - w0).norm())
            cos0 = float(F.cosine_similarity(r["f"], f0, dim=1).mean())
            cosb = float(F.cosine_similarity(r["f"], base["f"], dim=1).mean())
            row = {"shots": k, "seed": args.seed, "variant": name,
                   "n_cls": statistics.fmean(p["n_cls"]), "n_reg": statistics.fmean(p["n_reg"]),
                   "w_cls_mean": statistics.fmean(p["w_cls"]), "w_cls_min": min(p["w_cls"]),
                   "w_cls_max": max(p["w_cls"]), "w_loc_mean": statistics.fmean(p["w_loc"]),
                   "w_loc_min": min(p["w_loc"]), "w_loc_max": max(p["w_loc"]),
                   "weight_move": move, "weight_vs_baseline": rel, "cos_start": cos0, "cos_baseline": cosb,
                   "steps": args.steps, "lr": args.lr}
            lines.append(row)
            print(f"| {name} | {row['n_cls']:.2e} | {row['n_reg']:.2e} | {row['w_cls_mean']:.3f} "
                  f"[{row['w_cls_min']:.3f}, {row['w_cls_max']:.3f}] | {row['w_loc_mean']:.3f} "
                  f"[{row['w_loc_min']:.3f}, {row['w_loc_max']:.3f}] | {move:.4f} | {rel:.3f} | "
                  f"{cos0:.4f} | {cosb:.4f} |", flush=True)
        if args.json_out:
            with open(args.json_out, "a") as fh:
                for row in lines:
                    fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
