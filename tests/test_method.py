"""The method layer: teacher embeddings through the data layer, prepare_for_training,
checkpoints without training-only heads, an in-process episode, and the stats of the ablation."""
import math

import numpy as np
import pytest
import torch

from catalog import Catalog
from fewshot.model.checkpoint import load_checkpoint, save_checkpoint
from fewshot.model.presets import preset
from catalog.schema import TEACHER_EMB_COLUMN
from fewshot.model.batches import row_to_target
from fewshot.model.detector import build_detector
from fewshot.clip.distillation import HEAD_ATTR, LOSS_KEY
from fewshot.learning.episode import expand_parent, fine_tune_episode, sample_episode, score, to_checkpoint
from fewshot.metrics.coco_eval import load_eval_split
from fewshot.learning.method import MethodConfig, TeacherEmbedder, prepare_for_training
from fewshot.metrics.stats import mean_ci95
from fewshot.learning.loop import TrainConfig

E = 8


class FakeTeacher:
    """Embeds a box by its size and position: deterministic, no CLIP needed."""

    embed_dim = E
    calls = 0

    def embed_boxes(self, image, boxes):
        FakeTeacher.calls += 1
        b = torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4)
        emb = torch.cat([b, b.flip(1)], dim=1)
        return torch.nn.functional.normalize(emb + 1.0, dim=1)


def test_row_to_target_keeps_teacher_embeddings_of_the_kept_boxes_only():
    row = {"boxes": [[0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 1.5, 1.5], [2, 2, 30, 30]],
           "category_ids": [3, 99, 3, 4], "iscrowd": [False, False, False, True],
           TEACHER_EMB_COLUMN: [[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]]}
    t = row_to_target(row, {3: 1, 4: 2})
    # box 1 has an unknown class, box 2 is under a pixel wide, box 3 is crowd
    assert t["labels"].tolist() == [1]
    assert t[TEACHER_EMB_COLUMN].tolist() == [[1.0, 0.0]]
    assert TEACHER_EMB_COLUMN not in row_to_target({k: v for k, v in row.items() if k != TEACHER_EMB_COLUMN},
                                                {3: 1, 4: 2})


def test_method_config_rejects_bad_values():
    with pytest.raises(ValueError, match="teacher_dim"):
        MethodConfig(distill_beta=1.0)
    with pytest.raises(ValueError, match="balancer"):
        MethodConfig(balancer="adam")
    with pytest.raises(ValueError, match="momentum"):
        MethodConfig(balancer="pgb", balancer_momentum=1.0)
    assert MethodConfig.from_dict({"freeze": "none", "unknown": 1}).freeze == "none"


def test_prepare_for_training_adds_the_distillation_loss_and_checkpoints_drop_its_head(tmp_path):
    torch.manual_seed(0)
    config = preset("cpu-small", min_size=96, max_size=96)
    model = build_detector(config, num_classes=3)
    balancer = prepare_for_training(model, MethodConfig(freeze="backbone", balancer="pgb",
                                                        distill_beta=0.5, teacher_dim=E))
    assert balancer is not None and model.roi_heads.box_predictor.balancer is balancer
    head = getattr(model.roi_heads, HEAD_ATTR)
    assert all(p.requires_grad for p in head.parameters())
    assert not any(p.requires_grad for p in model.backbone.parameters())
    images = [torch.rand(3, 96, 96)]
    boxes = torch.tensor([[10.0, 10, 50, 50], [40, 30, 90, 80]])
    targets = [{"boxes": boxes, "labels": torch.tensor([1, 2]),
                TEACHER_EMB_COLUMN: FakeTeacher().embed_boxes(None, boxes)}]
    model.train()
    losses = model(images, targets)
    assert LOSS_KEY in losses and losses[LOSS_KEY].item() > 0
    sum(losses.values()).backward()
    assert head.proj.weight.grad is not None and head.proj.weight.grad.abs().sum() > 0
    fc7 = model.roi_heads.box_head.fc7.weight
    assert fc7.grad is not None and fc7.grad.abs().sum() > 0  # the shared feature learns

    path = save_checkpoint(tmp_path / "d.pt", model, config, ["a", "b"], [1, 2], "ds", "cs")
    ckpt = load_checkpoint(path)
    assert not any(HEAD_ATTR in k for k in ckpt.state_dict)
    ckpt.build_model()  # strict load of a plain detector


