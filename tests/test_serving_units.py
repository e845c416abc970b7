"""Serving's math without a cluster: bounded decoding, batched crops, per-item isolation,
the pyfunc flavour (legacy versions included) and the serve configs."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot.clip.answering import Answerer, Item
from fewshot.clip.batch_crops import crop_boxes
from fewshot.model.checkpoint import save_checkpoint
from fewshot.model.presets import preset
from fewshot.model.detector import build_detector
from fewshot.model.image_input import DecodedImage, ImageError, decode_image
from fewshot.model.inference import Detector
from imagegen import encode, scene

ROOT = Path(__file__).resolve().parents[1]
MODEL_SIZE = (160, 256)  # cpu-small




def png_header_bomb(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels (the data is a few bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> Detector:
    cfg = preset("cpu-small")
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "detector.pt", build_detector(cfg, 4), cfg,
                           ["circle", "square", "triangle"], [1, 2, 3], "synthworld", "cs-units")
    return Detector.from_file(path)


# ---- decoding ------------------------------------------------------------------------------

def test_decode_refuses_each_kind_of_bad_upload():
    good = encode(scene())
    cases = {
        "empty": b"",
        "too_large": good + b"\0" * 2048,
        "not_an_image": b"{\"image\": 1}",
        "corrupt": good[: len(good) // 2],
        "too_many_pixels": png_header_bomb(20000, 20000),
        "bad_shape": encode(Image.new("RGB", (4000, 20))),
    }
    for kind, data in cases.items():
        with pytest.raises(ImageError) as err:
            decode_image(data, max_bytes=len(good) + 1024, max_pixels=4_000_000, model_size=MODEL_SIZE)
        assert err.value.kind == kind, (kind, err.value.message)
    # PIL's own bomb limit is not the only guard: a header past max_pixels is refused unread
    with pytest.raises(ImageError) as err:
        decode_image(png_header_bomb(3000, 3000), max_pixels=1_000_000)
    assert err.value.kind == "too_many_pixels"


def test_decode_drafts_large_jpegs_and_maps_boxes_back():
    big = scene(2400, 1800)
    out = decode_image(encode(big, "JPEG", quality=90), max_pixels=1_000_000, model_size=MODEL_SIZE)
    # 4.3 MP refused by max_pixels if decoded whole; the DCT draft (1/8 per side) fits
    assert (out.width, out.height) == (2400, 1800)
    assert out.image.size == (300, 225) and out.scale == (8.0, 8.0)
    # PNG: decoded whole, then reduced to no smaller than the model input (213 x 160)
    out = decode_image(encode(big.resize((1200, 900))), model_size=MODEL_SIZE)
    assert out.image.size == (240, 180) and out.scale == (5.0, 5.0)
    small = decode_image(encode(scene()), model_size=MODEL_SIZE)
    assert small.image.size == (160, 120) and small.scale == (1.0, 1.0)


def test_decode_applies_exif_orientation_inside_the_error_handling():
    img = scene(200, 100)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: the upload is seen as 100 x 200
    out = decode_image(encode(img, "JPEG", exif=exif.tobytes()), model_size=MODEL_SIZE)
    assert (out.width, out.height) == (100, 200) and out.image.size == (100, 200)
    # a 16-bit greyscale PNG converts; an odd mode does not crash the caller
    out = decode_image(encode(Image.fromarray(np.full((50, 60), 40000, np.uint16))))
    assert out.image.mode == "RGB"


# ---- batched crops --------------------------------------------------------------------------

def test_batched_crops_match_the_teachers_crops():
    from catalog.captions import crop_box

    rng = np.random.default_rng(0)
    # a smooth image (crops of noise differ by resampling details, not by geometry)
    yy, xx = np.mgrid[0:120, 0:160]
    arr = np.stack([xx * 1.5, yy * 2.0, (xx + yy)], axis=2).clip(0, 255).astype(np.uint8)
    boxes = [[10, 10, 50, 40], [0, 0, 30, 100], [140, 100, 160, 120], [70, 50, 72, 52]]
    ref = np.stack([crop_box(arr, b, size=64, context=0.2) for b in boxes]).astype(np.float32)
    t = torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0
    got = crop_boxes([t, t], [torch.tensor(boxes, dtype=torch.float32), torch.zeros((0, 4))], 64, context=0.2)
    assert got.shape == (4, 3, 64, 64)
    got = got.permute(0, 2, 3, 1).numpy() * 255.0
    assert np.abs(got - ref).mean() < 3.0, np.abs(got - ref).mean()  # of 255
    del rng


def test_batched_crops_do_not_alias_when_they_shrink():
    """A 2-px checkerboard cut from a 400 px square into 64 px: PIL's antialiased resize
    gives near-flat grey; so must the batched crops (point sampling gives a moire, std ~87)."""
    from catalog.captions import crop_box

    yy, xx = np.mgrid[0:400, 0:400]
    arr = (((xx // 2 + yy // 2) % 2) * 255).astype(np.uint8)[..., None].repeat(3, axis=2)
    boxes = [[20, 20, 300, 300], [100, 50, 380, 200]]
    ref = np.stack([crop_box(arr, b, size=64, context=0.2) for b in boxes]).astype(np.float32)
    t = torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0
    got = crop_boxes([t], [torch.tensor(boxes, dtype=torch.float32)], 64, context=0.2)
    got = got.permute(0, 2, 3, 1).numpy() * 255.0
    assert ref.std() < 20.0  # what the teacher was trained on
    assert got.std() < 20.0, got.std()
    assert np.abs(got - ref).mean() < 8.0, np.abs(got - ref).mean()


def test_boxes_on_the_same_square_share_one_crop(tmp_path):
    from fewshot.clip.batch_crops import clip_probs_batched, shared_crops
    from fewshot.clip.refinement import Refiner, clip_class_probs
    from fewshot.clip.teacher import create_embedded_model, load_teacher, save_embedded_teacher

    # 56 px squares cut into 64 px crops: the tolerance is 0.44 image pixels
    boxes = torch.tensor([[10.0, 10, 50, 40], [10.2, 10.1, 50.1, 40.2], [60.0, 60, 100, 100],
                          [10.0, 10, 50, 40], [11.0, 10, 51, 40]])
    keep, owner = shared_crops(boxes, 64, context=0.2)
    assert keep.tolist() == [0, 2, 4] and owner.tolist() == [0, 0, 1, 0, 2]
    keep, owner = shared_crops(boxes, 64, context=0.2, tolerance_px=0.0)
    assert keep.tolist() == [0, 1, 2, 4] and owner.tolist() == [0, 1, 2, 0, 3]

    model, name = create_embedded_model()
    teacher = load_teacher(f"embedded:{save_embedded_teacher(tmp_path / 't.pt', model, model_name=name)}")
    refiner = Refiner.build(teacher, ["a", "b", "c"], fusion_weight=0.5)
    refiner.set_teacher(teacher)
    image = torch.from_numpy(np.asarray(scene(seed=3))).permute(2, 0, 1).float() / 255.0
    got = clip_probs_batched(refiner, [image, image[:, :60, :60]], [boxes, torch.zeros((0, 4))])
    assert got[0].shape == (5, 3) and got[1].shape == (0, 3)
    crops = crop_boxes([image], [boxes], teacher.image_size, context=teacher.box_context).clamp(0, 1)
    exact = clip_class_probs(teacher.encode_pixels((crops - teacher._mean) / teacher._std),
                             refiner.prompt_embeddings, refiner.temperature)
    assert torch.allclose(got[0][[0, 2, 3, 4]], exact[[0, 2, 3, 4]], atol=1e-5)
    assert torch.equal(got[0][1], got[0][0])
    assert (got[0][1] - exact[1]).abs().max() < 0.02  # what sharing changed: under half a crop pixel


# ---- isolation -----------------------------------------------------------------------------

def test_one_failing_item_fails_alone(detector):
    ans = Answerer(detector)
    good = [DecodedImage(scene(seed=s), 160, 120) for s in range(2)]
    # bypassing decode's shape check, this image makes the detector's resize zero-sized
    bad = DecodedImage(Image.new("RGB", (6000, 3)), 6000, 3)
    alone = [ans.answer([Item(g, 0.0, False)])[0] for g in good]
    out = ans.answer([Item(good[0], 0.0, False), Item(bad, 0.0, False), Item(good[1], 0.0, False)])
    assert isinstance(out[1], RuntimeError)
    assert out[0] == alone[0] and out[2] == alone[1]
    assert len(out[0]) > 0  # an untrained detector still answers boxes at threshold 0


def test_refinement_skips_only_the_boxes_that_cannot_reach_the_threshold(detector, tmp_path, monkeypatch):
    """With fusion weight 0.2 and threshold 0.5, a box needs a detector score >= 0.375 to be
    answered whatever CLIP says: only those are cropped and embedded, and the answer is the
    one the unpruned path gives."""
    import fewshot.clip.answering as answering
    from fewshot.clip.refinement import Refiner
    from fewshot.clip.teacher import create_embedded_model, load_teacher, save_embedded_teacher

    model, name = create_embedded_model()
    spec = f"embedded:{save_embedded_teacher(tmp_path / 'teacher.pt', model, model_name=name)}"
    refiner = Refiner.build(load_teacher(spec), list(detector.classes), fusion_weight=0.2)
    refiner.set_teacher(load_teacher(spec))
    ans = Answerer(detector, refiner)
    images = [DecodedImage(scene(seed=s), 160, 120) for s in range(3)]
    # an untrained detector scores its boxes ~0.25-0.5: make the threshold split them
    raw = ans._detect({i: ans._to_tensor(d.image) for i, d in enumerate(images)})
    scores = torch.cat([raw[i]["scores"] for i in raw])
    cut = float(scores.median())
    thr = 0.2 + 0.8 * cut  # reachable iff score >= cut
    embedded = []
    real = answering.clip_probs_batched
    monkeypatch.setattr(answering, "clip_probs_batched",
                        lambda r, ims, bxs: embedded.append(sum(len(b) for b in bxs)) or real(r, ims, bxs))
    items = [Item(d, thr, True) for d in images]
    pruned = ans.answer(items)
    monkeypatch.setattr(Answerer, "_reachable", lambda self, out, threshold: out)
    full = ans.answer(items)
    assert pruned == full and any(pruned)
    assert 0 < embedded[0] < embedded[1] == scores.numel()
    # every reachable box is embedded, and nothing further below than the rounding margin
    assert int((scores >= cut).sum()) <= embedded[0] <= int((scores >= cut - 1e-3).sum())


def test_answers_are_in_upload_pixels(detector):
    ans = Answerer(detector)
    img = scene(1200, 900)
    full = decode_image(encode(img), model_size=MODEL_SIZE)
    dets = ans.answer([Item(full, 0.0, False)])[0]
    assert dets and max(d["box"][2] for d in dets) > 300  # scaled back from the 300 px decode
    assert all(0 <= d["box"][0] <= d["box"][2] <= 1200.01 for d in dets)


# ---- the pyfunc flavour ----------------------------------------------------------------------

def test_pyfunc_signature_has_params():
    from fewshot.backends.pyfunc import input_example, signature

    sig = signature()
    assert [p.name for p in sig.params.params] == ["score_threshold", "refine"]
    assert sig.inputs.input_names() == ["image"]
    assert decode_image(input_example()["image"][0]).image.size == (64, 48)


# ---- configs -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["serve_config.yaml", "serve_config.gpu.yaml"])
def test_serve_configs_validate(name):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serving.app import ServiceSettings

    cfg = yaml.safe_load((ROOT / "serving" / name).read_text())
    schema = ServeDeploySchema.model_validate(cfg) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(cfg)
    dep = schema.applications[0].deployments[0]
    assert cfg["http_options"]["request_timeout_s"] > 0
    assert dep.autoscaling_config["target_ongoing_requests"] > 0
    settings = ServiceSettings(**dep.user_config)
    assert (settings.device == "cuda") == (dep.ray_actor_options.num_gpus > 0)
    with pytest.raises(ValueError):
        ServiceSettings(**dep.user_config, no_such_setting=1)
