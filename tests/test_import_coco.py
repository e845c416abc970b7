"""COCO import: the real coco-mini files, the quirks real data has, and the job's CLI."""
from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageOps

from catalog import Catalog
from catalog.importers import SplitExistsError, import_coco
from catalog.importers.coco import infer_split

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
COCO_MINI = DATASETS / "coco-mini"
needs_coco_mini = pytest.mark.skipif(
    not (COCO_MINI / "annotations" / "instances_train2017.json").is_file(),
    reason=f"real datasets not found at {DATASETS} (clone shared/ beside the repo)",
)


def _json(split: str) -> dict:
    return json.loads((COCO_MINI / "annotations" / f"instances_{split}2017.json").read_text())


@pytest.fixture(scope="module")
def coco_mini(tmp_path_factory):
    if not (COCO_MINI / "annotations" / "instances_train2017.json").is_file():
        pytest.skip(f"real datasets not found at {DATASETS} (clone shared/ beside the repo)")
    cat = Catalog(tmp_path_factory.mktemp("catalog"))
    reports = {}
    for split in ("train", "val"):
        reports[split] = import_coco(
            cat, "coco-mini", COCO_MINI / "annotations" / f"instances_{split}2017.json",
            images=COCO_MINI / f"{split}2017", split=split)
    return cat, reports


# ---- the real coco-mini ------------------------------------------------------------------
@needs_coco_mini
@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_mini_counts_match_the_json(coco_mini, split):
    cat, reports = coco_mini
    src = _json(split)
    manifest = cat.manifest("coco-mini")
    # no test split in COCO: test is held out from train, val stays whole for selection
    stored = [split] + (["test"] if split == "train" else [])
    assert sum(manifest.splits[s] for s in stored) == len(src["images"])
    assert manifest.split_origins["test"].held_out and manifest.origin("test").source == "train"

    cols = ["image_id", "category_ids", "iscrowd"]
    table = pa.concat_tables([cat.read_split("coco-mini", s, columns=cols) for s in stored])
    assert sorted(table.column("image_id").to_pylist()) == sorted(i["id"] for i in src["images"])
    stored = Counter(c for row in table.column("category_ids").to_pylist() for c in row)
    expected = Counter(a["category_id"] for a in src["annotations"])
    assert stored == expected

    crowd = sum(sum(row) for row in table.column("iscrowd").to_pylist())
    assert crowd == sum(a["iscrowd"] for a in src["annotations"]) > 0

    rep = reports[split].splits[split]
    assert rep.images == len(src["images"])
    assert rep.boxes == len(src["annotations"])
    assert rep.crowd == crowd
    assert dict(rep.per_class) == dict(expected)
    assert rep.clipped == rep.dropped_zero_area == 0


@needs_coco_mini
def test_coco_mini_keeps_non_contiguous_category_ids(coco_mini):
    cat, _ = coco_mini
    src = _json("train")
    manifest = cat.manifest("coco-mini")
    assert [(c.id, c.name, c.supercategory) for c in manifest.categories] == sorted(
        (c["id"], c["name"], c["supercategory"]) for c in src["categories"])
    ids = [c.id for c in manifest.categories]
    assert len(ids) == 80 and max(ids) == 90  # COCO's gaps survive


@needs_coco_mini
def test_coco_mini_ignores_unreferenced_images(coco_mini):
    cat, reports = coco_mini
    on_disk = {p.name for p in (COCO_MINI / "val2017").iterdir()}
    referenced = {i["file_name"] for i in _json("val")["images"]}
    assert reports["val"].unreferenced_files == len(on_disk - referenced) == 80
    assert reports["train"].unreferenced_files == 0
    names = set(cat.read_split("coco-mini", "val", columns=["file_name"])
                .column("file_name").to_pylist())
    assert names == referenced


