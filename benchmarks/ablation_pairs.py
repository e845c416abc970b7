"""Paired differences between ablation variants that ran in different `jobs/ablation.py` runs.

    python benchmarks/ablation_pairs.py runs_a.json runs_b.json --against baseline \
        --variants pgb-distill,all --parent-bAP50 50.7

Each file is a run's ``ablation_runs.json`` artifact (MLflow, experiment ``fewshot-ablation``;
``mlflow artifacts download -r RUN -a ablation_runs.json``). Rows of the same (shots, seed) are
the same support draw of the same parent, so a variant of one run pairs with ``--against`` of
another. Prints, per shot count, each variant's mean ± 95% CI (nAP50, bAP50, and their
unrefined figures when the rows carry them) and its paired difference to ``--against``. With
``--corrected`` the "unrefined" columns are the detector's figures after add_classes' bias
correction (``*_corrected``, rows of runs since the parent-distillation variants); with
``--per-increment`` the detector's figures with per-increment scoring (``*_per_increment``); with
``--auto`` what ``add_classes --scoring auto`` serves (``*_auto``: scoring and offset chosen on val).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def load_rows(path: str) -> list[dict]:
    """An MLflow ``log_table`` JSON ({"columns": [...], "data": [[...], ...]}) or a list of rows."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict) and "columns" in data:
        return [dict(zip(data["columns"], values)) for values in data["data"]]
    return list(data)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("files", nargs="+", help="ablation_runs.json files of one or more runs")
    p.add_argument("--against", default="baseline", help="the variant every other is paired with")
    p.add_argument("--variants", default="", help="comma-separated variants to report (default: all)")
    p.add_argument("--parent-bAP50", type=float, default=None,
                   help="the parent's bAP50 on the same test images, in points (prints each bAP50 - it)")
    p.add_argument("--corrected", action="store_true",
                   help="compare the detector's figures after bias correction (nAP50_corrected, bAP50_corrected) "
                        "instead of its uncorrected ones")
    p.add_argument("--per-increment", action="store_true",
                   help="compare the detector's figures with per-increment scoring (nAP50_per_increment, "
                        "bAP50_per_increment; rows of runs since add_classes scores that way)")
    p.add_argument("--auto", action="store_true",
                   help="compare the detector's figures as add_classes --scoring auto serves it (scoring and offset "
                        "chosen on val: nAP50_auto, bAP50_auto; rows of runs since that option)")
    args = p.parse_args(argv)
    if args.corrected + args.per_increment + args.auto > 1:
        p.error("--corrected, --per-increment and --auto each pick the figures to compare: pass one")
    from fewshot.metrics.stats import mean_ci95

    by: dict[tuple, dict] = {}
    for f in args.files:
        for r in load_rows(f):
            key = (r["variant"], int(r["shots"]), int(r["seed"]))
            if key in by:
                print(f"note: {key} appears in more than one file; keeping the first", file=sys.stderr)
                continue
            by[key] = r
    def unrefined(r: dict, metric: str) -> float | None:
        """The detector's own figure: recorded, or the figure itself for an unrefined row;
        None for a refined row of an older run that did not record it; with --corrected, the
        figure after bias correction (None when the run did not record it)."""
        if args.corrected:
            return r.get(f"{metric}_corrected")
        if args.per_increment:
            return r.get(f"{metric}_per_increment")
        if args.auto:
            return r.get(f"{metric}_auto")
        if f"{metric}_unrefined" in r:
            return r[f"{metric}_unrefined"]
        return r[metric] if r.get("fusion_weight") is None else None

    variants = [v for v in args.variants.split(",") if v] or sorted({k[0] for k in by} - {args.against})
    shots = sorted({k[1] for k in by})
    pts = lambda x: 100.0 * float(x)  # noqa: E731
    for k in shots:
        print(f"\n{k}-shot (AP50 points, mean ± 95% CI over the draws both variants ran)\n")
        own = ("corrected" if args.corrected else "per-increment" if args.per_increment
               else "auto-scored" if args.auto else "unrefined")
        print(f"| variant | nAP50 | bAP50 | {own} nAP50 | {own} bAP50 | paired Δ {own} nAP50 "
              f"vs {args.against} | paired Δ {own} bAP50 |" + (" bAP50 − parent |" if args.parent_bAP50 else ""))
        print("|---|---|---|---|---|---|---|" + ("---|" if args.parent_bAP50 else ""))
        for v in [args.against] + variants:
            seeds = sorted(s for (vv, kk, s) in by if vv == v and kk == k)
            if not seeds:
                continue
            rows = [by[(v, k, s)] for s in seeds]
            paired = [s for s in seeds if (args.against, k, s) in by]
            cells = []
            for metric in ("nAP50", "bAP50"):
                own = [unrefined(r, metric) for r in rows]
                known = None not in own and v != args.against and all(
                    unrefined(by[(args.against, k, s)], metric) is not None for s in paired)
                level = mean_ci95(pts(x) for x in own).format(scale=1.0) if None not in own else "–"
                diff = (mean_ci95(pts(unrefined(by[(v, k, s)], metric)) - pts(unrefined(by[(args.against, k, s)], metric))
                                  for s in paired).format(scale=1.0) + f" (n={len(paired)})") if known else "–"
                cells.append((level, diff))
            b_mean = mean_ci95(pts(r["bAP50"]) for r in rows)
            line = (f"| {v} | {mean_ci95(pts(r['nAP50']) for r in rows).format(scale=1.0)} | {b_mean.format(scale=1.0)} | "
                    f"{cells[0][0]} | {cells[1][0]} | {cells[0][1]} | {cells[1][1]} |")
            if args.parent_bAP50 is not None:
                line += f" {b_mean.mean - args.parent_bAP50:+.1f} |"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
