"""Retained heads: the old classes answered by the head that answered them in the parent.

A child of ``add_classes --freeze backbone`` trains its RoI box head and box regressor (so the
new classes get features of their own), and that moves the old classes' answers too: on the
embedded world the default child ended about one point of base AP50 below its parent, and
nearly all of it was this drift, not the new rows' competition (README *Where the last base
points go*). Fan et al., "Generalized Few-Shot Object Detection without Forgetting", CVPR 2021
(Retentive R-CNN, Sec. 4.1) keep the base detector's RoI head frozen beside the fine-tuned one
and answer the base classes with it, which leaves base AP exactly as it was. Here the same is
done for every increment of a continual chain:

* At expansion (:func:`fewshot.model.expansion.expand_detector` with ``retain_head``) a frozen
  copy of the parent's box head, regressor and classifier (rows, logit offsets, scoring) is
  kept. It answers the columns the parent's own head answered: all of them when the parent had
  no retained heads or scored jointly (a joint parent served every class from its live head),
  else those after its last retained head's (whose heads the child keeps as they are).
* Under per-increment scoring (:mod:`fewshot.model.cosine_head`) each retained head scores its
  columns with its own probabilities, ``p(c | x) = p_j(c | x)`` for ``c`` in head ``j``'s
  columns, with its own box deltas; the live head answers the columns after the last retained
  head's. With the backbone and RPN frozen (``--freeze backbone`` or ``head``) the proposals and
  pooled features are the parent's, so each old class gets exactly the score and box the
  parent served; and since each head keeps its own per-image detection cap
  (:meth:`fewshot.model.detector.FewShotRoIHeads.postprocess_detections`), new-class detections
  cannot push the parent's out of the answer.
* Under joint scoring the retained heads are ignored (one softmax over the live head's rows).

Cost: one box head (two fully connected layers on the pooled RoIs) per retained head at
inference, 1.15x the lite0-fpn detector's forward time with one (``benchmarks/retained_heads_cost.py``);
training never runs them.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torchvision.models.detection.faster_rcnn import TwoMLPHead

from fewshot.model.cosine_head import CosineBoxPredictor


class RetainedHead(nn.Module):
    """A frozen RoI head (box head and cosine box predictor) answering logit columns
    ``[start, end)`` of the detector it sits in."""

    def __init__(self, box_head: nn.Module, box_predictor: CosineBoxPredictor, start: int, end: int):
        super().__init__()
        if not 1 <= start < end <= box_predictor.num_classes:
            raise ValueError(f"a retained head answers columns [start, end) within its "
                             f"{box_predictor.num_classes} rows (start >= 1), got [{start}, {end})")
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.register_buffer("columns", torch.tensor([start, end], dtype=torch.long))
        for p in self.parameters():
            p.requires_grad_(False)

    @property
    def start(self) -> int:
        return int(self.columns[0])

    @property
    def end(self) -> int:
        return int(self.columns[1])

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This head's class probabilities and box deltas for its columns: ([R, end - start],
        [R, 4 * (end - start)])."""
        features = self.box_head(pooled)
        logits, deltas = self.box_predictor(features)
        probs = self.box_predictor.cls_score.probabilities(logits)[:, self.start:self.end]
        return probs, deltas[:, 4 * self.start:4 * self.end]


class RetainedHeads(nn.Module):
    """The retained heads of a detector, in increment order, answering consecutive columns
    from 1 (background excluded) up to :attr:`end`."""

    def __init__(self, in_channels: int, representation_size: int, cosine_scale: float):
        super().__init__()
        self.in_channels = in_channels
        self.representation_size = representation_size
        self.cosine_scale = cosine_scale
        self.heads = nn.ModuleList()
        # moves with the model, so heads built while loading land on its device
        self.register_buffer("_device", torch.empty(0), persistent=False)

    def __len__(self) -> int:
        return len(self.heads)

    @property
    def end(self) -> int:
        """The first column the live head answers (1 when nothing is retained)."""
        return self.heads[-1].end if len(self.heads) else 1

    @torch.no_grad()
    def keep(self, box_head: nn.Module, box_predictor: CosineBoxPredictor) -> None:
        """Retain a frozen copy of the live head before it trains on an increment (see the
        module docstring for the columns it answers)."""
        classifier = box_predictor.cls_score
        if classifier.scoring == "joint":
            self.heads = nn.ModuleList()   # a joint parent served every class from its live head
        head = RetainedHead(copy.deepcopy(box_head), copy.deepcopy(box_predictor), self.end,
                            classifier.num_classes)
        head.box_predictor.balancer = None
        self.heads.append(head.to(self._device.device))

    def clear(self) -> None:
        self.heads = nn.ModuleList()

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Probabilities and box deltas of columns ``0 .. end - 1`` ([R, end], [R, 4 * end];
        column 0, background, is zero)."""
        probs = [pooled.new_zeros(len(pooled), 1, dtype=torch.float32)]
        deltas = [pooled.new_zeros(len(pooled), 4, dtype=torch.float32)]
        for head in self.heads:
            p, d = head(pooled)
            probs.append(p.float())
            deltas.append(d.float())
        return torch.cat(probs, dim=1), torch.cat(deltas, dim=1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # as many heads as the checkpoint holds; their row counts come from the classifier's own loader
        marker = prefix + "heads."
        count = 1 + max((int(k[len(marker):].split(".", 1)[0]) for k in state_dict if k.startswith(marker)),
                        default=-1)
        device = self._device.device
        heads = []
        for _ in range(count):
            predictor = CosineBoxPredictor(self.representation_size, 2, self.cosine_scale)
            heads.append(RetainedHead(TwoMLPHead(self.in_channels, self.representation_size), predictor,
                                      1, 2).to(device))
        self.heads = nn.ModuleList(heads)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def merge_retained(scores: torch.Tensor, box_regression: torch.Tensor,
                   retained: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The live head's class probabilities ``scores`` ([R, C]) and box deltas ([R, 4C]) with the
    columns the retained heads answer (``retained``: :meth:`RetainedHeads.forward`'s output)
    replaced by theirs."""
    if retained is None:
        return scores, box_regression
    probs, deltas = retained
    end = probs.shape[1]
    if end > scores.shape[1]:
        raise ValueError(f"retained heads answer {end} columns but the live head has {scores.shape[1]}")
    scores = torch.cat([scores[:, :1], probs[:, 1:].to(scores.dtype), scores[:, end:]], dim=1)
    box_regression = torch.cat([box_regression[:, :4], deltas[:, 4:].to(box_regression.dtype),
                                box_regression[:, 4 * end:]], dim=1)
    return scores, box_regression
