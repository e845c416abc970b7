"""CLIP classification refinement: fuse detector scores with CLIP box-crop classification.

At inference each detected box is cropped (with a little context, as the teacher saw
objects in pretraining), embedded by the CLIP image encoder, and compared with one prompt
embedding per class of the model's class set (a prompt ensemble, see
:meth:`fewshot.clip.teacher.Teacher.class_prompt_embeddings`):

    p_clip(c | box) = softmax_c( cos(v_box, w_c) / T )

and the detector's score for the box's class is fused with it **arithmetically**:

    s = (1 - lambda) * s_det + lambda * p_clip(label)

When the detector gives its whole per-class score vector (``class_scores``), the vectors
are fused and the box takes the arg-max class (CLIP can then correct a label).

Why arithmetic and not ViLD's geometric ensemble (``s_det^(1-lambda) * p_clip^lambda``,
Gu et al. ICLR 2022, model ensembling): lambda = 0 returns the detector's scores exactly;
a confident detection is never zeroed by a CLIP probability near 0 (a small crop that
CLIP cannot read); and for lambda < 1 the detector's notion of "object vs background",
which CLIP over a closed class list does not have, keeps its weight in the ranking.
lambda is chosen by :func:`choose_fusion_weight` on a validation split (AP50 with
pycocotools), and stored with the model version through :class:`Refiner`'s
``to_extra``/``from_extra`` (plain lists and floats, for ``DetectorCheckpoint.extra``).

Math layer: no ray, no mlflow.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "EXTRA_KEY", "DEFAULT_GRID", "FORMAT_VERSION", "clip_class_probs", "fuse_scores",
    "fuse_results", "choose_fusion_weight", "clip_probs_for_results", "Refiner",
    "refine_results", "fit_refiner",
]

EXTRA_KEY = "clip_refinement"
FORMAT_VERSION = 1
DEFAULT_GRID: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(10))  # 0.0 .. 0.9


def clip_class_probs(box_embeddings: torch.Tensor, prompt_embeddings: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """softmax over classes of cosine(box, class prompt) / ``temperature``: [n, C]."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    v = torch.nn.functional.normalize(box_embeddings.float(), dim=-1)
    w = torch.nn.functional.normalize(prompt_embeddings.float().to(v.device), dim=-1)
    return torch.softmax(v @ w.T / temperature, dim=-1)


def fuse_scores(scores: torch.Tensor, labels: torch.Tensor, clip_probs: torch.Tensor,
                fusion_weight: float, class_scores: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``(labels, scores)`` of ``n`` detections.

    ``labels`` are model labels 1..C (0 is background; column ``label - 1`` of
    ``clip_probs`` [n, C] is that class). With ``class_scores`` [n, C] (the detector's
    foreground class probabilities) the vectors are fused and the arg-max is taken;
    otherwise only the detected label's score is fused. A fusion weight of 0 returns the
    detector's labels and scores unchanged."""
    lam = float(fusion_weight)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"fusion weight must be in [0, 1], got {lam}")
    if lam == 0.0 or scores.numel() == 0:
        return labels, scores.clone()
    scores = scores.float()
    probs = clip_probs.float().to(scores.device)
    if class_scores is not None:
        fused = (1.0 - lam) * class_scores.float().to(scores.device) + lam * probs
        best, idx = fused.max(dim=1)
        return idx + 1, best
    cols = (labels.long() - 1).clamp(min=0, max=probs.shape[1] - 1)
    p = probs.gather(1, cols.view(-1, 1)).squeeze(1)
    return labels, (1.0 - lam) * scores + lam * p


def fuse_results(results: Sequence[Mapping], clip_probs, category_ids: Sequence[int],
                 fusion_weight: float) -> list[dict]:
    """COCO result dicts with fused scores; ``clip_probs`` [N, C] is aligned with
    ``results``, its column ``j`` is category ``category_ids[j]``."""
    probs = np.asarray(clip_probs, dtype=np.float64).reshape(len(results), -1) if len(results) else None
    col = {int(c): j for j, c in enumerate(category_ids)}
    lam = float(fusion_weight)
    out = []
    for i, r in enumerate(results):
        j = col.get(int(r["category_id"]))
        s = float(r["score"])
        if j is not None and lam > 0.0:
            s = (1.0 - lam) * s + lam * float(probs[i, j])
        out.append({**r, "score": s})
    return out


_OBJECTIVES = ("AP50", "bAP50", "nAP50", "HM50", "AP", "bAP", "nAP", "HM")


