"""The synthetic world: determinism, sane boxes, classes and class splits, catalog build."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from catalog.shapes import CLASS_NAMES, SHAPES, shape_outline
from catalog.store import Catalog
from catalog.synthetic import WorldConfig, generate_row, image_rng, render_scene
from catalog.world import CLASS_SPLITS, build_world


def _rows(seed=0, split="train", n=30, size=160):
    cfg = WorldConfig.square(size)
    return [generate_row(seed, split, i, cfg) for i in range(n)]


def test_twenty_shape_classes_with_outlines():
    assert len(CLASS_NAMES) == 20 == len(set(CLASS_NAMES))
    rng = np.random.default_rng(0)
    for name in CLASS_NAMES:
        o = shape_outline(name, rng)
        pts = np.concatenate([p.points for p in o.parts if p.add])  # holes may reach out
        assert np.all(np.abs(pts) <= 1.0 + 1e-6), name
        assert np.isclose(np.abs(pts).max(), 1.0), name
        assert len(o.parts) >= 1
    assert list(SHAPES) == list(CLASS_NAMES)


def test_same_seed_same_bytes_and_different_seed_differs():
    a = _rows(seed=3, n=8)
    b = _rows(seed=3, n=8)
    assert [r["image"] for r in a] == [r["image"] for r in b]
    assert [r["boxes"] for r in a] == [r["boxes"] for r in b]
    c = _rows(seed=4, n=8)
    assert all(x["image"] != y["image"] for x, y in zip(a, c))
    # splits are independent streams too
    v = _rows(seed=3, split="val", n=8)
    assert all(x["image"] != y["image"] for x, y in zip(a, v))
    # one image can be regenerated alone, out of order
    assert generate_row(3, "train", 5)["image"] == a[5]["image"]


def test_boxes_inside_image_non_degenerate_and_annotated():
    rows = _rows(n=60)
    n_boxes = 0
    for r in rows:
        img = Image.open(io.BytesIO(r["image"]))
        assert img.size == (160, 160) and img.mode == "RGB"
        assert r["width"] == 160 and r["height"] == 160
        assert 1 <= len(r["boxes"]) <= 6
        assert len(r["boxes"]) == len(r["category_ids"]) == len(r["iscrowd"])
        for (x1, y1, x2, y2), c in zip(r["boxes"], r["category_ids"]):
            assert 0 <= x1 < x2 <= 160 and 0 <= y1 < y2 <= 160
            assert x2 - x1 >= 2 and y2 - y1 >= 2
            assert 1 <= c <= 20
            n_boxes += 1
        assert not any(r["iscrowd"])
    assert n_boxes >= 100
    # boxes span small to large objects
    sides = [max(b[2] - b[0], b[3] - b[1]) for r in rows for b in r["boxes"]]
    assert min(sides) < 20 and max(sides) > 60


def test_boxes_are_tight_on_visible_pixels_and_occlusion_bounded():
    cfg = WorldConfig()
    for i in range(40):
        scene = render_scene(image_rng(1, "train", i), cfg)
        for j, o in enumerate(scene.objects):
            if o.category is None:
                continue
            assert o.visible_fraction >= 1 - cfg.max_occlusion - 1e-9
            visible = scene.owner == j
            assert visible.sum() == o.visible_area > 0
            ys, xs = np.nonzero(visible)
            assert o.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert len(scene.objects) >= len(scene.annotations)


def test_colour_does_not_identify_class():
    cfg = WorldConfig()
    colours: dict[str, set] = {}
    for i in range(200):
        for o in render_scene(image_rng(2, "train", i), cfg).annotations:
            colours.setdefault(o.category, set()).add(o.colour)
    assert len(colours) == 20
    assert all(len(v) >= 4 for v in colours.values())


def test_image_size_is_configurable():
    r = generate_row(0, "test", 0, WorldConfig.square(96))
    assert Image.open(io.BytesIO(r["image"])).size == (96, 96)
    assert all(0 <= v <= 96 for b in r["boxes"] for v in b)


def test_class_splits_fifteen_base_five_novel_distinct():
    assert [cs.name for cs in CLASS_SPLITS] == ["split1", "split2", "split3"]
    novels = []
    for cs in CLASS_SPLITS:
        assert len(cs.base) == 15 and len(cs.novel) == 5
        assert set(cs.base) | set(cs.novel) == set(CLASS_NAMES)
        assert not set(cs.base) & set(cs.novel)
        novels.append(frozenset(cs.novel))
    assert len(set(novels)) == 3


def test_build_world_writes_catalog_and_reuses(tmp_path):
    cat = Catalog(tmp_path)
    m = build_world(cat, "tiny", n_train=12, n_val=4, n_test=0, seed=1, progress=False, workers=1)
    assert m.splits == {"train": 12, "val": 4, "test": 0}
    assert [c.id for c in m.categories] == list(range(1, 21))
    assert [c.name for c in m.categories] == list(CLASS_NAMES)
    assert m.class_split("split2").novel == CLASS_SPLITS[1].novel
    train = cat.read_split("tiny", "train")
    assert train.num_rows == 12
    assert cat.read_split("tiny", "test").num_rows == 0
    ids = train.column("image_id").to_pylist() + cat.read_split("tiny", "val").column("image_id").to_pylist()
    assert len(set(ids)) == len(ids)
    assert train.column("image").to_pylist()[3] == generate_row(1, "train", 3)["image"]

    mtime = cat.split_path("tiny", "train").stat().st_mtime_ns
    again = build_world(cat, "tiny", n_train=12, n_val=4, n_test=0, seed=1, progress=False)
    assert again.to_json() == m.to_json()
    assert cat.split_path("tiny", "train").stat().st_mtime_ns == mtime  # not regenerated

    with pytest.raises(FileExistsError, match="other generation parameters"):
        build_world(cat, "tiny", n_train=13, n_val=4, n_test=0, seed=1, progress=False)
    m2 = build_world(cat, "tiny", n_train=13, n_val=4, n_test=0, seed=1, progress=False,
                     overwrite=True, workers=1)
    assert m2.splits["train"] == 13


def test_coco_style_sanity(tmp_path):
    from pycocotools.coco import COCO

    rows = _rows(n=20)
    images, anns = [], []
    for r in rows:
        images.append({"id": r["image_id"], "width": r["width"], "height": r["height"],
                       "file_name": r["file_name"]})
        for b, c in zip(r["boxes"], r["category_ids"]):
            anns.append({"id": len(anns) + 1, "image_id": r["image_id"], "category_id": c,
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                         "area": (b[2] - b[0]) * (b[3] - b[1]), "iscrowd": 0})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns,
                    "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASS_NAMES)]}
    coco.createIndex()
    assert len(coco.getImgIds()) == 20
    assert sum(len(coco.getAnnIds(imgIds=[i])) for i in coco.getImgIds()) == len(anns)
    assert len({r["file_name"] for r in rows}) == 20


def _load_cli():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "jobs" / "build_dataset.py"
    spec = importlib.util.spec_from_file_location("build_dataset_cli", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_help_and_build(tmp_path, capsys):
    cli = _load_cli()
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--catalog", "--name", "--n-train", "--n-val", "--n-test", "--image-size",
                 "--seed", "--overwrite"):
        assert flag in text
    args = ["--catalog", str(tmp_path), "--name", "w", "--n-train", "5", "--n-val", "2",
            "--n-test", "2", "--image-size", "64", "--no-progress", "--workers", "1"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert str(tmp_path) in out and "train=5" in out
    assert Catalog(tmp_path).manifest("w").info["image_size"] == 64
    assert cli.main(args) == 0  # reused
    assert cli.main(args[:5] + ["6"] + args[6:]) == 2  # exists with other parameters


def test_presets_and_config_round_trip():
    easy = WorldConfig.preset("easy", 128)
    assert (easy.width, easy.height) == (128, 128) and easy.max_clutter == 0
    assert WorldConfig.from_dict(easy.to_dict()) == easy
    with pytest.raises(ValueError, match="unknown world preset"):
        WorldConfig.preset("impossible")
    scene = render_scene(image_rng(0, "train", 0), easy)
    assert all(o.category is not None for o in scene.objects)  # no clutter
    assert {o.texture for o in scene.objects} <= {"solid", "gradient"}


def test_clutter_is_drawn_but_never_annotated():
    cfg = WorldConfig()
    clutter = 0
    for i in range(30):
        scene = render_scene(image_rng(5, "train", i), cfg)
        row_cats = [o.category for o in scene.annotations]
        clutter += sum(o.category is None for o in scene.objects)
        assert None not in row_cats
    assert clutter > 10
