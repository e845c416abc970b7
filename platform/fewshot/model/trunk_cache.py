"""Memoise a frozen detector trunk (backbone + FPN features and RPN proposals) per input image.

When the backbone and the RPN are frozen (``--freeze backbone`` or ``head``), every fine-tuning
step recomputes, for each image of its batch, features and proposals that can never change:
the few-shot support set holds a few dozen images (twice that with horizontal flips), and a
fine-tune of 100-150 steps × 8 images sees each of them ten times or more. The ablation and a
Tune trial fine-tune several variants from the same trunk and score each of them on the same
val/test images. Inside :func:`cached_trunk` the detector's ``backbone`` and ``rpn`` look
every image up in a :class:`TrunkCache` first and run their own forward only on the images
they have not seen; the RoI heads (what trains) run as before.

What it changes, and why that is exact:

- the key is a digest of the image tensor the backbone receives (after the model's resize,
  normalisation and batch padding), with the mode that changes the RPN's output (training
  uses ``rpn_pre/post_nms_top_n_train``) and the autograd mode;
- the frozen RPN's losses are not returned: they depend on no trainable parameter, so they
  add nothing to any gradient (the loop's logged total loss leaves out those two constants),
  and on a cache miss they are computed outside the run's random stream, so a fine-tune draws
  the same RoI samples whether the cache was cold or filled by an earlier run;
- a batch's features are computed on the images not yet cached as their own, smaller batch:
  frozen batch norm and group norm make each image's features independent of the others', up
  to float rounding of the convolution kernels chosen per batch size (``tests/test_trunk_cache.py``
  checks the detections against the uncached model).

The cache refuses a model whose backbone or RPN has a parameter that trains, and a model whose
trunk weights differ from the ones it was filled with (a fingerprint of their values). It keeps
at most ``max_bytes`` of features (2 GiB by default: about 8,000 lite0-fpn images at 224 px, or
150 r50-fpn images at 800 px); past that, new images are computed as usual and not kept.
Math layer: no ray, no mlflow.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from torchvision.models.detection.image_list import ImageList


def _digest(t: torch.Tensor) -> bytes:
    data = t.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=16)
    h.update(str((tuple(data.shape), str(data.dtype))).encode())
    h.update(data.view(torch.uint8).numpy().tobytes() if data.dtype == torch.bfloat16
             else data.numpy().tobytes())
    return h.digest()


def trunk_fingerprint(model: nn.Module) -> bytes:
    """A digest of the backbone's and the RPN's weights and buffers (what the cache memoises)."""
    h = hashlib.blake2b(digest_size=16)
    for prefix, module in (("backbone", model.backbone), ("rpn", model.rpn)):
        for name, t in module.state_dict().items():
            h.update(f"{prefix}.{name}".encode())
            h.update(_digest(t))
    return h.digest()


def trainable_trunk_parameters(model: nn.Module) -> list[str]:
    """Names of the backbone's and RPN's parameters that train, and of their batch norms that
    would update running statistics (and mix images of a batch) in training mode."""
    names = [f"{prefix}.{name}" for prefix, module in (("backbone", model.backbone), ("rpn", model.rpn))
             for name, p in module.named_parameters() if p.requires_grad]
    return names + [f"{prefix}.{name} (batch norm in training mode)"
                    for prefix, module in (("backbone", model.backbone), ("rpn", model.rpn))
                    for name, m in module.named_modules()
                    if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]


class TrunkCache:
    """Features and proposals of a frozen trunk, per image; share one between models that have
    the same trunk weights (the variants of one ablation draw, the draws of one Tune trial)."""

    def __init__(self, max_bytes: int = 2 << 30) -> None:
        self.fingerprint: bytes | None = None
        self.features: dict[tuple, "OrderedDict[str, torch.Tensor]"] = {}
        self.proposals: dict[tuple, torch.Tensor] = {}
        self.max_bytes = int(max_bytes)  # past it, new images are computed but not kept
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def keep(self, key: tuple, features: "OrderedDict[str, torch.Tensor]") -> None:
        size = sum(f.numel() * f.element_size() for f in features.values())
        if self.bytes + size <= self.max_bytes:
            self.features[key] = features
            self.bytes += size

    def __len__(self) -> int:
        return len(self.features)

    def bind(self, model: nn.Module, for_training: bool = True) -> None:
        """Check that ``model``'s trunk is the one this cache holds (or take it) and, when it is
        about to train, that no parameter of it trains."""
        trainable = trainable_trunk_parameters(model) if for_training else []
        if trainable:
            raise ValueError(f"the trunk cache needs a frozen backbone and RPN; these train: "
                             f"{trainable[:3]}{' ...' if len(trainable) > 3 else ''}")
        fp = trunk_fingerprint(model)
        if self.fingerprint is None:
            self.fingerprint = fp
        elif fp != self.fingerprint:
            raise ValueError("this trunk cache holds another model's features (the backbone or RPN "
                             "weights differ); use one cache per trunk")


# the freezing policies under which the backbone and the RPN never change
# (fewshot.learning.freezing.POLICIES; a name here, so this module imports no learning code)
FROZEN_TRUNK_POLICIES = ("backbone", "head")


def use_trunk_cache(freeze: str, device: torch.device | str) -> bool:
    """Whether a run should read its trunk through a cache: the policy freezes the trunk, and
    the run is on the CPU. On a GPU the trunk costs milliseconds, and the digest's copy of
    every image to the host would eat most of what the cache saves (not measured here)."""
    return freeze in FROZEN_TRUNK_POLICIES and torch.device(device).type == "cpu"


def _mode_key() -> tuple:
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
            torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None,
            torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None)


class _TrunkReader:
    """The cached forwards of one model's backbone and RPN (installed as instance ``forward``
    attributes, so module names and the state dict stay as they are)."""

    def __init__(self, backbone: nn.Module, rpn: nn.Module, cache: TrunkCache):
        self.backbone, self.rpn, self.cache = backbone, rpn, cache
        self.plain_backbone = type(backbone).forward.__get__(backbone)
        self.plain_rpn = type(rpn).forward.__get__(rpn)
        self.last_keys: list[tuple] = []

    def backbone_forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        mode = (_mode_key(), self.backbone.training)
        keys = [(_digest(img), mode) for img in x]
        missing = [i for i, k in enumerate(keys) if k not in self.cache.features]
        fresh = {}
        if missing:
            computed = self.plain_backbone(x[missing])
            for j, i in enumerate(missing):
                fresh[i] = OrderedDict((n, f[j]) for n, f in computed.items())
                self.cache.keep(keys[i], fresh[i])
        self.cache.misses += len(missing)
        self.cache.hits += len(keys) - len(missing)
        self.last_keys = keys
        per_image = [fresh[i] if i in fresh else self.cache.features[k] for i, k in enumerate(keys)]
        return OrderedDict((n, torch.stack([f[n] for f in per_image])) for n in per_image[0])

    def rpn_forward(self, images: ImageList, features, targets=None):
        if len(self.last_keys) != len(images.image_sizes):
            raise RuntimeError("the cached RPN ran without the cached backbone's keys")
        keys = [(k, tuple(size), self.rpn.training) for k, size in zip(self.last_keys, images.image_sizes)]
        missing = [i for i, k in enumerate(keys) if k not in self.cache.proposals]
        if missing:
            sub = ImageList(images.tensors[missing], [images.image_sizes[i] for i in missing])
            sub_features = OrderedDict((n, f[missing]) for n, f in features.items())
            sub_targets = [targets[i] for i in missing] if targets is not None else None
            # the frozen RPN's loss samples anchors with the global generator: keep it out of
            # the run's random stream, so a run draws the same RoIs with a cold or a warm cache
            with torch.random.fork_rng(devices=[]):
                proposals, _frozen_losses = self.plain_rpn(sub, sub_features, sub_targets)
            fresh = {i: proposals[j].detach() for j, i in enumerate(missing)}
            for i, p in fresh.items():
                if keys[i][0] in self.cache.features:  # the image's features were kept
                    self.cache.proposals[keys[i]] = p
            return [fresh[i] if i in fresh else self.cache.proposals[k] for i, k in enumerate(keys)], {}
        return [self.cache.proposals[k] for k in keys], {}


@contextmanager
def cached_trunk(model: nn.Module, cache: TrunkCache | None, for_training: bool = True
                 ) -> Iterator[nn.Module]:
    """Within the block, ``model`` (a torchvision Faster R-CNN, not a DDP wrapper: pass the
    module it wraps) reads its frozen trunk through ``cache``; its modules, names and state dict
    stay as they are (a checkpoint saved inside the block is a plain one). ``None``: no caching.
    ``for_training=False`` (inference only) skips the check that the trunk does not train."""
    if cache is None:
        yield model
        return
    cache.bind(model, for_training)
    reader = _TrunkReader(model.backbone, model.rpn, cache)
    model.backbone.forward = reader.backbone_forward
    model.rpn.forward = reader.rpn_forward
    try:
        yield model
    finally:
        del model.backbone.forward
        del model.rpn.forward
