"""Expandable cosine classifier and the box predictor that carries it.

The classifier scores a RoI feature x against one weight row per class (row 0 is background)
by scaled cosine similarity, s_c = tau * <x/|x|, w_c/|w_c|> (Wang et al., "Frustratingly Simple
Few-Shot Object Detection", ICML 2020, Sec. 3.2: cosine box classifier). Rows are kept in two
blocks: ``weight_old`` (frozen, never updated again) and ``weight_new`` (trainable). Adding
classes moves every current row into the frozen block unchanged and appends new rows imprinted
from support RoI features (Qi et al., "Low-Shot Learning with Imprinted Weights", CVPR 2018:
the normalised mean embedding of the class's examples), so the rows of earlier classes stay
bit-identical across every later class set.

Every row also carries a logit offset (``logit_bias``, zero unless set): bias correction
(Wu et al., "Large Scale Incremental Learning", CVPR 2019, Sec. 3.3, Eq. 3, the correction
``alpha * o_k + beta`` on the new classes' logits, here with ``alpha = 1``) chosen on val after
fine-tuning by :mod:`fewshot.learning.bias_correction`; an increment's offsets move into the
frozen block with its rows and stay fixed.

Box regression is class-agnostic (one set of deltas, repeated per class for torchvision's
post-processing), so a new class needs no new regression rows and old localisation is kept.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CosineClassifier(nn.Module):
    def __init__(self, in_features: int, num_classes: int, scale: float = 20.0):
        super().__init__()
        self.in_features = in_features
        self.scale = scale
        self.weight_old = nn.Parameter(torch.empty(0, in_features), requires_grad=False)
        self.weight_new = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.normal_(self.weight_new, std=0.01)
        self.register_buffer("logit_bias", torch.zeros(num_classes))

    @property
    def num_classes(self) -> int:
        return self.weight_old.shape[0] + self.weight_new.shape[0]

    def weight(self) -> torch.Tensor:
        return torch.cat([self.weight_old, self.weight_new], dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 even under autocast: scale * cosine in bf16 would move logits by ~0.1 (tiny matmul)
        with torch.autocast(device_type=x.device.type, enabled=False):
            w = self.weight().float()
            logits = self.scale * F.normalize(x.float(), dim=1) @ F.normalize(w, dim=1).t()
            return logits + self.logit_bias.float()

    @torch.no_grad()
    def set_new_bias(self, value: float) -> None:
        """Offset every trainable (newest) row's logit by ``value``; old rows keep theirs."""
        self.logit_bias[self.weight_old.shape[0]:] = value

    @torch.no_grad()
    def expand(self, new_rows: torch.Tensor) -> None:
        """Freeze every current row and append ``new_rows`` ([n_new, in_features]) as trainable."""
        if new_rows.ndim != 2 or new_rows.shape[1] != self.in_features:
            raise ValueError(
                f"new rows must have shape [n, {self.in_features}], got {tuple(new_rows.shape)}"
            )
        old = torch.cat([self.weight_old.data, self.weight_new.data], dim=0).clone()
        device = old.device
        self.weight_old = nn.Parameter(old, requires_grad=False)
        self.weight_new = nn.Parameter(new_rows.detach().to(device=device, dtype=old.dtype).clone())
        self.logit_bias = torch.cat([self.logit_bias, self.logit_bias.new_zeros(new_rows.shape[0])])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Block sizes vary between class sets: take the shapes from the checkpoint.
        for name in ("weight_old", "weight_new"):
            key = prefix + name
            if key in state_dict:
                current = getattr(self, name)
                # on this module's device: a model already on a GPU loads a CPU checkpoint
                setattr(self, name, nn.Parameter(
                    torch.empty(state_dict[key].shape, dtype=current.dtype, device=current.device),
                    requires_grad=current.requires_grad))
        rows = self.weight_old.shape[0] + self.weight_new.shape[0]
        # checkpoints saved before the offsets existed hold none: zero for every row
        if prefix + "logit_bias" not in state_dict:
            state_dict[prefix + "logit_bias"] = torch.zeros(rows)
        self.logit_bias = torch.zeros(rows, dtype=self.logit_bias.dtype, device=self.logit_bias.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def imprint_rows(features: torch.Tensor, labels: torch.Tensor, classes: list[int],
                 center: torch.Tensor | None = None) -> torch.Tensor:
    """One imprinted row per class in ``classes``: normalised mean of its normalised features.

    ``center`` (optional, [D]) is subtracted from the class mean before normalising. RoI
    features after the box head's ReLU all lie in the positive orthant, so a plain class mean
    has a high cosine with *every* RoI and the new row out-scores the old classes on their own
    objects; the mean over all support boxes (old classes included) removes that shared part
    and leaves what is specific to the class.
    """
    rows = []
    normed = F.normalize(features, dim=1)
    for c in classes:
        sel = normed[labels == c]
        if sel.numel() == 0:
            raise ValueError(f"no support RoI feature for class index {c}")
        mean = sel.mean(dim=0)
        if center is not None:
            mean = mean - center
        rows.append(F.normalize(mean, dim=0))
    return torch.stack(rows)


class CosineBoxPredictor(nn.Module):
    """Drop-in replacement for torchvision's FastRCNNPredictor.

    ``balancer`` (optional) is consulted where the shared RoI feature splits into the
    classification and regression branches (identity forward, scaled backward).
    """

    def __init__(self, in_channels: int, num_classes: int, scale: float = 20.0):
        super().__init__()
        self.cls_score = CosineClassifier(in_channels, num_classes, scale)
        self.bbox_pred = nn.Linear(in_channels, 4)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.bbox_pred.bias)
        self.balancer = None

    @property
    def num_classes(self) -> int:
        return self.cls_score.num_classes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.flatten(start_dim=1)
        x_cls, x_reg = x, x
        if self.balancer is not None and self.training and torch.is_grad_enabled():
            # a fewshot.balancers.TaskBalancer, attached for training only
            x_cls, x_reg = self.balancer.split(x)
        scores = self.cls_score(x_cls)
        # box deltas in fp32 under autocast: decoded bf16 boxes would snap to several pixels
        deltas = self.bbox_pred(x_reg).float()
        return scores, deltas.repeat(1, self.num_classes)
