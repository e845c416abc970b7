"""Figures a person would rather look at than read: per-class AP, training curves."""
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
