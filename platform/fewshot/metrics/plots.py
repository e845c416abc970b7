"""Figures a person would rather look at than read: per-class AP, the grids the jobs choose
from (CLIP fusion weight, bias correction), the ablation."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def per_class_ap_figure(per_class: dict[str, float], novel: set[str] | None = None,
                        parent: dict[str, float] | None = None, title: str = "AP50 per class"):
    """Bars of AP50 per class; novel classes highlighted; the parent's values as markers."""
    novel = novel or set()
    names = list(per_class)
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names)), 3.6))
    colors = ["tab:orange" if n in novel else "tab:blue" for n in names]
    ax.bar(range(len(names)), [per_class[n] for n in names], color=colors)
    if parent:
        xs = [i for i, n in enumerate(names) if n in parent]
        ax.scatter(xs, [parent[names[i]] for i in xs], color="black", marker="_", s=200,
                   label="parent version", zorder=3)
        ax.legend(loc="upper right")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("AP50")
    ax.set_title(title + ("  (orange: new classes)" if novel else ""))
    fig.tight_layout()
    return fig


def fusion_weight_figure(selection: dict):
    """Val figures against the CLIP fusion weight lambda (the grid search of refinement)."""
    grid = selection.get("grid", [])
    lams = [row["lambda"] for row in grid]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for key in ("AP50", "bAP50", "nAP50", "HM50"):
        vals = [row.get(key) for row in grid]
        if any(v is not None and v == v for v in vals):
            ax.plot(lams, vals, marker="o", label=key)
    chosen = selection.get("chosen")
    if chosen is not None:
        ax.axvline(chosen, color="black", linestyle="--", label=f"chosen λ = {chosen:g}")
    ax.set_xlabel("fusion weight λ (0: detector only)")
    ax.set_ylabel(f"{selection.get('split', 'val')} AP")
    ax.set_title(f"CLIP refinement: λ chosen by {selection.get('objective', '?')}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def bias_correction_figure(table: list[dict], parent_bAP50: float, max_base_drop: float, chosen: float, *,
                           parent_served_bAP50: float | None = None, max_detector_drop: float | None = None):
    """Val bAP50 and nAP50 against the new rows' logit offset (the bias correction's grid), with
    the parent's bAP50 and the lowest base AP50 the rule accepts; when the rule was judged as
    served (refined), the served bAP50 of the offsets tried and the parent's as served too."""
    offsets = [row["offset"] for row in table]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for key in ("bAP50", "nAP50"):
        ax.plot(offsets, [row[key] for row in table], marker="o", label=f"child {key} (detector)")
    served = [row for row in table if "served_bAP50" in row]
    ax.axhline(parent_bAP50, color="tab:blue", linestyle=":", label="parent bAP50")
    if parent_served_bAP50 is not None and max_detector_drop is not None:
        ax.plot([r["offset"] for r in served], [r["served_bAP50"] for r in served], marker="s",
                linestyle="none", color="tab:green", label="child bAP50 as served")
        ax.axhline(parent_served_bAP50 - max_base_drop, color="tab:green", linestyle=":", lw=0.8,
                   label=f"parent as served − {max_base_drop:g}")
        ax.axhline(parent_bAP50 - max_detector_drop, color="gray", linestyle=":", lw=0.8,
                   label=f"parent − {max_detector_drop:g} (detector)")
    else:
        ax.axhline(parent_bAP50 - max_base_drop, color="gray", linestyle=":", lw=0.8,
                   label=f"parent − {max_base_drop:g}")
    ax.axvline(chosen, color="black", linestyle="--", label=f"chosen offset {chosen:g}")
    ax.set_xlabel("logit offset of the new rows (0: no correction)")
    ax.set_ylabel("val AP50")
    ax.set_title("Bias correction of the new rows, chosen on val")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def ablation_figure(cells: list[dict], variants: list[str], shots: list[int]):
    """Mean nAP50 and bAP50 (points) of each variant per shot count, with 95% CI bars;
    ``cells`` hold ``variant``, ``shots`` and ``nAP50``/``bAP50`` as ``fewshot.metrics.stats.MeanCI``."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("nAP50", "bAP50")):
        for i, v in enumerate(variants):
            sel = [c for c in cells if c["variant"] == v]
            xs = [shots.index(c["shots"]) + (i - len(variants) / 2) * 0.08 for c in sel]
            err = [0.0 if c[metric].half_width != c[metric].half_width else c[metric].half_width * 100
                   for c in sel]
            ax.errorbar(xs, [c[metric].mean * 100 for c in sel], yerr=err, fmt="o-", capsize=3, label=v)
        ax.set_xticks(range(len(shots)), [f"{k}-shot" for k in shots])
        ax.set_ylabel(f"{metric} (points, mean ± 95% CI)")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig
