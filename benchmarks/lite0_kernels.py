"""The lite0-fpn backbone's CPU kernels: what the fused frozen batch norm, the padding the
convolution does itself and the channels-last layout each buy on a training step and an
inference batch, against the obvious implementation (torchvision's ``FrozenBatchNorm2d``, a
padded copy before every convolution, contiguous NCHW).

    python benchmarks/lite0_kernels.py --threads 1 --repeats 6

Every variant is the same detector (same seed, same weights) on the same synthetic batch of
160 px images (the embedded world's size; the preset resizes them to 224); the variants
alternate window by window so a busy machine slows them alike. Prints the median seconds per
training step (batch 8, AdamW) and per inference batch, the ratio to the reference, and the
first step's loss of each variant (the fused kernels agree to float rounding; a different
memory layout changes the convolution's summation order, which can flip a proposal's rank).
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.ops import FrozenBatchNorm2d

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from fewshot.learning.loop import TrainConfig, make_optimizer, train_step  # noqa: E402
from fewshot.model import efficientnet_lite as lite  # noqa: E402
from fewshot.model.detector import build_detector  # noqa: E402
from fewshot.model.presets import preset  # noqa: E402

VARIANTS = ("reference", "fused-bn", "fused-bn+pad", "fused-bn+pad+channels-last")


class PaddedCopyConv2d(lite.SameConv2d):
    """The reference: TF ``SAME`` padding as an explicit padded copy before every convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + (kh - 1) * self.dilation[0] + 1 - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + (kw - 1) * self.dilation[1] + 1 - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--batch-size", type=int, default=8, help="images per step and per inference batch")
    p.add_argument("--steps", type=int, default=2, help="training steps per timed window")
    p.add_argument("--repeats", type=int, default=6, help="timed windows per variant (median reported)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {VARIANTS}")
    return p


def synthetic_batch(n: int, size: int = 160, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        images.append(torch.rand(3, size, size, generator=g))
        xy = torch.rand(3, 2, generator=g) * size * 0.6
        wh = 10 + torch.rand(3, 2, generator=g) * size * 0.3
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(1, 16, (3,), generator=g)})
    return images, targets


def build(variant: str) -> torch.nn.Module:
    """The product's detector (fused frozen BN, in-convolution padding, channels-last), with
    the kernels ``variant`` does not name put back to the obvious ones."""
    torch.manual_seed(0)
    model = build_detector(preset("lite0-fpn"), num_classes=16)
    for module in model.modules():
        if variant == "reference" and isinstance(module, lite.FusedFrozenBatchNorm2d):
            module.__class__ = FrozenBatchNorm2d
        if "pad" not in variant and isinstance(module, lite.SameConv2d):
            module.__class__ = PaddedCopyConv2d
    if "channels-last" not in variant:
        model.backbone.channels_last = False
        model.backbone.to(memory_format=torch.contiguous_format)
    return model


def main(argv=None) -> None:
    args = get_args_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    images, targets = synthetic_batch(args.batch_size)
    cfg = TrainConfig(steps=1000, batch_size=args.batch_size, lr=1e-4, warmup_steps=1)
    runs = {}
    for v in variants:
        model = build(v)
        opt = make_optimizer(model, cfg)
        torch.manual_seed(1)
        first = float(train_step(model, opt, images, targets, 10.0)["loss"])
        train_step(model, opt, images, targets, 10.0)  # warm-up
        runs[v] = {"model": model, "opt": opt, "first_loss": first, "train": [], "infer": []}
    for _ in range(args.repeats):
        for v in variants:
            r = runs[v]
            t = time.perf_counter()
            for _ in range(args.steps):
                train_step(r["model"], r["opt"], images, targets, 10.0)
            r["train"].append((time.perf_counter() - t) / args.steps)
            r["model"].eval()
            with torch.inference_mode():
                t = time.perf_counter()
                r["model"](images)
                r["infer"].append(time.perf_counter() - t)
    ref = runs[variants[0]]
    t_ref, i_ref = statistics.median(ref["train"]), statistics.median(ref["infer"])
    print(f"lite0-fpn, batch {args.batch_size} of 160 px images, {args.threads} thread(s), "
          f"{args.repeats} windows per variant (median, min-max)")
    print(f"| variant | train s/step | ratio to {variants[0]} | inference s/batch | ratio | first-step loss |")
    print("|---|---|---|---|---|---|")
    for v in variants:
        r = runs[v]
        t, i = statistics.median(r["train"]), statistics.median(r["infer"])
        print(f"| {v} | {t:.3f} ({min(r['train']):.3f}-{max(r['train']):.3f}) | {t_ref / t:.2f}x "
              f"| {i:.3f} ({min(r['infer']):.3f}-{max(r['infer']):.3f}) | {i_ref / i:.2f}x | {r['first_loss']:.5f} |")


if __name__ == "__main__":
    main()
