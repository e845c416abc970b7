"""Per-increment scoring (fewshot.model.cosine_head): each class scored by a softmax over the
classes that existed when it was added. The probabilities per increment, that an old class's
detections are exactly the parent's however strongly a new row competes, that joint scoring is
torchvision's post-processing unchanged, and that the choice survives a checkpoint."""
import pytest
import torch
import torch.nn.functional as F

from fewshot.model.checkpoint import load_checkpoint, save_checkpoint
from fewshot.model.cosine_head import CosineClassifier
from fewshot.model.detector import build_detector
from fewshot.model.presets import preset

PREFIX = "roi_heads.box_predictor.cls_score."


def test_each_increment_is_scored_against_the_rows_up_to_its_end():
    clf = CosineClassifier(8, num_classes=3)          # background + 2 base classes
    clf.expand(torch.randn(2, 8))                     # increment 1: rows 3, 4
    clf.expand(torch.randn(1, 8))                     # increment 2: row 5
    assert clf.increment_ends.tolist() == [3, 5, 6]
    logits = torch.randn(7, 6) * 4
    assert torch.equal(clf.probabilities(logits), F.softmax(logits, -1))     # joint by default
    clf.set_scoring("per-increment")
    p = clf.probabilities(logits)
    assert torch.allclose(p[:, :3], F.softmax(logits[:, :3], -1))
    assert torch.allclose(p[:, 3:5], F.softmax(logits[:, :5], -1)[:, 3:5])
    assert torch.allclose(p[:, 5:], F.softmax(logits, -1)[:, 5:])
    # an old class's probability does not depend on any later row's logit
    raised = logits.clone()
    raised[:, 3:] += 10.0
    assert torch.allclose(clf.probabilities(raised)[:, :3], p[:, :3])
    assert (clf.probabilities(raised)[:, 3:] > p[:, 3:]).all()
    with pytest.raises(ValueError, match="scoring"):
        clf.set_scoring("softmax")


def _detections(model, images):
    model.eval()
    with torch.no_grad():
        return model(images)


def _old_only(dets, num_old):
    keep = [d["labels"] < num_old for d in dets]
    return [{k: v[m] for k, v in d.items()} for d, m in zip(dets, keep)]


def test_old_classes_detect_exactly_as_the_parent_beside_a_competing_new_row():
    torch.manual_seed(0)
    model = build_detector(preset("cpu-small", min_size=96, max_size=96), num_classes=4)
    model.roi_heads.detections_per_img = 100_000   # no cap: every class keeps all its boxes
    images = [torch.rand(3, 96, 96) for _ in range(2)]
    parent = _old_only(_detections(model, images), 4)
    assert sum(len(d["scores"]) for d in parent) > 0
    clf = model.roi_heads.box_predictor.cls_score
    clf.expand(clf.weight()[1:2].detach().clone())     # the new row: a copy of old class 1
    joint = _detections(model, images)
    clf.set_scoring("per-increment")
    grouped = _detections(model, images)
    # joint: the copy takes a share of class 1's probability on its boxes
    ones = lambda dets: torch.cat([d["scores"][d["labels"] == 1] for d in dets])
    assert ones(joint).max() < 0.8 * ones(parent).max()
    # per-increment: the old classes' detections are the parent's, box for box
    for mine, theirs in zip(_old_only(grouped, 4), parent):
        assert torch.equal(mine["labels"], theirs["labels"])
        assert torch.allclose(mine["scores"], theirs["scores"], atol=1e-6)
        assert torch.allclose(mine["boxes"], theirs["boxes"], atol=1e-4)
    # and the new class is scored against every class, as in joint scoring
    new = lambda dets: torch.cat([d["scores"][d["labels"] == 4] for d in dets]).sort().values
    assert torch.allclose(new(grouped), new(joint), atol=1e-6)


def test_with_one_increment_the_postprocessing_is_torchvisions():
    torch.manual_seed(1)
    model = build_detector(preset("cpu-small", min_size=96, max_size=96), num_classes=5)
    heads = model.roi_heads
    logits, deltas = torch.randn(120, 5) * 3, torch.randn(120, 20) * 0.2
    proposals = [torch.tensor([[10.0, 10, 40, 50]]).repeat(60, 1) + torch.rand(60, 4) * 20 for _ in range(2)]
    sizes = [(96, 96), (96, 96)]
    torchvision_out = heads.postprocess_detections(logits, deltas, proposals, sizes)
    heads.box_predictor.cls_score.set_scoring("per-increment")   # one increment: the joint softmax
    own_out = heads.postprocess_detections(logits, deltas, proposals, sizes)
    for a, b in zip(torchvision_out, own_out):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_the_scoring_and_the_increments_travel_with_the_checkpoint(tmp_path):
    cfg = preset("cpu-small", min_size=96, max_size=96)
    model = build_detector(cfg, num_classes=3)
    clf = model.roi_heads.box_predictor.cls_score
    clf.expand(torch.randn(2, clf.in_features))
    clf.set_scoring("per-increment")
    path = save_checkpoint(tmp_path / "child.pt", model, cfg, ["a", "b", "c", "d"], [1, 2, 3, 4], "w", "cs")
    loaded = load_checkpoint(path).build_model().roi_heads.box_predictor.cls_score
    assert loaded.increment_ends.tolist() == [3, 5]
    assert loaded.scoring == "per-increment"


def test_a_checkpoint_from_before_keeps_joint_scoring_and_its_block_split(tmp_path):
    cfg = preset("cpu-small", min_size=96, max_size=96)
    model = build_detector(cfg, num_classes=3)
    clf = model.roi_heads.box_predictor.cls_score
    clf.expand(torch.randn(2, clf.in_features))
    state = {k: v for k, v in model.state_dict().items()
             if k not in (PREFIX + "increment_ends", PREFIX + "per_increment_scores")}
    fresh = build_detector(cfg, num_classes=5)
    fresh.load_state_dict(state)                      # strict: the missing buffers are filled in
    clf = fresh.roi_heads.box_predictor.cls_score
    assert clf.scoring == "joint"
    assert clf.increment_ends.tolist() == [3, 5]
