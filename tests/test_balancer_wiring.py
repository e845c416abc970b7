"""The balancer reaches the detector: PGB observes RoI precisions and scales the backward pass."""
import torch

from fewshot.balancers.observer import attach_precision_observer
from fewshot.balancers import make_balancer
from fewshot.model.presets import preset
from fewshot.model.detector import build_detector
from fewshot.learning.loop import TrainConfig, make_optimizer, train_step


def test_pgb_weights_move_during_detector_training():
    torch.manual_seed(0)
    model = build_detector(preset("cpu-small", min_size=96, max_size=96), num_classes=3)
    balancer = make_balancer("pgb", momentum=0.5)
    model.roi_heads.box_predictor.balancer = balancer
    attach_precision_observer(model, balancer)
    images = [torch.rand(3, 96, 96) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 60.0, 70.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[20.0, 30.0, 90.0, 80.0]]), "labels": torch.tensor([2])}]
    opt = make_optimizer(model, TrainConfig(lr=1e-3))
    for _ in range(2):
        train_step(model, opt, images, targets, grad_clip=10.0)
    w = balancer.last_weights
    assert abs(w["w_cls"] + w["w_loc"] - 2.0) < 1e-6
    assert w["w_cls"] != 1.0  # precisions were observed and the weights applied in backward
