"""CLIP knowledge distillation: the loss, where its gradient goes, and the detector hook."""
import pytest
import torch
import torch.nn.functional as F

from fewshot.model.presets import preset
from fewshot.model.checkpoint import strip_training_heads
from fewshot.model.detector import RoIBatch, build_detector
from fewshot.clip.distillation import (
    HEAD_ATTR, LOSS_KEY, DistillationHead, attach_distillation, detach_distillation,
    distillation_loss, roi_feature_dim, teacher_targets,
)

D, E = 6, 6


def _batch(features, labels, image_index, matched, targets) -> RoIBatch:
    R = features.shape[0]
    return RoIBatch(
        features=features, class_logits=torch.zeros(R, 3), box_regression=torch.zeros(R, 12),
        labels=torch.tensor(labels), regression_targets=torch.zeros(R, 4),
        proposals=torch.zeros(R, 4), image_index=torch.tensor(image_index),
        matched_idxs=torch.tensor(matched), targets=targets,
    )


def _identity_head() -> DistillationHead:
    head = DistillationHead(D, E)
    with torch.no_grad():
        head.proj.weight.copy_(torch.eye(D))
        head.proj.bias.zero_()
    return head


def _targets(emb0, emb1):
    return [
        {"boxes": torch.zeros(len(emb0), 4), "labels": torch.ones(len(emb0), dtype=torch.long),
         "teacher_emb": emb0},
        {"boxes": torch.zeros(len(emb1), 4), "labels": torch.ones(len(emb1), dtype=torch.long),
         "teacher_emb": emb1},
    ]


def _setup():
    torch.manual_seed(0)
    feats = torch.randn(6, D, requires_grad=True)
    # RoIs: 0 fg img0 gt1 | 1 bg | 2 fg img1 gt0 | 3 bg | 4 fg img0 gt0 | 5 fg img1 gt1
    labels = [1, 0, 2, 0, 1, 2]
    image_index = [0, 0, 1, 1, 0, 1]
    matched = [1, 0, 0, 0, 0, 1]
    return feats, labels, image_index, matched


def test_zero_when_projection_points_along_teacher_embedding():
    feats, labels, image_index, matched = _setup()
    f = feats.detach()
    # the teacher embedding of each GT box = the (scaled) feature of the RoI matching it
    emb0 = torch.stack([f[4] * 3.0, f[0] * 0.5])
    emb1 = torch.stack([f[2] * 2.0, f[5] * 7.0])
    batch = _batch(feats, labels, image_index, matched, _targets(emb0, emb1))
    loss = distillation_loss(batch, _identity_head(), beta=2.0)[LOSS_KEY]
    assert loss.abs().item() < 1e-6


def test_positive_otherwise_and_scaled_by_beta():
    feats, labels, image_index, matched = _setup()
    emb0, emb1 = torch.randn(2, E), torch.randn(2, E)
    batch = _batch(feats, labels, image_index, matched, _targets(emb0, emb1))
    head = _identity_head()
    l1 = distillation_loss(batch, head, beta=1.0)[LOSS_KEY]
    l3 = distillation_loss(batch, head, beta=3.0)[LOSS_KEY]
    assert l1.item() > 0.05
    assert torch.allclose(l3, 3 * l1)
    # by hand: mean over the 4 foreground RoIs of 1 - cos(feature, matched GT embedding)
    f = feats.detach()
    pairs = [(0, emb0[1]), (2, emb1[0]), (4, emb0[0]), (5, emb1[1])]
    expected = sum(1 - F.cosine_similarity(f[r], t, dim=0) for r, t in pairs) / 4
    assert torch.allclose(l1, expected, atol=1e-6)
    assert distillation_loss(batch, head, kind="l1")[LOSS_KEY].item() > 0


def test_gradient_reaches_only_foreground_features_and_the_head():
    feats, labels, image_index, matched = _setup()
    batch = _batch(feats, labels, image_index, matched, _targets(torch.randn(2, E), torch.randn(2, E)))
    head = DistillationHead(D, E, hidden=8)
    distillation_loss(batch, head, beta=1.0)[LOSS_KEY].backward()
    grad_norm = feats.grad.norm(dim=1)
    fg = torch.tensor(labels) > 0
    assert (grad_norm[fg] > 0).all()
    assert (grad_norm[~fg] == 0).all()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


