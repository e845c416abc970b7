"""Inference on decoded images: a loaded checkpoint answers with named, scored pixel boxes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fewshot.model.checkpoint import DetectorCheckpoint, load_checkpoint
from fewshot.model.devices import autocast, move_batch, resolve_device, resolve_precision


class Detector:
    """A detector ready to answer: ``predict`` takes RGB images (PIL, HxWx3 uint8, or tensors)."""

    def __init__(self, checkpoint: DetectorCheckpoint, device: str | torch.device | None = None,
                 precision: str | None = None):
        """``device``: default CUDA when available, else the CPU. ``precision``: fp32, bf16 or
        fp16 (autocast); None (default) answers in the precision the version was validated in
        (``checkpoint.extra["precision"]``, the registry tag ``precision``; fp32 when absent),
        except fp16 on a device without CUDA, which falls back to fp32 with a warning."""
        self.checkpoint = checkpoint
        self.classes = list(checkpoint.classes)
        self.device = resolve_device(device)
        if precision is None:
            precision = str(checkpoint.extra.get("precision") or "fp32")
            if precision == "fp16" and self.device.type != "cuda":
                import warnings

                warnings.warn(f"this version was validated in fp16, which needs CUDA; answering in fp32 "
                              f"on {self.device}", RuntimeWarning, stacklevel=2)
                precision = "fp32"
        self.precision = resolve_precision(precision, self.device)
        self.model = checkpoint.build_model().to(self.device)
        self.model.eval()

    @classmethod
    def from_file(cls, path: str | Path, device: str | torch.device | None = None,
                  precision: str | None = None) -> "Detector":
        return cls(load_checkpoint(path), device=device, precision=precision)

    def _to_tensor(self, image) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            t = image.float()
            return (t / 255.0 if t.max() > 1.0 else t).to(self.device)
        arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"expected an RGB image, got array of shape {arr.shape}")
        # uint8 travels to the device (4x fewer bytes) and becomes float [0, 1] there
        images, _ = move_batch([torch.from_numpy(arr.copy()).permute(2, 0, 1)], None, self.device)
        return images[0]

    @torch.no_grad()
    def predict(self, images: list, score_threshold: float = 0.3) -> list[list[dict]]:
        if not images:
            return []
        with autocast(self.device, self.precision):
            outputs = self.model([self._to_tensor(im) for im in images])
        results = []
        for out in outputs:
            dets = []
            for box, label, score in zip(out["boxes"].tolist(), out["labels"].tolist(), out["scores"].tolist()):
                if score < score_threshold:
                    continue
                dets.append({
                    "box": [round(v, 2) for v in box],
                    "label": self.classes[label - 1],
                    "score": round(float(score), 4),
                })
            results.append(dets)
        return results
