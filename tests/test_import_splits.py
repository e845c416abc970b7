"""Splits at import: no image in two splits (by content), a test hold-out when there is none,
and a manifest that says which split is which. Real coco-mini and BCCD, copies built here."""
from __future__ import annotations

import io
import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from catalog import Catalog, DatasetManifest
from catalog.content_hash import CONTENT_HASH_ALGO, image_bytes_sha256
from catalog.holdout import ids_sha256
from catalog.importers import SplitOverlapError, import_coco, import_voc
from catalog.overlap import SharedImagesError, assert_splits_disjoint, split_overlaps
from catalog.world import build_world

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
COCO_MINI = DATASETS / "coco-mini"
BCCD = DATASETS / "bccd"
needs_coco_mini = pytest.mark.skipif(
    not (COCO_MINI / "annotations" / "instances_train2017.json").is_file(),
    reason=f"real datasets not found at {DATASETS} (clone shared/ beside the repo)")
needs_bccd = pytest.mark.skipif(
    not (BCCD / "BCCD" / "Annotations").is_dir(),
    reason=f"real datasets not found at {DATASETS} (clone shared/ beside the repo)")

TRAIN_JSON = COCO_MINI / "annotations" / "instances_train2017.json"
VAL_JSON = COCO_MINI / "annotations" / "instances_val2017.json"


def snapshot(root: Path) -> dict[str, bytes] | None:
    if not root.exists():
        return None
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(root.rglob("*"))}


def stored_hashes(cat: Catalog, name: str) -> dict[str, list[str]]:
    return {s: cat.read_split(name, s, columns=["content_sha256"])
            .column("content_sha256").to_pylist() for s in cat.manifest(name).splits}


def assert_no_hash_in_two_splits(cat: Catalog, name: str) -> None:
    hashes = stored_hashes(cat, name)
    for s, hs in hashes.items():
        assert None not in hs, f"{s} has rows without a content hash"
    seen = Counter(h for hs in hashes.values() for h in set(hs))
    assert not [h for h, n in seen.items() if n > 1]
    assert_splits_disjoint(cat, name)


# ---- overlap -----------------------------------------------------------------------------
@needs_coco_mini
def test_val_json_listing_the_train_images_is_refused(tmp_path):
    """The very same images (same files, same ids) as train and as val: refused, and the
    dataset already in the catalog is left byte for byte as it was."""
    ann = tmp_path / "instances_val2017.json"
    shutil.copy(TRAIN_JSON, ann)
    cat = Catalog(tmp_path / "catalog")
    import_coco(cat, "cm", TRAIN_JSON, images=COCO_MINI / "train2017", split="train")
    before = snapshot(cat.root)
    with pytest.raises(SplitOverlapError) as info:
        import_coco(cat, "cm", ann, images=COCO_MINI / "train2017", split="val")
    assert snapshot(cat.root) == before
    msg = str(info.value)
    assert "80 image(s) are in more than one split (train, val)" in msg
    assert "keep-in-train" in msg and "--on-overlap" in msg
    first = json.loads(TRAIN_JSON.read_text())["images"]
    assert len(info.value.pairs) == 80
    a, fa, ia, b, fb, ib = info.value.pairs[0]
    assert {a, b} == {"train", "val"} and fa == fb and ia == ib
    assert f"{fa} (id {ia})" in msg and any(i["file_name"] == fa for i in first)


