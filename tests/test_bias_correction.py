"""Bias correction of the new rows' logits (BiC): the classifier's offsets travel with the rows,
the cached second stage gives exactly the detections of the model with the offset set, a large
negative offset gives the parent's old-class detections back, and the choice rule."""
import math

import pytest
import torch

from fewshot.learning.bias_correction import (
    ScoringCandidate,
    choose_offset,
    choose_scoring,
    collect_second_stage,
    detections_with_offset,
    fit_new_row_offset,
    offsets_for,
)
from fewshot.learning.episode import expand_parent, sample_episode
from fewshot.metrics.coco_eval import EvalReport, load_eval_split, predict_rows
from fewshot.model.checkpoint import load_checkpoint
from fewshot.model.cosine_head import CosineClassifier
from services import untrained_base_checkpoint

KEY = "roi_heads.box_predictor.cls_score.logit_bias"


def test_offsets_start_at_zero_move_with_their_rows_and_shift_only_the_new_logits():
    clf = CosineClassifier(8, 4)
    assert clf.logit_bias.tolist() == [0.0] * 4
    x = torch.randn(5, 8)
    clf.expand(torch.nn.functional.normalize(torch.randn(2, 8), dim=1))
    before = clf(x)
    clf.set_new_bias(-1.5)
    assert clf.logit_bias.tolist() == [0.0] * 4 + [-1.5] * 2
    after = clf(x)
    assert torch.equal(after[:, :4], before[:, :4])
    assert torch.allclose(after[:, 4:], before[:, 4:] - 1.5)
    # the next increment: these rows become old and keep their offset; the new ones start at 0
    clf.expand(torch.nn.functional.normalize(torch.randn(1, 8), dim=1))
    clf.set_new_bias(-0.5)
    assert clf.logit_bias.tolist() == [0.0] * 4 + [-1.5] * 2 + [-0.5]


def test_offsets_round_trip_and_older_checkpoints_load_with_zero_offsets():
    clf = CosineClassifier(8, 3)
    clf.expand(torch.randn(2, 8))
    clf.set_new_bias(-2.0)
    state = clf.state_dict()
    fresh = CosineClassifier(8, 1)
    fresh.load_state_dict(state)
    assert fresh.logit_bias.tolist() == [0.0] * 3 + [-2.0] * 2
    legacy = {k: v for k, v in state.items() if k != "logit_bias"}
    old = CosineClassifier(8, 1)
    old.load_state_dict(legacy)  # strict: the missing offsets are filled, not an error
    assert old.logit_bias.tolist() == [0.0] * 5


@pytest.fixture(scope="module")
def episode(tiny_catalog, tmp_path_factory):
    parent = load_checkpoint(untrained_base_checkpoint(tiny_catalog, tmp_path_factory.mktemp("bc") / "d.pt"))
    novel = list(tiny_catalog.manifest("synthworld").class_split("split1").novel[:2])
    ep = sample_episode(tiny_catalog, parent, novel, shots=2, seed=1)
    return parent, expand_parent(ep), novel


def _model(ckpt):
    model = ckpt.build_model()
    model.roi_heads.score_thresh = 0.01  # an untrained head: its scores are near 1 / classes
    return model


def test_the_cached_second_stage_gives_the_model_s_own_detections(tiny_catalog, episode):
    parent, child, novel = episode
    split = load_eval_split(tiny_catalog, "synthworld", "test", parent.classes, novel, max_images=6)
    model = _model(child)
    stages = collect_second_stage(model, split.rows, batch_size=4)
    assert len(stages) == 6 and stages[0].class_logits.shape[1] == len(child.classes) + 1
    first_new = len(parent.classes) + 1
    for offset in (0.0, -1.0):
        cached = detections_with_offset(model, stages, first_new, offset, child.category_ids)
        model.roi_heads.box_predictor.cls_score.set_new_bias(offset)
        direct = predict_rows(model, split.rows, child.category_ids, batch_size=3)
        model.roi_heads.box_predictor.cls_score.set_new_bias(0.0)
        assert len(cached) == len(direct) > 20
        for a, b in zip(cached, direct):
            assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
            assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-3)
            assert a["score"] == pytest.approx(b["score"], abs=1e-5)
    new_ids = set(child.category_ids[len(parent.classes):])
    at0 = detections_with_offset(model, stages, first_new, 0.0, child.category_ids)
    at1 = detections_with_offset(model, stages, first_new, -1.0, child.category_ids)
    assert sum(r["category_id"] in new_ids for r in at1) < sum(r["category_id"] in new_ids for r in at0)


