"""Where the old classes' AP50 goes when add_classes trains the box head, and whether the bias
correction's val rule sees it.

A child trained the way ``add_classes --freeze backbone`` trains it (old-class pseudo-labels at
0.9, parent distillation lambda, AdamW lr 5e-4, 150 steps, batch 8, 20 warm-up steps, no
balancer) loses some base AP50 against its parent. Two things can take it:

* **drift**: the box head and the box regressor, which train, answer the old classes worse.
  Measured by switching the new classes off (their logits offset by -100): what is left of the
  loss is the drift alone.
* **competition**: the new rows out-score the old classes on some of their objects. Measured by
  answering the old classes with the parent's frozen box head, box regressor and rows (the
  child's own head answers only the new classes, in the same softmax; Fan et al., "Generalized
  Few-Shot Object Detection without Forgetting", CVPR 2021, keep such a base branch): what is
  left of the loss is the competition alone.

Bias correction (:mod:`fewshot.learning.bias_correction`) can only remove competition, and it
judges on val. So per draw this also chooses the new rows' offset with add_classes' rule (the
smallest keeping val bAP50 within 1 point of the parent's) on the first 100 val images (the
ablation's), the first 150 (add_classes' gate) and all 300, and reports the test drop each
choice leaves and the new classes' AP50 it costs.

Protocol (fixed before the run): the base ``--checkpoint``, split1's five novel classes, shots
1 / 5 / 10, seeds 0..9 (the ablation's draws: ``fewshot.learning.episode.sample_episode``),
test figures on the first 150 test images (the ablation's) and all 300; nothing is chosen on
test. One JSON line per draw to ``--out``; ``--summarize`` prints the tables::

    python benchmarks/base_loss_sources.py --checkpoint base/dihedral.pt --seeds 5 \\
        --out benchmarks/results_base_loss_sources.jsonl            # then --first-seed 5 --seeds 5
    python benchmarks/base_loss_sources.py --summarize benchmarks/results_base_loss_sources.jsonl

**Per-increment scoring** (``per_increment`` in each line, added with it): the same child with
each class scored against the classes that existed when it was added
(:mod:`fewshot.model.cosine_head`), which takes the competition out of the old classes' scores
by construction; its test figures, and add_classes' offset rule judged on it.

**``--scoring auto``** (``auto`` in each line, added with it): what add_classes serves by
default, each scoring's offset rule judged on the first 100 / 150 / 300 val images and the
scoring chosen between them (:func:`fewshot.learning.bias_correction.choose_scoring`), with its
test figures; the tables pair it against joint scoring with its offset rule.

**Weight-space interpolation** (``--alphas``, added after the tables above were read): WiSE-FT
(Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022, Eq. 1) averages the
fine-tuned weights with the ones fine-tuning started from, ``theta_alpha = (1 - alpha) theta_0 +
alpha theta_1``; here ``theta_0`` is the expanded parent (old rows and box head the parent's, new
rows imprinted) and ``theta_1`` the child, so ``alpha < 1`` walks the box head, regressor and
every row back toward the parent (``--interpolate shared``: the box head, regressor and old rows
only, the child's new rows kept as trained). Per draw and alpha: the test drop and nAP50, and the same
selection on val as the bias correction's: for each alpha add_classes' offset rule, then the
largest alpha whose rule is met (else the best val harmonic mean over alpha and offset), judged
on 150 and on 300 val images.

**``--variant baseline``** (added last; ``variant`` in each line, absent in lines written
before it, which are ``add-classes``): the fixed-weight baseline of the ablation, the same
weights trained on the same support images with the same schedule, without the old-class
pseudo-labels and without parent distillation, and scored the same ways. With both variants in
one file, ``--summarize`` pairs them per draw (add_classes' default − baseline): nAP50 and base
drop as trained (joint scoring, no offset) and as served (``--scoring auto`` chosen on the
gate's 150 val images), on all 300 test images. Protocol fixed before its run: both variants
at seeds 0..14, shots 1 / 5 / 10, on one base, one variant per core (the ``add-classes``
lines of ``results_scoring_auto.jsonl`` were to be reused if a rebuilt base reproduced them; it
did not: seed 0 of the same recipe gave bAP50 0.727 where it had given 0.721; 20 draws were
planned and cut to 15 after the first two, before any 5- or 10-shot draw, because a draw took
65-85 s here)::

    python benchmarks/base_loss_sources.py --checkpoint base/dihedral.pt --variant add-classes \\
        --seeds 15 --out benchmarks/results_default_vs_baseline.jsonl   # and --variant baseline beside it

**``--retain-heads``** (added after that run; ``retain_heads``, ``retained`` and ``auto_retained``
in each line): the child is expanded as ``add_classes --retain-heads`` (its default since
2026-12-06) expands it, with a frozen copy of the parent's RoI head (:mod:`fewshot.model.retained_heads`);
training does not run it, so every other figure of the line is the child's own head as before.
``retained``: per-increment scoring with the retained head answering the old classes;
``auto_retained``: ``--scoring auto`` choosing between joint scoring (which ignores the head)
and that. Protocol fixed before its run: the add-classes variant at seeds 0..14, shots 1 / 5 / 10,
on the rebuilt base of the run above, written to its own file, into which the 45 baseline lines
of ``results_default_vs_baseline.jsonl`` (the same base and draws) are copied so ``--summarize``
pairs them::

    python benchmarks/base_loss_sources.py --checkpoint base/dihedral.pt --retain-heads --shots 1,5 \\
        --seeds 15 --out benchmarks/results_retained_heads.jsonl      # and --shots 10 beside it
    grep '"variant": "baseline"' benchmarks/results_default_vs_baseline.jsonl >> benchmarks/results_retained_heads.jsonl

Torch only (no Ray, no MLflow); 50-105 s per draw on one core, 10 shots the slowest (more with ``--alphas``;
86-164 s with ``--retain-heads``, the first draws beside other jobs).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "platform"), str(ROOT)]

NOVEL = ["triangle", "star4", "crescent", "lshape", "gear"]
OFFSETS = (0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0, -8.0)   # add_classes' grid
OFF = -100.0   # switches the new classes off
VAL_SIZES = (100, 150, 300)
VARIANTS = ("add-classes", "baseline")   # add_classes' default training; the ablation's baseline
TEST_SIZES = (150, 300)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="the base detector (a checkpoint file, e.g. base_detector_budget.py --save)")
    p.add_argument("--catalog", default=os.path.join(tempfile.gettempdir(), "fewshot-quality-catalog"),
                   help="catalog holding the embedded world (dataset synthworld)")
    p.add_argument("--shots", default="1,5,10", help="comma-separated shot counts")
    p.add_argument("--seeds", type=int, default=5, help="draws per shot count (seeds F..F+N-1)")
    p.add_argument("--first-seed", type=int, default=0, metavar="F", help="first draw seed (to extend a run)")
    p.add_argument("--variant", default="add-classes", choices=VARIANTS,
                   help="what trains the child: add-classes (its default: old-class pseudo-labels at 0.9 and "
                        "parent distillation) or baseline (neither: the ablation's fixed-weight baseline)")
    p.add_argument("--retain-heads", action="store_true",
                   help="expand with a retained head (add_classes --retain-heads): also score per-increment scoring "
                        "with the parent's frozen head answering the old classes, and --scoring auto choosing between "
                        "that and joint scoring ('retained' and 'auto_retained' in each line)")
    p.add_argument("--parent-distill", type=float, default=1.0, metavar="L",
                   help="parent distillation weight of the add-classes variant (add_classes' default 1)")
    p.add_argument("--alphas", default="", metavar="A,B",
                   help="also score the child interpolated toward its start, (1-a) start + a child, at "
                        "these a in (0, 1) (WiSE-FT; empty: skip)")
    p.add_argument("--interpolate", default="all", metavar="MODES",
                   help="what --alphas interpolates, comma-separated: all (every weight, WiSE-FT) and/or "
                        "shared (keep the child's new rows)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results_base_loss_sources.jsonl"),
                   help="append one JSON line per draw here")
    p.add_argument("--summarize", metavar="JSONL", default="", help="only print the tables of a results file")
    return p


class ParentAnswersOldClasses:
    """Forward hooks that make ``model`` answer the old classes (labels < ``num_old``, background
    included) with ``parent``'s box head, regressor and rows, and the new classes with its own."""

    def __init__(self, model, parent, num_old: int):
        self.parent_heads = parent.roi_heads
        self.num_old = num_old
        self.pooled = None
        heads = model.roi_heads
        self.hooks = [heads.box_head.register_forward_pre_hook(self._keep),
                      heads.box_predictor.register_forward_hook(self._merge)]

    def _keep(self, _module, args):
        self.pooled = args[0]

    @torch.no_grad()
    def _merge(self, _module, _args, output):
        logits, deltas = output
        features = self.parent_heads.box_head(self.pooled)
        predictor = self.parent_heads.box_predictor
        old_logits = predictor.cls_score(features)[:, :self.num_old]
        old_deltas = predictor.bbox_pred(features).float().repeat(1, self.num_old)
        return (torch.cat([old_logits, logits[:, self.num_old:]], dim=1),
                torch.cat([old_deltas, deltas[:, 4 * self.num_old:]], dim=1))

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def run(args) -> None:
    from catalog import Catalog
    from fewshot.learning.bias_correction import collect_second_stage, detections_with_offset
    from fewshot.learning.episode import expand_parent, fine_tune_episode, pseudo_label_episode, sample_episode
    from fewshot.learning.loop import TrainConfig
    from fewshot.learning.method import MethodConfig
    from fewshot.metrics.coco_eval import load_eval_split
    from fewshot.model.checkpoint import load_checkpoint
    from fewshot.model.trunk_cache import TrunkCache

    torch.set_num_threads(args.threads)
    catalog = Catalog(args.catalog)
    parent = load_checkpoint(args.checkpoint)
    base = list(parent.classes)
    cache = TrunkCache()
    sizes = {"val": VAL_SIZES, "test": TEST_SIZES}
    subsets = {(name, n): load_eval_split(catalog, "synthworld", name, base, NOVEL, n)
               for name in sizes for n in sizes[name]}
    full = {name: subsets[name, max(sizes[name])] for name in sizes}   # the largest size: all images

    def reports(model, name, first_new, ids, offsets, ns=None, stages=None):
        """{n: {offset: EvalReport}} on the first n images of split ``name`` (one forward pass,
        or none with ``stages``: the model's second stages on that split, kept from an earlier
        call; the classifier's scoring applies in post-processing, so they serve both scorings)."""
        if stages is None:
            stages = collect_second_stage(model, full[name].rows, device="cpu", trunk_cache=cache)
        out = {}
        for n in ns or sizes[name]:
            keep = {int(r["image_id"]) for r in subsets[name, n].rows}
            kept = [s for s in stages if s.image_id in keep]
            out[n] = {o: subsets[name, n].evaluate(detections_with_offset(model, kept, first_new, o, ids))
                      for o in offsets}
        return out

    parent_model = parent.build_model().eval()
    ref = {name: {n: r[0.0].bAP50 for n, r in reports(parent_model, name, 10**6, parent.category_ids,
                                                        (0.0,)).items()} for name in sizes}
    alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
    if any(not 0 < a < 1 for a in alphas):
        raise SystemExit(f"--alphas must lie in (0, 1), got {args.alphas}")
    modes = [m.strip() for m in args.interpolate.split(",") if m.strip()]
    if not modes or set(modes) - {"all", "shared"}:
        raise SystemExit(f"--interpolate takes all and/or shared, got {args.interpolate!r}")
    cfg = TrainConfig(steps=150, batch_size=8, lr=5e-4, warmup_steps=20, log_every=150)   # add_classes'
    default_training = args.variant == "add-classes"
    method = MethodConfig(freeze="backbone", parent_distill=args.parent_distill if default_training else 0.0)
    num_old = len(base) + 1
    for shots in [int(k) for k in args.shots.split(",")]:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            t0 = time.perf_counter()
            ep = sample_episode(catalog, parent, NOVEL, shots, seed)
            start = expand_parent(ep, device="cpu", retain_head=args.retain_heads)
            labelled = pseudo_label_episode(ep, 0.9, device="cpu")[0] if default_training else ep
            child = fine_tune_episode(labelled, cfg, method, start=start, device="cpu", precision="fp32",
                                      trunk_cache=cache)
            model = child.build_model().eval()
            with_heads = {name: collect_second_stage(model, full[name].rows, device="cpu", trunk_cache=cache)
                          for name in sizes}
            # every figure but the retained ones: the child's live head alone, as before --retain-heads
            stages = {name: [replace(st, retained=None) for st in s] for name, s in with_heads.items()}
            own = {name: reports(model, name, num_old, child.category_ids, OFFSETS + (OFF,), stages=stages[name])
                   for name in sizes}
            merge = ParentAnswersOldClasses(model, start.build_model().eval(), num_old)
            try:
                kept = reports(model, "test", num_old, child.category_ids, (0.0,))
            finally:
                merge.remove()
            line = {"shots": shots, "seed": seed, "variant": args.variant,
                    "parent_distill": args.parent_distill if default_training else 0.0,
                    "parent_bAP50": {f"{k}{n}": round(v, 5) for k in ref for n, v in ref[k].items()}}
            for n in TEST_SIZES:
                rep = own["test"][n]
                line[f"test{n}"] = {
                    "drop": round(ref["test"][n] - rep[0.0].bAP50, 5),
                    "drop_new_off": round(ref["test"][n] - rep[OFF].bAP50, 5),
                    "drop_parent_answers_old": round(ref["test"][n] - kept[n][0.0].bAP50, 5),
                    "nAP50": round(rep[0.0].nAP50, 5),
                    "nAP50_parent_answers_old": round(kept[n][0.0].nAP50, 5)}
            line |= {f"rule_val{n}": rule_line(own, ref, n) for n in VAL_SIZES}
            classifier = model.roi_heads.box_predictor.cls_score
            classifier.set_scoring("per-increment")   # the same second stages, re-post-processed
            grouped = {name: reports(model, name, num_old, child.category_ids, OFFSETS, stages=stages[name])
                       for name in sizes}
            classifier.set_scoring("joint")
            line["per_increment"] = per_increment_line(grouped, own, ref)
            line["auto"] = {f"rule_val{n}": auto_line({"joint": own, "per-increment": grouped}, ref, n)
                            for n in VAL_SIZES}
            if args.retain_heads:
                classifier.set_scoring("per-increment")
                kept_heads = {name: reports(model, name, num_old, child.category_ids, (0.0,),   # its only offset
                                            stages=with_heads[name]) for name in sizes}
                classifier.set_scoring("joint")
                line["retain_heads"] = True
                line["retained"] = {f"test{t}": {"drop": round(ref["test"][t] - kept_heads["test"][t][0.0].bAP50, 5),
                                                 "nAP50": round(kept_heads["test"][t][0.0].nAP50, 5)}
                                    for t in TEST_SIZES}
                line["auto_retained"] = {f"rule_val{n}": auto_line({"joint": own, "per-increment": kept_heads}, ref, n)
                                         for n in VAL_SIZES}
            for mode in modes if alphas else ():
                line[f"interpolation_{mode}"] = interpolation_line(
                    own, {a: {name: reports(interpolated(start, child, a, mode), name, num_old, child.category_ids,
                                            OFFSETS, ns)
                              for name, ns in (("val", WISE_VAL), ("test", (TEST_SIZES[-1],)))}
                          for a in alphas}, ref)
            line["train_s"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(line), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(line) + "\n")


