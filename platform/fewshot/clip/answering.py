"""The one answer a model version gives: detector, then CLIP refinement, item by item isolated.

Ray Serve's ``/v1/detect`` and the MLflow pyfunc flavour both answer through
:class:`Answerer`, so for the same bytes, threshold and refinement switch they give the same
boxes, labels and scores. A batch is run as a batch (one detector call, one teacher call for
the crops of every box of every image); when a batched step fails, its items are retried one
by one so only the item that fails gets an error (returned in its place, never raised).

Math layer: no ray, no mlflow.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fewshot.clip.batch_crops import clip_probs_batched
from fewshot.model.image_input import DecodedImage

__all__ = ["Item", "Answerer"]


@dataclass(frozen=True)
class Item:
    decoded: DecodedImage
    score_threshold: float = 0.3
    refine: bool = True


class Answerer:
    """``detector``: a :class:`fewshot.model.inference.Detector`; ``refiner``: a
    :class:`fewshot.clip.refinement.Refiner` whose teacher is loaded (or None)."""

    def __init__(self, detector, refiner=None):
        self.detector = detector
        self.refiner = refiner
        self.classes = list(detector.classes)
        self.device = detector.device
        cfg = detector.checkpoint.config
        self.model_size = (int(cfg.min_size), int(cfg.max_size))

    @property
    def can_refine(self) -> bool:
        return self.refiner is not None and self.refiner.fusion_weight > 0.0

    def warmup(self) -> None:
        """Run every step once (allocations, lazy inits) so the first request is not slow,
        and so a model that cannot answer fails here, before it is served."""
        from PIL import Image

        img = Image.new("RGB", (96, 80), (127, 127, 127))
        out = self.answer([Item(DecodedImage(img, 96, 80), 0.0, True)])[0]
        if isinstance(out, Exception):
            raise out
        if self.refiner is not None:  # the teacher too, even when the detector found nothing
            t = self._to_tensor(img)
            clip_probs_batched(self.refiner, [t], [torch.tensor([[10.0, 10.0, 50.0, 40.0]])])

    def _to_tensor(self, image) -> torch.Tensor:
        arr = np.asarray(image, dtype=np.uint8)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"expected an RGB image, got an array of shape {arr.shape}")
        t = torch.from_numpy(arr.copy()).to(self.device).permute(2, 0, 1)
        return t.float().div_(255.0)

    @torch.no_grad()
    def _detect(self, tensors: dict[int, torch.Tensor]) -> dict[int, dict | Exception]:
        keys = list(tensors)
        if not keys:
            return {}
        try:
            outs = self.detector.model([tensors[k] for k in keys])
            return dict(zip(keys, outs))
        except Exception as err:
            if len(keys) == 1:
                return {keys[0]: err}
        found: dict[int, dict | Exception] = {}
        for k in keys:  # isolate the item(s) that fail
            found.update(self._detect({k: tensors[k]}))
        return found

    def _clip(self, tensors: dict[int, torch.Tensor], boxes: dict[int, torch.Tensor]
              ) -> dict[int, torch.Tensor | Exception]:
        keys = list(tensors)
        if not keys:
            return {}
        try:
            probs = clip_probs_batched(self.refiner, [tensors[k] for k in keys], [boxes[k] for k in keys])
            return dict(zip(keys, probs))
        except Exception as err:
            if len(keys) == 1:
                return {keys[0]: err}
        found: dict[int, torch.Tensor | Exception] = {}
        for k in keys:
            found.update(self._clip({k: tensors[k]}, {k: boxes[k]}))
        return found

    def answer(self, items: list[Item]) -> list[list[dict] | Exception]:
        """One list of detections (or the exception that item met) per item, in order.

        A detection is ``{"box": [x1, y1, x2, y2] in upload pixels, "label", "score"}``; a
        refined one also has ``det_score`` (the detector's) and ``clip_score`` (CLIP's
        probability of the label); ``score`` is the fused one. Best first; only scores
        >= the item's ``score_threshold``."""
        results: list = [None] * len(items)
        tensors: dict[int, torch.Tensor] = {}
        for i, it in enumerate(items):
            try:
                tensors[i] = self._to_tensor(it.decoded.image)
            except Exception as err:
                results[i] = err
        raw = self._detect(tensors)
        for i, out in raw.items():
            if isinstance(out, Exception):
                results[i] = out
        ok = [i for i in raw if not isinstance(raw[i], Exception)]
        refine_ok = [i for i in ok if items[i].refine and self.can_refine]
        for i in refine_ok:
            raw[i] = self._reachable(raw[i], items[i].score_threshold)
        to_refine = [i for i in refine_ok if raw[i]["boxes"].shape[0]]
        # a refiner whose fusion weight is 0 leaves the scores as they are: no teacher call
        probs = self._clip({i: tensors[i] for i in to_refine}, {i: raw[i]["boxes"] for i in to_refine})
        del tensors
        for i in ok:
            try:
                p = probs.get(i)
                if isinstance(p, Exception):
                    raise p
                results[i] = self._format(items[i], raw[i], p,
                                          refined=items[i].refine and self.refiner is not None)
            except Exception as err:
                results[i] = err
        return results

    def _reachable(self, out: dict, threshold: float) -> dict:
        """Only the boxes whose fused score can still reach ``threshold``: with fusion weight
        lambda, ``(1 - lambda) * s_det + lambda * p_clip <= (1 - lambda) * s_det + lambda``,
        so a box below ``(threshold - lambda) / (1 - lambda)`` is never answered and is not
        cropped or embedded (a small margin keeps those the 4-decimal rounding could lift)."""
        lam = self.refiner.fusion_weight
        keep = (1.0 - lam) * out["scores"].float() + lam >= threshold - 1e-4
        if bool(keep.all()):
            return out
        n = keep.shape[0]
        return {k: (v[keep] if torch.is_tensor(v) and v.ndim and v.shape[0] == n else v) for k, v in out.items()}

    def _format(self, item: Item, out: dict, probs: torch.Tensor | None, refined: bool = False) -> list[dict]:
        sx, sy = item.decoded.scale
        boxes = (out["boxes"].float().cpu() * torch.tensor([sx, sy, sx, sy])).tolist()
        labels = out["labels"].cpu().tolist()
        scores = out["scores"].float().cpu().tolist()
        lam = self.refiner.fusion_weight if probs is not None else 0.0
        p_label = None
        if probs is not None:
            cols = (torch.as_tensor(labels, dtype=torch.long) - 1).clamp(min=0)
            p_label = probs.float().gather(1, cols.view(-1, 1)).squeeze(1).tolist()
        dets = []
        for j, (box, label, s_det) in enumerate(zip(boxes, labels, scores)):
            d = {"box": [round(v, 2) for v in box], "label": self.classes[label - 1]}
            if p_label is None:
                d["score"] = round(float(s_det), 4)
                if refined:  # fusion weight 0: refined answers still say the detector's score
                    d["det_score"] = d["score"]
            else:
                d["score"] = round((1.0 - lam) * s_det + lam * p_label[j], 4)
                d["det_score"] = round(float(s_det), 4)
                d["clip_score"] = round(float(p_label[j]), 4)
            if d["score"] >= item.score_threshold:
                dets.append(d)
        dets.sort(key=lambda d: -d["score"])
        return dets


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None: the current CUDA device when there is one (Ray sets which one a
    replica sees), else CPU; ``"cuda"`` means the current CUDA device, never a fixed index."""
    if device is None or str(device) == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' asked for but torch sees no CUDA device on this worker")
        return torch.device("cuda", torch.cuda.current_device())
    return dev


def load_refiner(detector, *, teacher_spec: str | None = None, device: str | torch.device = "cpu"):
    """The version's CLIP refiner with its teacher loaded on ``device``, or ``(None, why not)``.

    ``teacher_spec`` overrides where the teacher is loaded from (the carried artifact, a
    path on this machine); the stored teacher id is still checked."""
    from fewshot.clip.refinement import EXTRA_KEY, Refiner
    from fewshot.clip.teacher import load_teacher

    extra = detector.checkpoint.extra or {}
    if EXTRA_KEY not in extra:
        return None, "this model version has no CLIP refiner"
    try:
        refiner = Refiner.from_extra(extra, teacher_spec=teacher_spec)
        if list(refiner.class_names) != list(detector.classes):
            return None, "the stored refiner's classes differ from the model's"
        refiner.set_teacher(load_teacher(refiner.teacher_spec, device=device))
        return refiner, ""
    except Exception as err:  # missing teacher weights on this machine: answer unrefined
        return None, f"the refiner's teacher could not be loaded here: {type(err).__name__}: {err}"
