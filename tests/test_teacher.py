"""The CLIP teacher: captioned corpus, specs, the embedded OpenCLIP model, training, zero-shot."""
import copy

import numpy as np
import pytest
import torch

from catalog.captions import (
    captioned_corpus, class_coverage, iter_captioned, object_caption, scene_caption,
)
from catalog.crops import crop_box
from catalog.shapes import CLASS_NAMES
from fewshot.clip.teacher import (
    EMBEDDED_MODEL_CFG, EMBEDDED_MODEL_NAME, Teacher, create_embedded_model, load_teacher,
    parse_teacher_spec, save_embedded_teacher,
)
from fewshot.clip.pretraining import (
    build_corpus_pool, train_embedded_teacher, zero_shot_accuracy, zero_shot_report,
)

# a very small architecture for the tests that train (same open_clip config mechanism)
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


# ---- the captioned corpus -----------------------------------------------------------------

def test_corpus_is_deterministic_and_covers_every_class():
    a = captioned_corpus(400, seed=3)
    b = captioned_corpus(400, seed=3)
    assert [p.caption for p in a] == [p.caption for p in b]
    assert all(np.array_equal(p.image, q.image) for p, q in zip(a, b))
    assert [p.caption for p in captioned_corpus(50, seed=4)] != [p.caption for p in a[:50]]
    whole = [p.caption for p in iter_captioned(3, n_scenes=8)]
    parts = [p.caption for p in iter_captioned(3, n_scenes=4)] + \
        [p.caption for p in iter_captioned(3, n_scenes=4, start=4)]
    assert whole == parts  # scenes are independent: any range can be rendered on its own
    coverage = class_coverage(a)
    assert set(coverage) == set(CLASS_NAMES) and min(coverage.values()) > 0
    kinds = {p.kind for p in a}
    assert kinds == {"object", "scene"}
    for p in a:
        assert p.image.shape == (64, 64, 3) and p.image.dtype == np.uint8
        if p.kind == "object":
            words = p.caption.replace(".", "").split()
            assert p.category in words or any(w in p.caption for w in ("star", "letter", "half",
                                                                      "donut", "moon", "plus", "cog"))


def test_captions_read_naturally():
    rng = np.random.default_rng(0)
    caps = {object_caption("arrow", rng, colour="orange", texture="stripes", size="small")
            for _ in range(60)}
    assert any(c.startswith("an orange") or "an arrow" in c or "an orange" in c for c in caps)
    assert not any("  " in c or " ." in c for c in caps)
    assert scene_caption(["triangle", "star5", "triangle"], np.random.default_rng(1),
                         templates=("{list}.",)) in ("two triangles and a star5.", "a star5 and two triangles.")


def test_crop_box_pads_at_the_border_and_keeps_the_object_centred():
    img = np.zeros((50, 50, 3), np.uint8)
    img[0:10, 0:10] = 255  # a white box in the corner
    crop = crop_box(img, [0, 0, 10, 10], size=20, context=0.25)
    assert crop.shape == (20, 20, 3)
    assert crop[10, 10].min() == 255  # centre of the crop is the object
    assert crop[0, 0].min() == 255    # border pixels repeated, not black
    assert crop[19, 19].max() == 0


# ---- specs and the embedded OpenCLIP model -------------------------------------------------

def test_parse_teacher_spec():
    assert parse_teacher_spec("embedded:/x/t.pt").kind == "embedded"
    p = parse_teacher_spec("ViT-B-32:laion2b_s34b_b79k")
    assert (p.kind, p.model_name, p.source) == ("pretrained", "ViT-B-32", "laion2b_s34b_b79k")
    p = parse_teacher_spec("ViT-B-32@/w/b32.pt")
    assert (p.kind, p.model_name, p.source) == ("file", "ViT-B-32", "/w/b32.pt")
    assert parse_teacher_spec("hf-hub:org/repo").kind == "schema"
    for bad in ("", "ViT-B-32", "embedded:", "ViT-B-32@"):
        with pytest.raises(ValueError):
            parse_teacher_spec(bad)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    model, name = create_embedded_model()
    return Teacher.from_model(model, name, spec="test")