def rule_line(reports, ref, n: int) -> dict:
    """add_classes' offset rule judged on the first ``n`` val images of ``reports`` ({split: {size:
    {offset: EvalReport}}}): the offset, whether it met the rule, the val drop it saw and what it
    leaves on test."""
    from fewshot.learning.bias_correction import choose_offset

    val = {o: r for o, r in reports["val"][n].items() if o != OFF}
    offset, met = choose_offset(val, ref["val"][n], 0.01)
    return {"offset": offset, "met": met, "val_drop": round(ref["val"][n] - val[offset].bAP50, 5),
            **{f"test{t}_drop": round(ref["test"][t] - reports["test"][t][offset].bAP50, 5) for t in TEST_SIZES},
            **{f"test{t}_nAP50": round(reports["test"][t][offset].nAP50, 5) for t in TEST_SIZES}}


def per_increment_line(grouped, joint, ref) -> dict:
    """Per-increment scoring's test drop and nAP50 (offset 0), the val figures of both scorings
    (what a choice between them sees), and add_classes' offset rule on per-increment scores."""
    out = {f"test{t}": {"drop": round(ref["test"][t] - grouped["test"][t][0.0].bAP50, 5),
                        "nAP50": round(grouped["test"][t][0.0].nAP50, 5)} for t in TEST_SIZES}
    for n in VAL_SIZES:
        out[f"val{n}"] = {f"{k}{m}": round(ref["val"][n] - r[n][0.0].bAP50 if m == "drop" else r[n][0.0].nAP50, 5)
                          for k, r in (("", grouped["val"]), ("joint_", joint["val"])) for m in ("drop", "nAP50")}
    return out | {f"rule_val{n}": rule_line(grouped, ref, n) for n in VAL_SIZES}