@pytest.mark.parametrize("case", ["no_foreground", "no_embeddings", "nan_rows"])
def test_graph_connected_zero(case):
    feats, labels, image_index, matched = _setup()
    targets = _targets(torch.randn(2, E), torch.randn(2, E))
    if case == "no_foreground":
        labels = [0] * 6
    elif case == "no_embeddings":
        for t in targets:
            del t["teacher_emb"]
    else:  # the cache had no embedding for any box
        for t in targets:
            t["teacher_emb"] = torch.full((2, E), float("nan"))
    batch = _batch(feats, labels, image_index, matched, targets)
    head = DistillationHead(D, E)
    loss = distillation_loss(batch, head, beta=1.0)[LOSS_KEY]
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert feats.grad is not None and feats.grad.abs().sum() == 0
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in head.parameters())


def test_images_without_embeddings_are_skipped():
    feats, labels, image_index, matched = _setup()
    targets = _targets(torch.randn(2, E), torch.randn(2, E))
    del targets[1]["teacher_emb"]
    rows, emb = teacher_targets(_batch(feats, labels, image_index, matched, targets))
    assert rows.tolist() == [0, 4]
    assert torch.allclose(emb, F.normalize(targets[0]["teacher_emb"][[1, 0]], dim=1))


def test_attach_to_detector_trains_and_checkpoints_the_head():
    cfg = preset("cpu-small", min_size=96, max_size=96)
    model = build_detector(cfg, num_classes=3)
    head = DistillationHead(roi_feature_dim(model), 16)
    attach_distillation(model, head, beta=0.5)
    assert getattr(model.roi_heads, HEAD_ATTR) is head
    assert any(p is head.proj.weight for p in model.parameters())
    keys = [k for k in model.state_dict() if f"{HEAD_ATTR}." in k]
    assert keys and not [k for k in strip_training_heads(model.state_dict()) if f"{HEAD_ATTR}." in k]

    torch.manual_seed(0)
    images = [torch.rand(3, 96, 96) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0], [55.0, 50.0, 90.0, 92.0]]),
                "labels": torch.tensor([1, 2]), "teacher_emb": F.normalize(torch.randn(2, 16), dim=1)}
               for _ in range(2)]
    model.train()
    losses = model(images, targets)
    assert LOSS_KEY in losses and losses[LOSS_KEY].item() > 0
    sum(losses.values()).backward()
    assert head.proj.weight.grad is not None and head.proj.weight.grad.abs().sum() > 0

    # re-attaching replaces (does not stack); detaching restores the plain detector
    attach_distillation(model, head, beta=0.5)
    assert model.roi_heads.extra_losses.previous is None
    assert detach_distillation(model) is head
    assert model.roi_heads.extra_losses is None and not hasattr(model.roi_heads, HEAD_ATTR)


# ---- the teacher-embedding cache the distillation targets come from -------------------------

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from catalog import Catalog  # noqa: E402
from catalog.synthetic import generate_row  # noqa: E402
from catalog.teacher_cache import (  # noqa: E402
    TeacherCacheError, build_teacher_cache, cache_info, cache_path, load_teacher_cache,
)
from catalog.world import world_manifest  # noqa: E402


def _box_embedder(image_bytes, boxes):
    """A deterministic stand-in teacher: embedding = (box, area, 1)."""
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    assert isinstance(image_bytes, bytes)
    return np.concatenate([b, area[:, None], np.ones((len(b), 1), np.float32)], axis=1)


@pytest.fixture()
def small_catalog(tmp_path):
    catalog = Catalog(tmp_path / "cat")
    rows = [generate_row(0, "train", i, image_id=i + 1) for i in range(7)]
    empty = dict(rows[0], image_id=99, boxes=[], category_ids=[], iscrowd=[])
    catalog.write_dataset(world_manifest("tiny"), {"train": rows + [empty], "val": rows[:2]})
    return catalog, rows + [empty]


def test_cache_round_trip_is_aligned_with_boxes(small_catalog):
    catalog, rows = small_catalog
    path = build_teacher_cache(catalog, "tiny", "train", _box_embedder, teacher_id="box-v1",
                               images_per_batch=3)
    assert path == cache_path(catalog, "tiny", "train", "box-v1")
    assert path == catalog.dataset_dir("tiny") / "teacher" / "box-v1" / "train.parquet"
    assert [p.name for p in path.parent.iterdir()] == ["train.parquet"]  # no temp file left
    assert cache_info(catalog, "tiny", "train", "box-v1")["dim"] == 6
    cache = load_teacher_cache(catalog, "tiny", "train", "box-v1")
    assert set(cache) == {r["image_id"] for r in rows}
    for r in rows:
        emb = cache[r["image_id"]]
        assert emb.dtype == np.float32 and emb.shape == (len(r["boxes"]), 6)
        if r["boxes"]:
            assert np.allclose(emb[:, :4], np.asarray(r["boxes"], np.float32))
    assert pq.read_schema(path).names == ["image_id", "embeddings"]


