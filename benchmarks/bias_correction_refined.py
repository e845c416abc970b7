"""Bias correction under CLIP refinement, in the demo's setting: what the served version gets.

After ``make demo`` (services up, version 1 the demo's base, the embedded teacher trained),
this adds the demo's five new classes onto version 1 once per seed and bias-correction setting,
with the demo's flags (10 shots, 150 steps, ``--teacher embedded``), moving the ``champion``
alias back to version 1 before each job (``jobs/promote.py``, recorded on the versions). Each
job is a real ``ray job submit`` against the demo's Ray, MLflow and catalog. One JSON line per
job (the version's gate figures on val, the served and unrefined test figures) goes to
``--out``; ``--summarize FILE`` prints the mean ± 95% CI table and the paired differences.

    make demo
    python benchmarks/bias_correction_refined.py --seeds 0 1 2 --settings off default \\
        --out benchmarks/results_bias_correction_refined.jsonl
    python benchmarks/bias_correction_refined.py --summarize benchmarks/results_bias_correction_refined.jsonl

``default`` is whatever rule the checked-out ``add_classes`` uses; each line records it from the
version's tags (``bias_correction_judged``: ``served`` since 90ee5fe; absent at 19c5d7f, whose
rule judged the detector alone); ``off`` passes ``--bias-correction None``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "platform"), str(ROOT)]

RULES = {"off": "off", "detector": "detector alone, 1 point", "served": "as served"}


def run_job(seed: int, setting: str, env: dict) -> None:
    store = ["--catalog", env["FEWSHOT_CATALOG"], "--mlflow-uri", env["MLFLOW_TRACKING_URI"]]
    subprocess.run([sys.executable, "jobs/promote.py", *store, "--version", "1",
                    "--reason", "benchmarks/bias_correction_refined.py: back to the base"],
                   cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    extra = ["--bias-correction", "None"] if setting == "off" else []
    cmd = ["ray", "job", "submit", "--address", env["RAY_JOB_ADDRESS"], "--working-dir", ".", "--",
           "python", "jobs/add_classes.py", *store, "--model-name", "fewshot-detector",
           "--classes", "triangle,star4,crescent,lshape,gear", "--shots", "10", "--steps", "150",
           "--teacher", "embedded", "--seed", str(seed), *extra]
    print(f"=== seed {seed}, bias correction {setting}", flush=True)
    out = subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith(("gate (val", "child (test", "new rows' logit offset", "registered")):
            print("  " + line[:200], flush=True)


def version_line(client, version: int) -> dict:
    tags = client.get_model_version("fewshot-detector", str(version)).tags
    judged = tags.get("bias_correction_judged", "detector" if "bias_correction_offset" in tags else "off")
    gate = json.loads(tags["gate_figures"])
    return {"version": version, "seed": int(tags["seed"]), "rule": RULES[judged],
            "offset": float(tags.get("bias_correction_offset", 0)), "gate": tags["gate"],
            "val_detector_change": gate["unrefined_change"], "val_served_change": gate["served_change"],
            "test_served_nAP50": float(tags["nAP50"]), "test_served_bAP50": float(tags["bAP50"]),
            "test_served_HM50": float(tags["HM50"]),
            "test_unrefined_nAP50": float(tags["unrefined_test_nAP50"]),
            "test_unrefined_bAP50": float(tags["unrefined_test_bAP50"]),
            "parent_test_bAP50": float(tags["parent_test_bAP50"]),
            "fusion_weight": float(tags["refine_fusion_weight"])}


def summarize(path: str) -> None:
    from fewshot.metrics.stats import mean_ci95

    rows = [json.loads(line) for line in open(path) if line.strip()]
    rules = list(dict.fromkeys(r["rule"] for r in rows))
    keys = ("test_served_nAP50", "test_served_bAP50", "test_served_HM50", "test_unrefined_nAP50",
            "test_unrefined_bAP50")
    print("| rule | seeds | gate passed | offsets | served nAP50 | served bAP50 | served HM50 | "
          "detector nAP50 | detector bAP50 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for rule in rules:
        sel = sorted((r for r in rows if r["rule"] == rule), key=lambda r: r["seed"])
        cells = [mean_ci95([r[k] for r in sel]).format() for k in keys]
        offsets = " / ".join(f"{r['offset']:g}" for r in sel)
        passed = sum(r["gate"] == "passed" for r in sel)
        print(f"| {rule} | {len(sel)} | {passed} | {offsets} | " + " | ".join(cells) + " |")
    by = {(r["rule"], r["seed"]): r for r in rows}
    for a, b in ((RULES["served"], RULES["detector"]), (RULES["served"], RULES["off"])):
        seeds = sorted(s for (rule, s) in by if rule == a and (b, s) in by)
        if len(seeds) < 2:
            continue
        diffs = [mean_ci95([by[a, s][k] - by[b, s][k] for s in seeds]).format() for k in keys]
        print(f"| {a} − {b} (paired, seeds {', '.join(map(str, seeds))}) | | | | " + " | ".join(diffs) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the K-shot draw and training")
    p.add_argument("--settings", nargs="+", default=["off", "default"], choices=["off", "default"],
                   help="off: --bias-correction None; default: the checked-out add_classes' rule")
    p.add_argument("--out", default="", help="append one JSON line per job to this file")
    p.add_argument("--summarize", default="", help="print the tables of a results file and exit")
    args = p.parse_args()
    if args.summarize:
        summarize(args.summarize)
        return
    env = dict(os.environ)
    for key in ("FEWSHOT_CATALOG", "MLFLOW_TRACKING_URI", "RAY_JOB_ADDRESS"):
        if key not in env:
            sys.exit(f"{key} is not set: run `source infra/env.sh` after `make demo`")
    from mlflow import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    for seed in args.seeds:
        for setting in args.settings:
            run_job(seed, setting, env)
            latest = max(int(v.version) for v in client.search_model_versions("name='fewshot-detector'"))
            line = version_line(client, latest)
            print("  " + json.dumps(line), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