def choose_fusion_weight(
    val_predictions: Sequence[Mapping],
    val_clip_probs,
    gt: dict,
    grid: Sequence[float] = DEFAULT_GRID,
    *,
    category_ids: Sequence[int] | None = None,
    base_ids: Sequence[int] | None = None,
    novel_ids: Sequence[int] = (),
    objective: str = "AP50",
) -> tuple[float, list[dict]]:
    """Grid search of the fusion weight on a validation split; ``(best_lambda, table)``.

    ``val_predictions``: COCO result dicts (``image_id``, ``category_id``, ``bbox`` xywh,
    ``score``) of the detector on the split; ``val_clip_probs`` [N, C]: CLIP class
    probabilities of each prediction's box (:func:`clip_probs_for_results`), column ``j``
    being ``category_ids[j]`` (default: the categories of ``gt`` in order); ``gt``: the
    split as a COCO dict. Each lambda is scored with pycocotools
    (:func:`fewshot.metrics.coco_eval.coco_evaluate`). ``objective`` ``"AP50"`` is AP50 averaged
    over all evaluated classes (``base_ids`` + ``novel_ids``, default all of ``gt``);
    ``"nAP50"``, ``"HM50"``... pick one figure of the report. Ties go to the smaller
    lambda. ``table``: one dict per lambda with AP50, bAP50, nAP50, HM50 (and the AP ones).
    """
    from fewshot.metrics.coco_eval import coco_evaluate

    if objective not in _OBJECTIVES:
        raise ValueError(f"objective must be one of {_OBJECTIVES}, got {objective!r}")
    if not grid:
        raise ValueError("empty grid")
    cat_ids = [int(c["id"]) for c in gt["categories"]]
    columns = list(category_ids) if category_ids is not None else cat_ids
    if base_ids is None:
        base_ids = [c for c in cat_ids if c not in set(novel_ids)]
    all_ids = list(base_ids) + list(novel_ids)
    table = []
    for lam in grid:
        fused = fuse_results(val_predictions, val_clip_probs, columns, lam)
        report = coco_evaluate(gt, fused, base_ids=base_ids, novel_ids=novel_ids)
        overall = coco_evaluate(gt, fused, base_ids=all_ids) if novel_ids else report
        table.append({
            "lambda": float(lam),
            "AP50": overall.bAP50, "AP": overall.bAP,
            "bAP50": report.bAP50, "nAP50": report.nAP50, "HM50": report.HM50,
            "bAP": report.bAP, "nAP": report.nAP, "HM": report.HM,
        })
    best_lam, best_val = float(grid[0]), -math.inf
    for row in sorted(table, key=lambda r: r["lambda"]):
        v = row[objective]
        if not math.isnan(v) and v > best_val + 1e-12:
            best_lam, best_val = row["lambda"], v
    return best_lam, table


def clip_probs_for_results(refiner: "Refiner", images: Mapping[int, object],
                           results: Sequence[Mapping]) -> np.ndarray:
    """CLIP class probabilities [N, C] (columns in ``refiner.class_names`` order) of the
    boxes of COCO results; ``images`` maps image_id to the image (PIL, array or bytes)."""
    probs = np.zeros((len(results), len(refiner.class_names)), dtype=np.float32)
    by_image: dict[int, list[int]] = {}
    for i, r in enumerate(results):
        by_image.setdefault(int(r["image_id"]), []).append(i)
    for image_id, idx in by_image.items():
        boxes = [[b[0], b[1], b[0] + b[2], b[1] + b[3]] for b in (results[i]["bbox"] for i in idx)]
        probs[idx] = refiner.clip_probs(images[image_id], boxes).numpy()
    return probs


def refine_results(refiner: "Refiner", images: Mapping[int, object], results: Sequence[Mapping],
                   category_ids: Sequence[int], fusion_weight: float | None = None) -> list[dict]:
    """COCO results with the refiner's fused scores (``category_ids[j]`` is the model's class
    ``refiner.class_names[j]``); ``fusion_weight`` overrides the refiner's lambda."""
    lam = refiner.fusion_weight if fusion_weight is None else float(fusion_weight)
    if lam == 0.0 or not results:
        return [dict(r) for r in results]
    return fuse_results(results, clip_probs_for_results(refiner, images, results), category_ids, lam)


def fit_refiner(teacher, class_names: Sequence[str], category_ids: Sequence[int], val_split,
                val_results: Sequence[Mapping], *, objective: str | None = None,
                grid: Sequence[float] = DEFAULT_GRID, split_name: str = "val") -> "Refiner":
    """A :class:`Refiner` for a model whose classes are ``class_names`` (catalog ids
    ``category_ids``), its fusion weight chosen by grid search on ``val_split``
    (a :class:`fewshot.metrics.coco_eval.EvalSplit`) given the model's ``val_results`` there.

    ``objective`` defaults to HM50 when the split has novel classes (new classes gain,
    old ones must not pay for it) and to AP50 otherwise. The grid's scores are kept in
    ``refiner.selection`` so the choice can be shown next to the model version."""
    objective = objective or ("HM50" if val_split.novel_ids else "AP50")
    refiner = Refiner.build(teacher, class_names)
    keep = set(val_split.base_ids) | set(val_split.novel_ids)
    results = [r for r in val_results if r["category_id"] in keep]
    probs = clip_probs_for_results(refiner, val_split.images, results)
    lam, table = choose_fusion_weight(results, probs, val_split.gt, grid, category_ids=category_ids,
                                      base_ids=val_split.base_ids, novel_ids=val_split.novel_ids,
                                      objective=objective)
    refiner.fusion_weight = lam
    refiner.selection = {"objective": objective, "split": split_name, "chosen": lam,
                         "images": len(val_split.gt["images"]), "grid": table}
    return refiner


