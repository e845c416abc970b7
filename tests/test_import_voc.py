"""Pascal VOC import: the real BCCD folder and VOC's own conventions on small files."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from catalog import Catalog
from catalog.importers import DatasetImportError, import_voc, parse_split_map
from catalog.importers.voc import find_voc_root

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
BCCD = DATASETS / "bccd"
needs_bccd = pytest.mark.skipif(
    not (BCCD / "BCCD" / "Annotations").is_dir(),
    reason=f"real datasets not found at {DATASETS} (clone shared/ beside the repo)",
)


def _xml_objects(stem: str) -> list[tuple[str, list[float]]]:
    root = ET.parse(BCCD / "BCCD" / "Annotations" / f"{stem}.xml").getroot()
    out = []
    for obj in root.iter("object"):
        b = obj.find("bndbox")
        x1, y1, x2, y2 = (float(b.find(t).text) for t in ("xmin", "ymin", "xmax", "ymax"))
        out.append((obj.find("name").text.strip(), [x1 - 1, y1 - 1, x2, y2]))
    return out


def _image_set(name: str) -> list[str]:
    return (BCCD / "BCCD" / "ImageSets" / "Main" / f"{name}.txt").read_text().split()


@pytest.fixture(scope="module")
def bccd(tmp_path_factory):
    if not (BCCD / "BCCD" / "Annotations").is_dir():
        pytest.skip(f"real datasets not found at {DATASETS} (clone shared/ beside the repo)")
    cat = Catalog(tmp_path_factory.mktemp("catalog"))
    report = import_voc(cat, "bccd", BCCD)  # finds BCCD/ below, skips all.xml
    return cat, report


@needs_bccd
def test_bccd_splits_follow_the_image_sets(bccd):
    cat, report = bccd
    manifest = cat.manifest("bccd")
    assert [(c.id, c.name) for c in manifest.categories] == [(1, "Platelets"), (2, "RBC"),
                                                             (3, "WBC")]
    assert manifest.splits == {s: len(_image_set(s)) for s in ("train", "val", "test")}
    assert sum(manifest.splits.values()) == len(list((BCCD / "BCCD" / "Annotations")
                                                     .glob("*.xml"))) == 364
    assert report.unassigned_images == 0 and report.unreferenced_files == 0


@needs_bccd
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_bccd_counts_match_the_xml_files(bccd, split):
    cat, report = bccd
    stems = _image_set(split)
    expected = Counter(name for s in stems for name, _ in _xml_objects(s))
    names = {c.id: c.name for c in cat.manifest("bccd").categories}
    table = cat.read_split("bccd", split, columns=["file_name", "category_ids", "iscrowd"])
    stored = Counter(names[c] for row in table.column("category_ids").to_pylist() for c in row)
    assert stored == expected
    assert sorted(table.column("file_name").to_pylist()) == sorted(f"{s}.jpg" for s in stems)
    st = report.splits[split]
    assert st.images == len(stems) and st.boxes == sum(expected.values())
    assert st.crowd == 0 and not any(any(r) for r in table.column("iscrowd").to_pylist())


@needs_bccd
def test_bccd_boxes_are_zero_based(bccd):
    cat, report = bccd
    table = cat.read_split("bccd", "val", columns=["file_name", "boxes", "width", "height"])
    for row in table.slice(0, 25).to_pylist():
        src = [b for _, b in _xml_objects(Path(row["file_name"]).stem)]
        w, h = row["width"], row["height"]
        clipped = [[min(max(v, 0), lim) for v, lim in zip(b, (w, h, w, h))] for b in src]
        clipped = [b for b in clipped if b[2] > b[0] and b[3] > b[1]]
        assert np.allclose(sorted(row["boxes"]), sorted(clipped), atol=1e-3)
    total = report.total
    assert total.boxes + total.dropped_zero_area == 4888


@needs_bccd
def test_bccd_into_one_split_or_a_custom_map(tmp_path):
    cat = Catalog(tmp_path)
    rep = import_voc(cat, "all", BCCD, split="train", test_fraction=0, val_fraction=0)
    assert cat.manifest("all").splits == {"train": 364}
    rep = import_voc(cat, "tv", BCCD, split_map="trainval=train,test=test", val_fraction=0)
    assert cat.manifest("tv").splits == {"train": len(_image_set("trainval")),
                                         "test": len(_image_set("test"))}
    assert rep.unassigned_images == 0
    assert cat.manifest("all").categories == cat.manifest("tv").categories


# ---- VOC conventions on small files ------------------------------------------------------
def _write_voc(root: Path, items: dict[str, list[tuple]], size=(50, 40), sets=None):
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    for k, (stem, objects) in enumerate(items.items()):  # distinct pixels: distinct images
        Image.new("RGB", size, (120, 20 * k % 256, 120)).save(root / "JPEGImages" / f"{stem}.jpg")
        objs = "".join(
            f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin>"
            f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
            for n, b, d in objects)
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename><size><width>{size[0]}</width>"
            f"<height>{size[1]}</height><depth>3</depth></size>{objs}</annotation>")
    if sets:
        (root / "ImageSets" / "Main").mkdir(parents=True)
        for name, stems in sets.items():
            (root / "ImageSets" / "Main" / f"{name}.txt").write_text("\n".join(stems) + "\n")


def test_voc_conventions(tmp_path):
    _write_voc(tmp_path / "VOCdevkit" / "VOC2007", {
        "000005": [("dog", (1, 1, 50, 40), 0), ("cat", (10.5, 5, 20.5, 15), 1)],
        "000007": [("dog", (30, 20, 60, 45), 0), ("bird", (6, 5, 5, 9), 0)],
        "000009": [("cat", (2, 2, 10, 10), 0)],
    }, sets={"train": ["000005", "000007"], "val": ["000009"]})
    cat = Catalog(tmp_path / "cat")
    report = import_voc(cat, "voc", tmp_path / "VOCdevkit", test_fraction=0)  # as listed
    m = cat.manifest("voc")
    assert [(c.id, c.name) for c in m.categories] == [(1, "bird"), (2, "cat"), (3, "dog")]
    assert m.splits == {"train": 2, "val": 1}
    rows = {r["image_id"]: r for r in cat.read_split("voc", "train").to_pylist()}
    assert set(rows) == {5, 7}  # numeric stems become the image ids
    # 1-based inclusive -> 0-based: a full-image box covers [0, 0, 50, 40]
    assert rows[5]["boxes"] == [[0, 0, 50, 40], [9.5, 4, 20.5, 15]]
    assert rows[5]["category_ids"] == [3, 2]
    assert rows[5]["iscrowd"] == [False, True]  # difficult
    # clipped; xmax = xmin - 1 is zero width in VOC's inclusive pixels (xmax = xmin is 1 px)
    assert rows[7]["boxes"] == [[29, 19, 50, 40]]
    st = report.splits["train"]
    assert (st.boxes, st.crowd, st.clipped, st.dropped_zero_area) == (3, 1, 1, 1)
    assert report.warnings and "test.txt not found" in report.warnings[0]


def test_voc_without_image_sets_needs_a_split(tmp_path):
    _write_voc(tmp_path / "voc", {"a": [("x", (1, 1, 5, 5), 0)]})
    cat = Catalog(tmp_path / "cat")
    with pytest.raises(DatasetImportError, match="pass a split"):
        import_voc(cat, "v", tmp_path / "voc")
    assert cat.list_datasets() == []
    import_voc(cat, "v", tmp_path / "voc", split="test")
    assert cat.manifest("v").splits == {"test": 1}
    assert cat.read_split("v", "test").column("image_id").to_pylist() == [1]


def test_voc_unassigned_images_are_counted(tmp_path):
    _write_voc(tmp_path / "voc", {s: [("x", (1, 1, 5, 5), 0)] for s in ("a", "b", "c")},
               sets={"train": ["a"], "val": ["b"]})
    report = import_voc(Catalog(tmp_path / "cat"), "v", tmp_path / "voc")
    assert report.unassigned_images == 1
    assert any("none of the mapped image sets" in w for w in report.warnings)


def test_split_map_parsing():
    assert parse_split_map(None) == {"train": "train", "val": "val", "test": "test"}
    assert parse_split_map("trainval=train, test=val") == {"trainval": "train", "test": "val"}
    with pytest.raises(DatasetImportError, match="must be one of"):
        parse_split_map("train=training")
    with pytest.raises(DatasetImportError, match="expected VOC_SET=SPLIT"):
        parse_split_map("train")


def test_find_voc_root(tmp_path):
    (tmp_path / "a" / "VOC2007" / "Annotations").mkdir(parents=True)
    assert find_voc_root(tmp_path / "a") == tmp_path / "a" / "VOC2007"
    assert find_voc_root(tmp_path) == tmp_path / "a" / "VOC2007"
    (tmp_path / "a" / "VOC2012" / "Annotations").mkdir(parents=True)
    with pytest.raises(DatasetImportError, match="several VOC folders"):
        find_voc_root(tmp_path / "a")
    with pytest.raises(DatasetImportError, match="not found"):
        find_voc_root(tmp_path / "nope")


def test_job_imports_voc(tmp_path, capsys):
    from jobs.import_dataset import main

    _write_voc(tmp_path / "voc", {"a": [("x", (1, 1, 5, 5), 0)], "b": [("y", (2, 2, 9, 9), 1)]})
    rc = main(["--voc", str(tmp_path / "voc"), "--name", "v", "--split", "val",
               "--catalog", str(tmp_path / "cat")])
    out = capsys.readouterr().out
    assert rc == 0 and "Import report for dataset 'v'" in out
    assert Catalog(tmp_path / "cat").manifest("v").splits == {"val": 2}
