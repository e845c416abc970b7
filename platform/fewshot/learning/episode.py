"""One few-shot episode in this process: sample K shots, expand the parent, fine-tune, score.

The unit the ablation (``jobs/ablation.py``) and each Ray Tune trial (``jobs/tune.py``) run,
with the same steps ``jobs/add_classes.py`` takes on the cluster (TFA's two-stage protocol,
Wang et al. 2020: a base model, then K-shot fine-tuning on the new classes plus K replay
instances of every old class, evaluated by base and novel AP):

1. :func:`sample_episode` draws the support set (``catalog.kshot.sample_support``);
2. :func:`expand_parent` adds one classifier row per new class, imprinted from the centred
   support features (:func:`fewshot.model.expansion.expand_detector`); optionally
   :func:`pseudo_label_episode` gives the support images back the old-class objects the K-shot
   sampler left unannotated (:mod:`fewshot.learning.pseudo_labels`);
3. :func:`fine_tune_episode` trains with a :class:`fewshot.learning.method.MethodConfig`
   (balancer, distillation) and returns the child as an in-memory ``DetectorCheckpoint``;
4. :func:`score` evaluates it on a split, optionally with CLIP refinement.

Math layer: no ray, no mlflow.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from catalog import Catalog
from catalog.kshot import sample_support
from fewshot.model.checkpoint import DetectorCheckpoint
from fewshot.model.batches import class_index, rows_to_batch
from fewshot.model.checkpoint import strip_training_heads
from fewshot.model.devices import resolve_device
from fewshot.metrics.coco_eval import EvalReport, EvalSplit, predict_rows
from fewshot.model.cosine_head import Scoring
from fewshot.model.expansion import expand_detector
from fewshot.model.trunk_cache import TrunkCache
from fewshot.learning.pseudo_labels import PseudoLabelStats, pseudo_label_rows
from fewshot.learning.method import MethodConfig, TeacherEmbedder, finetune
from fewshot.learning.loop import TrainConfig


@dataclass
class Episode:
    """The support set of one (classes, shots, seed) draw and the parent it extends."""

    parent: DetectorCheckpoint
    dataset: str
    new_classes: list[str]
    new_ids: list[int]
    shots: int
    seed: int
    novel_rows: list[dict]
    replay_rows: list[dict]

    @property
    def child_classes(self) -> list[str]:
        return list(self.parent.classes) + list(self.new_classes)

    @property
    def child_ids(self) -> list[int]:
        return list(self.parent.category_ids) + list(self.new_ids)

    @property
    def rows(self) -> list[dict]:
        return self.novel_rows + self.replay_rows


def sample_episode(catalog: Catalog, parent: DetectorCheckpoint, new_classes: Sequence[str],
                   shots: int, seed: int, dataset: str | None = None, replay: bool = True) -> Episode:
    """Draw the K-shot support set of ``new_classes`` (and the replay set of the parent's)."""
    dataset = dataset or parent.dataset
    by_name = catalog.manifest(dataset).category_by_name()
    unknown = [c for c in new_classes if c not in by_name]
    if unknown:
        raise ValueError(f"unknown classes for dataset {dataset!r}: {unknown}")
    already = [c for c in new_classes if c in parent.classes]
    if already:
        raise ValueError(f"classes {already} are already in the parent's class set")
    new_ids = [by_name[c].id for c in new_classes]
    table = catalog.read_split(dataset, "train")
    novel, replay_rows = sample_support(table, new_ids, list(parent.category_ids), shots, seed,
                                        replay=replay)
    return Episode(parent=parent, dataset=dataset, new_classes=list(new_classes), new_ids=new_ids,
                   shots=shots, seed=seed, novel_rows=novel, replay_rows=replay_rows)


def expand_parent(ep: Episode, device: str | torch.device | None = None,
                  scoring: Scoring = "joint", retain_head: bool = False) -> DetectorCheckpoint:
    """The parent with one imprinted classifier row per new class (the fine-tune's start); the
    support features are computed on ``device`` (default: CUDA when available, else the CPU).
    ``scoring``: how the child scores classes (:mod:`fewshot.model.cosine_head`; add_classes
    passes its ``--scoring``); ``retain_head``: keep the parent's RoI head frozen for the old
    classes (:mod:`fewshot.model.retained_heads`; add_classes passes ``--retain-heads``)."""
    torch.manual_seed(ep.seed)
    model = ep.parent.build_model().to(resolve_device(device))
    index = class_index(ep.child_ids)
    images, targets = rows_to_batch(ep.novel_rows, index)
    replay_images, replay_targets = rows_to_batch(ep.replay_rows, index)
    expand_detector(model, images, targets, num_new=len(ep.new_classes),
                    center_images=replay_images, center_targets=replay_targets, scoring=scoring,
                    retain_head=retain_head)
    return to_checkpoint(model, ep.parent, ep.child_classes, ep.child_ids)


def pseudo_label_episode(ep: Episode, threshold: float, *, device: str | torch.device | None = None,
                         precision: str = "fp32") -> tuple[Episode, PseudoLabelStats]:
    """``ep`` with the parent's confident detections of its own classes added to every support
    image (novel and replay) as annotations (:func:`fewshot.learning.pseudo_labels.pseudo_label_rows`,
    score ``>= threshold``); the new classes' annotations stay the user's."""
    rows, stats = pseudo_label_rows(ep.parent.build_model(), ep.rows, ep.parent.category_ids, threshold,
                                    device=device, precision=precision)
    n = len(ep.novel_rows)
    return replace(ep, novel_rows=rows[:n], replay_rows=rows[n:]), stats


def to_checkpoint(model: torch.nn.Module, like: DetectorCheckpoint, classes: Sequence[str] | None = None,
                  category_ids: Sequence[int] | None = None, extra: dict | None = None) -> DetectorCheckpoint:
    """An in-memory checkpoint of ``model`` (without training-only heads), on the CPU whatever
    device the model is on (it is pickled to Tune trials and Ray tasks)."""
    state = {k: v.detach().to("cpu", copy=True) for k, v in strip_training_heads(model.state_dict()).items()}
    return replace(like, classes=list(classes or like.classes),
                   category_ids=list(category_ids or like.category_ids), state_dict=state,
                   extra=dict(like.extra if extra is None else extra))


def fine_tune_episode(ep: Episode, cfg: TrainConfig, method: MethodConfig, *,
                      start: DetectorCheckpoint | None = None, teacher=None,
                      on_log: Callable[[int, dict[str, float]], None] | None = None,
                      progress: bool = False, device: str | torch.device | None = None,
                      precision: str = "auto", trunk_cache: TrunkCache | None = None
                      ) -> DetectorCheckpoint:
    """Fine-tune the expanded parent (``start``, default :func:`expand_parent`) on the
    episode's support rows on ``device`` (default: CUDA when available, else the CPU) at
    ``precision``; ``teacher`` (needed when ``method`` distils) embeds the support boxes for the
    distillation targets. ``trunk_cache``: see :func:`fewshot.learning.method.finetune`."""
    start = start or expand_parent(ep, device=device)
    rows = ep.rows
    if method.distills:
        if teacher is None:
            raise ValueError("this method distils (beta > 0): pass the teacher")
        rows = TeacherEmbedder(teacher)(rows)
    model = finetune(start, rows, cfg, method, seed=ep.seed, on_log=on_log, progress=progress,
                     device=device, precision=precision, trunk_cache=trunk_cache)
    return to_checkpoint(model, start)


def predict(checkpoint: DetectorCheckpoint, split: EvalSplit, batch_size: int = 8, *,
            device: str | torch.device | None = None, precision: str = "fp32",
            trunk_cache: TrunkCache | None = None) -> list[dict]:
    """COCO results of ``checkpoint`` on ``split``'s images, run on ``device`` (default: CUDA
    when available, else the CPU) at ``precision`` (the one the version was validated with);
    ``trunk_cache``: shared with other models of the same trunk (:mod:`fewshot.model.trunk_cache`)."""
    return predict_rows(checkpoint.build_model(), split.rows, checkpoint.category_ids,
                        batch_size=batch_size, device=device, precision=precision,
                        trunk_cache=trunk_cache)


def score(checkpoint: DetectorCheckpoint, split: EvalSplit, refiner=None,
          results: list[dict] | None = None, *, device: str | torch.device | None = None,
          precision: str = "fp32", trunk_cache: TrunkCache | None = None) -> EvalReport:
    """bAP/nAP of ``checkpoint`` on ``split``; with ``refiner`` (:class:`fewshot.clip.refinement.Refiner`)
    the scores are fused with CLIP's at the refiner's weight first. ``device``/``precision``:
    where and how the predictions are made when ``results`` is not given; ``trunk_cache``: see
    :func:`predict`."""
    if results is None:
        results = predict(checkpoint, split, device=device, precision=precision, trunk_cache=trunk_cache)
    if refiner is not None:
        from fewshot.clip.refinement import refine_results

        results = refine_results(refiner, split.images, results, checkpoint.category_ids)
    return split.evaluate(results)


def refine_checkpoint_file(path, teacher, val_split: EvalSplit, results: list[dict] | None = None, *,
                           device: str | torch.device | None = None, precision: str = "fp32"):
    """Fit CLIP refinement for the detector saved at ``path`` on ``val_split`` (its
    predictions there: ``results``, computed when not given), choose the fusion weight there
    (:func:`fewshot.clip.refinement.fit_refiner`), and store the refiner in the file's
    ``extra`` (where Serve finds it). Returns the refiner."""
    from fewshot.clip.refinement import fit_refiner
    from fewshot.model.checkpoint import load_checkpoint, update_extra

    checkpoint = load_checkpoint(path)
    print(f"choosing the CLIP fusion weight on {len(val_split.rows)} val images ...", flush=True)
    results = predict(checkpoint, val_split, device=device, precision=precision) if results is None else results
    refiner = fit_refiner(teacher, checkpoint.classes, checkpoint.category_ids, val_split, results)
    update_extra(path, refiner.to_extra())
    return refiner
