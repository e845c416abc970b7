"""The device rule, checked on a CPU-only machine: every tensor that reaches the model is on the
model's device, the loop moves batches to whatever device it is given (the `meta` device stands
in for a GPU), the Ray Train worker trains on ray.train.torch.get_device(), fp32 on the CPU gives
bit-identical weights to the plain loop it replaced, and the precision rules hold."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from catalog.kshot import sample_support
from fewshot.backends.cluster import ClusterOptions
from fewshot.learning.loop import TrainConfig, lr_at, make_optimizer, train, trainable_parameters
from fewshot.learning.method import MethodConfig, finetune, prepare_for_training
from fewshot.metrics.coco_eval import predict_rows
from fewshot.model.batches import (
    PIXELS_COLUMN, class_index, columnar_to_rows, decode_column_batch, random_batches, rows_to_batch,
)
from fewshot.model.checkpoint import DetectorCheckpoint
from fewshot.model.detector import build_detector
from fewshot.model.devices import autocast, default_device, move_batch, resolve_precision
from fewshot.model.expansion import expand_detector
from fewshot.model.presets import preset


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def watch_devices(model: nn.Module) -> list[torch.device]:
    """A pre-hook on the detector's transform (every path into the model passes it: training,
    inference, imprinting): asserts each input tensor is on the model's own device."""
    seen: list[torch.device] = []

    def check(module, args):
        want = next(model.parameters()).device
        for t in _tensors(args):
            assert t.device == want, f"a {tuple(t.shape)} tensor on {t.device} reached a model on {want}"
            seen.append(t.device)

    model.transform.register_forward_pre_hook(check)
    return seen


@pytest.fixture(scope="module")
def small(tiny_catalog):
    manifest = tiny_catalog.manifest("synthworld")
    split = manifest.class_split("split1")
    by_name = manifest.category_by_name()
    base_ids = [by_name[c].id for c in split.base]
    novel_ids = [by_name[c].id for c in split.novel[:2]]
    table = tiny_catalog.read_split("synthworld", "train")
    novel, replay = sample_support(table, novel_ids, base_ids, 1, seed=0)
    torch.manual_seed(0)
    cfg = preset("cpu-small")
    model = build_detector(cfg, len(base_ids) + 1)
    parent = DetectorCheckpoint(config=cfg, classes=list(split.base), category_ids=base_ids,
                                dataset="synthworld", class_set="cs", state_dict=model.state_dict())
    return {"parent": parent, "rows": (novel + replay)[:4], "novel": novel, "novel_ids": novel_ids,
            "base_ids": base_ids,
            "val": tiny_catalog.read_split("synthworld", "val").to_pylist()[:3]}


# ---- the loop moves batches to the device it is given --------------------------------------------

