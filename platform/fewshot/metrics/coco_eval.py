"""Detection quality with pycocotools COCOeval: bAP, nAP, bAP50, nAP50, HM and per-class AP.

bAP/nAP follow the few-shot detection protocol (Wang et al. 2020, TFA; Kang et al. 2019):
COCO AP averaged over IoU 0.50:0.95 (AP50 at IoU 0.5), computed per class from COCOeval's
precision array (area "all", 100 detections) and averaged over the base classes (the parent
class set) and over the novel classes (the ones just added). HM is the harmonic mean of the
two, the usual single figure for "learned the new without forgetting the old".
"""
from __future__ import annotations

import contextlib
import io
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from fewshot.model.batches import decode_row_image_uint8
from fewshot.model.devices import autocast, move_batch, resolve_device, resolve_precision
from fewshot.model.trunk_cache import TrunkCache, cached_trunk


@dataclass
class EvalReport:
    bAP: float
    bAP50: float
    nAP: float
    nAP50: float
    HM: float
    HM50: float
    per_class_AP: dict[str, float] = field(default_factory=dict)
    per_class_AP50: dict[str, float] = field(default_factory=dict)
    num_images: int = 0

    def headline(self) -> dict[str, float]:
        """The figures that go into registry tags and MLflow metrics (NaN ones left out)."""
        out = {k: v for k, v in asdict(self).items() if isinstance(v, float)}
        return {k: v for k, v in out.items() if not math.isnan(v)}

    def to_dict(self) -> dict:
        return asdict(self)


def harmonic_mean(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b):
        return float("nan")
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


@torch.no_grad()
def run_over_rows(
    model: nn.Module,
    rows: Iterable[Mapping],
    on_batch: Callable[[list[Mapping], list[torch.Tensor], list[dict]], None],
    batch_size: int = 8,
    *,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    trunk_cache: TrunkCache | None = None,
) -> None:
    """Run the detector in eval mode over catalog rows, ``batch_size`` at a time, on ``device``
    (default: CUDA when available, else the CPU; the model is moved there) at ``precision``
    (autocast for bf16/fp16); ``on_batch(rows, images, outputs)`` sees each batch. Images are
    decoded to uint8 on the host and become float on the device. ``trunk_cache``: reuse the
    backbone features and proposals another model with the same trunk computed on these
    images (:mod:`fewshot.model.trunk_cache`)."""
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    model.to(device).eval()
    batch: list[Mapping] = []

    def flush():
        images, _ = move_batch([decode_row_image_uint8(r["image"]) for r in batch], None, device)
        with autocast(device, precision):
            outputs = model(images)
        on_batch(list(batch), images, outputs)
        batch.clear()

    with cached_trunk(model, trunk_cache, for_training=False):
        for row in rows:
            batch.append(row)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()


