"""The ablation protocol of the seed methods: which variants, and one (shots, seed) unit of it.

Variants (issue "The seed methods"; MTL-FSOD, ECCV 2024; arXiv 2509.23915):

=========================  ======================  ============  ==========  =============  ======
variant                    balancer                distillation  refinement  pseudo-labels  parent
=========================  ======================  ============  ==========  =============  ======
baseline                   fixed weights (1, 1)    no            no          no             no
pgb                        precision-driven (PGB)  no            no          no             no
gradnorm                   inverse gradient norm   no            no          no             no
distill                    fixed                   beta          no          no             no
pgb-distill                PGB                     beta          no          no             no
refine                     fixed (baseline's)      no            yes         no             no
all                        PGB                     beta          yes         no             no
pseudo                     fixed                   no            no          yes            no
pgb-distill-pseudo         PGB                     beta          no          yes            no
all-pseudo                 PGB                     beta          yes         yes            no
parent                     fixed                   no            no          no             lambda
pseudo-parent              fixed                   no            no          yes            lambda
pgb-distill-pseudo-parent  PGB                     beta          no          yes            lambda
=========================  ======================  ============  ==========  =============  ======

``pgb-distill`` is ``all``'s detector without refinement: the detector's own learning under
the full method. The ``pseudo`` variants fine-tune on the support images with the parent's
confident detections of the old classes added as annotations
(:mod:`fewshot.learning.pseudo_labels`, score ``>= UnitSpec.pseudo_label_threshold``): the
K-shot sampler leaves most old-class objects of those images unannotated, so without them a
fine-tune that trains the box head learns that old objects are background. They are not one of
the seed methods; they are listed so the table shows what each of them adds on its own. The ``parent`` variants
hold the old classes' outputs to the parent's while the box head trains (weight
``UnitSpec.parent_distill``, :mod:`fewshot.learning.parent_distillation`). Every row also carries ``nAP50_unrefined``/``bAP50_unrefined`` (the same
model scored without refinement; equal to ``nAP50``/``bAP50`` for unrefined variants).

One unit = one K-shot draw (``shots``, ``seed``) of the new classes: every variant fine-tunes
the same expanded parent on the same support rows with the same seed, so the variants differ
only by the method. Variants that train alike share the trained model (``refine`` is the
baseline's model with CLIP refinement; its fusion weight is chosen on val, never on test).
Figures are bAP50/nAP50 (and bAP/nAP) on the first ``test_images`` of the test split. With ``UnitSpec.bias_correction``
every row also carries the figures after the bias correction add_classes applies
(:mod:`fewshot.learning.bias_correction`: the new rows' logit offset chosen on the first
``val_images`` of val by the rule "smallest offset keeping val bAP50 within ``bias_correction``
of the parent's"): ``offset``, ``rule_met``, ``bAP50_corrected``, ``nAP50_corrected``, ``HM50_corrected``
(of the detector, unrefined). Every row also carries the detector's figures with per-increment
scoring (``add_classes --scoring per-increment``, :mod:`fewshot.model.cosine_head`: each class scored against the
classes that existed when it was added), from the same trained model and the same second-stage
outputs: ``bAP50_per_increment``, ``nAP50_per_increment``, ``HM50_per_increment``; the
uncorrected figures are joint scoring's, and so are the corrected ones. With bias correction,
rows also carry what ``add_classes --scoring auto`` (the default) serves: the scoring chosen on
the same val images (:func:`fewshot.learning.bias_correction.choose_scoring`) with its own
offset, ``scoring_auto``, ``bAP50_auto``, ``nAP50_auto``, ``HM50_auto``.

Math layer: no ray, no mlflow.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from catalog import Catalog
from fewshot.model.checkpoint import DetectorCheckpoint
from fewshot.learning.episode import (
    expand_parent, fine_tune_episode, predict, pseudo_label_episode, sample_episode, score,
)
from fewshot.metrics.coco_eval import load_eval_split
from fewshot.learning.bias_correction import collect_second_stage, detections_with_offset, fit_new_row_offset
from fewshot.model.cosine_head import AUTO_SCORINGS
from fewshot.learning.method import MethodConfig
from fewshot.learning.parent_distillation import DEFAULT_PARENT_DISTILL
from fewshot.learning.loop import TrainConfig
from fewshot.model.devices import resolve_device, resolve_precision
from fewshot.model.trunk_cache import TrunkCache, use_trunk_cache


@dataclass(frozen=True)
class Variant:
    balancer: str = "fixed"
    distill: bool = False
    refine: bool = False
    pseudo_labels: bool = False
    parent_distill: bool = False

    @property
    def training_key(self) -> tuple[str, bool, bool, bool]:
        return (self.balancer, self.distill, self.pseudo_labels, self.parent_distill)


VARIANTS: dict[str, Variant] = {
    "baseline": Variant(),
    "pgb": Variant(balancer="pgb"),
    "gradnorm": Variant(balancer="gradnorm"),
    "distill": Variant(distill=True),
    "pgb-distill": Variant(balancer="pgb", distill=True),
    "refine": Variant(refine=True),
    "all": Variant(balancer="pgb", distill=True, refine=True),
    "pseudo": Variant(pseudo_labels=True),
    "pgb-distill-pseudo": Variant(balancer="pgb", distill=True, pseudo_labels=True),
    "all-pseudo": Variant(balancer="pgb", distill=True, refine=True, pseudo_labels=True),
    "parent": Variant(parent_distill=True),
    "pseudo-parent": Variant(pseudo_labels=True, parent_distill=True),
    "pgb-distill-pseudo-parent": Variant(balancer="pgb", distill=True, pseudo_labels=True, parent_distill=True),
}


@dataclass(frozen=True)
class UnitSpec:
    """Everything one unit needs (plain data: it ships to a Ray task)."""

    catalog_root: str
    dataset: str
    new_classes: tuple[str, ...]
    shots: int
    seed: int
    variants: tuple[str, ...]
    train: TrainConfig
    freeze: str = "backbone"
    balancer_momentum: float = 0.9
    distill_beta: float = 1.0
    teacher_spec: str | None = None
    pseudo_label_threshold: float = 0.9   # the pseudo variants' score threshold (add_classes' default)
    parent_distill: float = DEFAULT_PARENT_DISTILL   # lambda of the parent variants (add_classes' default)
    bias_correction: float | None = 0.01  # also score after add_classes' bias correction (None: off)
    test_images: int | None = 150
    val_images: int | None = 100
    gpus: float = 0.0           # the task holds this many GPUs: run on its CUDA device (else the CPU)
    precision: str = "auto"     # fewshot.model.devices.resolve_precision on that device
    trunk_cache: bool = True    # share the frozen trunk's features across variants (exact)

    @property
    def device(self) -> str | None:
        return None if self.gpus > 0 else "cpu"


def check_variants(names: Sequence[str], teacher_spec: str | None) -> None:
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    needs = [n for n in names if VARIANTS[n].distill or VARIANTS[n].refine]
    if needs and not teacher_spec:
        raise ValueError(f"variants {needs} need a CLIP teacher (--teacher)")


def run_unit(spec: UnitSpec, parent: DetectorCheckpoint,
             progress: Callable[[str], None] | None = None) -> list[dict]:
    """Run every variant of one (shots, seed) draw; one result dict per variant."""
    check_variants(spec.variants, spec.teacher_spec)
    say = progress or (lambda _msg: None)
    catalog = Catalog(spec.catalog_root)
    device = resolve_device(spec.device)
    precision = resolve_precision(spec.precision, device)
    teacher = None
    if spec.teacher_spec and any(VARIANTS[v].distill or VARIANTS[v].refine for v in spec.variants):
        from fewshot.clip.teacher import load_teacher

        teacher = load_teacher(spec.teacher_spec, device=device)
    ep = sample_episode(catalog, parent, list(spec.new_classes), spec.shots, spec.seed, spec.dataset)
    base = list(parent.classes)
    test = load_eval_split(catalog, ep.dataset, "test", base, ep.new_classes, spec.test_images)
    val = load_eval_split(catalog, ep.dataset, "val", base, ep.new_classes, spec.val_images)
    start = expand_parent(ep, device=device)
    # every variant fine-tunes and is scored on the same frozen trunk: compute its features
    # and proposals once per image (exact; fewshot.model.trunk_cache)
    cache = TrunkCache() if spec.trunk_cache and use_trunk_cache(spec.freeze, device) else None

    labelled = None   # the episode with old-class pseudo-labels, made once for every pseudo variant
    trained: dict[tuple, tuple[DetectorCheckpoint, list[dict], dict]] = {}
    parent_val_bAP50 = None   # the bias correction's reference, computed once
    rows = []
    for name in spec.variants:
        v = VARIANTS[name]
        if v.training_key not in trained:
            method = MethodConfig(freeze=spec.freeze, balancer=v.balancer,
                                  balancer_momentum=spec.balancer_momentum,
                                  distill_beta=spec.distill_beta if v.distill else 0.0,
                                  teacher_dim=teacher.embed_dim if teacher is not None else None,
                                  parent_distill=spec.parent_distill if v.parent_distill else 0.0)
            train_ep = ep
            if v.pseudo_labels:
                if labelled is None:
                    labelled, stats = pseudo_label_episode(ep, spec.pseudo_label_threshold, device=device,
                                                           precision=precision)
                    say(f"{spec.shots}-shot seed {spec.seed}: {stats.added} old-class pseudo-labels "
                        f"beside {stats.annotated} annotations")
                train_ep = labelled
            say(f"{spec.shots}-shot seed {spec.seed}: training {name}")
            child = fine_tune_episode(train_ep, spec.train, method, start=start, teacher=teacher,
                                      device=device, precision=precision, trunk_cache=cache)
            model = child.build_model().to(device).eval()
            stages = collect_second_stage(model, test.rows, device=device, precision=precision, trunk_cache=cache)
            first_new = len(parent.classes) + 1
            test_results = detections_with_offset(model, stages, first_new, 0.0, ep.child_ids)
            classifier = model.roi_heads.box_predictor.cls_score
            trained_scoring = classifier.scoring
            classifier.set_scoring("per-increment")   # post-processing only: the same stages
            grouped = test.evaluate(detections_with_offset(model, stages, first_new, 0.0, ep.child_ids))
            classifier.set_scoring(trained_scoring)
            corrected = {"bAP50_per_increment": grouped.bAP50, "nAP50_per_increment": grouped.nAP50,
                         "HM50_per_increment": grouped.HM50}
            if spec.bias_correction is not None:
                if parent_val_bAP50 is None:
                    parent_val_bAP50 = score(parent, val, device=device, precision=precision,
                                             trunk_cache=cache).bAP50
                choice = fit_new_row_offset(model, val, ep.child_ids, parent_val_bAP50, spec.bias_correction,
                                            scorings=AUTO_SCORINGS, device=device, precision=precision,
                                            trunk_cache=cache)
                joint = next(c for c in choice.candidates if c["scoring"] == "joint")
                classifier.set_scoring("joint")
                fixed = test.evaluate(detections_with_offset(model, stages, first_new, joint["offset"], ep.child_ids))
                classifier.set_scoring(choice.scoring)
                auto = test.evaluate(detections_with_offset(model, stages, first_new, choice.offset, ep.child_ids))
                classifier.set_scoring(trained_scoring)
                corrected |= {"offset": joint["offset"], "rule_met": joint["met"], "bAP50_corrected": fixed.bAP50,
                             "nAP50_corrected": fixed.nAP50, "HM50_corrected": fixed.HM50,
                             "parent_val_bAP50": parent_val_bAP50, "scoring_auto": choice.scoring,
                             "bAP50_auto": auto.bAP50, "nAP50_auto": auto.nAP50, "HM50_auto": auto.HM50}
            trained[v.training_key] = (child, test_results, corrected)
        child, test_results, corrected = trained[v.training_key]
        fusion_weight = None
        unrefined = score(child, test, results=test_results)
        report = unrefined
        if v.refine:
            from fewshot.clip.refinement import fit_refiner

            refiner = fit_refiner(teacher, ep.child_classes, ep.child_ids, val,
                                  predict(child, val, device=device, precision=precision,
                                          trunk_cache=cache))
            fusion_weight = refiner.fusion_weight
            report = score(child, test, refiner=refiner, results=test_results)
        rows.append({"variant": name, "shots": spec.shots, "seed": spec.seed,
                     "bAP50": report.bAP50, "nAP50": report.nAP50, "bAP": report.bAP,
                     "nAP": report.nAP, "HM50": report.HM50, "fusion_weight": fusion_weight,
                     "bAP50_unrefined": unrefined.bAP50, "nAP50_unrefined": unrefined.nAP50,
                     "pseudo_label_threshold": spec.pseudo_label_threshold if v.pseudo_labels else None,
                     "parent_distill": spec.parent_distill if v.parent_distill else 0.0, **corrected})
    return rows
