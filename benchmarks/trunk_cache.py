"""How much the frozen-trunk cache saves one ablation draw: ``run_unit`` with and without it.

    python benchmarks/trunk_cache.py --checkpoint detector.pt --shots 5 --repeats 2

One (shots, seed) draw of split1's novel classes, the variants that need no teacher
(``--variants``), ``--freeze backbone``; the two paths alternate (cached, plain, cached, ...)
so a busy machine slows both alike. Prints wall seconds per draw and their ratio, and the
figures each path reached: the cache changes the random stream of RoI sampling (the frozen
RPN's loss no longer draws anchors), so the figures agree within that noise, not to the digit.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _draw_args import episode_parser  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = episode_parser(__doc__)
    p.add_argument("--shots", type=int, default=5, help="K of the draw")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw")
    p.add_argument("--variants", default="baseline,pgb,gradnorm", help="variants fine-tuned per draw")
    p.add_argument("--steps", type=int, default=100, help="fine-tuning steps per variant")
    p.add_argument("--test-images", type=int, default=150, help="test images scored per variant")
    p.add_argument("--repeats", type=int, default=2, help="draws timed per path (alternating)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from catalog import Catalog
    from fewshot.learning.ablation import UnitSpec, run_unit
    from fewshot.learning.loop import TrainConfig
    from fewshot.model.checkpoint import load_checkpoint

    torch.set_num_threads(args.threads)
    from catalog.world import build_world

    catalog = Catalog(args.catalog)
    build_world(catalog, progress=False, workers=1)  # reused when already built
    parent = load_checkpoint(args.checkpoint)
    split = catalog.manifest("synthworld").class_split("split1")
    spec = UnitSpec(catalog_root=str(catalog.root), dataset="synthworld", new_classes=tuple(split.novel),
                    shots=args.shots, seed=args.seed,
                    variants=tuple(v.strip() for v in args.variants.split(",") if v.strip()),
                    train=TrainConfig(steps=args.steps, batch_size=8, lr=1e-4, warmup_steps=20,
                                      log_every=args.steps),
                    freeze="backbone", test_images=args.test_images, val_images=1)
    times: dict[bool, list[float]] = {True: [], False: []}
    figures: dict[bool, list[dict]] = {True: [], False: []}
    for r in range(args.repeats):
        for cached in (True, False):
            t0 = time.perf_counter()
            rows = run_unit(replace(spec, trunk_cache=cached), parent)
            times[cached].append(time.perf_counter() - t0)
            figures[cached] = rows
            print(f"repeat {r + 1}/{args.repeats} {'cached' if cached else 'plain '}: "
                  f"{times[cached][-1]:.1f} s", flush=True)
    print(f"\n{args.shots}-shot draw (seed {args.seed}), {len(spec.variants)} variants x {args.steps} "
          f"steps, {args.test_images} test images, {args.threads} thread(s), {args.repeats} repeats:\n")
    print("| path | median s per draw | nAP50 / bAP50 per variant |")
    print("|---|---|---|")
    for cached in (False, True):
        figs = ", ".join(f"{r['variant']} {100 * r['nAP50']:.1f}/{100 * r['bAP50']:.1f}" for r in figures[cached])
        print(f"| {'trunk cache' if cached else 'plain'} | {statistics.median(times[cached]):.1f} | {figs} |")
    print(f"\nplain / cached: {statistics.median(times[False]) / statistics.median(times[True]):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
