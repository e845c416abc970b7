"""Bias correction of the newest classes' logits, chosen on val.

BiC (Wu et al., "Large Scale Incremental Learning", CVPR 2019, Sec. 3.3, Eq. 3) corrects the
logits of the classes an increment adds, ``q_k = alpha * o_k + beta``, with ``alpha`` and
``beta`` fitted on a small validation set after training, because the new classes' logits come
out too large against the old ones. Here ``alpha = 1`` (the cosine classifier puts every row on
one scale already, :mod:`fewshot.model.cosine_head`) and ``beta`` is a logit offset on the new
rows, chosen from a grid on the val split by the rule a continual detector needs: **the
smallest correction that keeps the old classes' AP50 within ``max_base_drop`` of the parent's**
(the parent scored alone on the same images). When no offset reaches that, the base loss is
not (only) the new rows' doing — under ``--freeze backbone`` the box head moved too — and the
offset with the best harmonic mean of old- and new-class AP50 is taken: the earlier fallback,
the best old-class AP50 alone, picked -6 on the 4x base with a tuned ``--freeze backbone``
config and registered a child whose new classes scored nAP50 0.000 (README *Tuning*).

When the version is served with CLIP refinement (:mod:`fewshot.clip.refinement`), the rule is
judged on what a user gets: the smallest correction that keeps the old classes' AP50 **as
served** (the refiner refitted on the corrected detections) within ``max_base_drop`` of the
parent's as served, while the detector alone stays within the gate's ``max_detector_drop``
(:mod:`fewshot.workflows.gate`). The refiner already gives the old classes back much of what the
new rows take, and every point of correction also pushes new-class detections under the score
threshold, where no refiner can find them again; judging the detector alone to one point there
cost the served new classes 2.8 to 9.4 points of nAP50 in the demo's setting (3 seeds, README
*Bias correction under refinement*).

Why it helps: under ``--freeze head`` the old rows and the features are the parent's, so the
only way a child loses old-class AP is that its new rows take probability from old classes on
their own objects (softmax over all rows). A negative offset gives that mass back; at
``beta -> -inf`` the old classes score exactly as in the parent.

**Which scoring** (:mod:`fewshot.model.cosine_head`): under per-increment scoring an old class's
probability does not depend on the new rows' logits, so the rule has nothing to correct there
and tries offset 0 only. ``add_classes --scoring auto`` runs the rule under both scorings from
the same prediction pass and keeps the scoring whose offset met the rule, then the better
harmonic mean of old- and new-class AP50 (:func:`choose_scoring`): per-increment scoring
removes the new rows' competition on old objects, joint scoring lets the new rows push down
old-class false detections on new objects, and which is worth more differs between models
(README *Per-increment scoring*).

The val predictions are computed once: the second stage's inputs to torchvision's
post-processing (proposals, class logits, box deltas) are kept per image, and every offset of
the grid re-runs only the post-processing (:meth:`RoIHeads.postprocess_detections`, the
transform's rescaling) and pycocotools, so a grid costs about one prediction pass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from fewshot.metrics.coco_eval import EvalReport, EvalSplit, coco_results, harmonic_mean, run_over_rows
from fewshot.model.trunk_cache import TrunkCache

DEFAULT_OFFSETS = (0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0, -8.0)


@dataclass
class SecondStage:
    """One image's inputs to the detector's post-processing."""

    image_id: int
    class_logits: torch.Tensor  # [R, C], with the classifier's current offsets
    box_regression: torch.Tensor  # [R, 4 * C]
    proposals: torch.Tensor  # [R, 4], in the transformed image
    image_size: tuple[int, int]  # (h, w) after the model's transform
    original_size: tuple[int, int]  # (h, w) of the decoded image
    retained: tuple[torch.Tensor, torch.Tensor] | None = None  # the retained heads' outputs, if any


@dataclass
class BiasChoice:
    """The offset chosen, what it was judged against, and every offset's figures."""

    offset: float
    parent_bAP50: float
    max_base_drop: float
    met: bool  # the chosen offset meets the rule (see the module docstring)
    table: list[dict] = field(default_factory=list)  # one row per offset: bAP50, nAP50, HM50 (+ served_bAP50)
    results: list[dict] = field(default_factory=list)  # COCO results on the split at the chosen offset
    judged: str = "detector"  # "served": the rule was judged as served, with refinement
    parent_served_bAP50: float | None = None
    max_detector_drop: float | None = None
    scoring: str = "joint"  # the scoring the chosen offset goes with (fit_new_row_offset's ``scorings``)
    candidates: list[dict] = field(default_factory=list)  # each scoring's outcome (ScoringCandidate.to_dict)


