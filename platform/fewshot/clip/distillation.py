"""CLIP knowledge distillation into the detector's RoI features.

The idea is ViLD's (Gu, Lin, Kuo, Cui, "Open-vocabulary Object Detection via Vision and
Language Knowledge Distillation", ICLR 2022, the ViLD-image loss). A frozen CLIP image
encoder embeds the crop of each region, and the detector's region embedding is pulled
toward it with an L1 loss between normalised embeddings:

    L_ViLD-image = 1/M * sum_{r in P~} || V(crop(I, r)) - R(phi(I), r) ||_1

over M precomputed proposals ``P~``, with ``V`` the CLIP image encoder and ``R`` the
detector's (normalised) region embedding. Here:

* The student embedding is a projection of the RoI feature the box head computes (the
  feature that also feeds the classifier and the box regressor), through a small
  :class:`DistillationHead` (Linear, or a 2-layer MLP), so the distillation shapes the
  shared feature without forcing its width to the teacher's.
* The loss is ``beta * mean(1 - cos(proj(x_r), t_r))`` by default (cosine distance, which
  for unit vectors is half the squared L2 distance); ViLD's L1 between normalised vectors
  is available as ``kind="l1"``.
* Only **foreground** RoIs distil, and their target is the teacher embedding of the
  **ground-truth box they matched**, not of the proposal's own crop. ViLD embeds the crops
  of precomputed proposals offline; we cache one embedding per annotated box with the
  dataset (:mod:`catalog.teacher_cache`) and read it through ``matched_idxs``, which costs
  nothing at training time and keeps the teacher off the training workers. Background
  RoIs get no distillation target (ViLD distils all proposals, background included).
* One crop per box, squared up with 20% context (:func:`catalog.crops.crop_box`);
  ViLD averages the embeddings of 1x and 1.5x crops.
* Only the image half of ViLD: the classifier stays the detector's cosine classifier
  (ViLD-text would replace it with CLIP text embeddings); text embeddings are used at
  inference instead, by :mod:`fewshot.clip.refinement`.

The per-box embeddings arrive in each target dict as ``target["teacher_emb"]``
([n_gt, E], aligned with ``target["boxes"]``). Images without it, and rows that are not
finite (a NaN row marks a box the cache has no embedding for), are skipped.

Math layer: no ray, no mlflow.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from catalog.schema import TEACHER_EMB_COLUMN  # per-box teacher embeddings in a target dict
from fewshot.model.checkpoint import DISTILL_HEAD_ATTR
from fewshot.model.detector import RoIBatch

__all__ = [
    "TEACHER_EMB_COLUMN", "HEAD_ATTR", "LOSS_KEY", "DistillationHead", "teacher_targets",
    "distillation_loss", "DistillationLoss", "attach_distillation", "detach_distillation",
    "roi_feature_dim",
]

HEAD_ATTR = DISTILL_HEAD_ATTR     # model.roi_heads.<HEAD_ATTR> holds the projection head
LOSS_KEY = "loss_distill"


class DistillationHead(nn.Module):
    """Projects RoI features [R, D] into the teacher's embedding space [R, E].

    ``hidden=None`` gives one Linear layer; ``hidden=H`` gives Linear-ReLU-Linear.
    """

    def __init__(self, in_dim: int, embed_dim: int, hidden: int | None = None):
        super().__init__()
        self.in_dim, self.embed_dim, self.hidden = int(in_dim), int(embed_dim), hidden
        if hidden:
            self.proj = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True),
                                      nn.Linear(hidden, embed_dim))
        else:
            self.proj = nn.Linear(in_dim, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x.flatten(start_dim=1))

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, embed_dim={self.embed_dim}, hidden={self.hidden}"


def roi_feature_dim(model: nn.Module) -> int:
    """Width D of the RoI feature the box head gives (the distillation head's input)."""
    predictor = model.roi_heads.box_predictor
    if hasattr(predictor, "bbox_pred"):
        return int(predictor.bbox_pred.in_features)
    return int(model.roi_heads.box_head.fc7.out_features)


def teacher_targets(batch: RoIBatch) -> tuple[Tensor, Tensor]:
    """The foreground RoIs that have a teacher embedding, and those embeddings.

    Returns ``(rows, emb)``: ``rows`` [K] indexes ``batch.features``; ``emb`` [K, E] is the
    teacher embedding of the ground-truth box each of those RoIs matched (L2-normalised).
    Both are empty when nothing qualifies (``emb`` is then [0, 0])."""
    device = batch.features.device
    fg = torch.nonzero(batch.labels > 0, as_tuple=False).flatten()
    empty = (torch.zeros(0, dtype=torch.long, device=device), batch.features.new_zeros((0, 0)))
    if fg.numel() == 0 or not batch.targets:
        return empty
    per_image, offsets, total = [], [], 0
    for t in batch.targets:
        emb = t.get(TEACHER_EMB_COLUMN) if isinstance(t, dict) else None
        n_gt = int(t["boxes"].shape[0]) if isinstance(t, dict) and "boxes" in t else 0
        if emb is None or emb.ndim != 2 or emb.shape[0] != n_gt or n_gt == 0:
            offsets.append(-1)
            continue
        offsets.append(total)
        per_image.append(emb)
        total += n_gt
    if not per_image:
        return empty
    dims = {int(e.shape[1]) for e in per_image}
    if len(dims) != 1:
        raise ValueError(f"teacher embeddings of one batch have different widths {sorted(dims)}")
    table = torch.cat([e.to(device=device, dtype=batch.features.dtype) for e in per_image])
    offs = torch.tensor(offsets, dtype=torch.long, device=device)
    img = batch.image_index[fg].to(device)
    start = offs[img]
    keep = start >= 0
    rows, idx = fg[keep], start[keep] + batch.matched_idxs[fg][keep].to(device)
    emb = table[idx]
    finite = torch.isfinite(emb).all(dim=1)
    rows, emb = rows[finite], emb[finite]
    if rows.numel() == 0:
        return empty
    return rows, F.normalize(emb, dim=1)


def _zero(batch: RoIBatch, head: nn.Module) -> Tensor:
    # graph-connected zero: touches the features and every head parameter, so autograd and
    # DDP see the same parameters used in every step (no "unused parameter" errors)
    z = batch.features.sum() * 0.0
    for p in head.parameters():
        z = z + p.sum() * 0.0
    return z


def distillation_loss(batch: RoIBatch, head: nn.Module, beta: float = 1.0,
                      kind: str = "cosine") -> dict[str, Tensor]:
    """``{"loss_distill": beta * mean_r d(head(x_r), t_r)}`` over foreground RoIs ``r``.

    ``d`` is ``1 - cos`` (``kind="cosine"``) or the L1 distance of the normalised vectors
    (``kind="l1"``, the ViLD-image loss). A graph-connected zero when no foreground RoI has a
    teacher embedding."""
    if kind not in ("cosine", "l1"):
        raise ValueError(f"kind must be 'cosine' or 'l1', got {kind!r}")
    rows, target = teacher_targets(batch)
    if rows.numel() == 0:
        return {LOSS_KEY: _zero(batch, head)}
    pred = head(batch.features[rows])
    if pred.shape[1] != target.shape[1]:
        raise ValueError(f"distillation head gives {pred.shape[1]}-d embeddings, "
                         f"teacher embeddings are {target.shape[1]}-d")
    if kind == "cosine":
        d = 1.0 - F.cosine_similarity(pred, target, dim=1)
    else:
        d = (F.normalize(pred, dim=1) - target).abs().sum(dim=1)
    return {LOSS_KEY: beta * d.mean()}


class DistillationLoss:
    """The ``roi_heads.extra_losses`` callable :func:`attach_distillation` installs.

    It looks the head up on ``roi_heads`` at call time (so moving or reloading the model
    keeps it working) and merges the losses of a previously installed ``extra_losses``."""

    def __init__(self, roi_heads: nn.Module, beta: float, kind: str = "cosine",
                 previous: Callable[[RoIBatch], dict] | None = None):
        self.roi_heads = roi_heads
        self.beta = float(beta)
        self.kind = kind
        self.previous = previous

    def __call__(self, batch: RoIBatch) -> dict[str, Tensor]:
        out = dict(self.previous(batch)) if self.previous is not None else {}
        out.update(distillation_loss(batch, getattr(self.roi_heads, HEAD_ATTR), self.beta, self.kind))
        return out


def attach_distillation(model: nn.Module, head: nn.Module, beta: float = 1.0,
                        kind: str = "cosine") -> nn.Module:
    """Install CLIP distillation on a detector built by :func:`fewshot.model.detector.build_detector`.

    The head becomes ``model.roi_heads.distill_head`` (a submodule: it is trained by an
    optimizer over ``model.parameters()``, moved by ``model.to``, wrapped by DDP, and saved
    in ``model.state_dict()`` under ``roi_heads.distill_head.*``), and
    ``model.roi_heads.extra_losses`` adds ``loss_distill`` to the training loss dict.
    Returns the model."""
    roi_heads = model.roi_heads
    if not hasattr(roi_heads, "extra_losses"):
        raise TypeError("model.roi_heads has no extra_losses hook (build it with build_detector)")
    if isinstance(head, DistillationHead) and head.in_dim != roi_feature_dim(model):
        raise ValueError(f"head expects {head.in_dim}-d RoI features, the model gives "
                         f"{roi_feature_dim(model)}")
    previous = roi_heads.extra_losses
    if isinstance(previous, DistillationLoss):  # re-attaching replaces, never stacks
        previous = previous.previous
    setattr(roi_heads, HEAD_ATTR, head)
    roi_heads.extra_losses = DistillationLoss(roi_heads, beta, kind, previous)
    return model


def detach_distillation(model: nn.Module) -> nn.Module | None:
    """Undo :func:`attach_distillation`; returns the removed head (None if there was none)."""
    roi_heads = model.roi_heads
    hook = getattr(roi_heads, "extra_losses", None)
    if isinstance(hook, DistillationLoss):
        roi_heads.extra_losses = hook.previous
    head = roi_heads._modules.pop(HEAD_ATTR, None)
    return head