class MetaSpy(nn.Module):
    """Stands in for a detector on another device: asserts that every input is on `meta`
    (as a GPU model would need them on its GPU) and returns a real CPU loss from its own
    parameter, so the loop's optimizer and host syncs still run. `.to()` is recorded, not done."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))
        self.moved_to: list[torch.device] = []
        self.inputs = 0

    def to(self, *args, **kwargs):  # noqa: D102 - keep the CPU parameter
        self.moved_to.append(torch.device(args[0]))
        return self

    def forward(self, images, targets):
        for t in _tensors([images, targets]):
            assert t.device.type == "meta", f"input on {t.device}"
            self.inputs += 1
        assert all(im.dtype == torch.float32 for im in images), "uint8 images must become float on the device"
        return {"loss_a": (self.w ** 2).sum(), "loss_b": self.w.sum() * 0.1}


def test_the_loop_moves_every_batch_to_the_device_it_is_given():
    spy = MetaSpy()
    image = torch.randint(0, 255, (3, 8, 8), dtype=torch.uint8)
    target = {"boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0]]), "labels": torch.tensor([1]),
              "teacher_emb": torch.zeros(1, 4)}
    batches = iter([([image, image], [target, target])] * 5)
    logged = []
    last = train(spy, batches, TrainConfig(steps=5, batch_size=2, log_every=2), progress=False,
                 on_log=lambda step, m: logged.append(step), device="meta", precision="fp32")
    assert spy.moved_to == [torch.device("meta")]
    assert spy.inputs == 5 * 2 * 4  # every image and every target tensor of every step
    assert [s for s in logged] == [2, 4, 5] and math.isfinite(last["loss"])


def test_move_batch_converts_uint8_to_the_same_floats_and_moves_every_target_tensor():
    image = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8)
    target = {"boxes": torch.rand(2, 4), "labels": torch.tensor([1, 2]), "note": "kept"}
    images, targets = move_batch([image], [target], "cpu")
    assert images[0].dtype == torch.float32 and torch.equal(images[0], image.float().div_(255.0))
    assert targets[0]["note"] == "kept" and torch.equal(targets[0]["labels"], target["labels"])
    meta_images, meta_targets = move_batch([image], [target], "meta")
    assert all(t.device.type == "meta" for t in _tensors([meta_images, meta_targets]))


def test_a_loss_that_turns_nan_is_caught_at_the_logging_interval():
    class NaNAfter(MetaSpy):
        def forward(self, images, targets):
            return {"loss": self.w.sum() * float("nan")}

    with pytest.raises(FloatingPointError, match="by step 2"):
        train(NaNAfter(), iter([([torch.zeros(3, 2, 2)], [{}])] * 4),
              TrainConfig(steps=4, batch_size=1, log_every=2), progress=False, device="cpu")


# ---- every in-process path feeds the model on the model's device ---------------------------------

def test_finetune_predict_and_expansion_feed_the_model_on_its_device(small):
    parent, rows = small["parent"], small["rows"]
    # imprinting: support images go to the model's device
    model = parent.build_model()
    seen = watch_devices(model)
    images, targets = rows_to_batch(small["novel"], class_index(parent.category_ids + small["novel_ids"]),
                                    uint8=True)
    expand_detector(model, images, targets, num_new=len(small["novel_ids"]))
    assert seen and all(d.type == "cpu" for d in seen)
    # fine-tuning in this process, the device passed explicitly
    model = parent.build_model()
    seen = watch_devices(model)
    finetune(parent, rows, TrainConfig(steps=2, batch_size=2, log_every=1), MethodConfig(freeze="head"),
             model=model, device="cpu", precision="fp32")
    assert len(seen) >= 2 * 2 * 3  # 2 steps x 2 images x (image, boxes, labels)
    # evaluation
    model = parent.build_model()
    seen = watch_devices(model)
    predict_rows(model, small["val"], parent.category_ids, batch_size=2, device="cpu")
    assert len(seen) == len(small["val"])


def test_the_ray_train_worker_trains_on_the_device_ray_gives_it(small, tmp_path, monkeypatch):
    """The single-worker path of add_classes, without a cluster: Ray Train's calls are faked,
    the worker body is the real one. It asks ray.train.torch.get_device() for its device, moves
    the model there, and every batch reaches the model on it."""
    import ray.train
    import ray.train.torch

    from fewshot.backends import ray_train
    from fewshot.model.checkpoint import save_checkpoint

    parent = small["parent"]
    init = save_checkpoint(tmp_path / "init.pt", parent.build_model(), parent.config, parent.classes,
                           parent.category_ids, "synthworld", "cs")
    columns = {k: np.array([r[k] for r in small["rows"]] + [None], dtype=object)[:-1] for k in small["rows"][0]}
    decoded = decode_column_batch(columns)  # what the map_batches stage hands the worker

    class Shard:
        def iter_batches(self, batch_size, **kwargs):
            n = len(decoded[PIXELS_COLUMN])
            for i in range(0, n, batch_size):
                yield {k: v[i:i + batch_size] for k, v in decoded.items()}

    asked, reports, seen, train_devices = [], [], [], []
    real_train = ray_train.train

    def get_device():
        asked.append(True)
        return torch.device("cpu")

    def prepare_model(model, move_to_device=True, **kwargs):
        assert move_to_device == torch.device("cpu")  # the device get_device() gave
        seen.append(watch_devices(model))
        return model

    def spy_train(*args, **kwargs):
        train_devices.append(kwargs["device"])
        return real_train(*args, **kwargs)

    monkeypatch.setattr(ray.train, "get_context", lambda: type("Ctx", (), {"get_world_rank": lambda self: 0})())
    monkeypatch.setattr(ray.train, "get_dataset_shard", lambda name: Shard())
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    monkeypatch.setattr(ray.train, "report", lambda metrics, checkpoint=None: reports.append(metrics))
    monkeypatch.setattr(ray.train.torch, "get_device", get_device)
    monkeypatch.setattr(ray.train.torch, "prepare_model", prepare_model)
    monkeypatch.setattr(ray_train, "train", spy_train)
    spec = ray_train.TrainJobSpec(init_checkpoint=str(init), train=TrainConfig(steps=2, batch_size=2, log_every=1),
                                  method=MethodConfig(freeze="head"), progress=False, precision="fp32")
    ray_train.train_loop_per_worker({"spec": spec})
    assert asked and train_devices == [torch.device("cpu")]
    assert len(seen[0]) >= 2 * 2 * 3  # 2 steps x 2 images x (image, boxes, labels), each checked
    assert reports and reports[-1]["step"] == 2


# ---- fp32 on the CPU: the same weights as the plain loop it replaced -----------------------------

def test_cpu_fp32_fine_tune_is_bit_identical_to_the_plain_loop(small):
    parent, rows = small["parent"], small["rows"]
    cfg = TrainConfig(steps=3, batch_size=2, lr=5e-4, warmup_steps=1, log_every=2)
    method = MethodConfig(freeze="backbone")

    # the loop as it was: float images on the host, every loss turned into a float each step
    torch.manual_seed(0)
    ref = parent.build_model()
    prepare_for_training(ref, method)
    opt = make_optimizer(ref, cfg)
    batches = random_batches(list(rows), class_index(parent.category_ids), cfg.batch_size, 0)
    for step in range(cfg.steps):
        images, targets = next(batches)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        ref.train()
        loss = sum(ref(images, targets).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable_parameters(ref), cfg.grad_clip)
        opt.step()

    new = finetune(parent, rows, cfg, method, seed=0, device="cpu", precision="fp32")
    ref_state, new_state = ref.state_dict(), new.state_dict()
    assert ref_state.keys() == new_state.keys()
    changed = [k for k in ref_state if not torch.equal(ref_state[k], new_state[k])]
    assert not changed, f"fp32 CPU results moved: {changed[:5]}"
    assert not torch.equal(new_state["roi_heads.box_head.fc7.weight"],
                           parent.state_dict["roi_heads.box_head.fc7.weight"])  # it did train


# ---- precision --------------------------------------------------------------------------------------

def test_precision_rules():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="fp16 needs a CUDA"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("int8", "cpu")
    assert default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="fp16 needs --gpu"):
        ClusterOptions(precision="fp16").check()
    with pytest.raises(ValueError, match="gpus-per-worker"):
        ClusterOptions(gpu=True, gpus_per_worker=0).check()
    assert ClusterOptions(gpus_per_worker=0.5).gpus == 0.0 and ClusterOptions(gpu=True, gpus_per_worker=0.5).gpus == 0.5


def test_gpu_options_request_gpus_from_ray_train():
    from fewshot.backends.ray_train import scaling_config

    sc = scaling_config(ClusterOptions(num_workers=2, cpus_per_worker=3, gpu=True, gpus_per_worker=0.5))
    assert sc.use_gpu and sc.num_workers == 2
    assert sc.resources_per_worker == {"CPU": 3, "GPU": 0.5}
    assert scaling_config(ClusterOptions()).resources_per_worker == {"CPU": 2}


def test_bf16_autocast_keeps_classifier_and_boxes_in_fp32_and_trains(small):
    parent = small["parent"]
    model = parent.build_model()
    images, targets = rows_to_batch(small["rows"][:2], class_index(parent.category_ids))
    with torch.no_grad(), autocast("cpu", "bf16"):
        out = model(images)
        feats = model.backbone(torch.stack([torch.nn.functional.interpolate(images[0][None], (64, 64))[0]]))
    assert next(iter(feats.values())).dtype == torch.bfloat16  # autocast is really on
    assert all(o["boxes"].dtype == torch.float32 and o["scores"].dtype == torch.float32 for o in out)
    last = train(model, iter([(images, targets)] * 2), TrainConfig(steps=2, batch_size=2, log_every=1),
                 progress=False, device="cpu", precision="bf16")
    assert math.isfinite(last["loss"])


def test_decoded_pixels_give_the_same_batch_as_encoded_bytes(small):
    rows = small["rows"][:3]
    columns = {k: np.array([r[k] for r in rows] + [None], dtype=object)[:-1] for k in rows[0]}
    decoded = columnar_to_rows(decode_column_batch(columns))
    assert all(isinstance(r[PIXELS_COLUMN], np.ndarray) and "image" not in r for r in decoded)
    index = class_index(small["parent"].category_ids)
    a_images, a_targets = rows_to_batch(rows, index, rng=np.random.default_rng(3))
    b_images, b_targets = rows_to_batch(decoded, index, rng=np.random.default_rng(3), uint8=True)
    b_images, b_targets = move_batch(b_images, b_targets, "cpu")
    for a, b in zip(a_images, b_images):
        assert torch.equal(a, b)
    for a, b in zip(a_targets, b_targets):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])


def test_a_version_answers_in_the_precision_it_was_validated_in():
    """Serve and the pyfunc build ``Detector(checkpoint, device)``: the version's recorded
    precision is used, fp16 falls back to fp32 without CUDA, and no record means fp32."""
    import dataclasses

    import pytest as _pytest

    from fewshot.model.checkpoint import DetectorCheckpoint
    from fewshot.model.detector import build_detector
    from fewshot.model.inference import Detector
    from fewshot.model.presets import preset

    cfg = dataclasses.replace(preset("cpu-small"), backbone_width=8, backbone_out_channels=16,
                              representation_size=32)
    state = build_detector(cfg, 3).state_dict()

    def ckpt(extra):
        return DetectorCheckpoint(config=cfg, classes=["a", "b"], category_ids=[1, 2], dataset="d",
                                  class_set="cs", state_dict=state, extra=extra)

    assert Detector(ckpt({}), device="cpu").precision == "fp32"
    assert Detector(ckpt({"precision": "bf16"}), device="cpu").precision == "bf16"
    with _pytest.warns(RuntimeWarning, match="validated in fp16"):
        assert Detector(ckpt({"precision": "fp16"}), device="cpu").precision == "fp32"
    assert Detector(ckpt({"precision": "bf16"}), device="cpu", precision="fp32").precision == "fp32"