def coco_results(image_id: int, det: Mapping[str, torch.Tensor], label_to_category: Sequence[int]) -> list[dict]:
    """One image's detections (torchvision's boxes/labels/scores) as COCO result dicts
    (category ids, xywh boxes)."""
    det = {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in det.items()}
    return [{"image_id": int(image_id), "category_id": int(label_to_category[label - 1]),
             "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)}
            for (x1, y1, x2, y2), label, score in zip(det["boxes"].tolist(), det["labels"].tolist(),
                                                      det["scores"].tolist())]


def predict_rows(
    model: nn.Module,
    rows: Iterable[Mapping],
    label_to_category: Sequence[int],
    batch_size: int = 8,
    *,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    trunk_cache: TrunkCache | None = None,
) -> list[dict]:
    """COCO result dicts of the detector over catalog rows (see :func:`run_over_rows` for
    ``device``, ``precision`` and ``trunk_cache``: evaluate a version in the precision it was
    validated with)."""
    results: list[dict] = []

    def keep(batch, _images, outputs):
        for row, out in zip(batch, outputs):
            results.extend(coco_results(row["image_id"], out, label_to_category))

    run_over_rows(model, rows, keep, batch_size, device=device, precision=precision, trunk_cache=trunk_cache)
    return results


def coco_evaluate(
    gt: dict,
    results: list[dict],
    base_ids: Sequence[int],
    novel_ids: Sequence[int] = (),
) -> EvalReport:
    """COCOeval over ``gt`` (a COCO dict) and ``results``; split by base and novel ids."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    names = {c["id"]: c["name"] for c in gt["categories"]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results) if results else COCO()
        if not results:
            coco_dt.dataset = {"images": gt["images"], "categories": gt["categories"], "annotations": []}
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.catIds = sorted(set(base_ids) | set(novel_ids))
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"]  # [T, R, K, A, M]
    per_ap: dict[int, float] = {}
    per_ap50: dict[int, float] = {}
    for k, cid in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        if (p > -1).any():
            per_ap[cid] = float(np.mean(p[p > -1]))
            p50 = p[0]
            per_ap50[cid] = float(np.mean(p50[p50 > -1])) if (p50 > -1).any() else float("nan")

    def mean_over(ids, table):
        vals = [table[i] for i in ids if i in table and not math.isnan(table[i])]
        return float(np.mean(vals)) if vals else float("nan")

    b, b50 = mean_over(base_ids, per_ap), mean_over(base_ids, per_ap50)
    n, n50 = mean_over(novel_ids, per_ap), mean_over(novel_ids, per_ap50)
    return EvalReport(
        bAP=b, bAP50=b50, nAP=n, nAP50=n50,
        HM=harmonic_mean(b, n), HM50=harmonic_mean(b50, n50),
        per_class_AP={names[c]: v for c, v in per_ap.items()},
        per_class_AP50={names[c]: v for c, v in per_ap50.items()},
        num_images=len(gt["images"]),
    )


@dataclass
class EvalSplit:
    """A catalog split ready to score: its rows, its ground truth as a COCO dict, and which
    category ids count as base and as novel."""

    rows: list[dict]
    gt: dict
    base_ids: list[int]
    novel_ids: list[int]

    @property
    def images(self) -> dict[int, bytes]:
        """image_id -> encoded image bytes (what refinement crops from)."""
        return {int(r["image_id"]): r["image"] for r in self.rows}

    def evaluate(self, results: list[dict]) -> EvalReport:
        keep = set(self.base_ids) | set(self.novel_ids)
        return coco_evaluate(self.gt, [r for r in results if r["category_id"] in keep],
                             base_ids=self.base_ids, novel_ids=self.novel_ids)


def load_eval_split(catalog, dataset: str, split: str, base_names: Sequence[str],
                    novel_names: Sequence[str] = (), max_images: int | None = None) -> EvalSplit:
    """The first ``max_images`` images of a catalog split (all by default), base/novel by name."""
    from catalog.coco_export import table_to_coco

    manifest = catalog.manifest(dataset)
    table = catalog.read_split(dataset, split)
    if max_images is not None and table.num_rows > max_images:
        table = table.slice(0, max_images)
    by_name = manifest.category_by_name()
    names = list(base_names) + list(novel_names)
    return EvalSplit(rows=table.to_pylist(), gt=table_to_coco(table, manifest, category_names=names),
                     base_ids=[by_name[n].id for n in base_names],
                     novel_ids=[by_name[n].id for n in novel_names])


def evaluate_checkpoint_on_split(
    checkpoint,
    catalog,
    dataset: str,
    split: str,
    base_names: Sequence[str],
    novel_names: Sequence[str] = (),
    batch_size: int = 8,
    max_images: int | None = None,
    device: str | torch.device | None = None,
    precision: str = "fp32",
) -> EvalReport:
    """Evaluate a ``DetectorCheckpoint`` on a catalog split, base/novel by class name."""
    es = load_eval_split(catalog, dataset, split, base_names, novel_names, max_images)
    results = predict_rows(checkpoint.build_model(), es.rows, checkpoint.category_ids,
                           batch_size=batch_size, device=device, precision=precision)
    return es.evaluate(results)