def test_failed_build_leaves_the_old_cache_untouched(small_catalog):
    catalog, rows = small_catalog
    path = build_teacher_cache(catalog, "tiny", "train", _box_embedder, teacher_id="box-v1")
    before = path.read_bytes()
    calls = {"n": 0}

    def flaky(image_bytes, boxes):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("teacher crashed")
        return _box_embedder(image_bytes, boxes) * 2

    with pytest.raises(RuntimeError):
        build_teacher_cache(catalog, "tiny", "train", flaky, teacher_id="box-v1", images_per_batch=2)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["train.parquet"]
    with pytest.raises(RuntimeError):  # a fresh id: nothing is published at all
        calls["n"] = 0
        build_teacher_cache(catalog, "tiny", "val", flaky, teacher_id="box-v2", images_per_batch=1) if False else \
            build_teacher_cache(catalog, "tiny", "train", flaky, teacher_id="box-v2", images_per_batch=1)
    assert not cache_path(catalog, "tiny", "train", "box-v2").exists()


def test_cache_checks_ids_shapes_and_staleness(small_catalog, tmp_path):
    catalog, rows = small_catalog
    with pytest.raises(TeacherCacheError):
        build_teacher_cache(catalog, "tiny", "train", _box_embedder, teacher_id="../evil")
    with pytest.raises(TeacherCacheError):
        build_teacher_cache(catalog, "tiny", "train", _box_embedder)  # callable needs an id
    with pytest.raises(TeacherCacheError):  # one embedding short
        build_teacher_cache(catalog, "tiny", "train", lambda im, b: _box_embedder(im, b)[1:],
                            teacher_id="short")
    with pytest.raises(FileNotFoundError):
        load_teacher_cache(catalog, "tiny", "train", "never-built")
    # the dataset changes under the cache (a box removed from one image): loading refuses
    path = build_teacher_cache(catalog, "tiny", "val", _box_embedder, teacher_id="box-v1")
    saved = tmp_path / "saved.parquet"
    saved.write_bytes(path.read_bytes())
    changed = [dict(rows[0], boxes=rows[0]["boxes"][1:], category_ids=rows[0]["category_ids"][1:],
                    iscrowd=rows[0]["iscrowd"][1:]), rows[1]]
    catalog.write_dataset(world_manifest("tiny"), {"train": rows, "val": changed}, overwrite=True)
    assert not path.exists()  # rebuilding the dataset drops its caches
    path.parent.mkdir(parents=True)
    path.write_bytes(saved.read_bytes())
    with pytest.raises(TeacherCacheError):
        load_teacher_cache(catalog, "tiny", "val", "box-v1")
    assert len(load_teacher_cache(catalog, "tiny", "val", "box-v1", verify=False)) == 2


def test_cache_uses_a_teacher_object_and_its_batched_call(small_catalog):
    catalog, rows = small_catalog

    class T:
        id = "obj-teacher"
        batches = 0

        def embed_boxes(self, image, boxes):
            raise AssertionError("embed_boxes_many should be used")

        def embed_boxes_many(self, images, boxes):
            T.batches += 1
            return [torch.as_tensor(_box_embedder(i, b)) if len(b) else torch.zeros(0, 6)
                    for i, b in zip(images, boxes)]

    build_teacher_cache(catalog, "tiny", "train", T(), images_per_batch=4)
    assert T.batches == 2
    cache = load_teacher_cache(catalog, "tiny", "train", "obj-teacher")
    assert np.allclose(cache[1][:, :4], np.asarray(rows[0]["boxes"], np.float32))


def test_join_puts_embeddings_next_to_the_rows(small_catalog):
    from catalog.teacher_cache import join_teacher_embeddings

    catalog, rows = small_catalog
    build_teacher_cache(catalog, "tiny", "train", _box_embedder, teacher_id="box-v1")
    table = catalog.read_split("tiny", "train").take([3, 0, 7])
    joined = join_teacher_embeddings(table, catalog, "tiny", "train", "box-v1")
    assert joined.column_names[-1] == "teacher_emb" and joined.num_rows == 3
    for row in joined.to_pylist():
        assert len(row["teacher_emb"]) == len(row["boxes"])
        if not row["boxes"]:
            continue
        emb = np.asarray(row["teacher_emb"], np.float32)
        assert np.allclose(emb[:, :4], np.asarray(row["boxes"], np.float32).reshape(-1, 4))