@torch.no_grad()
def collect_second_stage(model: nn.Module, rows: Iterable[Mapping], batch_size: int = 8, *,
                         device: str | torch.device | None = None, precision: str = "fp32",
                         trunk_cache: TrunkCache | None = None) -> list[SecondStage]:
    """Run ``model`` over catalog rows as :func:`fewshot.metrics.coco_eval.predict_rows` does
    and keep, per image, what its post-processing starts from (on the CPU, fp32)."""
    captured: dict[str, object] = {}

    def keep_inputs(_module, args):
        captured["proposals"], captured["image_shapes"] = args[1], args[2]

    def keep_outputs(_module, _args, output):
        captured["class_logits"], captured["box_regression"] = output

    def keep_pooled(_module, args):
        # the retained heads' answers on the same RoIs, whatever the scoring (they apply under per-increment)
        captured["retained"] = model.roi_heads.retained_outputs(args[0])

    out: list[SecondStage] = []

    def keep(batch, images, _outputs):
        counts = [len(p) for p in captured["proposals"]]
        logits = captured["class_logits"].float().cpu().split(counts)
        deltas = captured["box_regression"].float().cpu().split(counts)
        kept = captured["retained"]
        retained = (list(zip(*(t.float().cpu().split(counts) for t in kept))) if kept is not None
                    else [None] * len(batch))
        for i, row in enumerate(batch):
            out.append(SecondStage(
                image_id=int(row["image_id"]), class_logits=logits[i], box_regression=deltas[i],
                proposals=captured["proposals"][i].float().cpu(),
                image_size=tuple(int(v) for v in captured["image_shapes"][i]),
                original_size=(int(images[i].shape[-2]), int(images[i].shape[-1])), retained=retained[i]))

    hooks = [model.roi_heads.register_forward_pre_hook(keep_inputs),
             model.roi_heads.box_predictor.register_forward_hook(keep_outputs),
             model.roi_heads.box_head.register_forward_pre_hook(keep_pooled)]
    try:
        run_over_rows(model, rows, keep, batch_size, device=device, precision=precision,
                      trunk_cache=trunk_cache)
    finally:
        for h in hooks:
            h.remove()
    return out


@torch.no_grad()
def detections_with_offset(model: nn.Module, stages: Sequence[SecondStage], first_new: int,
                           offset: float, label_to_category: Sequence[int]) -> list[dict]:
    """COCO results of the kept second stages with ``offset`` added to the logits of labels
    ``first_new`` and above (the same detections the model makes with that offset set)."""
    heads = model.roi_heads
    results: list[dict] = []
    for st in stages:
        logits = st.class_logits.clone()
        logits[:, first_new:] += offset
        boxes, scores, labels = heads.postprocess_detections(
            logits, st.box_regression, [st.proposals], [st.image_size], retained=st.retained)
        det = model.transform.postprocess([{"boxes": boxes[0], "scores": scores[0], "labels": labels[0]}],
                                          [st.image_size], [st.original_size])[0]
        results.extend(coco_results(st.image_id, det, label_to_category))
    return results


