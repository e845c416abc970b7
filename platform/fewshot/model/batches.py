"""From catalog rows to detector inputs.

A catalog row (see ``catalog.schema``) holds encoded image bytes, pixel boxes and category ids.
The detector wants a float image tensor and a target with ``boxes`` and contiguous ``labels``
(1..C in class-set order, 0 is background). Annotations of categories outside the class set
are dropped (those objects become background, as in the few-shot protocol), and crowd
annotations never train.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image

from catalog.schema import TEACHER_EMB_COLUMN


def class_index(class_ids: Sequence[int]) -> dict[int, int]:
    """Category id -> contiguous model label (1-based, in class-set order)."""
    return {int(cid): i + 1 for i, cid in enumerate(class_ids)}


PIXELS_COLUMN = "pixels"  # decoded uint8 [3, H, W] images, added by :func:`decode_column_batch`


def decode_row_image_uint8(data: bytes) -> torch.Tensor:
    """Encoded bytes -> uint8 tensor [3, H, W] (4x smaller to ship and copy than float)."""
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return decode_image(raw, mode=ImageReadMode.RGB)


def decode_row_image(data: bytes) -> torch.Tensor:
    """Encoded bytes -> float tensor [3, H, W] in [0, 1]."""
    return decode_row_image_uint8(data).float().div_(255.0)


def row_to_target(row: Mapping, index: Mapping[int, int]) -> dict[str, torch.Tensor]:
    """``boxes`` [n, 4] and ``labels`` [n] of the kept annotations; when the row carries
    teacher embeddings (``teacher_emb``, one per box of the row, see
    ``catalog.teacher_cache``) also ``teacher_emb`` [n, E] of the same kept boxes."""
    boxes, labels, kept = [], [], []
    crowd = row.get("iscrowd") or [False] * len(row["category_ids"])
    for k, (box, cid, is_crowd) in enumerate(zip(row["boxes"], row["category_ids"], crowd)):
        label = index.get(int(cid))
        if label is None or is_crowd:
            continue
        x1, y1, x2, y2 = (float(v) for v in box)
        if x2 - x1 < 1.0 or y2 - y1 < 1.0:
            continue
        boxes.append([x1, y1, x2, y2])
        labels.append(label)
        kept.append(k)
    target = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }
    emb = row.get(TEACHER_EMB_COLUMN)
    if emb is not None and len(emb) == len(row["category_ids"]):
        table = torch.as_tensor(np.asarray([list(e) for e in emb], dtype=np.float32))
        if table.ndim == 2:
            target[TEACHER_EMB_COLUMN] = table[kept]
    return target


def hflip(image: torch.Tensor, target: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    width = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    return image.flip(-1), {**target, "boxes": boxes}


def rows_to_batch(
    rows: Iterable[Mapping],
    index: Mapping[int, int],
    rng: np.random.Generator | None = None,
    flip_prob: float = 0.5,
    uint8: bool = False,
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Decode rows into (images, targets); random horizontal flips when ``rng`` is given.

    ``uint8``: images stay uint8 [3, H, W] (the training loop converts them on its device,
    :func:`fewshot.model.devices.move_batch`, to the same float values). A row that already
    carries decoded pixels (``pixels``, see :func:`decode_column_batch`) is not decoded again."""
    images, targets = [], []
    for row in rows:
        pixels = row.get(PIXELS_COLUMN) if hasattr(row, "get") else None
        if pixels is not None:
            image = torch.from_numpy(np.ascontiguousarray(pixels))
        else:
            image = decode_row_image_uint8(row["image"])
        if not uint8:
            image = image.float().div_(255.0)
        target = row_to_target(row, index)
        if rng is not None and rng.random() < flip_prob:
            image, target = hflip(image, target)
        images.append(image)
        targets.append(target)
    return images, targets


def random_batches(
    rows: Sequence[Mapping],
    index: Mapping[int, int],
    batch_size: int,
    seed: int,
    uint8: bool = False,
) -> Iterator[tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]]:
    """Endless shuffled batches of ``rows`` with random flips (in-process fine-tuning).

    Each pass over the rows is a fresh permutation; a batch never repeats an image while
    there are at least ``batch_size`` rows."""
    if not rows:
        raise ValueError("no rows to train on")
    rng = np.random.default_rng(seed)
    order: list[int] = []
    while True:
        while len(order) < batch_size:
            order.extend(rng.permutation(len(rows)).tolist())
        take, order = order[:batch_size], order[batch_size:]
        yield rows_to_batch([rows[i] for i in take], index, rng=rng, uint8=uint8)


def columnar_to_rows(batch: Mapping[str, Sequence]) -> list[dict]:
    """A Ray Data / pyarrow column batch (dict of columns) -> list of row dicts."""
    keys = list(batch.keys())
    n = len(batch[keys[0]]) if keys else 0
    # decoded pixels stay numpy arrays (a nested list of a whole image would cost more than decoding it)
    return [{k: (np.asarray(batch[k][i]) if k == PIXELS_COLUMN else _plain(batch[k][i])) for k in keys}
            for i in range(n)]


def decode_column_batch(batch: Mapping[str, Sequence]) -> dict:
    """A column batch of catalog rows with the encoded ``image`` bytes replaced by decoded
    uint8 ``pixels`` [3, H, W] (one array per row). Ray Data runs it as ``map_batches`` in its
    own tasks (``fewshot.backends.ray_train``), so no training step waits on JPEG/PNG decoding."""
    out = {k: v for k, v in batch.items() if k != "image"}
    pixels = [decode_row_image_uint8(bytes(b)).numpy() for b in batch["image"]]
    arr = np.empty(len(pixels), dtype=object)
    arr[:] = pixels
    out[PIXELS_COLUMN] = arr
    return out


def prefetch(items: Iterator, depth: int = 2, fn: Callable | None = None) -> Iterator:
    """Yield ``fn(item)`` for the items of ``items``, produced ``depth`` ahead by a background
    thread (batch assembly and pinning overlap the step; torch ops release the GIL). The
    order is the iterator's; an exception in the thread is raised here."""
    fn = fn or (lambda x: x)
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    done = object()
    stop = threading.Event()

    def work():
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put((True, fn(item)))
            q.put((True, done))
        except BaseException as err:  # noqa: BLE001 - re-raised in the consumer
            q.put((False, err))

    thread = threading.Thread(target=work, name="batch-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, value = q.get()
            if not ok:
                raise value
            if value is done:
                return
            yield value
    finally:
        stop.set()


def _plain(value):
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            return [_plain(v) for v in value]
        return value.tolist()
    return value
