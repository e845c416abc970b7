"""The frozen-trunk cache: the same detections and the same training losses and gradients as
the plain model, the real modules run once per image, and it refuses what it cannot serve."""
import pytest
import torch

from fewshot.learning.freezing import apply_freezing
from fewshot.metrics.coco_eval import load_eval_split, predict_rows
from fewshot.model.batches import class_index, rows_to_batch
from fewshot.model.checkpoint import load_checkpoint
from fewshot.model.trunk_cache import TrunkCache, cached_trunk
from services import untrained_base_checkpoint


@pytest.fixture(scope="module")
def parent(tiny_catalog, tmp_path_factory):
    return load_checkpoint(untrained_base_checkpoint(tiny_catalog, tmp_path_factory.mktemp("tc") / "d.pt"))


@pytest.fixture(scope="module")
def split(tiny_catalog, parent):
    return load_eval_split(tiny_catalog, "synthworld", "test", parent.classes, (), 6)


def _model(parent):
    model = parent.build_model()
    model.roi_heads.score_thresh = 0.0  # an untrained head: keep every detection to compare
    return model


def test_detections_match_the_plain_model_and_the_trunk_runs_once_per_image(parent, split):
    plain = predict_rows(_model(parent), split.rows, parent.category_ids, batch_size=4)
    assert len(plain) > 20
    cache = TrunkCache()
    first = predict_rows(_model(parent), split.rows, parent.category_ids, batch_size=4, trunk_cache=cache)
    assert (cache.misses, cache.hits, len(cache)) == (6, 0, 6)
    # another model with the same trunk (a differently trained head) reads it from the cache
    other = _model(parent)
    with torch.no_grad():
        other.roi_heads.box_head.fc7.weight.mul_(0.5)
    second = predict_rows(other, split.rows, parent.category_ids, batch_size=3, trunk_cache=cache)
    assert (cache.misses, cache.hits) == (6, 6)
    assert second != first  # the head is not cached: its change shows
    for got in (first, predict_rows(_model(parent), split.rows, parent.category_ids, trunk_cache=cache)):
        assert len(got) == len(plain)
        for a, b in zip(got, plain):
            assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
            assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-3)
            assert a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_training_losses_and_gradients_match_the_plain_model(parent, tiny_catalog):
    table = tiny_catalog.read_split("synthworld", "train").slice(0, 4).to_pylist()
    images, targets = rows_to_batch(table, class_index(parent.category_ids))

    def step(cache):
        torch.manual_seed(0)
        model = parent.build_model()
        apply_freezing(model, "backbone")
        # take every proposal, so RoI sampling draws the same set whatever the random stream
        model.roi_heads.fg_bg_sampler.batch_size_per_image = 100_000
        model.train()
        with cached_trunk(model, cache):
            assert set(model.state_dict()) == set(parent.state_dict)  # a save inside is a plain one
            losses = model(images, targets)
            if cache is not None:  # the second pass reads features and proposals from the cache
                assert cache.misses == 4 and cache.hits == 0
                losses = model(images, targets)
                assert cache.hits == 4
        sum(losses.values()).backward()
        grads = {n: p.grad.clone() for n, p in model.roi_heads.named_parameters() if p.grad is not None}
        assert "forward" not in vars(model.backbone) and "forward" not in vars(model.rpn)  # restored
        return losses, grads

    plain_losses, plain_grads = step(None)
    cached_losses, cached_grads = step(TrunkCache())
    assert set(cached_losses) == {"loss_classifier", "loss_box_reg"}  # the frozen RPN's losses are constants
    for k in cached_losses:
        assert float(cached_losses[k].detach()) == pytest.approx(float(plain_losses[k].detach()), rel=1e-5, abs=1e-6)
    assert set(cached_grads) == set(plain_grads) and plain_grads
    for n in plain_grads:
        torch.testing.assert_close(cached_grads[n], plain_grads[n], rtol=1e-4, atol=1e-6)