def test_embedded_config_is_created_through_open_clip(teacher):
    import open_clip

    assert isinstance(teacher.model, open_clip.CLIP)
    assert EMBEDDED_MODEL_NAME in open_clip.list_models()
    assert open_clip.get_model_config(EMBEDDED_MODEL_NAME) == EMBEDDED_MODEL_CFG
    assert teacher.image_size == 64 and teacher.embed_dim == 128
    n_params = sum(p.numel() for p in teacher.model.visual.parameters())
    assert n_params < 2_000_000  # small enough to train on a CPU
    # a different config under the same name gets its own name, never a silent mismatch
    other = copy.deepcopy(EMBEDDED_MODEL_CFG)
    other["embed_dim"] = 64
    _, name2 = create_embedded_model(other)
    assert name2 != EMBEDDED_MODEL_NAME and open_clip.get_model_config(name2)["embed_dim"] == 64


def test_embeddings_are_normalised_with_the_right_shapes(teacher):
    pairs = captioned_corpus(6, seed=0)
    img = teacher.embed_images([p.image for p in pairs[:4]] + [pairs[4].pil()])
    assert img.shape == (5, 128)
    assert torch.allclose(img.norm(dim=1), torch.ones(5), atol=1e-5)
    txt = teacher.embed_texts(["a gear.", "a red circle."])
    assert txt.shape == (2, 128) and torch.allclose(txt.norm(dim=1), torch.ones(2), atol=1e-5)
    cls = teacher.class_prompt_embeddings(["gear", "circle", "star5"])
    assert cls.shape == (3, 128) and torch.allclose(cls.norm(dim=1), torch.ones(3), atol=1e-5)
    scene = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    boxes = torch.tensor([[10.0, 10, 40, 30], [100, 80, 160, 120], [0, 0, 2, 2]])
    emb = teacher.embed_boxes(scene, boxes)
    assert emb.shape == (3, 128) and torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    assert teacher.embed_boxes(scene, torch.zeros(0, 4)).shape == (0, 128)
    as_tensor = teacher.embed_boxes(torch.from_numpy(scene).permute(2, 0, 1).float() / 255, boxes[:1])
    assert torch.allclose(as_tensor, emb[:1], atol=1e-4)
    many = teacher.embed_boxes_many([scene, scene], [boxes[:2], boxes[2:]])
    assert [m.shape[0] for m in many] == [2, 1] and torch.allclose(many[1], emb[2:], atol=1e-5)


def test_save_and_load_embedded_checkpoint(teacher, tmp_path):
    path = save_embedded_teacher(tmp_path / "t" / "teacher.pt", teacher.model,
                                 model_name=teacher.model_name, info={"note": "x"})
    assert [p.name for p in path.parent.iterdir()] == ["teacher.pt"]  # no temp file left
    loaded = load_teacher(f"embedded:{path}")
    assert loaded.id == teacher.id and loaded.id.startswith("embedded-")
    assert loaded.spec == f"embedded:{path.resolve()}" and loaded.info == {"note": "x"}
    crops = [p.image for p in captioned_corpus(3, seed=1)]
    assert torch.allclose(loaded.embed_images(crops), teacher.embed_images(crops), atol=1e-5)
    # open_clip's own "<arch> + pretrained file" path, with the registered architecture
    weights = tmp_path / "weights.pt"
    torch.save(teacher.model.state_dict(), weights)
    by_file = load_teacher(f"{teacher.model_name}@{weights}")
    assert torch.allclose(by_file.embed_images(crops), teacher.embed_images(crops), atol=1e-5)
    with pytest.raises(FileNotFoundError):
        load_teacher(f"embedded:{tmp_path / 'missing.pt'}")


# ---- training and zero-shot ----------------------------------------------------------------

def test_few_contrastive_steps_lower_the_loss():
    pool = build_corpus_pool(48, seed=0, crop_size=32)
    teacher, metrics = train_embedded_teacher(
        steps=40, batch_size=24, seed=0, corpus=pool, model_cfg=TINY_CFG,
        model_name="fewshot-test-tiny", lr=3e-3, threads=1, augment=False)
    losses = metrics["losses"]
    assert len(losses) == 40 and all(np.isfinite(losses))
    # ln(24) = 3.18 is chance; 40 steps over 48 fixed pairs must get well below it
    assert metrics["loss_start"] > 2.5
    assert metrics["loss_end"] < metrics["loss_start"] - 1.0, (metrics["loss_start"], metrics["loss_end"])
    assert teacher.embed_images([pool.images[0].permute(1, 2, 0).numpy()]).shape == (1, 32)


