"""The ablation protocol of the seed methods: which variants, and one (shots, seed) unit of it.

Variants (issue "The seed methods"; MTL-FSOD, ECCV 2024; arXiv 2509.23915):

==================  ======================  ============  ==========  =============
variant             balancer                distillation  refinement  pseudo-labels
==================  ======================  ============  ==========  =============
baseline            fixed weights (1, 1)    no            no          no
pgb                 precision-driven (PGB)  no            no          no
gradnorm            inverse gradient norm   no            no          no
distill             fixed                   beta          no          no
pgb-distill         PGB                     beta          no          no
refine              fixed (baseline's)      no            yes         no
all                 PGB                     beta          yes         no
pseudo              fixed                   no            no          yes
pgb-distill-pseudo  PGB                     beta          no          yes
all-pseudo          PGB                     beta          yes         yes
==================  ======================  ============  ==========  =============

``pgb-distill`` is ``all``'s detector without refinement: the detector's own learning under
the full method. The ``pseudo`` variants fine-tune on the support images with the parent's
confident detections of the old classes added as annotations
(:mod:`fewshot.learning.pseudo_labels`, score ``>= UnitSpec.pseudo_label_threshold``): the
K-shot sampler leaves most old-class objects of those images unannotated, so without them a
fine-tune that trains the box head learns that old objects are background. They are not one of
the seed methods; they are listed so the table shows what each of them adds on its own. Every row also carries ``nAP50_unrefined``/``bAP50_unrefined`` (the same
model scored without refinement; equal to ``nAP50``/``bAP50`` for unrefined variants).

One unit = one K-shot draw (``shots``, ``seed``) of the new classes: every variant fine-tunes
the same expanded parent on the same support rows with the same seed, so the variants differ
only by the method. Variants that train alike share the trained model (``refine`` is the
baseline's model with CLIP refinement; its fusion weight is chosen on val, never on test).
Figures are bAP50/nAP50 (and bAP/nAP) on the first ``test_images`` of the test split.

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
from fewshot.learning.method import MethodConfig
from fewshot.learning.loop import TrainConfig
from fewshot.model.devices import resolve_device, resolve_precision
from fewshot.model.trunk_cache import TrunkCache, use_trunk_cache


@dataclass(frozen=True)
class Variant:
    balancer: str = "fixed"
    distill: bool = False
    refine: bool = False
    pseudo_labels: bool = False

    @property
    def training_key(self) -> tuple[str, bool, bool]:
        return (self.balancer, self.distill, self.pseudo_labels)


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
    trained: dict[tuple[str, bool, bool], tuple[DetectorCheckpoint, list[dict]]] = {}
    rows = []
    for name in spec.variants:
        v = VARIANTS[name]
        if v.training_key not in trained:
            method = MethodConfig(freeze=spec.freeze, balancer=v.balancer,
                                  balancer_momentum=spec.balancer_momentum,
                                  distill_beta=spec.distill_beta if v.distill else 0.0,
                                  teacher_dim=teacher.embed_dim if teacher is not None else None)
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
            trained[v.training_key] = (child, predict(child, test, device=device, precision=precision,
                                                      trunk_cache=cache))
        child, test_results = trained[v.training_key]
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
                     "pseudo_label_threshold": spec.pseudo_label_threshold if v.pseudo_labels else None})
    return rows
