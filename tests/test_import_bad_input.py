"""Bad input gives a specific, clear error and leaves the catalog exactly as it was.

Every case builds its own small broken files; "unchanged" is checked byte for byte over the
whole catalog folder (for a fresh catalog: the folder is not even created).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from catalog import Catalog
from catalog.importers import (
    CategoryMismatchError,
    CorruptImageError,
    DatasetImportError,
    DuplicateEntryError,
    MalformedAnnotationsError,
    MissingImageFilesError,
    MissingKeysError,
    import_coco,
    import_voc,
)


def snapshot(root: Path) -> dict[str, bytes] | None:
    if not root.exists():
        return None
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(root.rglob("*"))}


def _jpeg(path: Path, size=(64, 48), seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
        path, format="JPEG", quality=90)


def _coco(n_images=3, categories=None, extra_images=()):
    images = [{"id": i, "file_name": f"img{i}.jpg", "width": 64, "height": 48}
              for i in range(1, n_images + 1)] + list(extra_images)
    return {
        "images": images,
        "annotations": [{"id": 10 + i, "image_id": i, "category_id": 1,
                         "bbox": [4, 4, 20, 20], "iscrowd": 0} for i in range(1, n_images + 1)],
        "categories": categories or [{"id": 1, "name": "thing"}, {"id": 2, "name": "other"}],
    }


@pytest.fixture
def src(tmp_path):
    """A valid little COCO source: 3 images in src/images, annotations in src/ann.json."""
    root = tmp_path / "src"
    (root / "images").mkdir(parents=True)
    for i in range(1, 4):
        _jpeg(root / "images" / f"img{i}.jpg", seed=i)
    (root / "ann.json").write_text(json.dumps(_coco()))
    return root


@pytest.fixture
def catalog_with_dataset(tmp_path, src):
    """A catalog that already holds dataset 'ds' with a train split."""
    cat = Catalog(tmp_path / "catalog")
    import_coco(cat, "ds", src / "ann.json", images=src / "images", split="train")
    return cat


def _expect_unchanged(cat: Catalog, exc_type, match: str, fn):
    before = snapshot(cat.root)
    with pytest.raises(exc_type, match=match) as info:
        fn()
    assert snapshot(cat.root) == before
    return info.value


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


# ---- images ------------------------------------------------------------------------------
def test_truncated_jpeg_is_named_and_nothing_is_written(tmp_path, src):
    data = (src / "images" / "img2.jpg").read_bytes()
    (src / "images" / "img2.jpg").write_bytes(data[: len(data) // 2])
    cat = Catalog(tmp_path / "fresh")
    err = _expect_unchanged(cat, CorruptImageError, "img2.jpg",
                            lambda: import_coco(cat, "ds", src / "ann.json",
                                                images=src / "images", split="train"))
    assert err.files == ["img2.jpg"] and "truncated" in str(err)
    assert not cat.root.exists()


def test_truncated_jpeg_leaves_an_existing_dataset_byte_identical(src, catalog_with_dataset):
    cat = catalog_with_dataset
    splits = cat.manifest("ds").splits
    data = (src / "images" / "img3.jpg").read_bytes()
    (src / "images" / "img3.jpg").write_bytes(data[:300])
    _expect_unchanged(cat, CorruptImageError, "img3.jpg",
                      lambda: import_coco(cat, "ds", src / "ann.json", images=src / "images",
                                          split="val"))
    _expect_unchanged(cat, CorruptImageError, "img3.jpg",
                      lambda: import_coco(cat, "ds", src / "ann.json", images=src / "images",
                                          split="train", overwrite=True))
    assert cat.manifest("ds").splits == splits and sum(splits.values()) == 3


def test_every_undecodable_file_is_listed(tmp_path, src):
    (src / "images" / "img1.jpg").write_text("this is not an image")
    (src / "images" / "img3.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 40)
    cat = Catalog(tmp_path / "catalog")
    err = _expect_unchanged(cat, CorruptImageError, "2 image file",
                            lambda: import_coco(cat, "ds", src / "ann.json",
                                                images=src / "images", split="train"))
    assert err.files == ["img1.jpg", "img3.jpg"]


def test_missing_image_files_are_all_listed(tmp_path, src):
    extra = [{"id": 100 + k, "file_name": f"gone/missing{k:02d}.jpg", "width": 8, "height": 8}
             for k in range(25)]
    ann = _write(src / "ann.json", _coco(extra_images=extra))
    cat = Catalog(tmp_path / "catalog")
    err = _expect_unchanged(cat, MissingImageFilesError, "25 image file",
                            lambda: import_coco(cat, "ds", ann, images=src / "images",
                                                split="train"))
    assert err.missing == [f"gone/missing{k:02d}.jpg" for k in range(25)]
    msg = str(err)
    assert "gone/missing00.jpg" in msg and "gone/missing19.jpg" in msg
    assert "gone/missing20.jpg" not in msg and "and 5 more" in msg
    assert str(src / "images") in msg


# ---- the json ----------------------------------------------------------------------------
def test_json_missing_top_level_keys(tmp_path, src):
    data = _coco()
    del data["annotations"]
    ann = _write(src / "ann.json", data)
    cat = Catalog(tmp_path / "catalog")
    _expect_unchanged(cat, MissingKeysError, "missing required key.*'annotations'",
                      lambda: import_coco(cat, "ds", ann, images=src / "images", split="train"))


def test_json_items_missing_keys_are_named(catalog_with_dataset, src):
    data = _coco()
    del data["images"][1]["file_name"]
    del data["annotations"][0]["bbox"]
    del data["categories"][1]["name"]
    ann = _write(src / "bad.json", data)
    cat = catalog_with_dataset
    err = _expect_unchanged(cat, MissingKeysError, "3 item",
                            lambda: import_coco(cat, "ds", ann, images=src / "images",
                                                split="val"))
    msg = str(err)
    assert "images[1] (id 2) missing 'file_name'" in msg
    assert "annotations[0] (id 11) missing 'bbox'" in msg
    assert "categories[1] (id 2) missing 'name'" in msg


def test_json_that_is_not_json(tmp_path, src):
    ann = _write(src / "ann.json", '{"images": [')
    cat = Catalog(tmp_path / "catalog")
    _expect_unchanged(cat, MalformedAnnotationsError, "not valid JSON",
                      lambda: import_coco(cat, "ds", ann, images=src / "images", split="train"))


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), r"bbox=\[1, 2, 3\] is not 4"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, "x", 4]), "is not 4 finite numbers"),
    (lambda d: d["images"][0].update(width=0), "width=0 is not a positive integer"),
    (lambda d: d["images"][0].update(id="one"), "id='one' is not an integer"),
    (lambda d: d["annotations"][1].update(image_id=999), "annotation 12 -> image 999"),
    (lambda d: d["annotations"][1].update(category_id=7), "annotation 12 -> category 7"),
    (lambda d: d.update(categories=[]), "'categories' is empty"),
])
def test_json_with_bad_values(tmp_path, src, mutate, match):
    data = _coco()
    mutate(data)
    ann = _write(src / "ann.json", data)
    cat = Catalog(tmp_path / "catalog")
    _expect_unchanged(cat, MalformedAnnotationsError, match,
                      lambda: import_coco(cat, "ds", ann, images=src / "images", split="train"))


def test_two_categories_with_the_same_name(catalog_with_dataset, src):
    ann = _write(src / "bad.json", _coco(categories=[
        {"id": 1, "name": "thing"}, {"id": 2, "name": "other"}, {"id": 5, "name": "thing"}]))
    cat = catalog_with_dataset
    _expect_unchanged(cat, DuplicateEntryError, r"share a name: 'thing' \(ids 1, 5\)",
                      lambda: import_coco(cat, "ds", ann, images=src / "images", split="val"))


def test_image_file_referenced_twice(tmp_path, src):
    ann = _write(src / "ann.json", _coco(extra_images=[
        {"id": 4, "file_name": "img2.jpg", "width": 64, "height": 48}]))
    cat = Catalog(tmp_path / "catalog")
    _expect_unchanged(cat, DuplicateEntryError, r"referenced twice.*img2.jpg \(ids 2, 4\)",
                      lambda: import_coco(cat, "ds", ann, images=src / "images", split="train"))


def test_image_id_referenced_twice(tmp_path, src):
    ann = _write(src / "ann.json", _coco(extra_images=[
        {"id": 3, "file_name": "img1.jpg", "width": 64, "height": 48}]))
    cat = Catalog(tmp_path / "catalog")
    _expect_unchanged(cat, DuplicateEntryError, "image id.*referenced twice.*: 3",
                      lambda: import_coco(cat, "ds", ann, images=src / "images", split="train"))


def test_adding_a_split_with_other_categories(catalog_with_dataset, src):
    ann = _write(src / "other.json", _coco(categories=[
        {"id": 1, "name": "thing"}, {"id": 2, "name": "renamed"}]))
    cat = catalog_with_dataset
    _expect_unchanged(cat, CategoryMismatchError, "2: 'other' vs 'renamed'",
                      lambda: import_coco(cat, "ds", ann, images=src / "images", split="val"))


def test_missing_annotation_file_and_folder(tmp_path, src):
    cat = Catalog(tmp_path / "catalog")
    with pytest.raises(DatasetImportError, match="annotation file not found"):
        import_coco(cat, "ds", src / "nope.json", images=src / "images", split="train")
    with pytest.raises(DatasetImportError, match="image folder not found"):
        import_coco(cat, "ds", src / "ann.json", images=src / "nope", split="train")
    with pytest.raises(DatasetImportError, match="cannot tell the split"):
        import_coco(cat, "ds", src / "ann.json", images=src / "images")
    assert snapshot(cat.root) is None


# ---- VOC ---------------------------------------------------------------------------------
def _voc(root: Path, n=3) -> Path:
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    for i in range(n):
        _jpeg(root / "JPEGImages" / f"im{i}.jpg", seed=i)
        (root / "Annotations" / f"im{i}.xml").write_text(
            f"<annotation><filename>im{i}.jpg</filename><object><name>cell</name><bndbox>"
            "<xmin>2</xmin><ymin>3</ymin><xmax>20</xmax><ymax>30</ymax></bndbox></object>"
            "</annotation>")
    return root


def test_voc_malformed_xml_is_named(tmp_path):
    voc = _voc(tmp_path / "voc")
    (voc / "Annotations" / "im1.xml").write_text("<annotation><object>")
    cat = Catalog(tmp_path / "catalog")
    _expect_unchanged(cat, MalformedAnnotationsError, "im1.xml: not valid XML",
                      lambda: import_voc(cat, "v", voc, split="train"))


def test_voc_object_without_a_box(tmp_path):
    voc = _voc(tmp_path / "voc")
    (voc / "Annotations" / "im2.xml").write_text(
        "<annotation><filename>im2.jpg</filename><object><name>cell</name></object>"
        "</annotation>")
    cat = Catalog(tmp_path / "catalog")
    _expect_unchanged(cat, MissingKeysError, "im2.xml object 0: missing bndbox",
                      lambda: import_voc(cat, "v", voc, split="train"))


def test_voc_missing_images_are_listed(tmp_path):
    voc = _voc(tmp_path / "voc", n=4)
    (voc / "JPEGImages" / "im0.jpg").unlink()
    (voc / "JPEGImages" / "im3.jpg").unlink()
    cat = Catalog(tmp_path / "catalog")
    err = _expect_unchanged(cat, MissingImageFilesError, "2 image file.*im0.jpg, im3.jpg",
                            lambda: import_voc(cat, "v", voc, split="train"))
    assert err.missing == ["im0.jpg", "im3.jpg"]


def test_voc_truncated_jpeg(tmp_path):
    voc = _voc(tmp_path / "voc")
    data = (voc / "JPEGImages" / "im1.jpg").read_bytes()
    (voc / "JPEGImages" / "im1.jpg").write_bytes(data[: len(data) // 3])
    cat = Catalog(tmp_path / "catalog")
    _expect_unchanged(cat, CorruptImageError, "im1.jpg",
                      lambda: import_voc(cat, "v", voc, split="train"))


def test_voc_image_referenced_by_two_annotation_files(tmp_path):
    voc = _voc(tmp_path / "voc")
    text = (voc / "Annotations" / "im2.xml").read_text().replace("im2.jpg", "im1.jpg")
    (voc / "Annotations" / "im2.xml").write_text(text)
    cat = Catalog(tmp_path / "catalog")
    _expect_unchanged(cat, DuplicateEntryError, r"im1.jpg \(im1.xml, im2.xml\)",
                      lambda: import_voc(cat, "v", voc, split="train"))


def test_voc_image_set_with_unknown_images(tmp_path):
    voc = _voc(tmp_path / "voc")
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "train.txt").write_text("im0\nim1\nim9\n")
    cat = Catalog(tmp_path / "catalog")
    _expect_unchanged(cat, MissingKeysError, "no annotation file.*im9",
                      lambda: import_voc(cat, "v", voc))


def test_voc_image_in_two_splits(tmp_path):
    voc = _voc(tmp_path / "voc")
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "train.txt").write_text("im0\nim1\n")
    (voc / "ImageSets" / "Main" / "val.txt").write_text("im1\nim2\n")
    cat = Catalog(tmp_path / "catalog")
    _expect_unchanged(cat, DuplicateEntryError, r"im1 \(train and val\)",
                      lambda: import_voc(cat, "v", voc))


# ---- the job -----------------------------------------------------------------------------
def test_job_bad_input_exits_non_zero_with_one_line(src, catalog_with_dataset, capsys):
    from jobs.import_dataset import main

    data = (src / "images" / "img1.jpg").read_bytes()
    (src / "images" / "img1.jpg").write_bytes(data[:200])
    cat = catalog_with_dataset
    before = snapshot(cat.root)
    rc = main(["--coco", str(src / "ann.json"), "--images", str(src / "images"),
               "--name", "ds", "--split", "val", "--catalog", str(cat.root)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "img1.jpg" in err and "cannot be decoded" in err
    assert snapshot(cat.root) == before

    rc = main(["--coco", str(src / "ann.json"), "--images", str(src / "images"),
               "--name", "ds", "--split", "train", "--catalog", str(cat.root)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "already has split(s) train" in err and "--overwrite" in err
    assert snapshot(cat.root) == before
