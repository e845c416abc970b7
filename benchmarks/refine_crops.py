"""CLIP refinement cost per batch: per-box PIL crops (``Refiner.refine``, one image at a
time) vs batched tensor crops and one teacher call (``fewshot.clip.answering.Answerer``).

    PYTHONPATH=platform:. python benchmarks/refine_crops.py --batch 8 --repeats 5

Same untrained cpu-small detector and embedded teacher as the serving benchmarks; one thread
(as a 1-CPU replica). Prints the median of ``--repeats`` runs.
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

from _stack import detector_and_refiner, make_version, test_image


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    return p


def main(args) -> None:
    from fewshot.clip.answering import Item
    from fewshot.model.image_input import decode_image

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        det, ans = detector_and_refiner(make_version(Path(tmp)))
        data = [test_image(s) for s in range(args.batch)]
        images = [Image.open(io.BytesIO(d)).convert("RGB") for d in data]
        items = [Item(decode_image(d, model_size=ans.model_size), 0.3, True) for d in data]
        unrefined = [Item(i.decoded, 0.3, False) for i in items]

        def old():
            outs = det.predict(images, 0.0)
            return [ans.refiner.refine(im, o) for im, o in zip(images, outs)]

        def timed(fn):
            fn()
            runs = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn()
                runs.append((time.perf_counter() - t0) * 1000)
            return statistics.median(runs)

        t_none = timed(lambda: ans.answer(unrefined))
        t_old = timed(old)
        t_new = timed(lambda: ans.answer(items))
        boxes = sum(len(o) for o in det.predict(images, 0.0))
    print(f"\nrefine_crops: batch of {args.batch} images (160x160), {boxes} boxes, 1 thread, "
          f"torch {torch.__version__}; median of {args.repeats}")
    print(f"{'path':<44} {'ms/batch':>9} {'vs no refinement':>17}")
    for name, t in (("detector only (Answerer, refine off)", t_none),
                    ("per-image PIL crops (Refiner.refine)", t_old),
                    ("batched tensor crops + 1 teacher call", t_new)):
        print(f"{name:<44} {t:>9.1f} {100 * (t / t_none - 1):>+16.0f}%")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