def test_a_large_negative_offset_gives_back_the_parent_s_old_class_detections(tiny_catalog, episode):
    parent, child, novel = episode
    split = load_eval_split(tiny_catalog, "synthworld", "test", parent.classes, novel, max_images=6)
    want = predict_rows(_model(parent), split.rows, parent.category_ids)
    model = _model(child)
    stages = collect_second_stage(model, split.rows)
    got = detections_with_offset(model, stages, len(parent.classes) + 1, -60.0, child.category_ids)
    assert len(got) == len(want) > 20
    for a, b in zip(got, want):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_fit_sets_the_chosen_offset_and_reports_every_offset_tried(tiny_catalog, episode):
    parent, child, novel = episode
    split = load_eval_split(tiny_catalog, "synthworld", "test", parent.classes, novel, max_images=6)
    parent_b = split.evaluate(predict_rows(_model(parent), split.rows, parent.category_ids)).bAP50
    model = _model(child)
    choice = fit_new_row_offset(model, split, child.category_ids, parent_b, max_base_drop=0.0,
                                offsets=(0.0, -2.0, -60.0))
    assert [row["offset"] for row in choice.table] == [0.0, -2.0, -60.0]
    assert choice.met  # at -60 the old classes score as in the parent
    assert choice.offset in (0.0, -2.0, -60.0)
    chosen = next(r for r in choice.table if r["offset"] == choice.offset)
    assert chosen["bAP50"] >= parent_b - 1e-9
    bias = model.roi_heads.box_predictor.cls_score.logit_bias
    assert bias[len(parent.classes) + 1:].tolist() == [choice.offset] * len(novel)
    assert bias[: len(parent.classes) + 1].abs().sum().item() == 0.0
    # the model with the offset set scores what the table says
    direct = predict_rows(model, split.rows, child.category_ids)
    again = split.evaluate(direct)
    assert again.bAP50 == pytest.approx(chosen["bAP50"], abs=1e-6)
    # and the choice carries those detections (add_classes gates on them without a second pass)
    assert len(choice.results) == len(direct)
    assert [r["category_id"] for r in choice.results] == [r["category_id"] for r in direct]
    with pytest.raises(ValueError, match="<= 0"):
        fit_new_row_offset(model, split, child.category_ids, parent_b, 0.01, offsets=(1.0,))
    with pytest.raises(ValueError, match="new rows"):
        fit_new_row_offset(_model(parent), split, parent.category_ids, parent_b, 0.01)


def _report(b50: float, n50: float = 0.3) -> EvalReport:
    return EvalReport(bAP=b50, bAP50=b50, nAP=n50, nAP50=n50, HM=math.nan, HM50=math.nan)


def test_the_rule_takes_the_smallest_correction_within_the_drop_else_the_best_balance():
    reports = {0.0: _report(0.50), -1.0: _report(0.55), -2.0: _report(0.58), -4.0: _report(0.59)}
    assert choose_offset(reports, parent_bAP50=0.60, max_base_drop=0.01) == (-4.0, True)
    assert choose_offset(reports, parent_bAP50=0.60, max_base_drop=0.05) == (-1.0, True)
    assert choose_offset(reports, parent_bAP50=0.50, max_base_drop=0.0) == (0.0, True)
    assert choose_offset(reports, parent_bAP50=0.70, max_base_drop=0.01) == (-4.0, False)
    tie = {0.0: _report(0.4), -1.0: _report(0.5), -3.0: _report(0.5)}
    assert choose_offset(tie, parent_bAP50=0.9, max_base_drop=0.01) == (-1.0, False)
    # the rule out of reach (the box head moved): the best balance of old and new, not the best
    # base bought by wiping the new classes out
    moved = {0.0: _report(0.70, 0.45), -1.0: _report(0.72, 0.45), -3.0: _report(0.73, 0.20),
             -6.0: _report(0.74, 0.0)}
    assert choose_offset(moved, parent_bAP50=0.79, max_base_drop=0.01) == (-1.0, False)
    # no new-class box on val (nAP50 undefined): the best base AP50, as before
    blind = {o: _report(r.bAP50, math.nan) for o, r in moved.items()}
    assert choose_offset(blind, parent_bAP50=0.79, max_base_drop=0.01) == (-6.0, False)