@needs_coco_mini
def test_coco_mini_boxes_and_images_are_stored_exactly(coco_mini):
    cat, _ = coco_mini
    src = _json("val")
    by_image: dict[int, list] = {}
    for a in src["annotations"]:
        x, y, w, h = a["bbox"]
        by_image.setdefault(a["image_id"], []).append((a["category_id"], x, y, x + w, y + h))
    table = cat.read_split("coco-mini", "val")
    sizes = {i["id"]: (i["width"], i["height"]) for i in src["images"]}
    for row in table.slice(0, 20).to_pylist():
        got = sorted((c, *b) for c, b in zip(row["category_ids"], row["boxes"]))
        assert np.allclose(np.array(got), np.array(sorted(by_image[row["image_id"]])),
                           atol=1e-3)
        assert (row["width"], row["height"]) == sizes[row["image_id"]]
        # clean RGB JPEGs are stored byte for byte
        assert row["image"] == (COCO_MINI / "val2017" / row["file_name"]).read_bytes()


# ---- quirks, on small files built here ---------------------------------------------------
def _jpeg(path: Path, size, mode="RGB", color=(200, 30, 30), exif_orientation=None, **kw):
    img = Image.new("RGB", size, color)
    # a marker in the top-left corner so an orientation fix is visible in the pixels
    img.paste((0, 0, 255), (0, 0, size[0] // 3, size[1] // 3))
    if mode != "RGB":
        img = img.convert(mode)
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kw["exif"] = exif
    img.save(path, format="JPEG", quality=95, **kw)


def _build_quirky_coco(root: Path) -> Path:
    imgs = root / "images"
    imgs.mkdir(parents=True)
    _jpeg(imgs / "plain.jpg", (64, 48))
    _jpeg(imgs / "gray.jpg", (50, 40), mode="L")
    _jpeg(imgs / "cmyk.jpg", (40, 40), mode="CMYK")
    _jpeg(imgs / "rotated.jpg", (60, 30), exif_orientation=6)  # displayed 30 x 60
    Image.new("P", (32, 32), 3).save(imgs / "palette.png")
    Image.new("RGBA", (20, 24), (10, 200, 10, 128)).save(imgs / "alpha.png")
    Image.fromarray(np.full((16, 16), 40000, np.uint16)).save(imgs / "gray16.png")
    _jpeg(imgs / "negative.jpg", (33, 21))
    _jpeg(imgs / "not_in_json.jpg", (10, 10))
    images = [
        (11, "plain.jpg", 64, 48), (12, "gray.jpg", 50, 40), (13, "cmyk.jpg", 40, 40),
        (14, "rotated.jpg", 30, 60), (15, "palette.png", 32, 32), (16, "alpha.png", 20, 24),
        (17, "gray16.png", 16, 16), (18, "negative.jpg", 33, 21),
    ]
    anns = [
        (11, 3, [10, 10, 20, 20], 0),
        (11, 17, [50, 40, 30, 30], 0),   # partly outside: clipped to [50, 40, 64, 48]
        (11, 90, [5, 5, 0, 10], 0),      # zero width: dropped
        (12, 90, [-10, -5, 20, 15], 1),  # crowd, partly outside: clipped
        (12, 3, [60, 50, 5, 5], 0),      # entirely outside: zero area after clipping, dropped
        (13, 17, [1, 1, 10, -4], 0),     # negative height: dropped
        (14, 3, [2, 40, 20, 15], 0),     # in displayed (rotated) coordinates
        (15, 3, [0, 0, 32, 32], 0),
        (16, 17, [1.5, 2.25, 10.5, 8], 0),
        (17, 90, [4, 4, 4, 4], 0),
    ]
    data = {
        "images": [{"id": i, "file_name": f, "width": w, "height": h} for i, f, w, h in images],
        "annotations": [
            {"id": k, "image_id": i, "category_id": c, "bbox": b, "iscrowd": z, "area": 1.0}
            for k, (i, c, b, z) in enumerate(anns, start=100)
        ],
        "categories": [{"id": 3, "name": "car", "supercategory": "vehicle"},
                       {"id": 90, "name": "toothbrush", "supercategory": "indoor"},
                       {"id": 17, "name": "cat", "supercategory": "animal"}],
    }
    path = root / "instances_train.json"
    path.write_text(json.dumps(data))
    return path


def test_quirks_are_repaired_and_counted(tmp_path):
    ann = _build_quirky_coco(tmp_path / "src")
    cat = Catalog(tmp_path / "catalog")
    report = import_coco(cat, "quirky", ann, images=tmp_path / "src" / "images")
    st = report.splits["train"]  # split inferred from "instances_train.json"
    assert st.images == 8 and st.negatives == 2  # negative.jpg, and cmyk.jpg lost its box
    assert st.boxes == 7 and st.dropped_zero_area == 3 and st.clipped == 2 and st.crowd == 1
    assert st.converted["grayscale"] == 2 and st.converted["cmyk"] == 1
    assert st.converted["palette"] == 1 and st.converted["alpha"] == 1
    assert st.converted["exif_rotated"] == 1
    assert st.size_mismatch == 0
    assert report.unreferenced_files == 1
    assert report.to_dict()["total"]["per_class"] == {"car": 3, "cat": 2, "toothbrush": 2}
    assert [c.id for c in cat.manifest("quirky").categories] == [3, 17, 90]

    stored = cat.manifest("quirky").splits  # train, and val + test held out from it
    assert set(stored) == {"train", "val", "test"} and sum(stored.values()) == 8
    rows = {r["file_name"]: r for s in stored for r in cat.read_split("quirky", s).to_pylist()}
    assert len(rows) == 8 and "not_in_json.jpg" not in rows
    for r in rows.values():
        img = Image.open(io.BytesIO(r["image"]))
        assert img.mode == "RGB" and img.size == (r["width"], r["height"])
        assert img.format == ("JPEG" if r["file_name"].endswith(".jpg") else "PNG")
        assert len(r["boxes"]) == len(r["category_ids"]) == len(r["iscrowd"])
        for x1, y1, x2, y2 in r["boxes"]:
            assert 0 <= x1 < x2 <= r["width"] and 0 <= y1 < y2 <= r["height"]

    assert rows["plain.jpg"]["boxes"] == [[10, 10, 30, 30], [50, 40, 64, 48]]
    assert rows["plain.jpg"]["category_ids"] == [3, 17]
    assert rows["gray.jpg"]["boxes"] == [[0, 0, 10, 10]] and rows["gray.jpg"]["iscrowd"] == [True]
    assert rows["cmyk.jpg"]["boxes"] == []
    assert rows["negative.jpg"]["boxes"] == [] and rows["negative.jpg"]["category_ids"] == []
    assert rows["alpha.png"]["boxes"] == [[1.5, 2.25, 12.0, 10.25]]

    # EXIF orientation 6: stored upright, 30 x 60, pixels as a viewer shows them
    rot = rows["rotated.jpg"]
    assert (rot["width"], rot["height"]) == (30, 60)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "src/images/rotated.jpg"))
                          .convert("RGB"), dtype=np.float32)
    got = np.asarray(Image.open(io.BytesIO(rot["image"])).convert("RGB"), dtype=np.float32)
    assert got.shape == expected.shape and np.abs(got - expected).mean() < 3.0
    # clean JPEGs are kept byte for byte; converted ones are re-encoded
    assert rows["plain.jpg"]["image"] == (tmp_path / "src/images/plain.jpg").read_bytes()
    assert st.reencoded == 6
    # the 16-bit grayscale PNG is scaled, not clipped to white
    g16 = np.asarray(Image.open(io.BytesIO(rows["gray16.png"]["image"])))
    assert 150 < g16.mean() < 160  # 40000 / 65535 * 255 = 155.6

    text = report.format_table()
    for word in ("clipped", "dropped_zero_area", "crowd", "toothbrush", "exif_rotated", "cmyk"):
        assert word in text
    metrics = report.metrics()
    assert metrics["train/clipped"] == 2 and metrics["total/class/car"] == 3
    json.dumps(report.to_dict())