def test_teacher_embedder_embeds_each_box_subset_once():
    rows = [{"image_id": 1, "image": b"", "boxes": [[0, 0, 4, 4]]},
            {"image_id": 1, "image": b"", "boxes": [[0, 0, 4, 4], [1, 1, 9, 9]]},
            {"image_id": 1, "image": b"", "boxes": [[0, 0, 4, 4]]}]
    FakeTeacher.calls = 0
    out = TeacherEmbedder(FakeTeacher())(rows)
    assert [len(r[TEACHER_EMB_COLUMN]) for r in out] == [1, 2, 1]
    assert FakeTeacher.calls == 2  # the same image with other boxes is a different entry


@pytest.fixture(scope="module")
def parent(tiny_catalog: Catalog):
    manifest = tiny_catalog.manifest("synthworld")
    split = manifest.class_split("split1")
    by_name = manifest.category_by_name()
    config = preset("cpu-small")
    torch.manual_seed(0)
    model = build_detector(config, num_classes=len(split.base) + 1)
    return to_checkpoint(model, _ckpt(config, list(split.base), [by_name[c].id for c in split.base]))


def _ckpt(config, classes, ids):
    from fewshot.model.checkpoint import DetectorCheckpoint

    return DetectorCheckpoint(config=config, classes=classes, category_ids=ids, dataset="synthworld",
                              class_set="test", state_dict={})


def test_an_episode_in_process_trains_the_box_head_and_scores(tiny_catalog, parent):
    novel = list(tiny_catalog.manifest("synthworld").class_split("split1").novel[:2])
    ep = sample_episode(tiny_catalog, parent, novel, shots=1, seed=3)
    again = sample_episode(tiny_catalog, parent, novel, shots=1, seed=3)
    assert [r["image_id"] for r in ep.rows] == [r["image_id"] for r in again.rows]
    assert ep.child_classes == list(parent.classes) + novel
    start = expand_parent(ep)
    assert start.state_dict["roi_heads.box_predictor.cls_score.weight_new"].shape[0] == 2
    cfg = TrainConfig(steps=3, batch_size=2, lr=1e-3, warmup_steps=1, log_every=1)
    logged = []
    child = fine_tune_episode(ep, cfg, MethodConfig(freeze="backbone", balancer="gradnorm",
                                                    distill_beta=1.0, teacher_dim=E),
                              start=start, teacher=FakeTeacher(), on_log=lambda s, m: logged.append(m))
    assert len(logged) == 3 and all(LOSS_KEY in m and "w_cls" in m for m in logged)
    key = "roi_heads.box_head.fc7.weight"
    assert not torch.equal(child.state_dict[key], start.state_dict[key])
    frozen = "backbone.body.0.0.weight"
    assert torch.equal(child.state_dict[frozen], start.state_dict[frozen])
    split = load_eval_split(tiny_catalog, "synthworld", "test", list(parent.classes), novel, max_images=6)
    report = score(child, split)
    assert report.num_images == 6 and not math.isnan(report.bAP50)
    with pytest.raises(ValueError, match="teacher"):
        fine_tune_episode(ep, cfg, MethodConfig(distill_beta=1.0, teacher_dim=E), start=start)
    with pytest.raises(ValueError, match="already"):
        sample_episode(tiny_catalog, parent, [parent.classes[0]], shots=1, seed=0)


def test_mean_ci95_matches_the_t_interval():
    ci = mean_ci95([1.0, 2.0, 3.0])
    assert ci.mean == pytest.approx(2.0)
    assert ci.half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert ci.format() == "200.0 ± 248.4"
    one = mean_ci95([0.5, float("nan")])
    assert one.n == 1 and math.isnan(one.half_width) and one.format() == "50.0"
    assert mean_ci95([0.1, 0.2]).overlaps(mean_ci95([0.15, 0.3]))
    assert not mean_ci95([0.1, 0.1001, 0.0999]).overlaps(mean_ci95([0.5, 0.5001, 0.4999]))
