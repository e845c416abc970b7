"""Distillation of the old classes' outputs from the parent (Shmelkov et al. 2017, Eq. 1): the
loss's value, where it is zero, that it holds the trained box head to the parent's outputs, that
the parent's copies are never trained or saved, and which jobs apply it."""
import math

import pytest
import torch

from fewshot.learning.method import MethodConfig, MethodOptions, prepare_for_training
from fewshot.learning.parent_distillation import (
    ParentDistillationLoss, attach_parent_distillation, parent_distillation_loss,
)
from fewshot.model.detector import build_detector
from fewshot.model.expansion import expand_detector
from fewshot.model.presets import preset
from fewshot.model.checkpoint import strip_training_heads

KEY = "loss_parent_distill"


def test_the_loss_is_eq_1_mean_subtracted_logits_plus_deltas():
    child = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    # a constant shift of every old logit of a region changes nothing (the mean is subtracted)
    assert parent_distillation_loss(child + 5.0, torch.zeros(2, 4), child, torch.zeros(2, 4)).item() == pytest.approx(0.0)
    parent = torch.tensor([[1.0, 2.0, 6.0], [0.0, 0.0, 0.0]])
    # centred child row 0: [-1, 0, 1]; centred parent row 0: [-2, -1, 3]: squared diffs 1, 1, 4
    deltas_child, deltas_parent = torch.zeros(2, 4), torch.zeros(2, 4)
    deltas_child[1, 0] = 2.0
    expected = (1 + 1 + 4) / 6 + 4 / 8
    assert parent_distillation_loss(child, deltas_child, parent, deltas_parent).item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="shape"):
        parent_distillation_loss(child, torch.zeros(2, 4), parent[:, :2], torch.zeros(2, 4))
    empty = parent_distillation_loss(torch.zeros(0, 3), torch.zeros(0, 4), torch.zeros(0, 3), torch.zeros(0, 4))
    assert empty.item() == 0.0


def _expanded_model(seed: int = 0):
    """A cpu-small detector with 3 old classes and one new imprinted row."""
    torch.manual_seed(seed)
    model = build_detector(preset("cpu-small", min_size=96, max_size=96), num_classes=4)
    images = [torch.rand(3, 96, 96) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 10, 50, 50], [40, 30, 90, 80]]), "labels": torch.tensor([4, 1])},
               {"boxes": torch.tensor([[5.0, 20, 60, 70]]), "labels": torch.tensor([4])}]
    expand_detector(model, images, targets, num_new=1)
    return model, images, targets


def _old_outputs(model, images):
    """The old classes' centred logits and the deltas of the second stage on fixed proposals."""
    model.eval()
    with torch.no_grad():
        images_t, _ = model.transform(images)
        features = model.backbone(images_t.tensors)
        proposals, _ = model.rpn(images_t, features)
        heads = model.roi_heads
        x = heads.box_head(heads.box_roi_pool(features, proposals, images_t.image_sizes))
        logits, deltas = heads.box_predictor(x)
    old = logits[:, :heads.box_predictor.cls_score.weight_old.shape[0]]
    return old - old.mean(dim=1, keepdim=True), deltas[:, :4]   # what Eq. (1) compares


def _train(model, images, targets, weight: float, steps: int = 25):
    prepare_for_training(model, MethodConfig(freeze="backbone", parent_distill=weight))
    optim = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.02)
    model.train()
    last = None
    for _ in range(steps):
        losses = model(images, targets)
        optim.zero_grad()
        sum(losses.values()).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optim.step()
        last = losses
    return last


def test_the_loss_starts_at_zero_and_holds_the_old_outputs_to_the_parents():
    drift = {}
    for weight in (0.0, 20.0):
        model, images, targets = _expanded_model()
        before = _old_outputs(model, images)
        if weight:
            model.train()
            attach_parent_distillation(model, weight)
            first = model(images, targets)
            # the copies are the model itself as training starts: nothing to distil yet
            assert first[KEY].item() == pytest.approx(0.0, abs=1e-8)
            model.roi_heads.extra_losses = None   # prepare_for_training attaches it again
        last = _train(model, images, targets, weight)
        assert (KEY in last) == bool(weight)
        after = _old_outputs(model, images)
        drift[weight] = sum(float((a - b).pow(2).mean()) for a, b in zip(after, before))
    assert drift[0.0] > 0
    # the distilled box head kept the old classes' outputs at least 3x closer to the parent's
    assert drift[20.0] < drift[0.0] / 3, drift


def test_the_parents_copies_are_frozen_outside_the_model_and_reattaching_replaces():
    model, images, targets = _expanded_model()
    prepare_for_training(model, MethodConfig(freeze="backbone", parent_distill=1.0))
    hook = model.roi_heads.extra_losses
    assert isinstance(hook, ParentDistillationLoss) and hook.num_old == 4   # background + 3 old classes
    copies = [p for m in (hook.box_head, hook.cls_score, hook.bbox_pred) for p in m.parameters()]
    assert copies and not any(p.requires_grad for p in copies)
    model_params = {id(p) for p in model.parameters()}
    assert not any(id(p) in model_params for p in copies)
    # the state dict (what a checkpoint saves) is the plain detector's
    plain = build_detector(preset("cpu-small", min_size=96, max_size=96), num_classes=4)
    expand_detector(plain, images, targets, num_new=1)
    assert set(strip_training_heads(model.state_dict())) == set(plain.state_dict())
    attach_parent_distillation(model, 2.0)
    assert isinstance(model.roi_heads.extra_losses, ParentDistillationLoss)
    assert model.roi_heads.extra_losses.previous is None and model.roi_heads.extra_losses.weight == 2.0
    with pytest.raises(ValueError, match="> 0"):
        ParentDistillationLoss(model.roi_heads, 0.0)


def test_options_apply_it_only_under_freeze_backbone_and_refuse_bad_weights():
    assert MethodOptions(freeze="backbone", parent_distill=5.0).config(None).parent_distill == 5.0
    assert MethodOptions(freeze="rpn-head", parent_distill=5.0).config(None).parent_distill == 5.0
    # head, rpn: the old classes' outputs cannot move; none: the backbone drifts under it
    for freeze in ("head", "rpn", "none"):
        assert MethodOptions(freeze=freeze, parent_distill=5.0).config(None).parent_distill == 0.0
    assert MethodOptions(freeze="backbone", parent_distill=None).config(None).parent_distill == 0.0
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="parent-distill"):
            MethodOptions(freeze="backbone", parent_distill=bad).check()
        with pytest.raises(ValueError, match="parent distillation"):
            MethodConfig(freeze="backbone", parent_distill=bad)


def test_base_training_has_no_parent_to_distil_from():
    from dataclasses import replace

    from fewshot.workflows.base_train import BaseTrainOptions, validate

    opts = BaseTrainOptions(dataset="synthworld")
    assert opts.method.parent_distill is None
    with pytest.raises(ValueError, match="no parent"):
        validate(replace(opts, method=replace(opts.method, parent_distill=5.0)))
