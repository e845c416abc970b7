"""Retained heads (fewshot.model.retained_heads): the old classes answered by a frozen copy of
the parent's RoI head under per-increment scoring. That the old classes' detections are exactly
the parent's however far the child's head moved, that each head keeps its own detection cap,
which columns each retained head answers along a chain, that joint scoring ignores them, that
they survive a checkpoint and stay frozen in training, and that the bias correction's replayed
post-processing gives the detections the model gives."""
from dataclasses import replace

import pytest
import torch

from fewshot.learning.bias_correction import collect_second_stage, detections_with_offset
from fewshot.learning.freezing import apply_freezing
from fewshot.metrics.coco_eval import predict_rows
from fewshot.model.checkpoint import load_checkpoint, save_checkpoint
from fewshot.model.detector import build_detector
from fewshot.model.presets import preset

NUM_OLD = 4   # background + 3 classes


def _parent():
    torch.manual_seed(0)
    return build_detector(preset("cpu-small", min_size=96, max_size=96), num_classes=NUM_OLD).eval()


def _images(n=3):
    torch.manual_seed(1)
    return [torch.rand(3, 96, 96) for _ in range(n)]


def _detections(model, images):
    model.eval()
    with torch.no_grad():
        return model(images)


def _only(dets, lo, hi):
    return [{k: v[(d["labels"] >= lo) & (d["labels"] < hi)] for k, v in d.items()} for d in dets]


def _support():
    boxes = torch.tensor([[10.0, 10.0, 60.0, 60.0], [20.0, 30.0, 80.0, 90.0]])
    return [torch.rand(3, 96, 96)], [{"boxes": boxes, "labels": torch.tensor([NUM_OLD, NUM_OLD + 1])}]


def _expand(model, retain: bool, scoring="per-increment"):
    from fewshot.model.expansion import expand_detector

    images, targets = _support()
    return expand_detector(model, images, targets, num_new=2, scoring=scoring, retain_head=retain)


@torch.no_grad()
def _train_like(model, scale=0.5):
    """Move the live box head, regressor and new rows as a fine-tune would."""
    heads = model.roi_heads
    for p in list(heads.box_head.parameters()) + list(heads.box_predictor.bbox_pred.parameters()):
        p.add_(torch.randn_like(p) * scale * p.std().clamp_min(1e-3))
    heads.box_predictor.cls_score.weight_new.mul_(3.0)


def _assert_same(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x["labels"], y["labels"])
        assert torch.allclose(x["scores"], y["scores"], atol=1e-6)
        assert torch.allclose(x["boxes"], y["boxes"], atol=1e-4)


def test_old_classes_keep_the_parents_detections_after_the_head_moved():
    model = _parent()
    images = _images()
    parent = _detections(model, images)
    assert sum(len(d["scores"]) for d in parent) > 0
    _expand(model, retain=True)
    _train_like(model)
    child = _detections(model, images)
    _assert_same(_only(child, 1, NUM_OLD), parent)
    assert sum(len(d["scores"]) for d in _only(child, NUM_OLD, NUM_OLD + 2)) > 0   # the new classes detect
    # the same child without its retained head: the moved head answers the old classes differently
    model.roi_heads.retained.clear()
    moved = _only(_detections(model, images), 1, NUM_OLD)
    assert any(len(x["scores"]) != len(y["scores"]) or not torch.allclose(x["scores"], y["scores"])
               for x, y in zip(moved, parent))


def test_each_head_keeps_its_own_detection_cap():
    model = _parent()
    model.roi_heads.detections_per_img = 5
    images = _images()
    parent = _detections(model, images)
    assert max(len(d["scores"]) for d in parent) == 5
    _expand(model, retain=True)
    _train_like(model)
    child = _detections(model, images)
    _assert_same(_only(child, 1, NUM_OLD), parent)
    assert all(len(d["scores"]) <= 10 for d in child)
    assert all((d["scores"][:-1] >= d["scores"][1:]).all() for d in child)   # still by decreasing score


