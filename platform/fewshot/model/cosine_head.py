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

**Scoring each class against the classes it was added beside** (``per_increment_scores``). The
rows of every increment end at a recorded index (``increment_ends``: the base's rows, then each
increment's). With per-increment scoring a class of increment g is scored by a softmax over the
rows that existed when it was added (background, the base, increments 1..g) and not over the
rows added later::

    p(c | x) = softmax(s_0 .. s_{e_g - 1})_c        for c in increment g, ends e_0 < e_1 < ...

so an old class scores a RoI exactly as it would if no later row existed, and a later class is
scored against everything (joint scoring, the plain softmax over all rows, is the special case
of a single increment). The old classes' probabilities computed without the new classes'
logits are the separated softmax of Ahn et al., "SS-IL: Separated Softmax for Incremental
Learning", ICCV 2021 (Sec. 3.2, there in the training loss), and the base classes answered
apart from the novel ones is what the base branch of Fan et al., "Generalized Few-Shot Object
Detection without Forgetting", CVPR 2021, does with a second head; here one softmax per
increment, and with :mod:`fewshot.model.retained_heads` the parent's frozen head too.
Training is unchanged (the loss is the joint softmax, so the new rows still learn to reject
old objects); only the scores a detection carries change. What it
removes: the new rows' competition on old objects, which was about half of what a child
loses on the old classes (README *Where the last base points go*). What it gives up: joint
scoring's new rows also push down the old classes' false detections on new objects, which per
increment keep the parent's score; which of the two wins depends on the data (README
*Per-increment scoring*, *Three increments*: val preferred joint in the three-increment chain),
so ``add_classes --scoring auto`` (the default) chooses per version on val
(:func:`fewshot.learning.bias_correction.choose_scoring`); a classifier scores jointly unless
told otherwise.

Box regression is class-agnostic (one set of deltas, repeated per class for torchvision's
post-processing), so a new class needs no new regression rows and old localisation is kept.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


Scoring = Literal["per-increment", "joint"]
SCORINGS: tuple[str, ...] = ("per-increment", "joint")
DEFAULT_SCORING: Scoring = "joint"   # a classifier's scoring until one is chosen (the training loss's)
ScoringChoice = Literal["auto", "joint", "per-increment"]   # what add_classes --scoring takes
AUTO_SCORINGS: tuple[Scoring, ...] = ("joint", "per-increment")   # auto's candidates; ties go to joint


class CosineClassifier(nn.Module):
    def __init__(self, in_features: int, num_classes: int, scale: float = 20.0):
        super().__init__()
        self.in_features = in_features
        self.scale = scale
        self.weight_old = nn.Parameter(torch.empty(0, in_features), requires_grad=False)
        self.weight_new = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.normal_(self.weight_new, std=0.01)
        self.register_buffer("logit_bias", torch.zeros(num_classes))
        self.register_buffer("increment_ends", torch.tensor([num_classes], dtype=torch.long))
        self.register_buffer("per_increment_scores", torch.tensor(False))

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

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities of ``logits`` ([R, C]): the joint softmax, or with
        ``per_increment_scores`` each increment's columns from the softmax over the rows up to
        its end (module docstring)."""
        ends = [int(e) for e in self.increment_ends]
        if not bool(self.per_increment_scores) or len(ends) < 2:
            return F.softmax(logits, -1)
        if ends[-1] != logits.shape[-1]:
            raise ValueError(f"increment ends {ends} do not cover the {logits.shape[-1]} logit columns")
        parts, start = [], 0
        for end in ends:
            parts.append(F.softmax(logits[:, :end], -1)[:, start:end])
            start = end
        return torch.cat(parts, dim=1)

    @torch.no_grad()
    def set_scoring(self, scoring: Scoring) -> None:
        """Score each class against the rows that existed when it was added ('per-increment') or
        against every row ('joint', the plain softmax)."""
        if scoring not in SCORINGS:
            raise ValueError(f"unknown scoring {scoring!r}; choose one of {SCORINGS}")
        self.per_increment_scores.fill_(scoring == "per-increment")

    @property
    def scoring(self) -> Scoring:
        return "per-increment" if bool(self.per_increment_scores) else "joint"

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
        self.increment_ends = torch.cat([self.increment_ends, self.increment_ends.new_tensor([self.num_classes])])

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
        # checkpoints saved before per-increment scoring: the blocks' split is the only boundary
        # they kept, and they are scored jointly, as they were when registered
        if prefix + "increment_ends" not in state_dict:
            old = self.weight_old.shape[0]
            state_dict[prefix + "increment_ends"] = torch.tensor([old, rows] if old else [rows])
        state_dict.setdefault(prefix + "per_increment_scores", torch.tensor(False))
        self.increment_ends = torch.zeros(state_dict[prefix + "increment_ends"].shape, dtype=torch.long,
                                          device=self.increment_ends.device)
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