def auto_line(by_scoring, ref, n: int) -> dict:
    """What ``add_classes --scoring auto`` serves, judged on the first ``n`` val images: each
    scoring's offset rule on its own offsets, then the scoring chosen between them
    (:func:`fewshot.learning.bias_correction.choose_scoring`); its val and test figures."""
    from fewshot.learning.bias_correction import ScoringCandidate, choose_offset, choose_scoring, offsets_for

    candidates = []
    for scoring, reports in by_scoring.items():
        val = {o: reports["val"][n][o] for o in offsets_for(scoring, OFFSETS)}
        offset, met = choose_offset(val, ref["val"][n], 0.01)
        candidates.append(ScoringCandidate(scoring, offset, bool(met), val[offset].bAP50, val[offset].nAP50))
    chosen = choose_scoring(candidates)
    test = by_scoring[chosen.scoring]["test"]
    return {"scoring": chosen.scoring, "offset": chosen.offset, "met": chosen.met,
            "val_drop": round(ref["val"][n] - chosen.bAP50, 5), "val_nAP50": round(chosen.nAP50, 5),
            "candidates": [{**c.to_dict(), "val_drop": round(ref["val"][n] - c.bAP50, 5)} for c in candidates],
            **{f"test{t}_drop": round(ref["test"][t] - test[t][chosen.offset].bAP50, 5) for t in TEST_SIZES},
            **{f"test{t}_nAP50": round(test[t][chosen.offset].nAP50, 5) for t in TEST_SIZES}}


