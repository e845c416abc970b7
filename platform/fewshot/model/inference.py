"""Inference on decoded images: a loaded checkpoint answers with named, scored pixel boxes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fewshot.model.checkpoint import DetectorCheckpoint, load_checkpoint


class Detector:
    """A detector ready to answer: ``predict`` takes RGB images (PIL, HxWx3 uint8, or tensors)."""

    def __init__(self, checkpoint: DetectorCheckpoint, device: str | torch.device = "cpu"):
        self.checkpoint = checkpoint
        self.classes = list(checkpoint.classes)
        self.device = torch.device(device)
        self.model = checkpoint.build_model().to(self.device)
        self.model.eval()

    @classmethod
    def from_file(cls, path: str | Path, device: str | torch.device = "cpu") -> "Detector":
        return cls(load_checkpoint(path), device=device)

    def _to_tensor(self, image) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            t = image.float()
            return (t / 255.0 if t.max() > 1.0 else t).to(self.device)
        arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"expected an RGB image, got array of shape {arr.shape}")
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0).to(self.device)

    @torch.no_grad()
    def predict(self, images: list, score_threshold: float = 0.3) -> list[list[dict]]:
        if not images:
            return []
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