class Refiner:
    """What refinement needs at serving time, stored with a model version.

    ``class_names`` are the model's classes in label order (label ``i`` is
    ``class_names[i - 1]``); ``prompt_embeddings`` [C, E] their CLIP text embeddings;
    ``fusion_weight`` lambda; ``temperature`` T of the CLIP softmax; ``teacher_spec`` /
    ``teacher_id`` name the CLIP model the embeddings came from (loaded lazily on the
    first :meth:`refine`, and checked against ``teacher_id``)."""

    def __init__(self, class_names: Sequence[str], prompt_embeddings, *, fusion_weight: float = 0.0,
                 temperature: float = 0.01, teacher_spec: str = "", teacher_id: str = "",
                 templates: Sequence[str] = (), box_context: float | None = None,
                 selection: dict | None = None, teacher=None):
        emb = torch.as_tensor(np.asarray(prompt_embeddings, dtype=np.float32))
        if emb.ndim != 2 or emb.shape[0] != len(class_names):
            raise ValueError(f"prompt_embeddings must be [{len(class_names)}, E], got {tuple(emb.shape)}")
        if not 0.0 <= float(fusion_weight) <= 1.0:
            raise ValueError(f"fusion_weight must be in [0, 1], got {fusion_weight}")
        if float(temperature) <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.class_names = [str(c) for c in class_names]
        self.prompt_embeddings = torch.nn.functional.normalize(emb, dim=-1)
        self.fusion_weight = float(fusion_weight)
        self.temperature = float(temperature)
        self.teacher_spec = str(teacher_spec)
        self.teacher_id = str(teacher_id)
        self.templates = list(templates)
        self.box_context = box_context
        self.selection = dict(selection or {})
        self._teacher = teacher
        self._column = {n: i for i, n in enumerate(self.class_names)}

    @classmethod
    def build(cls, teacher, class_names: Sequence[str], *, fusion_weight: float = 0.0,
              temperature: float | None = None, templates: Sequence[str] | None = None) -> "Refiner":
        """Prompt embeddings of ``class_names`` from ``teacher``; the temperature defaults to
        the teacher's own (1 / exp(logit_scale))."""
        templates = tuple(templates or teacher.templates)
        emb = teacher.class_prompt_embeddings(list(class_names), templates)
        if temperature is None:
            temperature = 1.0 / max(teacher.logit_scale, 1e-6)
        return cls(class_names, emb, fusion_weight=fusion_weight, temperature=temperature,
                   teacher_spec=teacher.spec, teacher_id=teacher.id, templates=templates,
                   box_context=teacher.box_context, teacher=teacher)

    # -- the teacher
    @property
    def teacher(self):
        if self._teacher is None:
            if not self.teacher_spec:
                raise RuntimeError("this Refiner has no teacher spec; pass teacher=")
            from fewshot.clip.teacher import load_teacher

            self.set_teacher(load_teacher(self.teacher_spec))
        return self._teacher

    def set_teacher(self, teacher) -> None:
        """Use ``teacher`` (must have the weights the prompt embeddings came from)."""
        if self.teacher_id and teacher.id != self.teacher_id:
            raise ValueError(f"teacher {teacher.id!r} is not the one the prompt embeddings came "
                             f"from ({self.teacher_id!r}); rebuild the Refiner with Refiner.build")
        if self.box_context is not None:
            teacher.box_context = float(self.box_context)
        self._teacher = teacher

    # -- scoring
    def clip_probs(self, image, boxes) -> torch.Tensor:
        """CLIP class probabilities [n, C] of the crops of ``boxes`` in ``image``."""
        emb = self.teacher.embed_boxes(image, boxes)
        if emb.shape[0] == 0:
            return torch.zeros((0, len(self.class_names)))
        return clip_class_probs(emb, self.prompt_embeddings, self.temperature)

    def refine(self, image, detections, score_threshold: float | None = None,
               fusion_weight: float | None = None):
        """Detections of one image with fused scores, best first.

        ``detections`` is either torchvision's output dict (``boxes`` [n, 4], ``labels``
        [n] 1..C, ``scores`` [n], optional ``class_scores`` [n, C]) -> the same dict, or a
        list of ``{"box", "label": class name, "score"}`` (``fewshot.model.inference.Detector``)
        -> the same list with ``score`` fused and ``det_score``/``clip_score`` added.
        ``score_threshold`` drops fused scores below it (run the detector with a lower
        threshold than usual, since fusion can raise a score)."""
        lam = self.fusion_weight if fusion_weight is None else float(fusion_weight)
        if isinstance(detections, Mapping):
            return self._refine_tensors(image, detections, lam, score_threshold)
        return self._refine_list(image, list(detections), lam, score_threshold)

    def _refine_tensors(self, image, det: Mapping, lam: float, thr: float | None) -> dict:
        boxes, labels, scores = det["boxes"], det["labels"], det["scores"]
        out = dict(det)
        if boxes.shape[0] == 0:
            return out
        if lam == 0.0:  # exactly the detector's output (only re-sorted)
            new_labels, new_scores = labels, scores.clone()
        else:
            probs = self.clip_probs(image, boxes).to(scores.device)
            new_labels, new_scores = fuse_scores(scores, labels, probs, lam, det.get("class_scores"))
            out["clip_scores"] = probs
        out["det_scores"] = scores
        out["labels"], out["scores"] = new_labels.to(labels.dtype), new_scores.to(scores.dtype)
        order = torch.argsort(out["scores"], descending=True, stable=True)
        if thr is not None:
            order = order[out["scores"][order] >= thr]
        n = boxes.shape[0]
        return {k: (v[order] if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == n else v)
                for k, v in out.items()}

    def _refine_list(self, image, dets: list, lam: float, thr: float | None) -> list[dict]:
        if not dets:
            return []
        probs = self.clip_probs(image, [d["box"] for d in dets]) if lam > 0.0 else None
        out = []
        for i, d in enumerate(dets):
            col = self._column.get(d["label"])
            s_det = float(d["score"])
            s = s_det
            new = {**d, "det_score": s_det}
            if probs is not None and col is not None:
                p = float(probs[i, col])
                s = (1.0 - lam) * s_det + lam * p
                new["clip_score"] = round(p, 4)
            new["score"] = round(s, 4) if lam > 0.0 else d["score"]
            if thr is None or s >= thr:
                out.append(new)
        out.sort(key=lambda d: -float(d["score"]))
        return out

    # -- storage in DetectorCheckpoint.extra
    def to_extra(self) -> dict:
        """``{EXTRA_KEY: {...}}`` of plain lists, floats and strings: merge it into
        ``DetectorCheckpoint.extra`` (``extra.update(refiner.to_extra())``)."""
        return {EXTRA_KEY: {
            "format_version": FORMAT_VERSION,
            "class_names": list(self.class_names),
            "prompt_embeddings": self.prompt_embeddings.tolist(),
            "fusion_weight": self.fusion_weight,
            "temperature": self.temperature,
            "teacher_spec": self.teacher_spec,
            "teacher_id": self.teacher_id,
            "templates": list(self.templates),
            "box_context": None if self.box_context is None else float(self.box_context),
            "selection": _plain(self.selection),
        }}

    @classmethod
    def from_extra(cls, extra: Mapping, teacher=None, teacher_spec: str | None = None) -> "Refiner":
        """Rebuild from ``DetectorCheckpoint.extra`` (or the dict under ``EXTRA_KEY``).

        ``teacher`` (already loaded) or ``teacher_spec`` (where the teacher lives on this
        machine) override the stored spec; the stored ``teacher_id`` is still checked.
        Raises ``KeyError`` when the extra holds no refinement data."""
        data = extra.get(EXTRA_KEY, extra) if isinstance(extra, Mapping) else None
        if not isinstance(data, Mapping) or "prompt_embeddings" not in data:
            raise KeyError(f"no CLIP refinement data ({EXTRA_KEY!r}) in this checkpoint's extra")
        if data.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            raise ValueError(f"unsupported refinement format {data.get('format_version')!r}")
        refiner = cls(
            data["class_names"], data["prompt_embeddings"],
            fusion_weight=data["fusion_weight"], temperature=data["temperature"],
            teacher_spec=teacher_spec or data.get("teacher_spec", ""),
            teacher_id=data.get("teacher_id", ""), templates=data.get("templates", ()),
            box_context=data.get("box_context"), selection=data.get("selection"),
        )
        if teacher is not None:
            refiner.set_teacher(teacher)
        return refiner

    def __repr__(self) -> str:
        return (f"Refiner(classes={len(self.class_names)}, lambda={self.fusion_weight}, "
                f"T={self.temperature:.4g}, teacher={self.teacher_id!r})")


def _plain(value):
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value