WISE_VAL = (150, 300)   # the val sizes the interpolation's selection is judged on


NEW_ROW_KEYS = ("cls_score.weight_new", "cls_score.logit_bias")   # the rows add_classes added


def interpolated(start, child, alpha: float, mode: str = "all"):
    """The child's model with every float weight at ``(1 - alpha) start + alpha child`` (WiSE-FT
    Eq. 1); frozen weights are equal in both, so only what fine-tuning moved changes. ``mode``
    ``shared`` keeps the child's new rows (and logit biases) as trained."""
    theta0, theta1 = start.state_dict, child.state_dict
    keep = (lambda k: k.endswith(NEW_ROW_KEYS)) if mode == "shared" else (lambda k: False)
    mixed = {k: v if keep(k) or not v.is_floating_point() else torch.lerp(theta0[k].float(), v.float(),
                                                                           alpha).to(v.dtype)
             for k, v in theta1.items()}
    model = child.build_model().eval()
    model.load_state_dict(mixed)
    return model


def interpolation_line(own, mixed, ref) -> dict:
    """Per alpha the test drop and nAP50 (offset 0), and per val size the selection: add_classes'
    offset rule at every alpha, the largest alpha that meets it, else the best val HM."""
    from fewshot.learning.bias_correction import choose_offset
    from fewshot.metrics.coco_eval import harmonic_mean

    t = TEST_SIZES[-1]
    variants = {1.0: {"val": own["val"], "test": own["test"]}, **mixed}
    out = {f"{a:g}": {"drop": round(ref["test"][t] - v["test"][t][0.0].bAP50, 5),
                      "nAP50": round(v["test"][t][0.0].nAP50, 5)} for a, v in variants.items()}
    for n in WISE_VAL:
        rules = {}
        for a, v in variants.items():
            val = {o: r for o, r in v["val"][n].items() if o != OFF}
            offset, met = choose_offset(val, ref["val"][n], 0.01)
            rules[a] = (offset, met, harmonic_mean(val[offset].bAP50, val[offset].nAP50))
        met = [a for a in rules if rules[a][1]]
        alpha = max(met) if met else max(rules, key=lambda a: (rules[a][2], a))
        offset = rules[alpha][0]
        rep = variants[alpha]["test"][t][offset]
        out[f"rule_val{n}"] = {"alpha": alpha, "offset": offset, "met": bool(met),
                               "test300_drop": round(ref["test"][t] - rep.bAP50, 5),
                               "test300_nAP50": round(rep.nAP50, 5)}
    return out