def test_as_served_the_rule_skips_offsets_the_detector_rule_refuses_and_asks_served_lazily():
    # detector bAP50 per offset; the parent scores 0.60 alone and 0.62 as served
    reports = {0.0: _report(0.50), -1.0: _report(0.56), -2.0: _report(0.58), -4.0: _report(0.59)}
    served = {0.0: 0.60, -1.0: 0.62, -2.0: 0.63, -4.0: 0.65}
    asked: list[float] = []

    def served_at(offset):
        asked.append(offset)
        return served[offset]

    # 0.0 fails the detector's 5 points (0.50 < 0.55), -1.0 passes both: the served rule needs no more
    assert choose_offset(reports, 0.60, 0.01, served_bAP50=served_at, parent_served_bAP50=0.62,
                         max_detector_drop=0.05) == (-1.0, True)
    assert asked == [-1.0]
    # as served, one point is stricter than the refiner gives at -1 and -2: -4 is the smallest that meets it
    asked.clear()
    assert choose_offset(reports, 0.60, 0.01, served_bAP50=served_at, parent_served_bAP50=0.655,
                         max_detector_drop=0.05) == (-4.0, True)
    assert asked == [-1.0, -2.0, -4.0]
    # a detector allowance wide enough lets the uncorrected child through
    assert choose_offset(reports, 0.60, 0.01, served_bAP50=served_at, parent_served_bAP50=0.60,
                         max_detector_drop=0.10) == (0.0, True)
    # nothing meets it: the best detector bAP50, as without refinement
    assert choose_offset(reports, 0.60, 0.01, served_bAP50=served_at, parent_served_bAP50=0.80,
                         max_detector_drop=0.05) == (-4.0, False)
    with pytest.raises(ValueError, match="parent_served_bAP50"):
        choose_offset(reports, 0.60, 0.01, served_bAP50=served_at)


def test_fit_judged_as_served_passes_each_offset_s_detections_and_records_what_it_asked(tiny_catalog, episode):
    parent, child, novel = episode
    split = load_eval_split(tiny_catalog, "synthworld", "test", parent.classes, novel, max_images=6)
    parent_b = split.evaluate(predict_rows(_model(parent), split.rows, parent.category_ids)).bAP50
    model = _model(child)
    stages = collect_second_stage(model, split.rows)
    first_new = len(parent.classes) + 1
    seen: dict[float, list[dict]] = {}

    def served(offset, results):  # a stand-in refiner that serves the detector's own figures
        seen[offset] = results
        report = split.evaluate(results)
        return {"bAP50": report.bAP50, "nAP50": report.nAP50}

    # a detector allowance of 1.0 lets every offset through: the first asked (0.0) is within 0
    # of "the parent as served" when that is set to the child's own figure at 0.0
    at0 = split.evaluate(detections_with_offset(model, stages, first_new, 0.0, child.category_ids)).bAP50
    choice = fit_new_row_offset(model, split, child.category_ids, parent_b, max_base_drop=0.0,
                                offsets=(0.0, -2.0, -60.0), served=served,
                                parent_served_bAP50=at0, max_detector_drop=1.0)
    assert (choice.offset, choice.met, choice.judged) == (0.0, True, "served")
    assert list(seen) == [0.0]
    want = detections_with_offset(model, stages, first_new, 0.0, child.category_ids)
    assert [(r["image_id"], r["category_id"], r["score"]) for r in seen[0.0]] == \
        [(r["image_id"], r["category_id"], r["score"]) for r in want]
    rows = {row["offset"]: row for row in choice.table}
    assert rows[0.0]["served_bAP50"] == pytest.approx(at0) and "served_bAP50" not in rows[-2.0]
    assert rows[0.0]["served_nAP50"] == pytest.approx(rows[0.0]["nAP50"])
    assert choice.candidates == [{"scoring": "joint", "offset": 0.0, "met": True, "bAP50": pytest.approx(at0),
                                  "nAP50": pytest.approx(rows[0.0]["nAP50"]), "HM50": pytest.approx(rows[0.0]["HM50"])}]
    assert (choice.parent_served_bAP50, choice.max_detector_drop) == (at0, 1.0)
    # nothing meets it as served: the fallback offset's served figures are asked for too, so the
    # candidates (and a choice between scorings) compare what a user would be served
    seen.clear()
    missed = fit_new_row_offset(_model(child), split, child.category_ids, parent_b, max_base_drop=0.0,
                                offsets=(0.0, -2.0), served=lambda o, r: {"bAP50": 0.25, "nAP50": 0.5},
                                parent_served_bAP50=1.5, max_detector_drop=1.0)
    assert not missed.met and missed.candidates[0]["bAP50"] == 0.25 and missed.candidates[0]["nAP50"] == 0.5
    assert next(r for r in missed.table if r["offset"] == missed.offset)["served_bAP50"] == 0.25
    # unrefined, the same call judges the detector alone and records no served figures
    plain = fit_new_row_offset(_model(child), split, child.category_ids, parent_b, max_base_drop=0.0,
                               offsets=(0.0, -2.0, -60.0))
    assert plain.judged == "detector" and plain.parent_served_bAP50 is None
    assert all("served_bAP50" not in row for row in plain.table)