def test_joint_scoring_ignores_retained_heads():
    model = _parent()
    images = _images()
    _expand(model, retain=True, scoring="joint")
    _train_like(model)
    with_heads = _detections(model, images)
    model.roi_heads.retained.clear()
    _assert_same(with_heads, _detections(model, images))


def test_columns_along_a_chain():
    model = _parent()
    _expand(model, retain=True)                              # v1: retains v0's head for columns 1..3
    retained = model.roi_heads.retained
    assert [h.columns.tolist() for h in retained.heads] == [[1, 4]]
    from fewshot.model.expansion import expand_detector

    images, targets = _support()
    targets[0]["labels"] = torch.tensor([6, 7])
    expand_detector(model, images, targets, num_new=2, retain_head=True)   # v2 from a per-increment v1
    assert [h.columns.tolist() for h in retained.heads] == [[1, 4], [4, 6]]
    model.roi_heads.box_predictor.cls_score.set_scoring("joint")           # a joint v2 served all from its head
    targets[0]["labels"] = torch.tensor([8, 9])
    expand_detector(model, images, targets, num_new=2, retain_head=True)
    assert [h.columns.tolist() for h in model.roi_heads.retained.heads] == [[1, 8]]
    targets[0]["labels"] = torch.tensor([10, 11])
    expand_detector(model, images, targets, num_new=2, retain_head=False)
    assert len(model.roi_heads.retained) == 0


def test_retained_heads_survive_a_checkpoint(tmp_path):
    model = _parent()
    _expand(model, retain=True)
    _train_like(model)
    images = _images()
    before = _detections(model, images)
    config = preset("cpu-small", min_size=96, max_size=96)
    classes = [f"c{i}" for i in range(NUM_OLD + 1)]
    path = save_checkpoint(tmp_path / "d.pt", model, config, classes, list(range(1, NUM_OLD + 2)), "ds", "cs")
    loaded = load_checkpoint(path).build_model()
    assert [h.columns.tolist() for h in loaded.roi_heads.retained.heads] == [[1, 4]]
    _assert_same(_detections(loaded, images), before)
    # a checkpoint saved before retained heads existed loads with none
    state = {k: v for k, v in model.state_dict().items() if ".retained." not in k}
    plain = build_detector(config, NUM_OLD + 2)
    plain.load_state_dict(state)
    assert len(plain.roi_heads.retained) == 0


@pytest.mark.parametrize("policy", ["none", "backbone", "head"])
def test_retained_heads_never_train(policy):
    model = _parent()
    _expand(model, retain=True)
    apply_freezing(model, policy)
    assert not any(p.requires_grad for p in model.roi_heads.retained.parameters())
    assert any(p.requires_grad for p in model.parameters())


def test_replayed_post_processing_matches_the_model():
    """The bias correction replays post-processing from kept second stages: with retained heads
    it must give the detections the model itself gives."""
    from imagegen import encode, scene

    model = _parent()
    _expand(model, retain=True)
    _train_like(model)
    rows = [{"image_id": i, "image": encode(scene(96, 96, seed=i))} for i in range(2)]
    ids = list(range(101, 101 + NUM_OLD + 1))
    stages = collect_second_stage(model, rows, device="cpu")
    assert all(st.retained is not None for st in stages)
    replayed = detections_with_offset(model, stages, NUM_OLD, 0.0, ids)
    direct = predict_rows(model, rows, ids, device="cpu")
    assert replayed
    key = lambda r: (r["image_id"], r["category_id"], round(r["score"], 5))
    assert sorted(map(key, replayed)) == sorted(map(key, direct))
    # and the replay without them is the live head's own answer, which differs
    plain = detections_with_offset(model, [replace(st, retained=None) for st in stages], NUM_OLD, 0.0, ids)
    assert sorted(map(key, plain)) != sorted(map(key, replayed))