def _val_with_renamed_train_copies(root: Path, n_dup: int = 5) -> tuple[Path, Path, list[str]]:
    """coco-mini's val plus ``n_dup`` train images under new names and ids: 3 byte copies,
    one lossless re-save (PNG: other bytes, same pixels) and one lossy re-encode (JPEG q=70)."""
    images = root / "val_images"
    images.mkdir(parents=True)
    val = json.loads(VAL_JSON.read_text())
    for img in val["images"]:
        (images / img["file_name"]).symlink_to(COCO_MINI / "val2017" / img["file_name"])
    train = json.loads(TRAIN_JSON.read_text())
    anns_by_image: dict[int, list] = {}
    for a in train["annotations"]:
        anns_by_image.setdefault(a["image_id"], []).append(a)
    dup_names, next_ann = [], 10**9
    for k, img in enumerate(train["images"][:n_dup]):
        src = COCO_MINI / "train2017" / img["file_name"]
        if k == 3:
            name = f"resaved_{k}.png"
            Image.open(src).save(images / name, format="PNG")
        elif k == 4:
            name = f"reencoded_{k}.jpg"
            Image.open(src).save(images / name, format="JPEG", quality=70)
        else:
            name = f"copy_{k}.jpg"
            shutil.copy(src, images / name)
        new_id = 9_000_000 + k
        val["images"].append({**img, "id": new_id, "file_name": name})
        for a in anns_by_image.get(img["id"], []):
            next_ann += 1
            val["annotations"].append({**a, "id": next_ann, "image_id": new_id})
        dup_names.append(name)
    ann = root / "instances_val2017.json"
    ann.write_text(json.dumps(val))
    return ann, images, dup_names


@needs_coco_mini
def test_renamed_copies_are_found_by_content_and_kept_in_one_split(tmp_path):
    ann, images, dups = _val_with_renamed_train_copies(tmp_path / "src")
    cat = Catalog(tmp_path / "catalog")
    import_coco(cat, "cm", TRAIN_JSON, images=COCO_MINI / "train2017", split="train")
    before = snapshot(cat.root)
    with pytest.raises(SplitOverlapError) as info:
        import_coco(cat, "cm", ann, images=images, split="val")
    assert snapshot(cat.root) == before
    # byte copies and the lossless PNG re-save are caught; the lossy re-encode is not
    assert "4 image(s) are in more than one split" in str(info.value)
    assert {p[4] for p in info.value.pairs} == set(dups[:4])
    assert "copy_0.jpg (id 9000000)" in str(info.value)

    report = import_coco(cat, "cm", ann, images=images, split="val", on_overlap="keep-in-train")
    assert report.overlap["removed"] == {"val": 4} and report.overlap["groups"] == 4
    assert report.stored["val"]["images"] == 79 + 1  # val + the lossy copy
    text = report.format_table()
    assert "images in more than one split (by content hash): 4" in text
    assert "removed 4 from val" in text
    m = cat.manifest("cm")
    assert m.splits["val"] == 80 and m.splits["train"] + m.splits["test"] == 80
    assert m.overlap == {"method": "content_sha256", "policy": "keep-in-train", "groups": 4,
                         "removed": {"val": 4}}
    names = set(cat.read_split("cm", "val", columns=["file_name"]).column("file_name")
                .to_pylist())
    assert not names & set(dups[:4]) and dups[4] in names
    assert_no_hash_in_two_splits(cat, "cm")

    # keep-in-eval: the val copies stay, train (and the test drawn from it) loses them
    cat2 = Catalog(tmp_path / "catalog2")
    import_coco(cat2, "cm", TRAIN_JSON, images=COCO_MINI / "train2017", split="train")
    report = import_coco(cat2, "cm", ann, images=images, split="val", on_overlap="keep-in-eval")
    assert report.overlap["removed"] == {"train": 4}
    m2 = cat2.manifest("cm")
    assert m2.splits["val"] == 84 and m2.splits["train"] + m2.splits["test"] == 76
    assert_no_hash_in_two_splits(cat2, "cm")


@needs_coco_mini
def test_overlap_inside_one_coco_import_of_two_json_copies_keeps_train(tmp_path):
    """Same files listed by the train json and by a copy used as val, keep-in-train: val is
    left empty, said so, and nothing is in two splits."""
    ann = tmp_path / "instances_val2017.json"
    shutil.copy(TRAIN_JSON, ann)
    cat = Catalog(tmp_path / "catalog")
    import_coco(cat, "cm", TRAIN_JSON, images=COCO_MINI / "train2017", split="train")
    report = import_coco(cat, "cm", ann, images=COCO_MINI / "train2017", split="val",
                         on_overlap="keep-in-train")
    assert report.overlap["removed"] == {"val": 80}
    assert cat.manifest("cm").splits["val"] == 0
    assert any("split 'val' is empty" in w for w in report.warnings)
    assert_no_hash_in_two_splits(cat, "cm")