def test_choose_scoring_prefers_a_met_rule_then_the_better_balance_then_the_first():
    joint = ScoringCandidate("joint", -1.0, True, 0.70, 0.40)
    grouped = ScoringCandidate("per-increment", 0.0, True, 0.70, 0.44)   # same base, no offset: more nAP50
    assert choose_scoring([joint, grouped]) is grouped
    missed = ScoringCandidate("per-increment", 0.0, False, 0.74, 0.60)  # a better balance, rule not met
    assert choose_scoring([joint, missed]) is joint
    assert choose_scoring([ScoringCandidate("joint", -1.0, False, 0.6, 0.3), missed]) is missed
    twin = ScoringCandidate("per-increment", 0.0, True, 0.70, 0.40)     # a tie goes to the first (joint)
    assert choose_scoring([joint, twin]) is joint and choose_scoring([twin, joint]) is twin
    blind = [ScoringCandidate("joint", 0.0, True, 0.70, math.nan), ScoringCandidate("per-increment", 0.0, True, 0.71,
                                                                                    math.nan)]
    assert choose_scoring(blind).scoring == "per-increment"   # no new-class box on val: base AP50 alone
    assert joint.to_dict()["HM50"] == pytest.approx(2 * 0.7 * 0.4 / 1.1)
    with pytest.raises(ValueError, match="no scoring"):
        choose_scoring([])
    assert offsets_for("joint", (0.0, -1.0)) == (0.0, -1.0) and offsets_for("per-increment", (0.0, -1.0)) == (0.0,)


def test_fit_chooses_between_scorings_from_one_pass_and_sets_the_chosen_one(tiny_catalog, episode, monkeypatch):
    import fewshot.learning.bias_correction as bc

    parent, child, novel = episode
    split = load_eval_split(tiny_catalog, "synthworld", "test", parent.classes, novel, max_images=6)
    parent_b = split.evaluate(predict_rows(_model(parent), split.rows, parent.category_ids)).bAP50
    passes = []
    real = bc.collect_second_stage
    monkeypatch.setattr(bc, "collect_second_stage", lambda *a, **k: passes.append(1) or real(*a, **k))
    model = _model(child)
    choice = fit_new_row_offset(model, split, child.category_ids, parent_b, max_base_drop=0.0,
                                offsets=(0.0, -2.0, -60.0), scorings=("joint", "per-increment"))
    assert len(passes) == 1   # both scorings re-post-process the same second stages
    by = {c["scoring"]: c for c in choice.candidates}
    assert list(by) == ["joint", "per-increment"]
    assert by["per-increment"]["offset"] == 0.0   # the only offset per-increment scoring tries
    want = choose_scoring([ScoringCandidate(**{k: c[k] for k in ("scoring", "offset", "met", "bAP50", "nAP50")})
                           for c in choice.candidates])
    assert (choice.scoring, choice.offset, choice.met) == (want.scoring, want.offset, want.met)
    classifier = model.roi_heads.box_predictor.cls_score
    assert classifier.scoring == choice.scoring
    assert classifier.logit_bias[len(parent.classes) + 1:].tolist() == [choice.offset] * len(novel)
    # the model as set scores what the chosen candidate says, and the choice carries its detections
    direct = predict_rows(model, split.rows, child.category_ids)
    assert split.evaluate(direct).bAP50 == pytest.approx(by[choice.scoring]["bAP50"], abs=1e-6)
    assert [r["category_id"] for r in choice.results] == [r["category_id"] for r in direct]
    # each scoring's figures are its own: per-increment scoring at offset 0, re-scored directly
    classifier.set_new_bias(0.0)
    classifier.set_scoring("per-increment")
    grouped = split.evaluate(predict_rows(model, split.rows, child.category_ids))
    assert (by["per-increment"]["bAP50"], by["per-increment"]["nAP50"]) == (
        pytest.approx(grouped.bAP50, abs=1e-6), pytest.approx(grouped.nAP50, abs=1e-6, nan_ok=True))
    with pytest.raises(ValueError, match="unknown scoring"):
        fit_new_row_offset(_model(child), split, child.category_ids, parent_b, 0.0, scorings=("grouped",))