class _ColourTeacher:
    """Embeds an image as its normalised mean colour; classes are the one-hot colours."""

    def class_prompt_embeddings(self, names, templates=None):
        return torch.eye(3)[[("red", "green", "blue").index(n) for n in names]]

    def embed_images(self, images):
        means = torch.tensor(np.stack([np.asarray(i, np.float32).mean((0, 1)) for i in images]))
        return torch.nn.functional.normalize(means, dim=1)


def test_zero_shot_accuracy_on_a_toy_case():
    def solid(rgb):
        return np.broadcast_to(np.asarray(rgb, np.uint8), (8, 8, 3)).copy()

    crops = [solid((200, 10, 10)), solid((10, 200, 10)), solid((10, 10, 200)), solid((220, 0, 0))]
    names = ["red", "green", "blue"]
    t = _ColourTeacher()
    assert zero_shot_accuracy(t, crops, ["red", "green", "blue", "red"], names) == 1.0
    assert zero_shot_accuracy(t, crops, [0, 1, 2, 1], names) == 0.75
    assert zero_shot_accuracy(t, crops[:2], ["green", "red"], names) == 0.0
    assert np.isnan(zero_shot_accuracy(t, [], [], names))
    report = zero_shot_report(t, crops, ["red", "green", "blue", "red"], names,
                              subsets={"no_red": ["green", "blue"]})
    assert report["all"] == 1.0 and report["no_red"] == 1.0 and report["no_red_gzsl"] == 1.0
    assert report["count_no_red"] == 2


def test_refiner_loads_its_teacher_from_the_stored_spec(teacher, tmp_path):
    from fewshot.clip.refinement import Refiner

    path = save_embedded_teacher(tmp_path / "teacher.pt", teacher.model, model_name=teacher.model_name)
    ref = Refiner.build(load_teacher(f"embedded:{path}"), ["circle", "gear", "star5"], fusion_weight=0.5)
    assert 0 < ref.temperature < 1
    scene = captioned_corpus(1, seed=5, crop_size=96)[0].image
    dets = [{"box": [10.0, 10.0, 60.0, 50.0], "label": "gear", "score": 0.8},
            {"box": [40.0, 30.0, 90.0, 90.0], "label": "circle", "score": 0.4}]
    expected = ref.refine(scene, dets)
    again = Refiner.from_extra(ref.to_extra())  # no teacher given: loaded lazily from the spec
    assert again._teacher is None
    got = again.refine(scene, dets)
    assert again._teacher is not None and again.teacher.id == teacher.id
    assert [d["score"] for d in got] == [d["score"] for d in expected]
    probs = again.clip_probs(scene, [d["box"] for d in dets])
    assert probs.shape == (2, 3) and torch.allclose(probs.sum(1), torch.ones(2), atol=1e-5)


def _job():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "pretrain_teacher", Path(__file__).resolve().parents[1] / "jobs" / "pretrain_teacher.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


def test_pretrain_job_runs_end_to_end_without_mlflow(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    job = _job()
    out = tmp_path / "teacher.pt"
    rc = job.main(["--catalog", str(tmp_path / "empty-catalog"), "--steps", "2", "--batch-size", "8",
                   "--corpus-pairs", "16", "--eval-images", "6", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0 and out.is_file()
    for split in ("split1", "split2", "split3"):
        assert f"{split} novel" in printed
    assert "not registered" in printed and f"embedded:{out}" in printed
    loaded = load_teacher(f"embedded:{out}")
    assert loaded.info["steps"] == 2 and "zs_top1_split1_novel" in loaded.info
    with pytest.raises(SystemExit):
        job.main(["--help"])


def test_pretrain_job_registers_the_teacher(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    job = _job()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ckpt = tmp_path / "embedded-teacher.pt"
    ckpt.write_bytes(b"weights")
    spec = f"embedded:{ckpt}"
    for _ in range(2):
        version = job.register_teacher(uri, "teachers", job.DEFAULT_REGISTERED_NAME, ckpt, spec,
                                       "embedded-abc", {"steps": 1},
                                       {"zs_top1_all": 0.5, "nan": float("nan")}, [2.0, 1.0])
    assert version == "2"
    mv = MlflowClient(uri, uri).get_model_version_by_alias(job.DEFAULT_REGISTERED_NAME, "champion")
    assert str(mv.version) == "2" and mv.tags["teacher_spec"] == spec and mv.tags["zs_top1_all"] == "0.5000"
    local = job.download_registered_teacher(uri, dst=str(tmp_path / "dl"))
    assert local.startswith("embedded:") and open(local[len("embedded:"):], "rb").read() == b"weights"
