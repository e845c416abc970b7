"""A detector checkpoint that carries everything needed to use it: config, class set, weights.

One file (``detector.pt``) per model version. The class list is ordered: model label i+1 is
``classes[i]``; ``category_ids`` are the catalog ids of the same classes, so predictions map
back to the dataset for evaluation. ``extra`` holds method state that travels with a version
(e.g. refinement weights).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fewshot.model.presets import DetectorConfig
from fewshot.model.detector import build_detector

FORMAT_VERSION = 1


# Training-only modules a run may attach to ``model.roi_heads`` (the CLIP distillation
# projection, :mod:`fewshot.clip.distillation`); a saved detector never holds them.
DISTILL_HEAD_ATTR = "distill_head"
TRAINING_ONLY_ATTRS = (DISTILL_HEAD_ATTR,)


def strip_training_heads(state_dict: dict) -> dict:
    """A state dict without training-only heads (what a plain detector loads strictly)."""
    markers = tuple(f"roi_heads.{attr}." for attr in TRAINING_ONLY_ATTRS)
    return {k: v for k, v in state_dict.items() if not any(m in k for m in markers)}


@dataclass
class DetectorCheckpoint:
    config: DetectorConfig
    classes: list[str]
    category_ids: list[int]
    dataset: str
    class_set: str
    state_dict: dict[str, torch.Tensor]
    extra: dict = field(default_factory=dict)

    def build_model(self) -> nn.Module:
        model = build_detector(self.config, num_classes=len(self.classes) + 1)
        model.load_state_dict(self.state_dict)
        model.eval()
        return model


def save_checkpoint(path: str | Path, model: nn.Module, config: DetectorConfig, classes: list[str],
                    category_ids: list[int], dataset: str, class_set: str,
                    extra: dict | None = None) -> Path:
    if len(classes) != len(category_ids):
        raise ValueError("classes and category_ids must have the same length")
    num_rows = model.roi_heads.box_predictor.num_classes
    if num_rows != len(classes) + 1:
        raise ValueError(f"model has {num_rows} classifier rows but {len(classes)} classes (+1 background)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # training-only heads (the distillation projection) are not part of the detector
    state = {k: v.detach().cpu() for k, v in strip_training_heads(model.state_dict()).items()}
    payload = {
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "classes": list(classes),
        "category_ids": [int(c) for c in category_ids],
        "dataset": dataset,
        "class_set": class_set,
        "state_dict": state,
        "extra": extra or {},
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: str | Path | bytes) -> DetectorCheckpoint:
    """A checkpoint from a file, or from its bytes (what Ray Train workers on other nodes get)."""
    if isinstance(path, (bytes, bytearray, memoryview)):
        import io

        payload = torch.load(io.BytesIO(bytes(path)), map_location="cpu", weights_only=True)
        path = "checkpoint bytes"
    else:
        payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported checkpoint format {payload.get('format_version')!r}")
    return DetectorCheckpoint(
        config=DetectorConfig.from_dict(payload["config"]),
        classes=list(payload["classes"]),
        category_ids=list(payload["category_ids"]),
        dataset=payload["dataset"],
        class_set=payload["class_set"],
        state_dict=payload["state_dict"],
        extra=payload.get("extra", {}),
    )


def update_extra(path: str | Path, extra: dict) -> Path:
    """Merge ``extra`` into the ``extra`` of the checkpoint file at ``path`` (atomic rewrite)."""
    path = Path(path)
    payload = torch.load(path, map_location="cpu", weights_only=True)
    payload["extra"] = {**payload.get("extra", {}), **extra}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path
