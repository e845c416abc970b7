"""Head expansion keeps every old classifier row bit-identical, before and after fine-tuning."""
import torch
import torch.nn.functional as F

from fewshot.model.presets import preset
from fewshot.model.cosine_head import CosineClassifier, imprint_rows
from fewshot.model.detector import build_detector
from fewshot.model.expansion import expand_detector
from fewshot.learning.freezing import apply_freezing
from fewshot.learning.loop import TrainConfig, make_optimizer, train_step


def _batch(n_classes_label: int):
    torch.manual_seed(1)
    images = [torch.rand(3, 96, 96) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0]]), "labels": torch.tensor([n_classes_label])}
               for _ in range(2)]
    return images, targets


def test_expand_appends_imprinted_rows_and_keeps_old_rows():
    clf = CosineClassifier(8, 4)
    before = clf.weight().detach().clone()
    feats = torch.randn(6, 8)
    labels = torch.tensor([4, 4, 4, 5, 5, 5])
    rows = imprint_rows(feats, labels, [4, 5])
    clf.expand(rows)
    assert clf.num_classes == 6
    assert torch.equal(clf.weight()[:4], before)
    expected = F.normalize(F.normalize(feats[:3], dim=1).mean(0), dim=0)
    assert torch.allclose(clf.weight()[4], expected)
    assert not clf.weight_old.requires_grad and clf.weight_new.requires_grad


def test_old_rows_bit_identical_after_expansion_and_fine_tuning():
    cfg = preset("cpu-small", min_size=96, max_size=96)
    model = build_detector(cfg, num_classes=4)  # background + 3
    old = model.roi_heads.box_predictor.cls_score.weight().detach().clone()
    images, targets = _batch(4)
    expand_detector(model, images, targets, num_new=1)
    predictor = model.roi_heads.box_predictor
    assert predictor.num_classes == 5
    for policy in ("backbone", "none"):
        apply_freezing(model, policy)
        opt = make_optimizer(model, TrainConfig(lr=0.05))
        new_before = predictor.cls_score.weight_new.detach().clone()
        for _ in range(3):
            train_step(model, opt, images, targets, grad_clip=10.0)
        assert torch.equal(predictor.cls_score.weight()[:4], old), policy
        assert not torch.equal(predictor.cls_score.weight_new, new_before), "new rows must train"


def test_rpn_policy_trains_the_proposals_and_the_new_rows_only():
    """--freeze rpn: the RPN and the new classifier rows move; the backbone, the box head, the
    box regressor and the old rows stay bit-identical."""
    cfg = preset("cpu-small", min_size=96, max_size=96)
    model = build_detector(cfg, num_classes=4)
    images, targets = _batch(4)
    expand_detector(model, images, targets, num_new=1)
    counts = apply_freezing(model, "rpn")
    assert counts["trainable_params"] > 0
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = make_optimizer(model, TrainConfig(lr=0.05))
    for _ in range(3):
        train_step(model, opt, images, targets, grad_clip=10.0)
    moved = {k for k, v in model.named_parameters() if not torch.equal(v.detach(), before[k])}
    assert any(k.startswith("rpn.") for k in moved)
    assert "roi_heads.box_predictor.cls_score.weight_new" in moved
    fixed = [k for k in before if k.startswith(("backbone.", "roi_heads.box_head.", "roi_heads.box_predictor.bbox_pred"))
             or k == "roi_heads.box_predictor.cls_score.weight_old"]
    assert fixed and not moved & set(fixed)


def test_rpn_head_policy_trains_all_but_the_backbone():
    """--freeze rpn-head: the RPN, the box head, the box regressor and the new rows move; the
    backbone and the old rows stay bit-identical."""
    cfg = preset("cpu-small", min_size=96, max_size=96)
    model = build_detector(cfg, num_classes=4)
    images, targets = _batch(4)
    expand_detector(model, images, targets, num_new=1)
    apply_freezing(model, "rpn-head")
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = make_optimizer(model, TrainConfig(lr=0.05))
    for _ in range(3):
        train_step(model, opt, images, targets, grad_clip=10.0)
    moved = {k for k, v in model.named_parameters() if not torch.equal(v.detach(), before[k])}
    for prefix in ("rpn.", "roi_heads.box_head.", "roi_heads.box_predictor.bbox_pred"):
        assert any(k.startswith(prefix) for k in moved), prefix
    assert "roi_heads.box_predictor.cls_score.weight_new" in moved
    fixed = [k for k in before if k.startswith("backbone.") or k == "roi_heads.box_predictor.cls_score.weight_old"]
    assert fixed and not moved & set(fixed)


def test_checkpoint_round_trip_keeps_block_shapes(tmp_path):
    from fewshot.model.checkpoint import load_checkpoint, save_checkpoint

    cfg = preset("cpu-small", min_size=96, max_size=96)
    model = build_detector(cfg, num_classes=3)
    images, targets = _batch(3)
    expand_detector(model, images, targets, num_new=1)
    path = save_checkpoint(tmp_path / "d.pt", model, cfg, ["a", "b", "c"], [1, 2, 3], "ds", "cs-x")
    loaded = load_checkpoint(path).build_model()
    a = model.roi_heads.box_predictor.cls_score
    b = loaded.roi_heads.box_predictor.cls_score
    assert b.weight_old.shape == (3, cfg.representation_size)
    assert torch.equal(a.weight(), b.weight())
