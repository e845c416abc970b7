"""pycocotools evaluation: perfect predictions score AP 1.0, shifted boxes score less."""
import math

from fewshot.metrics.coco_eval import coco_evaluate, harmonic_mean


def _gt():
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 100},
                   {"id": 2, "file_name": "b.png", "width": 100, "height": 100}],
        "categories": [{"id": 3, "name": "base_cls"}, {"id": 7, "name": "novel_cls"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 30, 40], "area": 1200, "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 7, "bbox": [50, 40, 20, 20], "area": 400, "iscrowd": 0},
        ],
    }


def _dets(shift=0.0):
    return [
        {"image_id": 1, "category_id": 3, "bbox": [10 + shift, 10, 30, 40], "score": 0.9},
        {"image_id": 2, "category_id": 7, "bbox": [50 + shift, 40, 20, 20], "score": 0.8},
    ]


def test_perfect_predictions_score_one():
    r = coco_evaluate(_gt(), _dets(), base_ids=[3], novel_ids=[7])
    assert math.isclose(r.bAP, 1.0) and math.isclose(r.nAP, 1.0)
    assert math.isclose(r.bAP50, 1.0) and math.isclose(r.nAP50, 1.0)
    assert math.isclose(r.HM, 1.0)
    assert set(r.per_class_AP) == {"base_cls", "novel_cls"}
    assert all(math.isclose(v, 1.0) for v in r.per_class_AP.values())


def test_shifted_boxes_score_less():
    r = coco_evaluate(_gt(), _dets(shift=6.0), base_ids=[3], novel_ids=[7])
    # IoU of the novel box drops to 14*20/(2*400-280) = 0.54: counts at 0.5, not above 0.55
    assert r.nAP < 1.0 and math.isclose(r.nAP50, 1.0)
    assert r.nAP < r.bAP < 1.0


def test_no_detections_scores_zero_and_nan_without_novel():
    r = coco_evaluate(_gt(), [], base_ids=[3])
    assert r.bAP == 0.0
    assert math.isnan(r.nAP) and math.isnan(r.HM)
    assert "nAP" not in r.headline()


def test_harmonic_mean():
    assert math.isclose(harmonic_mean(0.5, 0.25), 2 * 0.5 * 0.25 / 0.75)
    assert harmonic_mean(0.0, 0.0) == 0.0
