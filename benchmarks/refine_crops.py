"""CLIP refinement cost per batch: per-box PIL crops (``Refiner.refine``, one image at a
time) vs batched tensor crops and one teacher call (``fewshot.clip.answering.Answerer``).

    PYTHONPATH=platform:. python benchmarks/refine_crops.py --batch 8 --repeats 5

By default the same untrained cpu-small detector and embedded teacher as the serving
benchmarks on synthetic blobs (an untrained detector returns its cap of boxes per image: the
worst case for refinement); ``--checkpoint`` times a trained detector on the embedded world's
test images instead (e.g. the base model ``add_classes_wall.py`` trains), so the boxes per
image are the ones a user's model returns. One thread (as a 1-CPU replica); the median of
``--repeats`` runs.

    PYTHONPATH=platform:. python benchmarks/refine_crops.py --checkpoint base/detector.pt
"""
from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from _stack import bench_images, detector_and_refiner, make_version


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per path (the median is printed)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="a trained detector checkpoint: time it on the embedded world's test images "
                        "(default: an untrained cpu-small detector on synthetic blobs)")
    p.add_argument("--fusion-weight", type=float, default=0.5,
                   help="the refiner's lambda (boxes that cannot reach the threshold are not embedded)")
    p.add_argument("--threshold", type=float, default=0.3, help="the request's score_threshold")
    return p


def main(args) -> None:
    from fewshot.clip.answering import Item
    from fewshot.model.image_input import decode_image

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        det, ans = detector_and_refiner(make_version(Path(tmp), checkpoint=args.checkpoint,
                                                     fusion_weight=args.fusion_weight))
        data = bench_images(args.batch, args.checkpoint)
        images = [Image.open(io.BytesIO(d)).convert("RGB") for d in data]
        thr = args.threshold
        items = [Item(decode_image(d, model_size=ans.model_size), thr, True) for d in data]
        unrefined = [Item(i.decoded, thr, False) for i in items]

        def old():
            outs = det.predict(images, 0.0)
            return [ans.refiner.refine(im, o, score_threshold=thr) for im, o in zip(images, outs)]

        def interleaved(*fns):
            """Median ms of each of ``fns``, run in turn ``--repeats`` times (interleaved, so a
            slow moment of a shared machine falls on every path alike)."""
            runs: list[list[float]] = [[] for _ in fns]
            for fn in fns:
                fn()
            for _ in range(args.repeats):
                for fn, times in zip(fns, runs):
                    t0 = time.perf_counter()
                    fn()
                    times.append((time.perf_counter() - t0) * 1000)
            return [statistics.median(times) for times in runs]

        t_none, t_old, t_new = interleaved(lambda: ans.answer(unrefined), old, lambda: ans.answer(items))
        boxes = sum(len(o) for o in det.predict(images, 0.0))
        lam = ans.refiner.fusion_weight
        reach = sum(len(o) for o in det.predict(images, (thr - lam) / (1 - lam) - 1e-4)) if lam < 1 else boxes
        answered = sum(len(a) for a in ans.answer(items))
    source = args.checkpoint or "untrained cpu-small, synthetic blobs"
    print(f"\nrefine_crops: {source}; batch of {args.batch} images (160x160), 1 thread, "
          f"torch {torch.__version__}; median of {args.repeats}")
    print(f"boxes from the detector {boxes} ({boxes / args.batch:.1f} per image); "
          f"can reach threshold {thr} at lambda {lam}: {reach} (embedded); answered: {answered}")
    print(f"{'path':<44} {'ms/batch':>9} {'vs no refinement':>17}")
    for name, t in (("detector only (Answerer, refine off)", t_none),
                    ("per-image PIL crops (Refiner.refine)", t_old),
                    ("batched tensor crops + 1 teacher call", t_new)):
        print(f"{name:<44} {t:>9.1f} {100 * (t / t_none - 1):>+16.0f}%")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