def test_size_mismatch_is_counted_and_boxes_clipped_to_the_real_image(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _jpeg(src / "a.jpg", (40, 30))
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg", "width": 80, "height": 60}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [30, 20, 30, 30]}],
        "categories": [{"id": 1, "name": "thing"}],
    }))
    report = import_coco(Catalog(tmp_path / "cat"), "m", ann, images=src, split="val")
    assert report.splits["val"].size_mismatch == 1 and report.splits["val"].clipped == 1
    assert any("differ in size" in w for w in report.warnings)


def test_adding_a_split_keeps_the_others_and_refuses_to_clobber(tmp_path):
    ann = _build_quirky_coco(tmp_path / "src")
    images = tmp_path / "src" / "images"
    other = tmp_path / "other"  # the val images: other pixels, so no image is in two splits
    other.mkdir()
    for f in images.iterdir():
        img = Image.open(f)
        ImageOps.invert(img.convert("RGB")).save(other / f.name, format=img.format)
    cat = Catalog(tmp_path / "catalog")
    opts = dict(test_fraction=0, val_fraction=0)  # no hold-outs: splits as imported
    import_coco(cat, "ds", ann, images=images, split="train", **opts)
    train_before = cat.read_split("ds", "train")
    report = import_coco(cat, "ds", ann, images=other, split="val", **opts)
    assert report.kept_splits == {"train": 8}
    assert cat.manifest("ds").splits == {"train": 8, "val": 8}
    assert cat.read_split("ds", "train").equals(train_before)

    before = {p.name: p.read_bytes() for p in cat.dataset_dir("ds").iterdir()}
    with pytest.raises(SplitExistsError, match="already has split"):
        import_coco(cat, "ds", ann, images=other, split="val", **opts)
    assert {p.name: p.read_bytes() for p in cat.dataset_dir("ds").iterdir()} == before

    import_coco(cat, "ds", ann, images=other, split="val", overwrite=True, **opts)
    assert cat.manifest("ds").splits == {"train": 8, "val": 8}
    assert cat.read_split("ds", "train").equals(train_before)
    assert sorted(cat.manifest("ds").info["imports"]) == ["train", "val"]