def summarize(path: str) -> str:
    """The tables of every variant in the results file, then add_classes' default paired against
    the baseline where both are there."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    by_variant = defaultdict(list)
    for r in rows:
        by_variant[r.get("variant", VARIANTS[0])].append(r)
    if len(by_variant) == 1:
        return variant_tables(rows)
    out = []
    for variant, vrows in by_variant.items():
        out += [f"## --variant {variant}", "", variant_tables(vrows), ""]
    if set(VARIANTS) <= set(by_variant):
        out.append(default_vs_baseline_table(*(by_variant[v] for v in VARIANTS)))
    return "\n".join(out)


def default_vs_baseline_table(default: list[dict], baseline: list[dict]) -> str:
    """add_classes' default training − the baseline, paired over the draws both ran, as trained
    (joint scoring, no offset) and as served (``--scoring auto`` chosen on 150 val images); with
    ``--retain-heads`` lines also the default served with its retained head against the baseline
    as served (the baseline has none: the ablation's fixed-weight fine-tune of one head)."""
    from fewshot.metrics.stats import mean_ci95

    t = TEST_SIZES[-1]
    c = lambda vs: mean_ci95(vs).format()
    ways = {"as trained": lambda r: (r[f"test{t}"]["nAP50"], r[f"test{t}"]["drop"]),
            "as served": lambda r: (r["auto"]["rule_val150"][f"test{t}_nAP50"], r["auto"]["rule_val150"][f"test{t}_drop"])}
    if all("auto_retained" in r for r in default):   # add_classes --retain-heads, its default since 2026-12-06
        ways["as served, retained heads"] = lambda r: (
            (r["auto_retained"] if "auto_retained" in r else r["auto"])["rule_val150"][f"test{t}_nAP50"],
            (r["auto_retained"] if "auto_retained" in r else r["auto"])["rule_val150"][f"test{t}_drop"])
    base = {(r["shots"], r["seed"]): r for r in baseline}
    out = [f"add_classes' default training − the fixed-weight baseline, paired per draw, on {t} test images "
           "(as trained: joint scoring, no offset; as served: --scoring auto chosen on 150 val images; "
           "AP50 points, base drop = parent − child):", "",
           "| shots | draws | scored | nAP50, default | nAP50, baseline | nAP50 difference | base drop, default "
           "| base drop, baseline | base drop difference |", "|---|---|---|---|---|---|---|---|---|"]
    for shots in sorted({r["shots"] for r in default}):
        pairs = [(r, base[shots, r["seed"]]) for r in default if r["shots"] == shots and "auto" in r
                 and (shots, r["seed"]) in base]
        for way, get in ways.items():
            x = [(get(a), get(b)) for a, b in pairs]
            out.append(f"| {shots} | {len(pairs)} | {way} | {c(a[0] for a, _ in x)} | {c(b[0] for _, b in x)} "
                       f"| {c(a[0] - b[0] for a, b in x)} | {c(a[1] for a, _ in x)} "
                       f"| {c(b[1] for _, b in x)} | {c(a[1] - b[1] for a, b in x)} |")
    return "\n".join(out)


def variant_tables(rows: list[dict]) -> str:
    """One variant's tables: where its base AP50 goes, the offset rule, the scorings."""
    from fewshot.metrics.stats import mean_ci95

    by = defaultdict(list)
    for r in rows:
        by[r["shots"]].append(r)
    t = TEST_SIZES[-1]
    out = [f"Base AP50 lost against the parent on {t} test images (points, mean ± 95% CI over draws):", "",
           "| shots | draws | as trained | new classes off (drift) | parent answers old classes (competition) "
           "| nAP50 as trained | nAP50, parent answers old |", "|---|---|---|---|---|---|---|"]
    for shots, rs in sorted(by.items()):
        c = lambda key: mean_ci95(r[f"test{t}"][key] for r in rs).format()
        out.append(f"| {shots} | {len(rs)} | {c('drop')} | {c('drop_new_off')} | {c('drop_parent_answers_old')} "
                   f"| {c('nAP50')} | {c('nAP50_parent_answers_old')} |")
    out += ["", "The bias correction's rule judged on n val images: the offset it chose, the val drop it saw, "
            "what that offset leaves on test:", ""] + rule_table(by, lambda r: r)
    if any("per_increment" in r for r in rows):
        out += ["", per_increment_table(by)]
    if any("auto" in r for r in rows):
        out += ["", auto_table(by)]
    if any("retained" in r for r in rows):
        out += ["", retained_table(by)]
    for mode in ("all", "shared"):
        if any(f"interpolation_{mode}" in r for r in rows):
            out += ["", interpolation_tables(by, mode)]
    return "\n".join(out)


def per_increment_table(by: dict) -> str:
    """Per-increment scoring against joint scoring on the same children (paired), and the offset
    rule judged on it."""
    from fewshot.metrics.stats import mean_ci95

    c = lambda xs: mean_ci95(xs).format()
    out = ["Per-increment scoring (each class scored against the classes that existed when it was added), "
           "the same children, no offset; paired against joint scoring:", "",
           "| shots | draws | test images | base drop | nAP50 | drop − joint | nAP50 − joint |", "|---|---|---|---|---|---|---|"]
    for shots, rs in sorted(by.items()):
        rs = [r for r in rs if "per_increment" in r]
        for t in TEST_SIZES:
            g = [r["per_increment"][f"test{t}"] for r in rs]
            j = [r[f"test{t}"] for r in rs]
            out.append(f"| {shots} | {len(rs)} | {t} | {paired_cells(g, j, 'drop', 'nAP50')} |")
    out += ["", "What a choice between the two scorings sees on val (base drop at offset 0; nAP50 per-increment "
            "− joint):", "", "| shots | val images | base drop, per-increment | base drop, joint | paired "
            "difference | nAP50 difference |", "|---|---|---|---|---|---|"]
    for shots, rs in sorted(by.items()):
        rs = [r for r in rs if "val150" in r.get("per_increment", {})]
        for n in VAL_SIZES:
            v = [r["per_increment"][f"val{n}"] for r in rs]
            out.append(f"| {shots} | {n} | {c(x['drop'] for x in v)} | {c(x['joint_drop'] for x in v)} "
                       f"| {c(x['drop'] - x['joint_drop'] for x in v)} | {c(x['nAP50'] - x['joint_nAP50'] for x in v)} |")
    every = [r["per_increment"] for rs in by.values() for r in rs if "val150" in r.get("per_increment", {})]
    out.append("| all | " + " / ".join(str(n) for n in VAL_SIZES) + " | | | " + " / ".join(
        c(x[f"val{n}"]["drop"] - x[f"val{n}"]["joint_drop"] for x in every) for n in VAL_SIZES) + " | |")
    out += ["", "add_classes' offset rule judged on per-increment scores:", ""]
    out += rule_table({k: [r for r in rs if "per_increment" in r] for k, rs in by.items()},
                      lambda r: r["per_increment"])
    return "\n".join(out)


def auto_table(by: dict) -> str:
    """``--scoring auto`` (the scoring and its offset chosen on val) paired against joint scoring
    with its offset rule (what add_classes served before auto), on the same children."""
    out = ["add_classes --scoring auto: joint or per-increment scoring, each with its own offset rule, chosen on n "
           "val images; paired against joint scoring with its offset rule:", "",
           "| shots | val images | per-increment chosen | test drop (300) | nAP50 (300) | drop − joint | "
           "nAP50 − joint |", "|---|---|---|---|---|---|---|"]
    cells = {(shots, n): ([r["auto"][f"rule_val{n}"] for r in rs if "auto" in r],   # auto, then joint
                          [r[f"rule_val{n}"] for r in rs if "auto" in r])
             for shots, rs in by.items() for n in VAL_SIZES}
    out += [f"| {shots} | {n} | {sum(x['scoring'] == 'per-increment' for x in a)} of {len(a)} "
            f"| {paired_cells(a, j, 'test300_drop', 'test300_nAP50')} |" for (shots, n), (a, j) in sorted(cells.items())]
    return "\n".join(out)


def retained_table(by: dict) -> str:
    """``--retain-heads``: per-increment scoring with the parent's frozen head answering the old
    classes, paired against the same child's per-increment scoring without it; then ``--scoring
    auto`` choosing between that and joint scoring, paired against auto without the head."""
    out = ["Retained heads (the parent's frozen RoI head answers the old classes under per-increment scoring), "
           "the same children, paired against per-increment scoring with the child's own head:", "",
           "| shots | draws | test images | base drop | nAP50 | drop − own head | nAP50 − own head |",
           "|---|---|---|---|---|---|---|"]
    for shots, rs in sorted(by.items()):
        rs = [r for r in rs if "retained" in r]
        for t in TEST_SIZES:
            kept = [r["retained"][f"test{t}"] for r in rs]
            own = [r["per_increment"][f"test{t}"] for r in rs]
            out.append(f"| {shots} | {len(rs)} | {t} | {paired_cells(kept, own, 'drop', 'nAP50')} |")
    out += ["", "add_classes --scoring auto with --retain-heads (joint, or per-increment with the retained head, "
            "chosen on n val images); paired against auto without the head:", "",
            "| shots | val images | per-increment chosen | test drop (300) | nAP50 (300) | drop − without | "
            "nAP50 − without |", "|---|---|---|---|---|---|---|"]
    for shots, rs in sorted(by.items()):
        rs = [r for r in rs if "auto_retained" in r]
        for n in VAL_SIZES:
            a, j = [r["auto_retained"][f"rule_val{n}"] for r in rs], [r["auto"][f"rule_val{n}"] for r in rs]
            out.append(f"| {shots} | {n} | {sum(x['scoring'] == 'per-increment' for x in a)} of {len(a)} "
                       f"| {paired_cells(a, j, 'test300_drop', 'test300_nAP50')} |")
    return "\n".join(out)


def paired_cells(xs: list[dict], ys: list[dict], drop: str, nap: str) -> str:
    """Table cells: ``xs``' base drop and nAP50, then their paired differences to ``ys`` (the
    same draws), each mean ± 95% CI."""
    from fewshot.metrics.stats import mean_ci95

    c = lambda vs: mean_ci95(vs).format()
    return (f"{c(x[drop] for x in xs)} | {c(x[nap] for x in xs)} | {c(x[drop] - y[drop] for x, y in zip(xs, ys))} "
            f"| {c(x[nap] - y[nap] for x, y in zip(xs, ys))}")


def rule_table(by: dict, lines_of) -> list[str]:
    """The offset rule's table: per shot count and val size, how often it was met, the offsets,
    the val drop it saw and what it leaves on test; ``lines_of(r)`` holds a draw's ``rule_val*``."""
    from fewshot.metrics.stats import mean_ci95

    out = ["| shots | val images | rule met | offsets | val drop | test drop (150) | test drop (300) | nAP50 (300) |",
           "|---|---|---|---|---|---|---|---|"]
    for shots, rs in sorted(by.items()):
        for n in VAL_SIZES:
            w = [lines_of(r)[f"rule_val{n}"] for r in rs]
            c = lambda key: mean_ci95(x[key] for x in w).format()
            out.append(f"| {shots} | {n} | {sum(x['met'] for x in w)} of {len(w)} "
                       f"| {' / '.join(format(x['offset'], 'g') for x in w)} | {c('val_drop')} "
                       f"| {c('test150_drop')} | {c('test300_drop')} | {c('test300_nAP50')} |")
    return out


def interpolation_tables(by: dict, mode: str) -> str:
    """The ``--alphas`` tables: each alpha's test figures, then the selection on val, paired
    against the bias correction's rule alone (alpha 1) on the same val images."""
    from fewshot.metrics.stats import mean_ci95

    t = TEST_SIZES[-1]
    key = f"interpolation_{mode}"
    by = {shots: [r for r in rs if key in r] for shots, rs in by.items() if any(key in r for r in rs)}
    alphas = sorted({k for rs in by.values() for r in rs for k in r[key] if not k.startswith("rule")},
                    key=float, reverse=True)
    what = "every weight" if mode == "all" else "the child's new rows kept"
    out = [f"WiSE-FT interpolation (1 - a) start + a child ({what}), no offset, on {t} test images "
           "(base points lost / nAP50):", "",
           "| shots | draws | " + " | ".join(f"a = {a}" for a in alphas) + " |",
           "|---|---|" + "---|" * len(alphas)]
    for shots, rs in sorted(by.items()):
        cells = [f"{mean_ci95(r[key][a]['drop'] for r in rs).format()} / "
                 f"{mean_ci95(r[key][a]['nAP50'] for r in rs).format()}" for a in alphas]
        out.append(f"| {shots} | {len(rs)} | " + " | ".join(cells) + " |")
    out += ["", "Alpha and offset chosen on val (the largest alpha whose offset rule is met, else the best "
            "val HM), against the offset rule alone (a = 1), paired:", "",
            "| shots | val images | alphas chosen | test drop | nAP50 | drop − rule alone | nAP50 − rule alone |",
            "|---|---|---|---|---|---|---|"]
    for shots, rs in sorted(by.items()):
        for n in WISE_VAL:
            w = [r[key][f"rule_val{n}"] for r in rs]
            alone = [r[f"rule_val{n}"] for r in rs]
            c = lambda xs: mean_ci95(xs).format()
            out.append(f"| {shots} | {n} | {' / '.join(format(x['alpha'], 'g') for x in w)} "
                       f"| {c(x['test300_drop'] for x in w)} | {c(x['test300_nAP50'] for x in w)} "
                       f"| {c(x['test300_drop'] - y['test300_drop'] for x, y in zip(w, alone))} "
                       f"| {c(x['test300_nAP50'] - y['test300_nAP50'] for x, y in zip(w, alone))} |")
    return "\n".join(out)


def main(argv=None) -> None:
    args = get_args_parser().parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return
    if not args.checkpoint:
        raise SystemExit("--checkpoint is required (the base detector)")
    run(args)
    print(summarize(args.out))


if __name__ == "__main__":
    main()
