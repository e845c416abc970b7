"""CLIP classification refinement: fusion, the lambda grid search, storage in checkpoint extra."""
import io
import json

import numpy as np
import pytest
import torch

from fewshot.clip.refinement import (
    EXTRA_KEY, Refiner, choose_fusion_weight, clip_class_probs, clip_probs_for_results,
    fuse_results, fuse_scores,
)

CLASSES = ["circle", "gear", "heart"]


class FakeTeacher:
    """Embeds a box as the one-hot of the class its x1 coordinate encodes (x1 // 100)."""

    id = "fake-teacher"
    spec = "fake:spec"
    templates = ("a {}.",)
    box_context = 0.2
    logit_scale = 100.0

    def class_prompt_embeddings(self, names, templates=None):
        return torch.eye(len(names))

    def embed_boxes(self, image, boxes):
        boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        cls = (boxes[:, 0] // 100).long()
        return torch.nn.functional.one_hot(cls, len(CLASSES)).float()


def _refiner(lam, temperature=0.05):
    return Refiner.build(FakeTeacher(), CLASSES, fusion_weight=lam, temperature=temperature)


def _dets():
    # box i "looks like" class x1 // 100 to CLIP; the detector says otherwise
    boxes = torch.tensor([[0.0, 0, 10, 10], [100.0, 0, 110, 10], [200.0, 0, 210, 10]])
    labels = torch.tensor([2, 2, 3])        # gear, gear, heart
    scores = torch.tensor([0.9, 0.5, 0.3])
    return {"boxes": boxes, "labels": labels, "scores": scores}


def test_lambda_zero_returns_detector_scores_unchanged():
    det = _dets()
    out = _refiner(0.0).refine(None, det)
    assert torch.equal(out["scores"], det["scores"]) and torch.equal(out["labels"], det["labels"])
    listed = [{"box": b, "label": CLASSES[l - 1], "score": s}
              for b, l, s in zip(det["boxes"].tolist(), det["labels"].tolist(), [0.9, 0.5, 0.3])]
    out_list = _refiner(0.0).refine(None, listed)
    assert [d["score"] for d in out_list] == [0.9, 0.5, 0.3]
    labels, scores = fuse_scores(det["scores"], det["labels"], torch.rand(3, 3), 0.0)
    assert torch.equal(labels, det["labels"]) and torch.equal(scores, det["scores"])
    # even with full score vectors that disagree with the labels, lambda 0 changes nothing
    det["class_scores"] = torch.tensor([[0.9, 0.05, 0.05]] * 3)
    out = _refiner(0.0).refine(None, det)
    assert torch.equal(out["labels"], det["labels"]) and torch.equal(out["scores"], det["scores"])


def test_lambda_one_ranks_by_clip():
    det = _dets()
    out = _refiner(1.0).refine(None, det)
    probs = clip_class_probs(FakeTeacher().embed_boxes(None, det["boxes"]), torch.eye(3), 0.05)
    clip_of_label = probs[torch.arange(3), det["labels"] - 1]
    # box 0 (the detector's best) is a circle to CLIP, not a gear: it drops to last
    assert [b[0] for b in out["boxes"].tolist()] == [100.0, 200.0, 0.0]
    assert torch.allclose(out["scores"], clip_of_label[[1, 2, 0]])
    assert out["scores"][-1] < 0.01 < 0.99 < out["scores"][1]
    assert torch.allclose(out["det_scores"], det["scores"][[1, 2, 0]])


def test_full_score_vectors_let_clip_correct_labels():
    det = _dets()
    det["class_scores"] = torch.tensor([[0.1, 0.8, 0.1], [0.1, 0.5, 0.4], [0.1, 0.3, 0.6]])
    out = _refiner(0.6).refine(None, det, score_threshold=0.0)
    # box 0 is a circle to CLIP: fused circle 0.4*0.1+0.6*~1 beats gear 0.4*0.8+0.6*~0
    by_x = {int(b[0]): int(l) for b, l in zip(out["boxes"].tolist(), out["labels"].tolist())}
    assert by_x == {0: 1, 100: 2, 200: 3}


def test_list_detections_get_fused_scores_and_threshold():
    det = [{"box": [200.0, 0, 210, 10], "label": "heart", "score": 0.2},
           {"box": [0.0, 0, 10, 10], "label": "heart", "score": 0.6}]
    out = _refiner(0.5).refine(None, det, score_threshold=0.5)
    assert len(out) == 1 and out[0]["box"] == [200.0, 0, 210, 10]
    assert out[0]["det_score"] == 0.2 and out[0]["clip_score"] > 0.99
    assert out[0]["score"] == pytest.approx(0.5 * 0.2 + 0.5 * out[0]["clip_score"], abs=1e-3)


def _coco_case():
    gt = {
        "images": [{"id": 1, "width": 300, "height": 300}],
        "categories": [{"id": 7, "name": "circle"}, {"id": 9, "name": "gear"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 40, 40], "area": 1600, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [150, 150, 40, 40], "area": 1600, "iscrowd": 0},
        ],
    }
    # det score and CLIP probability of class 7: both TPs above both FPs only for 0.364 < lambda < 0.571
    rows = [([10, 10, 40, 40], 0.9, 0.1),     # TP the detector likes, CLIP does not
            ([150, 150, 40, 40], 0.2, 0.9),   # TP CLIP likes
            ([80, 220, 40, 40], 0.6, 0.2),    # FP the detector likes
            ([230, 20, 40, 40], 0.1, 0.7)]    # FP CLIP likes
    preds = [{"image_id": 1, "category_id": 7, "bbox": b, "score": s} for b, s, _ in rows]
    probs = np.asarray([[p, 1 - p] for _, _, p in rows])
    return gt, preds, probs