# ---- hold-outs ---------------------------------------------------------------------------
def _classes_by_image(cat: Catalog, name: str, split: str) -> dict[int, set[int]]:
    t = cat.read_split(name, split, columns=["image_id", "category_ids", "iscrowd"])
    return {i: {c for c, z in zip(cs, zs) if not z} for i, cs, zs in
            zip(*(t.column(c).to_pylist() for c in ("image_id", "category_ids", "iscrowd")))}


@needs_coco_mini
def test_coco_mini_test_is_held_out_of_train_and_val_stays_whole(tmp_path):
    cat = Catalog(tmp_path / "a")
    import_coco(cat, "cm", TRAIN_JSON, images=COCO_MINI / "train2017", split="train")
    report = import_coco(cat, "cm", VAL_JSON, images=COCO_MINI / "val2017", split="val")
    m = cat.manifest("cm")
    src = json.loads(TRAIN_JSON.read_text())
    train, test = _classes_by_image(cat, "cm", "train"), _classes_by_image(cat, "cm", "test")
    assert not set(train) & set(test)
    assert set(train) | set(test) == {i["id"] for i in src["images"]}
    assert m.splits["val"] == len(json.loads(VAL_JSON.read_text())["images"]) == 79

    o = m.origin("test")
    assert (o.kind, o.source, o.fraction, o.seed, o.stratify) == (
        "held_out", "train", 0.2, 0, "rarest_class")
    assert sorted(o.image_ids) == sorted(test) and o.images == len(test)
    assert o.ids_sha256 == ids_sha256(test)
    assert m.origin("train").kind == m.origin("val").kind == "imported"
    assert m.origin("val").source == str(VAL_JSON)
    assert (m.selection_split, m.report_split, m.has_test) == ("val", "test", True)
    assert m.held_out_splits() == {"test": o} and m.content_hash == CONTENT_HASH_ALGO

    # stratified: every class with 2+ train images is on both sides, or named in a warning
    n_images = Counter(c for cs in list(train.values()) + list(test.values()) for c in cs)
    in_train = set().union(*train.values())
    in_test = set().union(*test.values())
    one_sided = {c for c, n in n_images.items() if n >= 2 and not (c in in_train and c in in_test)}
    warning = [w for w in report.warnings if "landed on one side only" in w]
    names = {c.id: c.name for c in m.categories}
    assert len(one_sided) <= 3 and all(names[c] in "".join(warning) for c in one_sided)
    assert sum(n >= 2 for n in n_images.values()) - len(one_sided) >= 50
    assert 0.2 <= len(test) / 80 <= 0.4  # rare classes push the share above 20 %
    assert "held out 'test' from 'train'" in report.format_table()

    # the order of the imports does not matter; another seed draws another test
    cat_b = Catalog(tmp_path / "b")
    import_coco(cat_b, "cm", VAL_JSON, images=COCO_MINI / "val2017", split="val")
    assert cat_b.manifest("cm").origin("test").source == "val"  # val-only so far
    import_coco(cat_b, "cm", TRAIN_JSON, images=COCO_MINI / "train2017", split="train")
    mb = cat_b.manifest("cm")
    assert mb.splits == m.splits and mb.origin("test") == o
    for s in ("train", "val", "test"):
        assert sorted(_classes_by_image(cat_b, "cm", s)) == sorted(_classes_by_image(cat, "cm", s))
    cat_c = Catalog(tmp_path / "c")
    import_coco(cat_c, "cm", TRAIN_JSON, images=COCO_MINI / "train2017", split="train",
                holdout_seed=7)
    assert cat_c.manifest("cm").origin("test").ids_sha256 != o.ids_sha256


@needs_bccd
def test_bccd_keeps_its_own_test_split(tmp_path):
    cat = Catalog(tmp_path)
    report = import_voc(cat, "bccd", BCCD)
    m = cat.manifest("bccd")
    assert m.splits == {"train": 205, "val": 87, "test": 72} and not report.holdouts
    assert {s: o.kind for s, o in m.split_origins.items()} == {
        "train": "imported", "val": "imported", "test": "imported"}
    assert m.report_split == "test" and not m.held_out_splits()
    assert report.overlap["groups"] == 0
    assert_no_hash_in_two_splits(cat, "bccd")