def test_split_is_read_from_coco_file_names():
    assert infer_split(Path("instances_val2017.json")) == "val"
    assert infer_split(Path("instances_train2017.json")) == "train"
    assert infer_split(Path("image_info_test-dev2017.json")) == "test"
    assert infer_split(Path("annotations.json")) is None


# ---- the job -----------------------------------------------------------------------------
def test_job_help_explains_every_flag(capsys):
    from jobs.import_dataset import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--coco", "--voc", "--images", "--name", "--split", "--catalog", "--overwrite",
                 "--mlflow-uri", "--voc-split-map"):
        assert flag in out


def test_job_imports_prints_the_report_and_logs_to_mlflow(tmp_path, capsys, monkeypatch):
    from jobs.import_dataset import main

    ann = _build_quirky_coco(tmp_path / "src")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = (tmp_path / "mlruns").as_uri()
    rc = main(["--coco", str(ann), "--images", str(tmp_path / "src" / "images"),
               "--name", "quirky", "--split", "val", "--catalog", str(tmp_path / "cat"),
               "--mlflow-uri", uri, "--report-json", str(tmp_path / "report.json")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "Import report for dataset 'quirky'" in out and "toothbrush" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["splits"]["val"]["images"] == 8
    # a val-only dataset: test is held out from val (default --test-fraction 0.2)
    splits = Catalog(tmp_path / "cat").manifest("quirky").splits
    assert set(splits) == {"val", "test"} and sum(splits.values()) == 8 and splits["test"] >= 1
    assert report["holdouts"]["test"]["from"] == "val" and "held out 'test' from 'val'" in out

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("dataset-imports")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "import-quirky"
    assert run.data.metrics["val/dropped_zero_area"] == 3
    assert run.data.params["dataset"] == "quirky"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"import_report.json"}


def test_job_bad_input_is_a_one_line_error(tmp_path, capsys):
    from jobs.import_dataset import main

    ann = tmp_path / "instances_train.json"
    ann.write_text(json.dumps({"images": [], "categories": []}))
    (tmp_path / "imgs").mkdir()
    rc = main(["--coco", str(ann), "--images", str(tmp_path / "imgs"), "--name", "x",
               "--catalog", str(tmp_path / "cat")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0 and "'annotations'" in err and err.startswith("import_dataset")
    assert not (tmp_path / "cat").exists()


def test_rotated_image_annotated_with_its_stored_size_is_flagged(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _jpeg(src / "r.jpg", (60, 30), exif_orientation=6)  # stored 60 x 30, displayed 30 x 60
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "r.jpg", "width": 60, "height": 30}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10]}],
        "categories": [{"id": 1, "name": "thing"}],
    }))
    cat = Catalog(tmp_path / "cat")
    report = import_coco(cat, "r", ann, images=src, split="train")
    assert report.splits["train"].size_mismatch == 1
    assert any("EXIF-rotated" in w and "r.jpg" in w for w in report.warnings)
    row = cat.read_split("r", "train").to_pylist()[0]
    assert (row["width"], row["height"]) == (30, 60)