def choose_offset(reports: Mapping[float, EvalReport], parent_bAP50: float,
                  max_base_drop: float, *, served_bAP50: Callable[[float], float] | None = None,
                  parent_served_bAP50: float | None = None,
                  max_detector_drop: float | None = None) -> tuple[float, bool]:
    """The offset closest to zero that meets the rule; else the one with the best harmonic mean
    of bAP50 and nAP50 (closest to zero on ties), so a correction that cannot bring the base
    back does not trade the new classes away for it. ``reports``: the detector's figures per
    offset (AP50 as fractions).

    Without ``served_bAP50`` the rule is: bAP50 within ``max_base_drop`` of ``parent_bAP50``.
    With it (the version is served refined) an offset meets the rule when the detector's bAP50
    is within ``max_detector_drop`` of ``parent_bAP50`` and ``served_bAP50(offset)`` within
    ``max_base_drop`` of ``parent_served_bAP50``; ``served_bAP50`` is called lazily, in order
    of the offsets' size, only for offsets the detector's figure lets through."""
    by_size = sorted(reports, key=abs)
    if served_bAP50 is None:
        for offset in by_size:
            if reports[offset].bAP50 >= parent_bAP50 - max_base_drop - 1e-9:
                return offset, True
    else:
        if parent_served_bAP50 is None or max_detector_drop is None:
            raise ValueError("judging as served needs parent_served_bAP50 and max_detector_drop")
        for offset in by_size:
            if reports[offset].bAP50 < parent_bAP50 - max_detector_drop - 1e-9:
                continue
            if served_bAP50(offset) >= parent_served_bAP50 - max_base_drop - 1e-9:
                return offset, True
    def balance(o: float) -> float:   # base AP50 alone when val holds no new-class box (nAP50 NaN)
        hm = harmonic_mean(reports[o].bAP50, reports[o].nAP50)
        return reports[o].bAP50 if math.isnan(hm) else hm

    return max(by_size, key=lambda o: (balance(o), -abs(o))), False


@dataclass(frozen=True)
class ScoringCandidate:
    """One scoring's outcome of the offset rule on val: the offset it chose, whether that met the
    rule, and the figures the rule judged (as served when the version is refined)."""

    scoring: str
    offset: float
    met: bool
    bAP50: float
    nAP50: float

    @property
    def balance(self) -> float:
        """The harmonic mean of bAP50 and nAP50 (bAP50 alone when val holds no new-class box)."""
        hm = harmonic_mean(self.bAP50, self.nAP50)
        return self.bAP50 if math.isnan(hm) else hm

    def to_dict(self) -> dict:
        return {"scoring": self.scoring, "offset": self.offset, "met": self.met, "bAP50": self.bAP50,
                "nAP50": self.nAP50, "HM50": self.balance}


def choose_scoring(candidates: Sequence[ScoringCandidate]) -> ScoringCandidate:
    """The scoring a version is served with, chosen on val (``add_classes --scoring auto``): one
    whose offset met the rule before one whose did not, then the better harmonic mean of the
    old and new classes' AP50 (the bias correction's own fallback criterion), then the earlier
    candidate (pass joint first: the training objective's scoring). Per-increment scoring keeps
    an old class's score as in the parent and joint scoring lets the new rows push down its
    false detections on new objects; which helps more depends on the data (README *Per-increment
    scoring*), so val decides per version."""
    if not candidates:
        raise ValueError("no scoring to choose from")
    best = candidates[0]
    for c in candidates[1:]:
        if (c.met, c.balance) > (best.met, best.balance + 1e-12):
            best = c
    return best


def offsets_for(scoring: str, offsets: Sequence[float]) -> tuple[float, ...]:
    """The offsets the rule tries under ``scoring``: the grid under joint scoring; only 0 under
    per-increment scoring, where an old class's probability does not depend on the new rows'
    logits at all (:mod:`fewshot.model.cosine_head`), so a negative offset cannot give it
    anything back and only pushes new-class detections under the score threshold."""
    return tuple(float(o) for o in offsets) if scoring == "joint" else (0.0,)


