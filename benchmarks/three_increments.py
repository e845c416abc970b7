"""Class-incremental protocol on the embedded world: 10 base classes, then three increments
(4 + 3 + 3 new classes), each added by ``jobs/add_classes.py`` onto the previous champion,
against one model trained on all 20 classes at once (the upper bound).

The protocol, fixed before the run:

* classes in category-id order: the first 10 are the base, the next 4, 3 and 3 the increments;
* the base model and the upper bound: ``jobs/base_train.py`` with the same preset, steps,
  workers and seed; each increment: ``jobs/add_classes.py`` at ``--shots`` K with the product's
  defaults (replay exemplars, the gate on val) and seed ``seed + i``; ``--freeze`` and
  ``--bias-correction`` name variants, each chain of a seed starting from the same base model;
* the gate decides on val as always; when it refuses a child, the protocol promotes it anyway
  with ``jobs/promote.py --version N --reason ...`` (what a user who accepts the drop does) and
  the table says so, so the next increment still starts from the previous step;
* after each step the champion is scored on the **test** split (the first ``--test-images``
  images; nothing is chosen on it) with pycocotools: AP50 of every class seen so far, averaged
  per group (base, each increment, all seen); a champion that scores per increment
  (``--scoring per-increment``) is also scored with joint scoring, the same checkpoint
  re-scored, so the table pairs what the scoring alone changes.

Every job runs as a separate process as ``ray job submit`` would run it, against the MLflow
server at ``--mlflow-uri`` (or a throwaway one this script starts on 127.0.0.1). The figures go
to one MLflow run (experiment ``fewshot-increments``): a metric per group and step, the table,
and a plot of AP50 per class group across the increments. With several ``--seeds`` the chain
runs once per seed and the table gives mean ± 95% t-interval.

    python benchmarks/three_increments.py --catalog /tmp/fewshot-quality-catalog --seeds 0
    python benchmarks/three_increments.py --summarize benchmarks/results_three_increments.jsonl
    python benchmarks/three_increments.py --val-log run.log   # the gate's val figures per variant
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "platform"), str(ROOT)]   # this checkout's code, also beside another install
GROUP_SIZES = (10, 4, 3, 3)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--catalog", default=os.path.join(tempfile.gettempdir(), "fewshot-quality-catalog"),
                   help="catalog root; the embedded world is built into it if missing")
    p.add_argument("--mlflow-uri", default=None,
                   help="MLflow server to use (default: a throwaway one on 127.0.0.1 for this run)")
    p.add_argument("--preset", default="lite0-fpn", help="detector preset of the base and the upper bound")
    p.add_argument("--base-steps", type=int, default=360, help="base_train steps (per worker)")
    p.add_argument("--num-workers", type=int, default=2, help="Ray Train workers of base_train")
    p.add_argument("--shots", type=int, default=10, help="K: annotated instances per new class")
    p.add_argument("--add-steps", type=int, default=150, help="add_classes fine-tuning steps")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; the whole chain runs once per seed")
    p.add_argument("--test-images", type=int, default=300, help="test images scored after each step")
    p.add_argument("--no-upper-bound", action="store_true", help="skip the all-classes-at-once model")
    p.add_argument("--ray-address", default="local",
                   help="the jobs' Ray cluster (RAY_ADDRESS): 'local' starts a private one per job, so a "
                        "cluster already running on this machine is left alone; or a cluster address")
    p.add_argument("--bias-correction", default="0.01",
                   help="comma-separated variants of add_classes' --bias-correction: 'off' (None there) or a base "
                        "AP50 drop, 0.01 being add_classes' default "
                        "(e.g. off,0.01); every variant's increments start from the same base model of the seed "
                        "(a copy registered under the variant's model name), so the variants are paired")
    p.add_argument("--freeze", default="backbone",
                   help="comma-separated variants of add_classes' --freeze (backbone is its default, with "
                        "old-class pseudo-labels and parent distillation; head trains the new rows only, "
                        "add_classes' default before 2026-12-05); crossed with "
                        "--bias-correction, every variant starting from the same base model of the seed")
    p.add_argument("--scoring", default="",
                   help="add_classes' --scoring for every increment (auto, per-increment or joint; empty: its "
                        "default, auto); a champion that scores per increment is also scored jointly, paired")
    p.add_argument("--json-out", default="", help="append one JSON line per seed (and variant) to this file")
    p.add_argument("--val-log", default="",
                   help="print the val figures (the gate's 150 images) of every add_classes job in this console "
                        "log of a run, per variant (--freeze, --bias-correction) and paired against the first, "
                        "and exit")
    p.add_argument("--summarize", default="",
                   help="print the table (mean ± 95%% CI over the seeds) of the JSON lines in this file "
                        "and exit; runs nothing (the upper-bound row needs it in every line)")
    return p


def run(cmd: list[str], env: dict) -> None:
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    subprocess.run(cmd, env=env, check=True, cwd=ROOT)
    print(f"  ({time.time() - t0:.0f} s)", flush=True)


def job(name: str) -> list[str]:
    return [sys.executable, str(ROOT / "jobs" / f"{name}.py")]


def groups_of(manifest) -> list[list[str]]:
    names = [c.name for c in sorted(manifest.categories, key=lambda c: c.id)]
    if len(names) < sum(GROUP_SIZES):
        raise SystemExit(f"the dataset has {len(names)} classes; the protocol needs {sum(GROUP_SIZES)}")
    out, i = [], 0
    for n in GROUP_SIZES:
        out.append(names[i:i + n])
        i += n
    return out


def score_champion(catalog, uri: str, model: str, groups: list[list[str]], test_images: int) -> dict:
    """AP50 on test of the champion, per class and averaged per group of the classes it knows."""
    from fewshot.backends import registry
    from fewshot.learning.bias_correction import collect_second_stage, detections_with_offset
    from fewshot.metrics.coco_eval import load_eval_split, predict_rows
    from fewshot.model.checkpoint import load_checkpoint

    info = registry.get_alias(uri, model, registry.CHAMPION)
    with tempfile.TemporaryDirectory() as d:
        ckpt = load_checkpoint(registry.download_checkpoint(uri, model, info.version, d))
    seen = [c for g in groups for c in g if c in ckpt.classes]
    split = load_eval_split(catalog, ckpt.dataset, "test", seen, max_images=test_images)
    detector = ckpt.build_model()

    def by_group(report) -> dict:
        per_class = report.per_class_AP50
        out = {"per_class_AP50": per_class, "all_seen": report.bAP50}
        for name, group in zip(["base", "inc1", "inc2", "inc3"], groups):
            if all(c in per_class for c in group):  # classes absent from these test images left out
                vals = [per_class[c] for c in group if not math.isnan(per_class[c])]
                out[name] = sum(vals) / len(vals) if vals else float("nan")
        return out

    classifier = detector.roi_heads.box_predictor.cls_score
    out = {"version": info.version, "scoring": classifier.scoring}
    if classifier.scoring == "joint":
        return out | by_group(split.evaluate(predict_rows(detector, split.rows, ckpt.category_ids)))
    # per-increment: also the same checkpoint with one softmax over every class, from the same
    # second-stage outputs (the scoring acts in post-processing only)
    stages = collect_second_stage(detector, split.rows)
    detect = lambda: detections_with_offset(detector, stages, len(ckpt.classes) + 1, 0.0, ckpt.category_ids)
    out |= by_group(split.evaluate(detect()))
    classifier.set_scoring("joint")
    out["joint_scoring"] = by_group(split.evaluate(detect()))
    return out


def gate_verdict(uri: str, model: str, version: int) -> str:
    from mlflow import MlflowClient

    return MlflowClient(uri, registry_uri=uri).get_model_version(model, str(version)).tags.get("gate", "?")


def val_figures(uri: str, model: str, version: int) -> dict:
    """The val figures add_classes logged for ``version`` (150 val images, the gate's): the child's
    nAP50 and bAP50 as served and the parent's bAP50, as fractions; {} when its run lacks them."""
    from mlflow import MlflowClient

    client = MlflowClient(uri, registry_uri=uri)
    run_id = client.get_model_version(model, str(version)).run_id
    metrics = client.get_run(run_id).data.metrics if run_id else {}
    keys = {"nAP50": "val_nAP50", "bAP50": "val_bAP50", "parent_bAP50": "parent_val_bAP50"}
    return {k: metrics[m] for k, m in keys.items() if m in metrics}


def val_figures_from_log(path: str) -> list[dict]:
    """The same val figures read back from a run's console log, for runs made before the JSON
    lines held them: per add_classes job, its flags (model, seed, freeze) and the lines it prints
    for the chosen logit offset (child's val bAP50 and nAP50) and the gate (parent's val bAP50)."""
    jobs: list[dict] = []
    for line in Path(path).read_text(errors="replace").splitlines():
        if line.startswith("$ ") and "add_classes.py" in line:
            flags = dict(re.findall(r"--([\w-]+) (\S+)", line))
            jobs.append({"model": flags["model-name"], "seed": int(flags["seed"]),
                         "variant": f"{flags.get('freeze', 'head')}, bias correction "
                                    f"{flags.get('bias-correction', 'None')}"})
        elif jobs and (m := re.search(r"logit offset \S+: val bAP50 ([\d.]+) nAP50 ([\d.]+)", line)):
            jobs[-1].update(bAP50=float(m.group(1)), nAP50=float(m.group(2)))
        elif jobs and (m := re.search(r"^gate \(val.*as served ([\d.]+) \(unrefined parent\)", line)):
            jobs[-1]["parent_bAP50"] = float(m.group(1))
    return [j for j in jobs if {"bAP50", "nAP50", "parent_bAP50"} <= set(j)]


def val_table(jobs: list[dict]) -> str:
    """Val HM50 of each step's child per variant (--freeze, --bias-correction), and every variant
    paired against the first one (the chains' seed is the model name's; step i ran with
    add_classes --seed seed + i)."""
    from fewshot.metrics.coco_eval import harmonic_mean as hm
    from fewshot.metrics.stats import mean_ci95

    rows: dict[tuple[str, int], dict[int, dict]] = {}
    for j in jobs:
        chain_seed = int(re.search(r"increments-s(\d+)", j["model"]).group(1))
        rows.setdefault((j["variant"], j["seed"] - chain_seed), {})[chain_seed] = j
    freezes = list(dict.fromkeys(f for f, _ in rows))
    lines = ["| step | --freeze, --bias-correction | val nAP50 | val bAP50 | val base change | val HM50 | "
             f"HM50 paired vs {freezes[0]} |", "|---|---|---|---|---|---|---|"]
    for step in sorted({s for _, s in rows}):
        ref = rows.get((freezes[0], step), {})
        for fz in freezes:
            by_seed = rows.get((fz, step), {})
            if not by_seed:
                continue
            js = list(by_seed.values())
            paired = [hm(by_seed[k]["bAP50"], by_seed[k]["nAP50"]) - hm(ref[k]["bAP50"], ref[k]["nAP50"])
                      for k in by_seed if k in ref]
            cells = [mean_ci95(j["nAP50"] for j in js).format(), mean_ci95(j["bAP50"] for j in js).format(),
                     mean_ci95(j["bAP50"] - j["parent_bAP50"] for j in js).format(),
                     mean_ci95(hm(j["bAP50"], j["nAP50"]) for j in js).format(),
                     "-" if fz == freezes[0] or not paired else mean_ci95(paired).format()]
            lines.append(f"| +inc{step} | {fz} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def latest_version(uri: str, model: str) -> int:
    from mlflow import MlflowClient

    return max(int(v.version) for v in MlflowClient(uri, registry_uri=uri).search_model_versions(f"name='{model}'"))


def variant_model(seed: int, variant: str, freeze: str = "head", scoring: str = "") -> str:
    name = f"increments-s{seed}" if variant == "off" else f"increments-s{seed}-bc{variant}"
    name = name if freeze == "head" else f"{name}-fz{freeze}"
    return f"{name}-{scoring}" if scoring else name


def variant_label(result: dict) -> str:
    """The add_classes flags a result line's chain ran with (lines from before --freeze ran head,
    lines from before --scoring scored jointly)."""
    return (f"--freeze {result.get('freeze', 'head')} --bias-correction {result.get('bias_correction', 'off')} "
            f"--scoring {result.get('scoring', 'joint')}")


def fork_base(uri: str, source: str, target: str) -> None:
    """Register the base version (1) of ``source`` as ``target``'s champion: the same weights,
    so the variants' chains are paired."""
    import mlflow

    from fewshot.backends import registry
    from fewshot.model.checkpoint import load_checkpoint

    if registry.get_alias(uri, target, registry.CHAMPION) is not None:
        return
    with tempfile.TemporaryDirectory() as d:
        path = registry.download_checkpoint(uri, source, 1, d)
        ckpt = load_checkpoint(path)
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("fewshot-increments")
        with mlflow.start_run(run_name=f"fork-{source}-to-{target}"):
            v = registry.register_detector(uri, target, path, classes=ckpt.classes, class_set=ckpt.class_set,
                                           parent_version=None, shots=None,
                                           extra_tags={"dataset": ckpt.dataset, "forked_from": f"{source}/1"})
    registry.set_alias(uri, target, registry.CHAMPION, v.version)


def chain(args, catalog, manifest, uri: str, env: dict, seed: int, groups: list[list[str]],
          variant: str = "off", base_from: str | None = None, freeze: str = "head") -> dict:
    """One seed's chain; ``variant``: add_classes' --bias-correction ('off' or a drop);
    ``freeze``: its --freeze; ``base_from``: the model whose base version this chain starts from
    (else it trains one)."""
    from fewshot.backends import registry

    model = variant_model(seed, variant, freeze, args.scoring)
    common = ["--catalog", args.catalog, "--mlflow-uri", uri, "--model-name", model,
              "--experiment", "fewshot-increments"]
    steps = []
    if base_from is not None:
        fork_base(uri, base_from, model)
    elif registry.get_alias(uri, model, registry.CHAMPION) is None:
        run(job("base_train") + common + [
            "--dataset", manifest.name, "--classes", ",".join(groups[0]), "--preset", args.preset,
            "--steps", str(args.base_steps), "--num-workers", str(args.num_workers), "--seed", str(seed)], env)
    steps.append({"step": "base", "gate": "-", **score_champion(catalog, uri, model, groups, args.test_images)})
    correction = ["--bias-correction", "None" if variant == "off" else variant]
    for i, group in enumerate(groups[1:], start=1):
        run(job("add_classes") + common + [
            "--classes", ",".join(group), "--shots", str(args.shots), "--steps", str(args.add_steps),
            "--seed", str(seed + i), "--freeze", freeze, *correction,
            *(["--scoring", args.scoring] if args.scoring else [])], env)
        version = latest_version(uri, model)
        verdict = gate_verdict(uri, model, version)
        if registry.get_alias(uri, model, registry.CHAMPION).version != version:
            run(job("promote") + common[:6] + ["--version", str(version), "--reason",
                                               f"three-increments protocol: step {i} continues from it"], env)
            verdict += " (promoted by the protocol)"
        step = {"step": f"+inc{i}", "gate": verdict, "val": val_figures(uri, model, version),
                **score_champion(catalog, uri, model, groups, args.test_images)}
        if variant != "off":
            step["offset"] = float(registry.get_version(uri, model, version).tags.get("bias_correction_offset", "nan"))
        steps.append(step)
    out = {"seed": seed, "bias_correction": variant, "freeze": freeze, "steps": steps,
           "scoring": args.scoring or "auto"}
    if not args.no_upper_bound and base_from is None:
        joint = f"increments-joint-s{seed}"
        jcommon = common[:4] + ["--model-name", joint, "--experiment", "fewshot-increments"]
        if registry.get_alias(uri, joint, registry.CHAMPION) is None:
            run(job("base_train") + jcommon + [
                "--dataset", manifest.name, "--classes", ",".join(c for g in groups for c in g),
                "--preset", args.preset, "--steps", str(args.base_steps),
                "--num-workers", str(args.num_workers), "--seed", str(seed)], env)
        out["joint"] = score_champion(catalog, uri, joint, groups, args.test_images)
    return out


def table(results: list[dict]) -> str:
    from fewshot.metrics.stats import mean_ci95

    cols = ["all_seen", "base", "inc1", "inc2", "inc3"]
    lines = ["| step | gate | AP50 all seen | base | +4 (inc1) | +3 (inc2) | +3 (inc3) | base drop vs previous |",
             "|---|---|---|---|---|---|---|---|"]
    n = len(results[0]["steps"])
    for k in range(n):
        cells = []
        for c in cols:
            vals = [r["steps"][k].get(c) for r in results]
            cells.append("-" if any(v is None for v in vals) else mean_ci95(vals).format())
        drop = "-" if k == 0 else mean_ci95(
            r["steps"][k - 1]["base"] - r["steps"][k]["base"] for r in results).format()
        gates = "; ".join(sorted({r["steps"][k]["gate"] for r in results}))
        lines.append(f"| {results[0]['steps'][k]['step']} | {gates} | " + " | ".join(cells) + f" | {drop} |")
    if all("joint" in r for r in results):
        cells = [mean_ci95(r["joint"][c] for r in results).format() for c in cols]
        lines.append("| all 20 at once (upper bound) | - | " + " | ".join(cells) + " | - |")
    return "\n".join(lines)


def plot(results: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.4, 4))
    labels = [s["step"] for s in results[0]["steps"]]
    x = np.arange(len(labels))
    for key, name in [("base", "base (10)"), ("inc1", "+4"), ("inc2", "+3"), ("inc3", "+3 last"),
                      ("all_seen", "all seen")]:
        ys = [np.mean([r["steps"][k][key] for r in results]) if key in results[0]["steps"][k] else np.nan
              for k in range(len(labels))]
        ax.plot(x, 100 * np.asarray(ys), marker="o", label=name)
        if all("joint" in r for r in results):
            ax.axhline(100 * np.mean([r["joint"][key] for r in results]), ls=":", lw=0.8,
                       color=ax.lines[-1].get_color())
    ax.set_xticks(x, labels)
    ax.set_ylabel("test AP50 (%)")
    ax.set_title("AP50 per class group across increments (dotted: all classes at once)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def paired_drops(reference: list[dict], variant: list[dict]) -> str:
    """Per increment, over the seeds both variants ran: base drop of ``variant`` minus the
    ``reference``'s, and the same for the new classes' AP50 (AP50 points, mean ± 95% CI)."""
    from fewshot.metrics.stats import mean_ci95

    by_seed = {r["seed"]: r for r in reference}
    pairs = [(by_seed[r["seed"]], r) for r in variant if r["seed"] in by_seed]
    if not pairs:
        return ""
    lines = ["| step | base drop, variant − reference | new group AP50, variant − reference | offsets chosen |",
             "|---|---|---|---|"]
    for k in range(1, len(pairs[0][0]["steps"])):
        def drop(r):
            return r["steps"][k - 1]["base"] - r["steps"][k]["base"]
        group = f"inc{k}"
        d_drop = mean_ci95(drop(b) - drop(a) for a, b in pairs).format()
        d_new = mean_ci95(b["steps"][k][group] - a["steps"][k][group] for a, b in pairs).format()
        offsets = " / ".join(f"{b['steps'][k].get('offset', float('nan')):g}" for _, b in pairs)
        lines.append(f"| {pairs[0][0]['steps'][k]['step']} | {d_drop} | {d_new} | {offsets} |")
    last = len(pairs[0][0]["steps"]) - 1
    total = mean_ci95((b["steps"][0]["base"] - b["steps"][last]["base"])
                      - (a["steps"][0]["base"] - a["steps"][last]["base"]) for a, b in pairs).format()
    seen = mean_ci95(b["steps"][last]["all_seen"] - a["steps"][last]["all_seen"] for a, b in pairs).format()
    lines.append(f"| all increments | {total} | all seen classes after the last: {seen} | - |")
    return f"paired over seed(s) {', '.join(str(a['seed']) for a, _ in pairs)}:\n\n" + "\n".join(lines)


def scoring_pairs(results: list[dict]) -> str:
    """Per step, what per-increment scoring changes against joint scoring of the same champions
    (AP50 points, paired over the seeds); empty when no step was re-scored."""
    from fewshot.metrics.stats import mean_ci95

    n = len(results[0]["steps"])
    if not all("joint_scoring" in r["steps"][k] for r in results for k in range(1, n)):
        return ""
    lines = ["The same champions scored jointly (one softmax over every class), per-increment − joint:", "",
             "| step | base | +4 (inc1) | +3 (inc2) | +3 (inc3) | all seen |", "|---|---|---|---|---|---|"]
    for k in range(1, n):
        cells = []
        for c in ["base", "inc1", "inc2", "inc3", "all_seen"]:
            pairs = [(r["steps"][k].get(c), r["steps"][k]["joint_scoring"].get(c)) for r in results]
            cells.append("-" if any(a is None or b is None for a, b in pairs)
                         else mean_ci95(a - b for a, b in pairs).format())
        lines.append(f"| {results[0]['steps'][k]['step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarize(path: str) -> None:
    lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not lines:
        raise SystemExit(f"{path} holds no results")
    variants: dict[str, list[dict]] = {}
    for r in lines:
        variants.setdefault(variant_label(r), []).append(r)
    for variant, results in variants.items():
        seeds = ", ".join(str(r["seed"]) for r in results)
        print(f"{variant}: {len(results)} seed(s) ({seeds}); mean ± 95% CI in AP50 points\n")
        print(table(results))
        rescored = scoring_pairs(results)
        if rescored:
            print("\n" + rescored)
        joint = [r for r in results if "joint" in r]
        if joint and len(joint) < len(results):
            print(f"\nupper bound of seed(s) {', '.join(str(r['seed']) for r in joint)} only:")
            print(table(joint).splitlines()[-1])
        print()
    reference = next(iter(variants))  # the first variant in the file: the one the others pair with
    for variant, results in variants.items():
        if variant != reference:
            text = paired_drops(variants[reference], results)
            if text:
                print(f"{variant} against {reference}, {text}\n")


def main(args: argparse.Namespace) -> None:
    if args.summarize:
        return summarize(args.summarize)
    if args.val_log:
        return print(val_table(val_figures_from_log(args.val_log)))
    import mlflow

    from catalog import Catalog
    from catalog.world import build_world
    from fewshot.learning.freezing import POLICIES

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), str(ROOT),
                                                        os.environ.get("PYTHONPATH", "")])}
    catalog = Catalog(args.catalog)
    manifest = build_world(catalog, progress=False)
    groups = groups_of(manifest)
    print("groups:", json.dumps(groups), flush=True)
    with ExitStack() as stack:
        uri = args.mlflow_uri
        if uri is None:
            sys.path.insert(0, str(ROOT / "benchmarks"))
            from _stack import mlflow_server

            uri = stack.enter_context(mlflow_server(Path(stack.enter_context(tempfile.TemporaryDirectory()))))
        env["MLFLOW_TRACKING_URI"] = uri
        env["RAY_ADDRESS"] = args.ray_address
        t0 = time.time()
        corrections = [v.strip() for v in args.bias_correction.split(",") if v.strip()]
        for v in corrections:
            if v != "off":
                float(v)  # a drop, e.g. 0.01: fail before any job runs
        freezes = [f.strip() for f in args.freeze.split(",") if f.strip()]
        unknown = sorted(set(freezes) - set(POLICIES))
        if unknown:
            raise SystemExit(f"unknown --freeze {unknown}; add_classes knows {list(POLICIES)}")
        variants = [(fz, bc) for fz in freezes for bc in corrections]
        by_variant: dict[tuple[str, str], list[dict]] = {v: [] for v in variants}
        for seed in (int(s) for s in args.seeds.split(",")):
            first = None
            for fz, bc in variants:
                r = chain(args, catalog, manifest, uri, env, seed, groups, bc, freeze=fz,
                          base_from=None if first is None else variant_model(seed, first[1], first[0],
                                                                             args.scoring))
                first = first or (fz, bc)
                by_variant[(fz, bc)].append(r)
                if args.json_out:
                    with open(args.json_out, "a") as f:
                        f.write(json.dumps({**r, "args": vars(args)}) + "\n")
        results = by_variant[variants[0]]
        for variant in variants[1:]:
            print(f"\n{variant_label(by_variant[variant][0])}:\n{table(by_variant[variant])}", flush=True)
            print(f"against {variant_label(results[0])}, "
                  f"{paired_drops(results, by_variant[variant])}", flush=True)
        text = table(results)
        rescored = scoring_pairs(results)
        if rescored:
            text += "\n\n" + rescored
        print(f"\n{len(results)} seed(s), {args.shots} shots, preset {args.preset}, "
              f"{args.test_images} test images; mean ± 95% CI in AP50 points ({time.time() - t0:.0f} s)\n")
        print(text, flush=True)
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("fewshot-increments")
        with mlflow.start_run(run_name=f"three-increments-{args.shots}shot"):
            mlflow.log_params({k: v for k, v in vars(args).items() if k not in ("catalog", "mlflow_uri")})
            for k, step in enumerate(results[0]["steps"]):
                for key in ("all_seen", "base", "inc1", "inc2", "inc3"):
                    if key in step:
                        mlflow.log_metric(f"test_AP50/{key}",
                                          sum(r["steps"][k][key] for r in results) / len(results), step=k)
            mlflow.log_text(text, "increments_table.md")
            mlflow.log_figure(plot(results), "increments_ap50.png")
            for fz, bc in variants[1:]:  # the other variants' tables and plots beside the first's
                suffix = f"freeze-{fz}_bc-{bc}"
                mlflow.log_text(table(by_variant[(fz, bc)]), f"increments_table_{suffix}.md")
                mlflow.log_figure(plot(by_variant[(fz, bc)]), f"increments_ap50_{suffix}.png")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