@needs_bccd
def test_bccd_hold_outs_follow_what_is_imported(tmp_path):
    cat = Catalog(tmp_path)
    # train only: val and test are both held out of it, stratified over the 3 classes
    report = import_voc(cat, "b", BCCD, split_map="train=train")
    m = cat.manifest("b")
    assert set(m.held_out_splits()) == {"val", "test"}
    assert m.splits["train"] + m.splits["val"] + m.splits["test"] == 205
    assert abs(report.holdouts["test"]["images"] / 205 - 0.2) < 0.02
    assert abs(report.holdouts["val"]["images"] / 205 - 0.1) < 0.02
    assert m.origin("val").fraction == 0.1 and m.origin("val").source == "train"
    for s in ("train", "val", "test"):
        assert set().union(*_classes_by_image(cat, "b", s).values()) == {1, 2, 3}
    assert_no_hash_in_two_splits(cat, "b")

    # the real val arrives: the held-out val returns to train; test is drawn as before
    test_before = m.origin("test")
    report = import_voc(cat, "b", BCCD, split_map="val=val")
    m = cat.manifest("b")
    assert m.splits["val"] == 87 and m.origin("val").kind == "imported"
    assert m.splits["train"] + m.splits["test"] == 205 and m.origin("test") == test_before
    assert any("'val' hold-out returned to 'train'" in n for n in report.notes)
    one_shot = Catalog(tmp_path / "one")
    import_voc(one_shot, "b", BCCD, split_map="train=train,val=val")
    assert one_shot.manifest("b").splits == m.splits
    assert one_shot.manifest("b").origin("test") == test_before

    # and the real test: the held-out test returns to train, nothing is held out any more
    import_voc(cat, "b", BCCD, split_map="test=test")
    m = cat.manifest("b")
    assert m.splits == {"train": 205, "val": 87, "test": 72} and not m.held_out_splits()
    assert_no_hash_in_two_splits(cat, "b")


def test_world_keeps_its_own_test_split_and_hashes_every_row(tmp_path):
    cat = Catalog(tmp_path)
    m = build_world(cat, "w", n_train=6, n_val=3, n_test=3, seed=0, progress=False, workers=1)
    assert m.splits == {"train": 6, "val": 3, "test": 3}
    assert {s: o.kind for s, o in m.split_origins.items()} == {
        "train": "generated", "val": "generated", "test": "generated"}
    assert m.content_hash == CONTENT_HASH_ALGO and not m.held_out_splits()
    rows = cat.read_split("w", "val").to_pylist()
    assert all(r["content_sha256"] == image_bytes_sha256(r["image"]) for r in rows)
    assert_no_hash_in_two_splits(cat, "w")


# ---- older datasets ----------------------------------------------------------------------
def _legacy_dataset(cat: Catalog, name: str, images: list[bytes]) -> None:
    """A dataset as the code before content hashes and split origins wrote it."""
    legacy_schema = pa.schema([f for f in pa.schema(
        [("image_id", pa.int64()), ("file_name", pa.string()), ("width", pa.int32()),
         ("height", pa.int32()), ("image", pa.binary()),
         ("boxes", pa.list_(pa.list_(pa.float32(), 4))), ("category_ids", pa.list_(pa.int32())),
         ("iscrowd", pa.list_(pa.bool_()))])])
    d = cat.dataset_dir(name)
    d.mkdir(parents=True)
    rows = [{"image_id": i + 1, "file_name": f"old{i}.png", "width": 32, "height": 24,
             "image": data, "boxes": [[1, 1, 10, 10]], "category_ids": [1], "iscrowd": [False]}
            for i, data in enumerate(images)]
    pq.write_table(pa.Table.from_pylist(rows, schema=legacy_schema), d / "train.parquet")
    (d / "dataset.json").write_text(json.dumps({
        "name": name, "categories": [{"id": 1, "name": "thing", "supercategory": ""}],
        "splits": {"train": len(rows)}, "class_splits": [], "source": "coco", "info": {}}))


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), color).save(buf, format="PNG")
    return buf.getvalue()