def fit_new_row_offset(model: nn.Module, split: EvalSplit, label_to_category: Sequence[int],
                       parent_bAP50: float, max_base_drop: float,
                       offsets: Sequence[float] = DEFAULT_OFFSETS, *,
                       served: Callable[[float, list[dict]], Mapping[str, float]] | None = None,
                       parent_served_bAP50: float | None = None, max_detector_drop: float | None = None,
                       scorings: Sequence[str] | None = None,
                       device: str | torch.device | None = None, precision: str = "fp32",
                       trunk_cache: TrunkCache | None = None) -> BiasChoice:
    """Choose the newest rows' logit offset on ``split`` (see the module docstring), set it on
    ``model``'s classifier and return the choice with the figures of every offset tried.

    ``served(offset, detections)``: the model's figures on ``split`` as served (``bAP50`` and
    ``nAP50``) given its detections at that offset (e.g. a refiner fitted on them); with it, the
    rule is judged as served (:func:`choose_offset`) and the table's rows it was asked for carry
    ``served_bAP50`` and ``served_nAP50``.

    ``scorings``: the scorings to choose between (:func:`choose_scoring`; each runs the rule on
    its own offsets, :func:`offsets_for`, from one prediction pass); the chosen one is set on the
    classifier. Default: the classifier's current scoring only."""
    if not offsets:
        raise ValueError("offsets must not be empty")
    if any(not math.isfinite(o) or o > 0 for o in offsets):
        raise ValueError(f"offsets must be finite and <= 0 (a correction lowers the new logits), got {offsets}")
    classifier = model.roi_heads.box_predictor.cls_score
    first_new = classifier.weight_old.shape[0]
    if first_new <= 1 or classifier.weight_new.shape[0] == 0:
        raise ValueError("bias correction needs old classes and new rows (a model fresh from expand_detector)")
    scorings = tuple(scorings) if scorings else (classifier.scoring,)
    classifier.set_new_bias(0.0)
    stages = collect_second_stage(model, split.rows, device=device, precision=precision, trunk_cache=trunk_cache)
    outcomes: dict[str, tuple] = {}
    for scoring in scorings:
        classifier.set_scoring(scoring)   # post-processing only: the same second stages serve every scoring
        tried = offsets_for(scoring, offsets)
        detections = {o: detections_with_offset(model, stages, first_new, o, label_to_category) for o in tried}
        reports = {o: split.evaluate(results) for o, results in detections.items()}
        asked: dict[float, Mapping[str, float]] = {}

        def served_at(offset: float, detections=detections, asked=asked) -> float:
            asked[offset] = served(offset, detections[offset])
            return float(asked[offset]["bAP50"])

        offset, met = choose_offset(reports, parent_bAP50, max_base_drop,
                                    served_bAP50=served_at if served is not None else None,
                                    parent_served_bAP50=parent_served_bAP50, max_detector_drop=max_detector_drop)
        if served is not None and offset not in asked:   # a fallback offset: compare scorings as served too
            served_at(offset)
        judged = asked[offset] if served is not None else {"bAP50": reports[offset].bAP50,
                                                            "nAP50": reports[offset].nAP50}
        candidate = ScoringCandidate(scoring=scoring, offset=offset, met=met, bAP50=float(judged["bAP50"]),
                                     nAP50=float(judged["nAP50"]))
        outcomes[scoring] = (candidate, reports, asked, detections[offset])
    chosen = choose_scoring([outcomes[s][0] for s in scorings])
    _, reports, asked, results = outcomes[chosen.scoring]
    classifier.set_scoring(chosen.scoring)
    classifier.set_new_bias(chosen.offset)
    table = [{"offset": o, "bAP50": r.bAP50, "nAP50": r.nAP50, "HM50": r.HM50,
              **({"served_bAP50": float(asked[o]["bAP50"]), "served_nAP50": float(asked[o]["nAP50"])}
                 if o in asked else {})}
             for o, r in sorted(reports.items(), key=lambda kv: -kv[0])]
    return BiasChoice(offset=chosen.offset, parent_bAP50=parent_bAP50, max_base_drop=max_base_drop,
                      met=chosen.met, table=table, results=results,
                      judged="served" if served is not None else "detector",
                      parent_served_bAP50=parent_served_bAP50 if served is not None else None,
                      max_detector_drop=max_detector_drop if served is not None else None,
                      scoring=chosen.scoring, candidates=[outcomes[s][0].to_dict() for s in scorings])
