"""Would the CLIP teacher train faster on frozen ImageNet features? What each tower costs.

    PYTHONPATH=platform:. python benchmarks/teacher_image_tower.py
    PYTHONPATH=platform:. python benchmarks/teacher_image_tower.py --train-steps 1500 \
        --catalog /path/to/catalog

The issue suggests building the demo's teacher "through the pretrained image features": keep
the ImageNet EfficientNet-Lite0 trunk frozen and train only a projection and the text tower,
as LiT does (Zhai et al. 2022, "LiT: Zero-Shot Transfer with Locked-image text Tuning"). This
script measures what that would buy and cost, one thread, side by side:

1. embedding cost per 64 px crop (what refinement pays for every box it rescores at serving):
   the embedded teacher's image tower against the frozen lite0 trunk (channels-last, eval);
2. one training step's cost, batch 64: the embedded teacher's image tower forward + backward
   against its text tower forward + backward (with a locked, precomputed image side only the
   text tower's part remains);
3. with ``--train-steps N``: zero-shot top-1 on the test crops of each split's novel classes,
   after N steps, for the embedded teacher (trained as ``jobs/pretrain_teacher.py`` trains it)
   and for the locked-image variant (lite0 pooled features computed once for the corpus, a
   two-layer projection and the same text tower trained with the same loss), with the seconds
   each took, features included.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per cost figure (the median is printed)")
    p.add_argument("--crops", type=int, default=256, help="crops per embedding batch")
    p.add_argument("--train-steps", type=int, default=0,
                   help="also train both teachers this many steps and report zero-shot top-1 (0: skip)")
    p.add_argument("--corpus-pairs", type=int, default=8000, help="captioned pairs to train on")
    p.add_argument("--catalog", default=None,
                   help="catalog holding the synthworld test split for the zero-shot figures "
                        "(default: the catalog's default root, else the world rendered in memory)")
    p.add_argument("--seed", type=int, default=0, help="seed of the corpus and both trainings")
    return p


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


class LockedLite0Tower(nn.Module):
    """Frozen ImageNet lite0 pooled features (standardised) -> a trained two-layer projection.

    ``features`` is what training precomputes once per corpus image; ``forward`` is the
    whole tower, so a :class:`fewshot.clip.teacher.Teacher` can embed crops with it."""

    def __init__(self, embed_dim: int, image_size: int = 64, hidden: int = 512):
        super().__init__()
        from fewshot.model.efficientnet_lite import INPUT_MEAN, INPUT_STD, lite0_imagenet

        self.trunk = lite0_imagenet().eval().requires_grad_(False)
        self.proj = nn.Sequential(nn.Linear(1280, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))
        self.register_buffer("mu", torch.zeros(1280))
        self.register_buffer("sd", torch.ones(1280))
        self.image_size = image_size
        self.preprocess_cfg = {"mean": INPUT_MEAN, "std": INPUT_STD}

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk.embed(x.contiguous(memory_format=torch.channels_last))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj((self.features(x) - self.mu) / self.sd)


def embedding_costs(args) -> dict[str, float]:
    from fewshot.clip.teacher import Teacher, create_embedded_model

    model, name = create_embedded_model()
    teacher = Teacher.from_model(model, name, spec="", device="cpu")
    x = torch.randn(args.crops, 3, 64, 64)
    tower = LockedLite0Tower(128)
    tower.trunk.to(memory_format=torch.channels_last)
    out = {
        "embedded teacher image tower": _median_ms(lambda: teacher.encode_pixels(x), args.repeats) / args.crops,
        "frozen lite0 trunk (locked image)": _median_ms(lambda: tower.features(x), args.repeats) / args.crops,
    }
    print(f"\n1. embedding cost per 64 px crop, batch {args.crops}, one thread (median of {args.repeats})")
    print(f"| image tower | ms per crop | x embedded |\n|---|---|---|")
    base = out["embedded teacher image tower"]
    for k, v in out.items():
        print(f"| {k} | {v:.3f} | {v / base:.1f} |")
    return out


def step_costs(args) -> dict[str, float]:
    from open_clip import get_tokenizer

    from fewshot.clip.teacher import create_embedded_model

    model, name = create_embedded_model()
    model.train()
    tokens = get_tokenizer(name)(["a photo of a small red circle."] * 64)
    x = torch.randn(64, 3, 64, 64)

    def image_side():
        model.zero_grad(set_to_none=True)
        model.encode_image(x).sum().backward()

    def text_side():
        model.zero_grad(set_to_none=True)
        model.encode_text(tokens).sum().backward()

    out = {"image tower": _median_ms(image_side, args.repeats),
           "text tower": _median_ms(text_side, args.repeats)}
    print(f"\n2. one training step of the embedded teacher, batch 64, forward + backward, one thread")
    print("| part | ms | share |\n|---|---|---|")
    total = sum(out.values())
    for k, v in out.items():
        print(f"| {k} | {v:.1f} | {v / total:.0%} |")
    return out


def train_locked(pool, steps: int, seed: int):
    """The locked-image variant: precompute lite0 features once, train projection + text."""
    from open_clip import get_tokenizer

    from fewshot.clip.pretraining import _adamw, _param_groups, clip_loss, lr_at
    from fewshot.clip.teacher import Teacher, create_embedded_model

    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 271828])
    model, name = create_embedded_model()
    tower = LockedLite0Tower(int(model.text_projection.shape[-1]))
    t0 = time.perf_counter()
    feats = torch.cat([tower.features(pool.images[i:i + 256].float().div(255).sub(0.5).div(0.5))
                       for i in range(0, len(pool), 256)])
    tower.mu.copy_(feats.mean(0))
    tower.sd.copy_(feats.std(0) + 1e-3)
    feature_seconds = time.perf_counter() - t0
    model.visual = tower
    tokenizer = get_tokenizer(name)
    groups = [g for g in _param_groups(model, 0.1) if g["params"]]
    opt = _adamw(groups, 3e-3)
    t1 = time.perf_counter()
    for step in range(steps):
        idx = rng.choice(len(pool), 64, replace=False)
        captions = pool.draw_captions(idx, rng)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, 3e-3, max(1, steps // 20)) * g["lr_scale"]
        img = F.normalize(tower.proj((feats[torch.from_numpy(idx)] - tower.mu) / tower.sd), dim=-1)
        txt = model.encode_text(tokenizer(captions), normalize=True)
        loss = clip_loss(img, txt, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100.0))
    train_seconds = time.perf_counter() - t1
    return Teacher.from_model(model, name, spec="", device="cpu"), feature_seconds, train_seconds


def zero_shot(args) -> None:
    from catalog.store import default_root
    from fewshot.clip.pretraining import build_corpus_pool, train_embedded_teacher
    from jobs.pretrain_teacher import evaluation_rows, zero_shot_figures

    rows, manifest, where = evaluation_rows(args.catalog or str(default_root()), "synthworld", "test", 300)
    pool = build_corpus_pool(args.corpus_pairs, seed=args.seed)
    print(f"\n3. zero-shot top-1 after {args.train_steps} steps (batch 64, one thread), crops of {where}")
    print("| teacher | seconds | all classes | split1 novel | split2 novel | split3 novel |\n|---|---|---|---|---|---|")
    embedded, metrics = train_embedded_teacher(steps=args.train_steps, corpus=pool, seed=args.seed, threads=1)
    zs = zero_shot_figures(embedded, rows, manifest)
    print(f"| embedded (trained image tower) | {metrics['train_seconds']:.0f} | {zs['zs_top1_all']:.3f} | "
          + " | ".join(f"{zs[f'zs_top1_split{k}_novel']:.3f}" for k in (1, 2, 3)) + " |", flush=True)
    locked, fs, ts = train_locked(pool, args.train_steps, args.seed)
    zs = zero_shot_figures(locked, rows, manifest)
    print(f"| locked lite0 features + projection | {fs:.0f} features + {ts:.0f} | {zs['zs_top1_all']:.3f} | "
          + " | ".join(f"{zs[f'zs_top1_split{k}_novel']:.3f}" for k in (1, 2, 3)) + " |")


def main(args) -> None:
    torch.set_num_threads(1)
    embedding_costs(args)
    step_costs(args)
    if args.train_steps > 0:
        zero_shot(args)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