def test_legacy_dataset_reads_with_defaults_and_is_checked_on_the_next_import(tmp_path):
    cat = Catalog(tmp_path / "catalog")
    olds = [_png((10 * k, 50, 90)) for k in range(4)]
    _legacy_dataset(cat, "old", olds)
    m = cat.manifest("old")
    assert m.split_origins == {} and m.origin("train").kind == "unknown"
    assert m.content_hash == "" and not m.has_content_hashes and m.overlap == {}
    assert (m.selection_split, m.report_split, m.has_test) == (None, None, False)
    assert DatasetManifest.from_json(m.to_json()) == m
    assert cat.read_split("old", "train").column("content_sha256").to_pylist() == [None] * 4

    # a val whose first image is a legacy train image: found although train has no hashes
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(olds[0])
    Image.new("RGB", (32, 24), (200, 0, 0)).save(src / "b.png")
    ann = src / "val.json"
    ann.write_text(json.dumps({
        "images": [{"id": 100 + k, "file_name": f, "width": 32, "height": 24}
                   for k, f in enumerate(["a.png", "b.png"])],
        "annotations": [{"id": 1, "image_id": 101, "category_id": 1, "bbox": [2, 2, 8, 8]}],
        "categories": [{"id": 1, "name": "thing"}]}))
    before = snapshot(cat.root)
    with pytest.raises(SplitOverlapError, match="train/old0.png"):
        import_coco(cat, "old", ann, images=src, split="val")
    assert snapshot(cat.root) == before
    report = import_coco(cat, "old", ann, images=src, split="val", on_overlap="keep-in-eval",
                         test_fraction=0)
    assert report.overlap["removed"] == {"train": 1}
    m = cat.manifest("old")
    assert m.splits == {"train": 3, "val": 2} and m.has_content_hashes
    assert m.origin("train").kind == "unknown" and m.origin("val").kind == "imported"
    assert any("no test split" in w for w in report.warnings)
    assert_no_hash_in_two_splits(cat, "old")  # the legacy rows got their hashes


# ---- the job -----------------------------------------------------------------------------
@needs_coco_mini
def test_job_overlap_flags(tmp_path, capsys):
    from jobs.import_dataset import main

    ann, images, _ = _val_with_renamed_train_copies(tmp_path / "src")
    base = ["--name", "cm", "--catalog", str(tmp_path / "cat")]
    assert main(["--coco", str(TRAIN_JSON), "--images", str(COCO_MINI / "train2017"),
                 "--split", "train", "--test-fraction", "0", "--val-fraction", "0"] + base) == 0
    capsys.readouterr()
    rc = main(["--coco", str(ann), "--images", str(images), "--split", "val"] + base)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "more than one split" in err
    rc = main(["--coco", str(ann), "--images", str(images), "--split", "val",
               "--on-overlap", "keep-in-train", "--test-fraction", "0"] + base)
    out = capsys.readouterr().out
    assert rc == 0 and "removed 4 from val" in out
    assert Catalog(tmp_path / "cat").manifest("cm").splits == {"train": 80, "val": 79 + 5 - 4}

    with pytest.raises(SystemExit) as exc:
        main(["--coco", str(ann), "--test-fraction", "1.5"] + base)
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    for flag in ("--on-overlap", "keep-in-eval", "--test-fraction", "--val-fraction",
                 "--holdout-seed"):
        assert flag in help_text


def test_split_overlaps_reports_pairs_of_a_stored_dataset(tmp_path):
    cat = Catalog(tmp_path)
    a, b = _png((1, 2, 3)), _png((4, 5, 6))
    row = {"width": 32, "height": 24, "boxes": [], "category_ids": [], "iscrowd": []}
    cat.write_dataset(DatasetManifest(name="d", categories=[]), {
        "train": [{**row, "image_id": 1, "file_name": "x.png", "image": a},
                  {**row, "image_id": 2, "file_name": "y.png", "image": b}],
        "test": [{**row, "image_id": 3, "file_name": "renamed.png", "image": a}]})
    found = split_overlaps(cat, "d")
    assert list(found) == [("train", "test")]
    assert [(p.left_file, p.right_file, p.by) for p in found[("train", "test")]] == [
        ("x.png", "renamed.png", "content_sha256")]
    with pytest.raises(SharedImagesError, match="train/test: 1"):
        assert_splits_disjoint(cat, "d")
    assert_splits_disjoint(cat, "d", splits=["train"])