def test_refuses_a_trunk_that_trains_or_another_models_trunk(parent):
    model = parent.build_model()
    apply_freezing(model, "none")
    with pytest.raises(ValueError, match="frozen backbone and RPN"):
        with cached_trunk(model, TrunkCache()):
            pass
    apply_freezing(model, "rpn")
    with pytest.raises(ValueError, match="rpn.head"):
        with cached_trunk(model, TrunkCache()):
            pass
    cache = TrunkCache()
    frozen = parent.build_model()
    apply_freezing(frozen, "head")
    with cached_trunk(frozen, cache):
        pass
    with torch.no_grad():
        frozen.backbone.body[0][0].weight.add_(0.01)
    with pytest.raises(ValueError, match="another model's features"):
        with cached_trunk(frozen, cache, for_training=False):
            pass


def test_the_policies_it_serves_are_the_ones_that_freeze_the_trunk(parent):
    from fewshot.learning.freezing import POLICIES
    from fewshot.model.trunk_cache import FROZEN_TRUNK_POLICIES, trainable_trunk_parameters, use_trunk_cache

    for policy in POLICIES:
        model = parent.build_model()
        apply_freezing(model, policy)
        assert (not trainable_trunk_parameters(model)) == (policy in FROZEN_TRUNK_POLICIES), policy
    assert use_trunk_cache("head", "cpu") and not use_trunk_cache("rpn", "cpu")
    assert not use_trunk_cache("head", "cuda")


def test_a_full_cache_computes_new_images_without_keeping_them(parent, split):
    plain = predict_rows(_model(parent), split.rows, parent.category_ids, batch_size=3)
    one_image = sum(f.numel() * f.element_size() for f in parent.build_model().eval().backbone(
        torch.zeros(1, 3, 160, 160)).values())
    cache = TrunkCache(max_bytes=int(2.5 * one_image))
    got = predict_rows(_model(parent), split.rows, parent.category_ids, batch_size=3, trunk_cache=cache)
    assert len(cache.features) == 2 and len(cache.proposals) == 2 and cache.bytes <= cache.max_bytes
    assert [(r["image_id"], r["category_id"]) for r in got] == [(r["image_id"], r["category_id"]) for r in plain]
    assert [r["score"] for r in got] == pytest.approx([r["score"] for r in plain], abs=1e-5)


def test_a_warm_cache_trains_the_same_model_as_a_cold_one(parent, tiny_catalog):
    from fewshot.learning.loop import TrainConfig
    from fewshot.learning.method import MethodConfig, finetune

    rows = tiny_catalog.read_split("synthworld", "train").slice(0, 6).to_pylist()
    cfg = TrainConfig(steps=4, batch_size=3, lr=1e-3, warmup_steps=1, log_every=4)
    method = MethodConfig(freeze="backbone")
    cache = TrunkCache()
    cold = finetune(parent, rows, cfg, method, seed=3, device="cpu", trunk_cache=cache)
    filled = len(cache)
    warm = finetune(parent, rows, cfg, method, seed=3, device="cpu", trunk_cache=cache)
    assert filled > 0 and len(cache) == filled and cache.hits >= 4 * 3
    start = parent.build_model().roi_heads.box_head.fc6.weight
    assert not torch.equal(cold.roi_heads.box_head.fc6.weight, start)  # it trained
    for (name, a), b in zip(cold.roi_heads.named_parameters(), warm.roi_heads.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def test_refuses_a_trunk_with_batch_norm_in_training_mode(parent):
    model = parent.build_model()
    apply_freezing(model, "backbone")
    model.backbone.extra_bn = torch.nn.BatchNorm2d(4).requires_grad_(False)  # its statistics still move
    model.train()
    with pytest.raises(ValueError, match="batch norm in training mode"):
        with cached_trunk(model, TrunkCache()):
            pass
    model.eval()
    with cached_trunk(model, TrunkCache()):
        pass