def test_grid_search_picks_the_best_lambda():
    gt, preds, probs = _coco_case()
    best, table = choose_fusion_weight(preds, probs, gt, category_ids=[7, 9])
    by_lam = {r["lambda"]: r["AP50"] for r in table}
    assert len(table) == 10 and set(by_lam) == {round(0.1 * i, 1) for i in range(10)}
    assert by_lam[0.4] == pytest.approx(1.0) and by_lam[0.5] == pytest.approx(1.0)
    assert by_lam[0.0] < 0.9 and by_lam[0.3] < 1.0 and by_lam[0.6] < 1.0 and by_lam[0.9] < 1.0
    assert best == 0.4  # ties go to the smaller weight
    fused = fuse_results(preds, probs, [7, 9], 0.4)
    assert fused[0]["score"] == pytest.approx(0.6 * 0.9 + 0.4 * 0.1)


def test_clip_probs_for_results_align_with_results():
    ref = _refiner(0.3)
    results = [{"image_id": 2, "category_id": 1, "bbox": [200, 0, 10, 10], "score": 0.5},
               {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.5},
               {"image_id": 2, "category_id": 1, "bbox": [100, 0, 10, 10], "score": 0.5}]
    probs = clip_probs_for_results(ref, {1: None, 2: None}, results)
    assert probs.shape == (3, 3) and probs.argmax(1).tolist() == [2, 0, 1]


def test_extra_round_trip_is_plain_and_checks_the_teacher():
    ref = _refiner(0.3, temperature=0.02)
    ref.selection = {"objective": "AP50", "table": [{"lambda": 0.3, "AP50": np.float64(0.5)}]}
    extra = ref.to_extra()
    json.dumps(extra)  # only lists, floats, strings
    buf = io.BytesIO()
    torch.save({"extra": extra}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)["extra"]  # as DetectorCheckpoint loads it
    back = Refiner.from_extra(loaded, teacher=FakeTeacher())
    assert back.class_names == CLASSES and back.fusion_weight == 0.3 and back.temperature == 0.02
    assert back.teacher_id == "fake-teacher" and back.teacher_spec == "fake:spec"
    assert torch.allclose(back.prompt_embeddings, ref.prompt_embeddings)
    assert back.selection["table"][0]["AP50"] == 0.5
    det = _dets()
    assert torch.allclose(back.refine(None, det)["scores"], ref.refine(None, det)["scores"])
    assert Refiner.from_extra(extra[EXTRA_KEY]).class_names == CLASSES
    with pytest.raises(KeyError):
        Refiner.from_extra({"something": 1})
    other = FakeTeacher()
    other.id = "another-teacher"
    with pytest.raises(ValueError):
        Refiner.from_extra(extra, teacher=other)
