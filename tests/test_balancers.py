"""Task-gradient balancers, the scaled-backward split, and the per-batch task precisions.

Every claim is checked against autograd: the gradient each branch sends back is computed
separately with ``torch.autograd.grad`` on an un-balanced graph and compared with what the
balanced graph delivers.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import box_iou

from fewshot.balancers import (
    FixedBalancer,
    GradNormBalancer,
    PrecisionGradientBalancer,
    TaskBalancer,
    balancer_names,
    inverse_norm_weights,
    make_balancer,
    pgb_target_weights,
)
from fewshot.balancers.task_precision import (
    TaskPrecision,
    classification_precision,
    compute_task_precision,
    localization_precision,
    paired_box_iou,
)
from fewshot.balancers.task_split import split_for_tasks

# ----------------------------------------------------------------------------------------
# A miniature box head: trunk -> shared feature x -> (cls head, reg head)
# ----------------------------------------------------------------------------------------

R, D_IN, D, C = 10, 5, 6, 4  # RoIs, input dim, shared feature dim, classes incl. background


class MiniHead(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Linear(D_IN, D)
        self.cls_head = nn.Linear(D, C)
        self.reg_head = nn.Linear(D, C * 4)

    def shared(self, inp: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.trunk(inp))

    def heads(self, x_cls: torch.Tensor, x_reg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cls_head(x_cls), self.reg_head(x_reg)


def make_batch(seed: int = 1, no_fg: bool = False):
    g = torch.Generator().manual_seed(seed)
    inp = torch.randn(R, D_IN, generator=g)
    labels = torch.randint(1, C, (R,), generator=g)
    labels[::3] = 0  # some background
    if no_fg:
        labels.zero_()
    targets = torch.randn(R, 4, generator=g)
    return inp, labels, targets


def task_losses(scores, deltas, labels, targets):
    loss_cls = F.cross_entropy(scores, labels)
    fg = torch.nonzero(labels > 0).squeeze(1)
    per_class = deltas.reshape(deltas.shape[0], -1, 4)
    # Sum over fg RoIs normalised by R, as torchvision's fastrcnn_loss does (0 when no fg).
    loss_reg = F.smooth_l1_loss(per_class[fg, labels[fg]], targets[fg], beta=1 / 9, reduction="sum") / labels.numel()
    return loss_cls, loss_reg


def run(model: MiniHead, balancer, batch, observe_first: TaskPrecision | None = None):
    """Forward + backward through the model with the given balancer; returns everything."""
    inp, labels, targets = batch
    model.zero_grad(set_to_none=True)
    x = model.shared(inp)
    x.retain_grad()
    x_cls, x_reg = split_for_tasks(x, balancer)
    scores, deltas = model.heads(x_cls, x_reg)
    loss_cls, loss_reg = task_losses(scores, deltas, labels, targets)
    if observe_first is not None and balancer is not None:
        balancer.observe(observe_first)
    (loss_cls + loss_reg).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return scores.detach(), deltas.detach(), x.grad.detach().clone(), grads


def branch_grads(model: MiniHead, batch):
    """dL_cls/dx, dL_reg/dx and the same for the trunk parameters, from an unbalanced graph."""
    inp, labels, targets = batch
    x = model.shared(inp)
    scores, deltas = model.heads(x, x)
    loss_cls, loss_reg = task_losses(scores, deltas, labels, targets)
    trunk_params = list(model.trunk.parameters())
    g_cls = torch.autograd.grad(loss_cls, [x, *trunk_params], retain_graph=True)
    g_reg = torch.autograd.grad(loss_reg, [x, *trunk_params])
    return g_cls, g_reg


def assert_close(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------
# split_for_tasks with any balancer
# ----------------------------------------------------------------------------------------


def _balancers_under_test():
    pgb = PrecisionGradientBalancer(momentum=0.0)
    pgb.observe(TaskPrecision(p_cls=0.2, p_loc=0.8, n_fg=5))
    return [
        FixedBalancer(w_cls=0.3, w_loc=1.7),
        pgb,
        GradNormBalancer(momentum=0.0),
    ]


@pytest.mark.parametrize("balancer", _balancers_under_test(), ids=lambda b: b.name)
def test_forward_identical_with_and_without_balancer(balancer):
    model, batch = MiniHead(), make_batch()
    scores0, deltas0, _, _ = run(model, None, batch)
    scores1, deltas1, _, _ = run(model, balancer, batch)
    assert torch.equal(scores0, scores1)
    assert torch.equal(deltas0, deltas1)


@pytest.mark.parametrize("balancer", _balancers_under_test(), ids=lambda b: b.name)
def test_shared_gradient_is_weighted_sum_of_branch_gradients(balancer):
    model, batch = MiniHead(), make_batch()
    (gx_cls, *gt_cls), (gx_reg, *gt_reg) = branch_grads(model, batch)
    _, _, gx, grads = run(model, balancer, batch)

    w = balancer.last_weights
    w_c, w_l = w["w_cls"], w["w_loc"]
    assert abs(w_c - w_l) > 0.1, "test needs unequal weights to be able to fail"
    assert_close(gx, w_c * gx_cls + w_l * gx_reg)
    # ... and it is NOT the plain sum, nor the swapped combination.
    assert not torch.allclose(gx, gx_cls + gx_reg, atol=1e-6)
    assert not torch.allclose(gx, w_l * gx_cls + w_c * gx_reg, atol=1e-6)
    # The rebalanced gradient keeps flowing upstream by the chain rule (trunk parameters).
    for (name, _), g_c, g_r in zip(model.trunk.named_parameters(), gt_cls, gt_reg):
        assert_close(grads[f"trunk.{name}"], w_c * g_c + w_l * g_r)


@pytest.mark.parametrize("balancer", _balancers_under_test(), ids=lambda b: b.name)
def test_head_parameter_gradients_unchanged(balancer):
    model, batch = MiniHead(), make_batch()
    _, _, gx0, grads0 = run(model, None, batch)
    _, _, gx1, grads1 = run(model, balancer, batch)
    for name in ("cls_head.weight", "cls_head.bias", "reg_head.weight", "reg_head.bias"):
        assert torch.equal(grads0[name], grads1[name]), name
    # whereas the trunk does see the balancer
    assert not torch.allclose(grads0["trunk.weight"], grads1["trunk.weight"], atol=1e-6)
    assert not torch.allclose(gx0, gx1, atol=1e-6)


def test_neutral_fixed_balancer_matches_no_balancer():
    model, batch = MiniHead(), make_batch()
    _, _, gx0, grads0 = run(model, None, batch)
    _, _, gx1, grads1 = run(model, make_balancer("fixed"), batch)
    assert_close(gx0, gx1)
    for name in grads0:
        assert_close(grads0[name], grads1[name])


def test_split_is_noop_without_balancer_or_grad():
    x = torch.randn(4, 3, requires_grad=True)
    bal = FixedBalancer(0.5, 1.5)
    a, b = split_for_tasks(x, None)
    assert a is x and b is x
    with torch.no_grad():
        a, b = split_for_tasks(x, bal)
    assert a is x and b is x
    a, b = split_for_tasks(x.detach(), bal)  # frozen trunk / eval
    assert a.grad_fn is None and b.grad_fn is None
    bal.enabled = False
    a, b = split_for_tasks(x, bal)
    assert a is x and b is x
    bal.enabled = True
    a, b = split_for_tasks(x, bal)
    assert a is not x and b is not x and a.grad_fn is not None


def test_split_outputs_support_inplace_ops():
    x = torch.randn(4, 3, requires_grad=True)
    bal = FixedBalancer(0.5, 2.0)
    a, b = split_for_tasks(x * 1.0, bal)
    a.relu_()
    b.mul_(3.0)
    (a.sum() + b.sum()).backward()
    expected = 0.5 * (x > 0).float() + 2.0 * 3.0
    assert_close(x.grad, expected)


def test_last_weights_are_the_applied_ones():
    bal = GradNormBalancer(momentum=0.0)
    assert bal.last_weights == {"w_cls": 1.0, "w_loc": 1.0}
    x = torch.randn(5, 3, requires_grad=True)
    a, b = split_for_tasks(x, bal)
    (a.sum() * 1.0 + b.sum() * 4.0).backward()  # ||g_reg|| = 4 ||g_cls||
    w = bal.last_weights
    assert set(w) == {"w_cls", "w_loc"}
    assert w["w_cls"] == pytest.approx(2 * 4 / 5)
    assert w["w_loc"] == pytest.approx(2 * 1 / 5)
    assert_close(x.grad, torch.full_like(x, w["w_cls"] * 1.0 + w["w_loc"] * 4.0))


# ----------------------------------------------------------------------------------------
# PGB
# ----------------------------------------------------------------------------------------


def test_pgb_starts_neutral():
    bal = PrecisionGradientBalancer()
    assert bal.current_weights() == (1.0, 1.0)
    assert bal.backward_weights(torch.ones(2), torch.ones(2)) == (1.0, 1.0)


@pytest.mark.parametrize("p_cls,p_loc", [(0.2, 0.8), (0.9, 0.3)])
def test_pgb_favours_the_poorer_task(p_cls, p_loc):
    bal = PrecisionGradientBalancer(momentum=0.0)
    bal.observe(TaskPrecision(p_cls=p_cls, p_loc=p_loc, n_fg=7))
    w_c, w_l = bal.current_weights()
    assert w_c + w_l == pytest.approx(2.0)
    assert w_c == pytest.approx(2 * p_loc / (p_cls + p_loc))
    assert w_l == pytest.approx(2 * p_cls / (p_cls + p_loc))
    if p_cls < p_loc:
        assert w_c > 1.0 > w_l
    else:
        assert w_l > 1.0 > w_c


def test_pgb_equal_precisions_are_neutral():
    bal = PrecisionGradientBalancer(momentum=0.0)
    bal.observe(TaskPrecision(p_cls=0.6, p_loc=0.6, n_fg=3))
    assert bal.current_weights() == pytest.approx((1.0, 1.0))


def test_pgb_ema_moves_partially_and_converges():
    bal = PrecisionGradientBalancer(momentum=0.9)
    extreme = TaskPrecision(p_cls=0.01, p_loc=1.0, n_fg=4)
    target_c, target_l = pgb_target_weights(0.01, 1.0, bal.eps)
    bal.observe(extreme)
    w_c, w_l = bal.current_weights()
    assert w_c == pytest.approx(0.9 * 1.0 + 0.1 * target_c)
    assert 1.0 < w_c < target_c - 0.5  # only a partial move
    assert w_c + w_l == pytest.approx(2.0)
    for _ in range(200):
        bal.observe(extreme)
    assert bal.current_weights() == pytest.approx((target_c, target_l), abs=1e-6)
    # One opposite batch does not flip the (smoothed) ordering.
    bal.observe(TaskPrecision(p_cls=1.0, p_loc=0.01, n_fg=4))
    w_c, w_l = bal.current_weights()
    assert w_c > w_l
    assert w_c + w_l == pytest.approx(2.0)


def test_pgb_clamps_precisions():
    assert pgb_target_weights(0.0, 0.0) == pytest.approx((1.0, 1.0))
    assert pgb_target_weights(1.7, 1.0) == pytest.approx((1.0, 1.0))  # >1 clamped to 1
    w_c, w_l = pgb_target_weights(0.0, 1.0, eps=1e-3)
    assert math.isfinite(w_c) and w_c == pytest.approx(2 / 1.001)
    assert w_l == pytest.approx(2e-3 / 1.001)


@pytest.mark.parametrize(
    "stats",
    [None, TaskPrecision(n_fg=0), TaskPrecision(p_cls=0.1, p_loc=0.9, n_fg=0), TaskPrecision(p_cls=float("nan"), p_loc=0.5)],
    ids=["none", "empty", "n_fg=0", "nan"],
)
def test_pgb_ignores_empty_batches(stats):
    bal = PrecisionGradientBalancer(momentum=0.5)
    bal.observe(TaskPrecision(p_cls=0.3, p_loc=0.7, n_fg=2))
    before = bal.state_dict()
    bal.observe(stats)
    assert bal.state_dict() == before


def test_pgb_observe_then_backward_uses_batch_precision():
    """The documented loop: precisions from the batch -> observe -> backward."""
    model, batch = MiniHead(), make_batch()
    bal = PrecisionGradientBalancer(momentum=0.0)
    stats = TaskPrecision(p_cls=0.25, p_loc=0.75, n_fg=6)
    (gx_cls, *_), (gx_reg, *_) = branch_grads(model, batch)
    _, _, gx, _ = run(model, bal, batch, observe_first=stats)
    assert bal.last_weights == pytest.approx({"w_cls": 1.5, "w_loc": 0.5})
    assert_close(gx, 1.5 * gx_cls + 0.5 * gx_reg)


# ----------------------------------------------------------------------------------------
# Gradient-norm scaling
# ----------------------------------------------------------------------------------------


def test_gradnorm_favours_the_smaller_gradient_and_sums_to_two():
    bal = GradNormBalancer(momentum=0.0)
    g_cls = torch.full((4, 3), 0.1)
    g_reg = torch.full((4, 3), 2.0)
    w_c, w_l = bal.backward_weights(g_cls, g_reg)
    assert w_c > w_l
    assert w_c + w_l == pytest.approx(2.0)
    n_c, n_l = g_cls.norm().item(), g_reg.norm().item()
    assert w_c * n_c == pytest.approx(w_l * n_l)  # equalised contributions
    assert (w_c, w_l) == pytest.approx(inverse_norm_weights(n_c, n_l))
    # and the other direction
    w_c, w_l = GradNormBalancer(momentum=0.0).backward_weights(g_reg, g_cls)
    assert w_l > w_c and w_c + w_l == pytest.approx(2.0)


def test_gradnorm_on_real_branch_gradients():
    model, batch = MiniHead(), make_batch()
    (gx_cls, *_), (gx_reg, *_) = branch_grads(model, batch)
    bal = GradNormBalancer(momentum=0.0)
    _, _, gx, _ = run(model, bal, batch)
    n_c, n_l = gx_cls.norm().item(), gx_reg.norm().item()
    w = bal.last_weights
    assert (w["w_cls"], w["w_loc"]) == pytest.approx(inverse_norm_weights(n_c, n_l))
    assert_close(gx, w["w_cls"] * gx_cls + w["w_loc"] * gx_reg)
    assert (w["w_cls"] * gx_cls).norm().item() == pytest.approx((w["w_loc"] * gx_reg).norm().item(), rel=1e-5)


def test_gradnorm_ema_smoothing():
    bal = GradNormBalancer(momentum=0.5)
    ones = torch.ones(3)
    bal.backward_weights(ones * 1.0, ones * 1.0)  # first step initialises the EMA: (1, 1)
    assert bal.current_weights() == pytest.approx((1.0, 1.0))
    w_c, w_l = bal.backward_weights(ones * 1.0, ones * 9.0)  # EMA norms: 1 and 5
    n_c, n_l = math.sqrt(3) * 1.0, math.sqrt(3) * 5.0
    assert (w_c, w_l) == pytest.approx(inverse_norm_weights(n_c, n_l))
    unsmoothed = inverse_norm_weights(math.sqrt(3), 9 * math.sqrt(3))
    assert 1.0 < w_c < unsmoothed[0]
    # smooth=False ignores momentum
    raw = GradNormBalancer(momentum=0.5, smooth=False)
    raw.backward_weights(ones, ones)
    assert raw.backward_weights(ones * 1.0, ones * 9.0) == pytest.approx(unsmoothed)


def test_gradnorm_zero_gradient_keeps_previous_weights():
    bal = GradNormBalancer(momentum=0.0)
    zeros = torch.zeros(4, 3)
    assert bal.backward_weights(torch.ones(4, 3), zeros) == (1.0, 1.0)  # nothing seen yet
    prev = bal.backward_weights(torch.ones(4, 3), torch.full((4, 3), 3.0))
    assert prev != pytest.approx((1.0, 1.0))
    assert bal.backward_weights(torch.ones(4, 3), zeros) == prev
    assert bal.backward_weights(zeros, torch.ones(4, 3)) == prev
    assert bal.backward_weights(torch.full((4, 3), float("nan")), torch.ones(4, 3)) == prev
    assert bal.num_skipped == 4


def test_zero_foreground_batch_leaves_weights_unchanged_through_autograd():
    model = MiniHead()
    bal = GradNormBalancer(momentum=0.0)
    run(model, bal, make_batch(seed=1))
    prev = dict(bal.last_weights)
    state = bal.state_dict()

    empty = make_batch(seed=2, no_fg=True)
    (gx_cls, *_), (gx_reg, *_) = branch_grads(model, empty)
    assert gx_reg.abs().max().item() == 0.0
    _, _, gx, _ = run(model, bal, empty)
    assert bal.last_weights == prev
    assert bal.norm_cls == state["norm_cls"] and bal.norm_loc == state["norm_loc"]
    assert_close(gx, prev["w_cls"] * gx_cls)

    # PGB: the same empty batch gives TaskPrecision(n_fg=0) and leaves PGB untouched
    pgb = PrecisionGradientBalancer(momentum=0.0)
    pgb.observe(TaskPrecision(p_cls=0.2, p_loc=0.6, n_fg=3))
    before = pgb.current_weights()
    inp, labels, targets = empty
    stats = compute_task_precision(torch.randn(R, C), torch.randn(R, C * 4), labels, targets, torch.rand(R, 4) * 10 + torch.tensor([0, 0, 20, 20]))
    assert stats.n_fg == 0 and not stats.valid
    pgb.observe(stats)
    assert pgb.current_weights() == before


# ----------------------------------------------------------------------------------------
# Factory and checkpointing
# ----------------------------------------------------------------------------------------


def test_make_balancer_known_names():
    assert sorted(balancer_names()) == ["fixed", "gradnorm", "pgb"]
    assert isinstance(make_balancer("fixed"), FixedBalancer)
    assert isinstance(make_balancer("PGB", momentum=0.5), PrecisionGradientBalancer)
    assert make_balancer("pgb", momentum=0.5).momentum == 0.5
    assert isinstance(make_balancer("gradnorm"), GradNormBalancer)
    assert make_balancer("fixed", w_cls=2.0).current_weights() == (2.0, 1.0)
    for name in balancer_names():
        b = make_balancer(name)
        assert isinstance(b, TaskBalancer) and b.name == name


def test_make_balancer_unknown_name():
    with pytest.raises(ValueError) as err:
        make_balancer("uncertainty")
    msg = str(err.value)
    assert "uncertainty" in msg
    for name in ("fixed", "pgb", "gradnorm"):
        assert name in msg


def test_bad_hyperparameters_rejected():
    with pytest.raises(ValueError):
        make_balancer("pgb", momentum=1.0)
    with pytest.raises(ValueError):
        make_balancer("gradnorm", momentum=-0.1)
    with pytest.raises(ValueError):
        make_balancer("fixed", w_cls=-1.0)
    with pytest.raises(TypeError):
        make_balancer("pgb", no_such_option=1)


def test_state_dict_roundtrip():
    pgb = PrecisionGradientBalancer(momentum=0.8)
    for p in (0.2, 0.4, 0.3):
        pgb.observe(TaskPrecision(p_cls=p, p_loc=0.7, n_fg=2))
    pgb2 = PrecisionGradientBalancer()
    pgb2.load_state_dict(pgb.state_dict())
    assert pgb2.current_weights() == pgb.current_weights()
    pgb.observe(TaskPrecision(p_cls=0.9, p_loc=0.1, n_fg=2))
    pgb2.observe(TaskPrecision(p_cls=0.9, p_loc=0.1, n_fg=2))
    assert pgb2.state_dict() == pgb.state_dict()

    gn = GradNormBalancer(momentum=0.7)
    gn.backward_weights(torch.ones(3), torch.ones(3) * 2)
    gn.backward_weights(torch.ones(3), torch.ones(3) * 5)
    gn2 = GradNormBalancer()
    gn2.load_state_dict(gn.state_dict())
    g1, g2 = torch.ones(3) * 0.5, torch.ones(3) * 3
    assert gn2.backward_weights(g1, g2) == gn.backward_weights(g1, g2)

    with pytest.raises(ValueError):
        gn2.load_state_dict(pgb.state_dict())


# ----------------------------------------------------------------------------------------
# Task precisions
# ----------------------------------------------------------------------------------------

CODER = BoxCoder((10.0, 10.0, 5.0, 5.0))


def _random_boxes(n: int, g: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g) * 50
    wh = torch.rand(n, 2, generator=g) * 40 + 5
    return torch.cat([xy, xy + wh], dim=1)


def _detection_batch(seed: int = 0, n: int = 12, num_classes: int = 5):
    g = torch.Generator().manual_seed(seed)
    proposals = _random_boxes(n, g)
    gt = proposals + torch.randn(n, 4, generator=g) * 2.0
    gt[:, 2:] = torch.maximum(gt[:, 2:], gt[:, :2] + 1)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    labels[0] = 1
    targets = CODER.encode_single(gt, proposals)
    return proposals, gt, labels, targets


def _class_specific(deltas: torch.Tensor, labels: torch.Tensor, num_classes: int, fill: float = 7.0):
    """[R, C*4] regression output holding `deltas` at the true class, garbage elsewhere."""
    out = torch.full((deltas.shape[0], num_classes, 4), fill)
    out[torch.arange(deltas.shape[0]), labels] = deltas
    return out.reshape(deltas.shape[0], -1)


def test_perfect_predictions():
    proposals, gt, labels, targets = _detection_batch()
    box_reg = _class_specific(targets, labels, 5)
    assert localization_precision(box_reg, labels, targets, proposals) == pytest.approx(1.0, abs=1e-5)
    assert localization_precision(targets, labels, targets, proposals, CODER) == pytest.approx(1.0, abs=1e-5)  # agnostic
    logits = torch.zeros(len(labels), 5)
    logits[torch.arange(len(labels)), labels] = 20.0
    p_cls = classification_precision(logits, labels)
    assert p_cls > 0.999
    assert classification_precision(torch.zeros(len(labels), 5), labels) == pytest.approx(0.2)


def test_targets_decode_to_ground_truth():
    proposals, gt, labels, targets = _detection_batch(seed=3)
    fg = labels > 0
    assert_close(CODER.decode_single(targets[fg], proposals[fg]), gt[fg], rtol=1e-4, atol=1e-3)


def test_shifted_boxes_lower_iou():
    proposals, gt, labels, targets = _detection_batch(seed=1)
    values = []
    for shift in (0.0, 0.3, 1.0, 3.0):  # shift the x centre by `shift` box widths
        deltas = targets.clone()
        deltas[:, 0] += shift * 10.0  # BoxCoder weight wx = 10
        values.append(localization_precision(_class_specific(deltas, labels, 5), labels, targets, proposals))
    assert values[0] == pytest.approx(1.0, abs=1e-5)
    assert all(a > b for a, b in zip(values, values[1:])), values
    # the predicted box really is the decoded true-class delta: compare with explicit IoU
    fg = labels > 0
    deltas = targets.clone()
    deltas[:, 0] += 3.0
    pred = CODER.decode_single(deltas[fg], proposals[fg])
    expected = box_iou(pred, gt[fg]).diagonal().mean().item()
    got = localization_precision(_class_specific(deltas, labels, 5), labels, targets, proposals)
    assert got == pytest.approx(expected, rel=1e-4)


def test_hand_computed_two_roi_example():
    # RoI 0: proposal [0,0,10,10], class 1, gt = proposal; predicted dx = 1.0/10 * 10 px = +1 px
    #        -> box [1,0,11,10], IoU = 90 / 110 = 9/11;  logits [0, ln 3, 0] -> p(1) = 3/5
    # RoI 1: proposal [0,0,20,20], class 2, gt = proposal; predicted dw = 5 ln2 / 5 = ln 2
    #        -> width 40 around centre 10 -> [-10,0,30,20], IoU = 400 / 800 = 1/2;
    #        logits [0, 0, ln 2] -> p(2) = 2/4
    # RoI 2: background; ignored however wrong it is.
    proposals = torch.tensor([[0.0, 0, 10, 10], [0, 0, 20, 20], [5, 5, 9, 9]])
    labels = torch.tensor([1, 2, 0])
    targets = torch.zeros(3, 4)
    targets[2] = torch.tensor([3.0, -2.0, 1.0, 1.0])
    box_reg = torch.full((3, 3, 4), 9.0)
    box_reg[0, 1] = torch.tensor([1.0, 0, 0, 0])
    box_reg[1, 2] = torch.tensor([0, 0, 5 * math.log(2), 0])
    box_reg = box_reg.reshape(3, 12)
    logits = torch.tensor([[0.0, math.log(3), 0.0], [0.0, 0.0, math.log(2)], [9.0, -9.0, -9.0]])

    p_loc = localization_precision(box_reg, labels, targets, proposals)
    p_cls = classification_precision(logits, labels)
    assert p_loc == pytest.approx((9 / 11 + 1 / 2) / 2, rel=1e-6)
    assert p_cls == pytest.approx((3 / 5 + 2 / 4) / 2, rel=1e-6)

    stats = compute_task_precision(logits, box_reg, labels, targets, proposals)
    assert stats == TaskPrecision(p_cls=p_cls, p_loc=p_loc, n_fg=2)
    assert stats.valid
    # per-image lists, as RoIHeads produces them, give the same numbers
    stats_list = compute_task_precision(
        logits, box_reg, [labels[:1], labels[1:]], [targets[:1], targets[1:]], [proposals[:1], proposals[1:]]
    )
    assert stats_list == stats


def test_no_foreground_returns_none():
    labels = torch.zeros(4, dtype=torch.long)
    assert classification_precision(torch.randn(4, 3), labels) is None
    assert localization_precision(torch.randn(4, 12), labels, torch.randn(4, 4), torch.tensor([[0.0, 0, 5, 5]] * 4)) is None
    stats = compute_task_precision(torch.randn(4, 3), torch.randn(4, 12), labels, torch.randn(4, 4), torch.tensor([[0.0, 0, 5, 5]] * 4))
    assert stats.n_fg == 0 and stats.p_cls is None and stats.p_loc is None and not stats.valid


def test_precisions_do_not_track_gradients():
    proposals, gt, labels, targets = _detection_batch()
    logits = torch.randn(len(labels), 5, requires_grad=True)
    box_reg = torch.randn(len(labels), 20, requires_grad=True)
    stats = compute_task_precision(logits, box_reg, labels, targets, proposals)
    assert isinstance(stats.p_cls, float) and isinstance(stats.p_loc, float)
    assert 0.0 <= stats.p_cls <= 1.0 and 0.0 <= stats.p_loc <= 1.0
    assert logits.grad is None


def test_paired_iou_matches_torchvision_diagonal():
    g = torch.Generator().manual_seed(5)
    a, b = _random_boxes(20, g), _random_boxes(20, g)
    assert_close(paired_box_iou(a, b), box_iou(a, b).diagonal())
    assert paired_box_iou(torch.tensor([[0.0, 0, 0, 0]]), torch.tensor([[0.0, 0, 0, 0]])).item() == 0.0


def test_with_torchvision_roiheads_sampling():
    """Inputs straight from torchvision's RoIHeads.select_training_samples work unchanged."""
    from torchvision.models.detection.roi_heads import RoIHeads
    from torchvision.ops import MultiScaleRoIAlign

    heads = RoIHeads(
        box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2),
        box_head=nn.Identity(),
        box_predictor=nn.Identity(),
        fg_iou_thresh=0.5,
        bg_iou_thresh=0.5,
        batch_size_per_image=32,
        positive_fraction=0.25,
        bbox_reg_weights=None,
        score_thresh=0.05,
        nms_thresh=0.5,
        detections_per_img=10,
    )
    torch.manual_seed(0)
    gt_boxes = [torch.tensor([[10.0, 10, 40, 50], [60, 20, 90, 70]]), torch.tensor([[5.0, 5, 30, 30]])]
    gt_labels = [torch.tensor([1, 3]), torch.tensor([2])]
    proposals = [b.repeat(8, 1) + torch.randn(len(b) * 8, 4) * 3 for b in gt_boxes]
    proposals = [torch.cat([p, torch.tensor([[0.0, 0, 100, 100]])]) for p in proposals]
    targets = [{"boxes": b, "labels": lab} for b, lab in zip(gt_boxes, gt_labels)]
    props, _, labels, reg_targets = heads.select_training_samples(proposals, targets)
    n = sum(len(p) for p in props)
    labels_cat = torch.cat(labels)
    assert (labels_cat > 0).any()
    box_reg = _class_specific(torch.cat(reg_targets), labels_cat, 4)
    logits = torch.zeros(n, 4)
    logits[torch.arange(n), labels_cat] = 30.0
    stats = compute_task_precision(logits, box_reg, labels, reg_targets, props, heads.box_coder)
    assert stats.n_fg == int((labels_cat > 0).sum())
    assert stats.p_loc == pytest.approx(1.0, abs=1e-5)
    assert stats.p_cls == pytest.approx(1.0, abs=1e-6)
