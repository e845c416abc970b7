"""Glue: the MLflow bookkeeping shared by the jobs (experiments, params, evaluation reports)."""
from __future__ import annotations

import json
import math

import mlflow

from fewshot.metrics.coco_eval import EvalReport
from fewshot.metrics.plots import per_class_ap_figure


def start_run(uri: str, experiment: str, run_name: str, tags: dict[str, str] | None = None):
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    return mlflow.start_run(run_name=run_name, tags=tags or {})


def log_params(params: dict) -> None:
    flat = {k: (json.dumps(v) if isinstance(v, (list, dict, tuple)) else v) for k, v in params.items()}
    mlflow.log_params({k: str(v)[:6000] for k, v in flat.items()})


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Finite metrics into the active run (NaN, e.g. AP of a class a split lacks, left out)."""
    finite = {k: float(v) for k, v in metrics.items() if not math.isnan(float(v))}
    if finite:
        mlflow.log_metrics(finite, step=step)


def log_dict(data, artifact_file: str) -> None:
    mlflow.log_dict(data, artifact_file)


def set_tags(tags: dict[str, str]) -> None:
    mlflow.set_tags({k: str(v) for k, v in tags.items()})


def log_eval_report(report: EvalReport, prefix: str, novel: set[str] | None = None,
                    parent_per_class: dict[str, float] | None = None) -> None:
    """Headline metrics, the full report as JSON, and a per-class AP50 bar chart."""
    mlflow.log_metrics({f"{prefix}{k}": v for k, v in report.headline().items()})
    mlflow.log_dict(report.to_dict(), f"eval/{prefix.rstrip('_/') or 'report'}.json")
    if report.per_class_AP50:
        fig = per_class_ap_figure(report.per_class_AP50, novel=novel, parent=parent_per_class,
                                  title=f"{prefix.rstrip('_/')} AP50 per class")
        mlflow.log_figure(fig, f"eval/{prefix.rstrip('_/') or 'report'}_per_class_ap50.png")
        import matplotlib.pyplot as plt

        plt.close(fig)


def eval_tags(report: EvalReport) -> dict[str, str]:
    """Evaluation figures as registry tags (4 decimals; NaN ones left out)."""
    return {k: f"{v:.4f}" for k, v in report.headline().items() if not math.isnan(v)}


def log_refinement(refiner) -> dict[str, str]:
    """The chosen CLIP fusion weight, the grid it was chosen from (JSON and a plot) in the
    active run; returns the version tags that record it."""
    import matplotlib.pyplot as plt

    from fewshot.metrics.plots import fusion_weight_figure

    mlflow.log_metric("refine_fusion_weight", refiner.fusion_weight)
    mlflow.log_dict(refiner.selection, "refinement/selection.json")
    fig = fusion_weight_figure(refiner.selection)
    mlflow.log_figure(fig, "refinement/fusion_weight.png")
    plt.close(fig)
    return {"refine_fusion_weight": f"{refiner.fusion_weight:g}", "refine_teacher": refiner.teacher_id,
            "refine_objective": str(refiner.selection.get("objective", ""))}


def log_scoring_choice(choice) -> dict[str, str]:
    """The scoring ``add_classes --scoring auto`` chose on val
    (:class:`fewshot.learning.bias_correction.BiasChoice`): each candidate's offset and val
    figures as JSON in the active run; returns the version tags that record it."""
    mlflow.log_dict({"chosen": choice.scoring, "candidates": choice.candidates, "judged": choice.judged},
                    "scoring/selection.json")
    for c in choice.candidates:
        log_metrics({f"scoring/val_{c['scoring']}_{k}": c[k] for k in ("bAP50", "nAP50", "HM50")})
    tags = {"scoring": choice.scoring, "scoring_val": json.dumps(choice.candidates, sort_keys=True)}
    set_tags(tags)
    return tags


def log_bias_correction(choice) -> dict[str, str]:
    """The new rows' logit offset the bias correction chose
    (:class:`fewshot.learning.bias_correction.BiasChoice`): every offset's val figures as
    metrics (step = position in the grid), JSON and a plot, in the active run; returns the
    version tags that record it."""
    import matplotlib.pyplot as plt

    from fewshot.metrics.plots import bias_correction_figure

    for i, row in enumerate(choice.table):
        log_metrics({f"bias_correction/val_{k}": row[k] for k in ("bAP50", "nAP50", "HM50", "served_bAP50")
                     if k in row}, step=i)
    mlflow.log_metric("bias_correction_offset", choice.offset)
    mlflow.log_dict({"offsets": choice.table, "chosen": choice.offset, "met": choice.met, "judged": choice.judged,
                     "parent_val_bAP50": choice.parent_bAP50, "max_base_drop": choice.max_base_drop,
                     "parent_val_served_bAP50": choice.parent_served_bAP50,
                     "max_detector_drop": choice.max_detector_drop},
                    "bias_correction/selection.json")
    fig = bias_correction_figure(choice.table, choice.parent_bAP50, choice.max_base_drop, choice.offset,
                                 parent_served_bAP50=choice.parent_served_bAP50,
                                 max_detector_drop=choice.max_detector_drop)
    mlflow.log_figure(fig, "bias_correction/offset.png")
    plt.close(fig)
    tags = {"bias_correction_offset": f"{choice.offset:g}", "bias_correction_met": str(choice.met).lower(),
            "bias_correction_max_drop": f"{choice.max_base_drop:g}", "bias_correction_judged": choice.judged}
    set_tags(tags)
    return tags
