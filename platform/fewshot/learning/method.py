"""The learning method of one training run, in one place: what trains, how the shared RoI
feature's gradient is balanced, and whether CLIP distillation pulls on it.

:class:`MethodConfig` is plain data (it ships to Ray Train workers and Tune trials and is
logged as run parameters). :func:`prepare_for_training` turns a freshly built detector into
the model a run trains:

1. freezing policy (:mod:`fewshot.learning.freezing`);
2. a task balancer on the box predictor, applied where the shared RoI feature splits into
   the classification and regression branches (MTL-FSOD, ECCV 2024, PGB; arXiv 2509.23915,
   gradient-norm scaling; see :mod:`fewshot.balancers`), with the per-batch precision
   observer the PGB needs;
3. a distillation head on the RoI feature with weight beta (ViLD-image, see
   :mod:`fewshot.clip.distillation`), trained with the model;
4. distillation of the old classes' outputs from the parent with weight lambda (Shmelkov et
   al. 2017, :mod:`fewshot.learning.parent_distillation`): what the child must not forget.

The balancer and the distillation head are training-time only: a saved detector never holds
them (:func:`fewshot.model.checkpoint.save_checkpoint` drops the head's weights), so a served model
is the plain detector.

:func:`finetune` runs the whole thing in this process on a list of catalog rows (one worker,
no cluster): the unit of work of the ablation and of each Tune trial.

Math layer: no ray, no mlflow.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal, Mapping, Sequence

import torch
from torch import nn

from catalog.schema import TEACHER_EMB_COLUMN
from fewshot.model.checkpoint import DetectorCheckpoint
from fewshot.model.cosine_head import ScoringChoice
from fewshot.model.batches import class_index, prefetch, random_batches
from fewshot.model.devices import pin_batch, resolve_device
from fewshot.model.trunk_cache import TrunkCache, cached_trunk
from fewshot.clip.distillation import DistillationHead, attach_distillation, roi_feature_dim
from fewshot.balancers import balancer_names
from fewshot.learning.freezing import POLICIES, apply_freezing
from fewshot.learning.parent_distillation import (
    DEFAULT_PARENT_DISTILL, PARENT_DISTILL_POLICIES, attach_parent_distillation,
)
from fewshot.learning.loop import TrainConfig, make_optimizer, train

# Names the CLI offers: the balancer registry's, read once (fewshot.balancers adds each method).
BalancerName = Literal[balancer_names()]
FreezePolicy = Literal[POLICIES]


@dataclass(frozen=True)
class MethodConfig:
    """``freeze``: which parameters train (``none``/``backbone``/``rpn``/``rpn-head``/``head``);
    ``balancer``: ``None`` (plain summed losses), ``fixed``, ``pgb`` or ``gradnorm``;
    ``balancer_momentum``: EMA smoothing of the balancer's weights (PGB) or norms
    (gradient-norm); ``distill_beta``: weight beta of the distillation loss (0: off);
    ``teacher_dim``: the teacher's embedding width (needed when beta > 0); ``parent_distill``:
    weight lambda of the old-class output distillation from the expanded parent (0: off;
    :mod:`fewshot.learning.parent_distillation`)."""

    freeze: str = "head"
    balancer: str | None = None
    balancer_momentum: float = 0.9
    distill_beta: float = 0.0
    teacher_dim: int | None = None
    distill_hidden: int | None = None
    parent_distill: float = 0.0

    def __post_init__(self) -> None:
        if self.freeze not in POLICIES:
            raise ValueError(f"unknown freezing policy {self.freeze!r}; choose one of {POLICIES}")
        if self.balancer is not None and self.balancer not in balancer_names():
            raise ValueError(f"unknown balancer {self.balancer!r}; choose one of {list(balancer_names())}")
        if not 0.0 <= self.balancer_momentum < 1.0:
            raise ValueError(f"balancer momentum must be in [0, 1), got {self.balancer_momentum}")
        if self.distill_beta < 0:
            raise ValueError(f"distillation weight beta must be >= 0, got {self.distill_beta}")
        if not (self.parent_distill >= 0 and math.isfinite(self.parent_distill)):
            raise ValueError(f"parent distillation weight must be finite and >= 0, got {self.parent_distill}")
        if self.distill_beta > 0 and not self.teacher_dim:
            raise ValueError("distillation (beta > 0) needs the teacher's embedding width (teacher_dim)")

    @property
    def distills(self) -> bool:
        return self.distill_beta > 0

    def balancer_kwargs(self) -> dict:
        return {} if self.balancer in (None, "fixed") else {"momentum": self.balancer_momentum}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> "MethodConfig":
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class MethodOptions:
    """The learning method as a user states it (job flags, a YAML config file, a tuned
    config); :meth:`config` turns it into the :class:`MethodConfig` a run trains with."""

    freeze: FreezePolicy = "backbone"
    """What trains: backbone (default) = box head and regressor with the new rows (backbone and
    RPN frozen; old-class pseudo-labels and parent distillation hold the old classes); head =
    only the new classifier rows (old classes' weights untouched); rpn = the new rows and the
    region proposal network; rpn-head = RPN, box head and new rows (only the backbone frozen: for
    new classes the base RPN learnt as background); none = everything. The balancer and
    distillation act on the shared RoI feature, so they need backbone, rpn-head or none."""
    balancer: BalancerName | None = None
    """Task-gradient balancer where the shared RoI feature splits into the classification and
    box branches: fixed weights, pgb (precision-driven, MTL-FSOD) or gradnorm (inverse gradient
    norm). None: plain summed losses."""
    balancer_momentum: float = 0.9
    """Smoothing (EMA momentum in [0, 1)) of the balancer's weights (pgb) or gradient norms
    (gradnorm)."""
    teacher: str | None = None
    """CLIP teacher for distillation and refinement: 'embedded' (the domain teacher
    jobs/pretrain_teacher.py trains), 'embedded:<file>', '<open_clip model>:<pretrained tag>' or
    '<open_clip model>@<weights file>'. None: no distillation, no refinement."""
    distill_beta: float = 0.0
    """Weight beta of the CLIP distillation loss on foreground RoI features (0 = off; needs
    --teacher and a freeze policy under which the box head trains)."""
    refine: bool = True
    """With --teacher, fit CLIP score refinement: the fusion weight is chosen on the val split,
    stored with the version, and Serve applies it."""
    scoring: ScoringChoice = "auto"
    """How the new version scores its classes. joint: one softmax over every class;
    per-increment: each class by a softmax over the classes that existed when it was added, so
    an old class scores a box as it did before the new rows existed (the new rows cannot take
    its probability, nor push down its false detections on new objects; the new classes are
    scored against every class); auto (default): both are scored on the val split after
    fine-tuning, each with its own bias-correction offset, and the version keeps the one that
    keeps the old classes within --bias-correction of the parent (--max-base-drop when that is
    None), then the one with the better harmonic mean of old- and new-class AP50 (ties: joint). Training is the same either way;
    the choice travels with the version (tag 'scoring')."""
    parent_distill: float | None = DEFAULT_PARENT_DISTILL
    """Weight lambda of the distillation of the old classes' outputs (logits and box deltas on
    the sampled RoIs) from the parent, Shmelkov et al. 2017, so the box head that trains does
    not drift away from what the old classes need. Applied with --freeze backbone and rpn-head;
    with head or rpn the old classes' outputs cannot move, and with none the backbone drifts
    under it (on BCCD it cost the new class up to 13 AP50 points and kept no base AP50), so it
    is skipped there.
    None or 0 turns it off."""

    def check(self) -> None:
        """The combinations that would silently do nothing or fail later, refused now."""
        if self.distill_beta < 0:
            raise ValueError(f"--distill-beta must be >= 0, got {self.distill_beta}")
        if self.distill_beta > 0 and not self.teacher:
            raise ValueError("--distill-beta > 0 needs a CLIP teacher: pass --teacher")
        if not 0.0 <= self.balancer_momentum < 1.0:
            raise ValueError(f"--balancer-momentum must be in [0, 1), got {self.balancer_momentum}")
        if self.parent_distill is not None and not (self.parent_distill >= 0 and math.isfinite(self.parent_distill)):
            raise ValueError(f"--parent-distill must be a finite weight >= 0 (or None), got {self.parent_distill}")

    def config(self, teacher_dim: int | None) -> MethodConfig:
        """The training-time method (``teacher_dim``: the loaded teacher's embedding width)."""
        return MethodConfig(freeze=self.freeze, balancer=self.balancer,
                            balancer_momentum=self.balancer_momentum,
                            distill_beta=self.distill_beta,
                            teacher_dim=teacher_dim if self.distill_beta > 0 else None,
                            parent_distill=self.applied_parent_distill)

    @property
    def applied_parent_distill(self) -> float:
        """The parent distillation weight this run trains with: 0 unless the box head trains on a
        frozen backbone (--freeze backbone, rpn-head)."""
        return float(self.parent_distill or 0.0) if self.freeze in PARENT_DISTILL_POLICIES else 0.0


def prepare_for_training(model: nn.Module, method: MethodConfig):
    """Freeze, attach the balancer and the distillation head; returns the balancer (or None).

    Call it on a freshly built model before the optimizer is made, so the optimizer sees the
    distillation head's parameters."""
    apply_freezing(model, method.freeze)
    if method.parent_distill > 0:
        attach_parent_distillation(model, method.parent_distill)
    balancer = None
    if method.balancer:
        from fewshot.balancers.observer import attach_precision_observer
        from fewshot.balancers import make_balancer

        balancer = make_balancer(method.balancer, **method.balancer_kwargs())
        model.roi_heads.box_predictor.balancer = balancer
        attach_precision_observer(model, balancer)
    if method.distills:
        head = DistillationHead(roi_feature_dim(model), int(method.teacher_dim), method.distill_hidden)
        attach_distillation(model, head, beta=method.distill_beta)
    return balancer


def balancer_metrics(balancer) -> Callable[[], dict[str, float]] | None:
    """The per-step metrics callback of a balancer (the weights it applied), or None."""
    if balancer is None:
        return None
    return lambda: dict(balancer.last_weights)


def finetune(
    start: DetectorCheckpoint,
    rows: Sequence[Mapping],
    cfg: TrainConfig,
    method: MethodConfig,
    seed: int = 0,
    *,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = False,
    model: nn.Module | None = None,
    device: str | torch.device | None = None,
    precision: str = "auto",
    trunk_cache: TrunkCache | None = None,
) -> nn.Module:
    """Train ``start`` (or ``model``, already built from it) on catalog ``rows`` in this
    process on ``device`` (default: CUDA when available, else the CPU) at ``precision``;
    returns the trained model (on ``device``) in eval mode, distillation head still attached
    (``save_checkpoint`` drops it). ``rows`` may carry ``teacher_emb``. ``trunk_cache``: read
    the frozen backbone's features and RPN's proposals through it
    (:mod:`fewshot.model.trunk_cache`; the method must freeze both, ``backbone`` or ``head``)."""
    device = resolve_device(device)
    torch.manual_seed(seed)
    model = model if model is not None else start.build_model()
    balancer = prepare_for_training(model, method)
    model.to(device)  # after prepare_for_training: the distillation head moves too
    optimizer = make_optimizer(model, cfg)
    batches = random_batches(list(rows), class_index(start.category_ids), cfg.batch_size, seed,
                             uint8=True)
    if device.type == "cuda":  # decode and pin the next batches while the GPU runs this one
        batches = prefetch(batches, depth=2, fn=lambda b: pin_batch(*b))
    with cached_trunk(model, trunk_cache):
        train(model, batches, cfg, on_log=on_log, extra_metrics=balancer_metrics(balancer),
              progress=progress, optimizer=optimizer, device=device, precision=precision)
    model.eval()
    return model


@dataclass
class TeacherEmbedder:
    """Adds ``teacher_emb`` (one embedding per box, the row's box order) to catalog rows by
    running a teacher on their boxes; what add_classes does for its few support images
    instead of caching a whole split. ``teacher`` is a :class:`fewshot.clip.teacher.Teacher`."""

    teacher: object
    cache: dict = field(default_factory=dict)

    def __call__(self, rows: Sequence[Mapping]) -> list[dict]:
        out = []
        for row in rows:
            # a K-shot row keeps only its sampled boxes: the same image may come with others
            key = (int(row["image_id"]), tuple(tuple(map(float, b)) for b in row["boxes"]))
            if key not in self.cache:
                boxes = [list(map(float, b)) for b in row["boxes"]]
                emb = self.teacher.embed_boxes(row["image"], boxes) if boxes else torch.zeros((0, 1))
                self.cache[key] = emb.float().cpu().numpy().tolist()
            out.append({**row, TEACHER_EMB_COLUMN: self.cache[key]})
        return out
