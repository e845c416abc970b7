"""COCO export: hand-built tables, and real round trips (import -> export -> pycocotools)."""
from __future__ import annotations

import contextlib
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from catalog import IMAGE_SCHEMA, Catalog, Category, DatasetManifest
from catalog.coco_export import ANNOTATION_COLUMNS, export_coco, table_to_coco
from catalog.importers import import_coco, import_voc

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
COCO_MINI = DATASETS / "coco-mini"
BCCD = DATASETS / "bccd"
SKIP_REASON = f"real datasets not found at {DATASETS} (clone shared/ beside the repo)"


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def load_coco(d: dict) -> COCO:
    coco = COCO()
    coco.dataset = d
    _quiet(coco.createIndex)
    return coco


MANIFEST = DatasetManifest(
    name="toy",
    categories=[Category(3, "car", "vehicle"), Category(17, "cat", "animal"),
                Category(90, "toothbrush", "indoor")],
)
ROWS = [
    {"image_id": 7, "file_name": "a.jpg", "width": 64, "height": 48, "image": b"",
     "boxes": [[10, 10, 30, 20], [0, 0, 64, 48]], "category_ids": [3, 90],
     "iscrowd": [False, True]},
    {"image_id": 9, "file_name": "b.png", "width": 20, "height": 20, "image": b"",
     "boxes": [], "category_ids": [], "iscrowd": []},
    {"image_id": 12, "file_name": "c.jpg", "width": 30, "height": 40, "image": b"",
     "boxes": [[1.5, 2.25, 12, 10.25]], "category_ids": [17], "iscrowd": [False]},
]


def test_table_to_coco_by_hand():
    d = table_to_coco(pa.Table.from_pylist(ROWS, schema=IMAGE_SCHEMA), MANIFEST)
    assert d["images"] == [
        {"id": 7, "file_name": "a.jpg", "width": 64, "height": 48},
        {"id": 9, "file_name": "b.png", "width": 20, "height": 20},
        {"id": 12, "file_name": "c.jpg", "width": 30, "height": 40},
    ]
    assert d["annotations"] == [
        {"id": 1, "image_id": 7, "category_id": 3, "bbox": [10, 10, 20, 10], "area": 200,
         "iscrowd": 0},
        {"id": 2, "image_id": 7, "category_id": 90, "bbox": [0, 0, 64, 48], "area": 3072,
         "iscrowd": 1},
        {"id": 3, "image_id": 12, "category_id": 17, "bbox": [1.5, 2.25, 10.5, 8.0],
         "area": 84.0, "iscrowd": 0},
    ]
    assert d["categories"] == [{"id": 3, "name": "car", "supercategory": "vehicle"},
                               {"id": 17, "name": "cat", "supercategory": "animal"},
                               {"id": 90, "name": "toothbrush", "supercategory": "indoor"}]
    coco = load_coco(json.loads(json.dumps(d)))
    assert coco.getAnnIds(imgIds=[7]) == [1, 2] and coco.getCatIds() == [3, 17, 90]


def test_only_the_named_categories():
    table = pa.Table.from_pylist(ROWS, schema=IMAGE_SCHEMA)
    d = table_to_coco(table, MANIFEST, category_names=["toothbrush", "cat"])
    assert [c["id"] for c in d["categories"]] == [17, 90]
    assert [(a["image_id"], a["category_id"]) for a in d["annotations"]] == [(7, 90), (12, 17)]
    assert len(d["images"]) == 3  # negatives stay
    with pytest.raises(KeyError, match="'dog'"):
        table_to_coco(table, MANIFEST, category_names=["dog"])


def test_annotation_columns_only_sliced_and_chunked_tables():
    full = pa.Table.from_pylist(ROWS, schema=IMAGE_SCHEMA)
    expected = table_to_coco(full, MANIFEST)
    assert table_to_coco(full.select(ANNOTATION_COLUMNS), MANIFEST) == expected
    chunked = pa.concat_tables([full.slice(0, 1), full.slice(1, 2)])
    assert chunked.column("boxes").num_chunks == 2
    assert table_to_coco(chunked, MANIFEST) == expected
    tail = table_to_coco(full.slice(1, 2), MANIFEST)
    assert [a["image_id"] for a in tail["annotations"]] == [12]
    empty = table_to_coco(full.slice(0, 0), MANIFEST)
    assert empty["images"] == [] and empty["annotations"] == []


def test_export_coco_writes_a_file_pycocotools_reads(tmp_path):
    cat = Catalog(tmp_path / "catalog")
    cat.write_dataset(DatasetManifest(name="toy", categories=list(MANIFEST.categories)),
                      {"val": ROWS})
    path = export_coco(cat, "toy", "val", tmp_path / "out" / "val.json")
    coco = _quiet(COCO, str(path))
    assert len(coco.getImgIds()) == 3 and len(coco.getAnnIds()) == 3


# ---- real round trips --------------------------------------------------------------------
def _source_boxes(d: dict) -> list[tuple]:
    sizes = {i["id"]: (i["width"], i["height"]) for i in d["images"]}
    out = []
    for a in d["annotations"]:
        w, h = sizes[a["image_id"]]
        x, y, bw, bh = a["bbox"]
        x1, y1 = min(max(x, 0), w), min(max(y, 0), h)
        x2, y2 = min(max(x + bw, 0), w), min(max(y + bh, 0), h)
        if x2 > x1 and y2 > y1:
            out.append((a["image_id"], a["category_id"], int(a.get("iscrowd", 0)),
                        x1, y1, x2 - x1, y2 - y1))
    return sorted(out)


def _exported_boxes(d: dict) -> list[tuple]:
    return sorted((a["image_id"], a["category_id"], a["iscrowd"], *a["bbox"])
                  for a in d["annotations"])


@pytest.mark.skipif(not (COCO_MINI / "annotations").is_dir(), reason=SKIP_REASON)
def test_coco_mini_round_trip(tmp_path):
    cat = Catalog(tmp_path / "catalog")
    src_path = COCO_MINI / "annotations" / "instances_val2017.json"
    import_coco(cat, "coco-mini", src_path, images=COCO_MINI / "val2017", split="val",
                test_fraction=0)  # the whole json, no test held out of it
    out = export_coco(cat, "coco-mini", "val", tmp_path / "val.json")
    src = json.loads(src_path.read_text())
    exp = _quiet(COCO, str(out))

    assert sorted(exp.getImgIds()) == sorted(i["id"] for i in src["images"])
    assert len(exp.getAnnIds()) == len(src["annotations"])
    assert {c["id"]: c["name"] for c in exp.loadCats(exp.getCatIds())} == {
        c["id"]: c["name"] for c in src["categories"]}
    assert Counter(a["category_id"] for a in exp.dataset["annotations"]) == Counter(
        a["category_id"] for a in src["annotations"])
    got, want = _exported_boxes(exp.dataset), _source_boxes(src)
    assert [g[:3] for g in got] == [w[:3] for w in want]  # ids, classes, crowd flags
    assert np.abs(np.array([g[3:] for g in got]) - np.array([w[3:] for w in want])).max() < 1e-3
    for img in src["images"]:
        e = exp.imgs[img["id"]]
        assert (e["file_name"], e["width"], e["height"]) == (
            img["file_name"], img["width"], img["height"])

    # the export is usable as evaluation ground truth: itself as detections scores AP 1
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
             "score": 1.0} for a in exp.dataset["annotations"] if not a["iscrowd"]]
    ev = COCOeval(exp, _quiet(exp.loadRes, dets), "bbox")
    _quiet(ev.evaluate)
    _quiet(ev.accumulate)
    _quiet(ev.summarize)
    assert ev.stats[0] == pytest.approx(1.0) and ev.stats[1] == pytest.approx(1.0)


@pytest.mark.skipif(not (BCCD / "BCCD").is_dir(), reason=SKIP_REASON)
def test_bccd_round_trip(tmp_path):
    cat = Catalog(tmp_path / "catalog")
    import_voc(cat, "bccd", BCCD, split_map="test=test")
    out = export_coco(cat, "bccd", "test", tmp_path / "test.json")
    exp = _quiet(COCO, str(out))
    assert [c["name"] for c in exp.loadCats(exp.getCatIds())] == ["Platelets", "RBC", "WBC"]

    import xml.etree.ElementTree as ET

    stems = (BCCD / "BCCD" / "ImageSets" / "Main" / "test.txt").read_text().split()
    file_to_id = {i["file_name"]: i["id"] for i in exp.dataset["images"]}
    name_to_id = {c["name"]: c["id"] for c in exp.dataset["categories"]}
    src = {"images": [], "annotations": []}
    for s in stems:
        root = ET.parse(BCCD / "BCCD" / "Annotations" / f"{s}.xml").getroot()
        iid = file_to_id[f"{s}.jpg"]
        size = root.find("size")
        src["images"].append({"id": iid, "width": int(size.find("width").text),
                              "height": int(size.find("height").text)})
        for obj in root.iter("object"):
            b = obj.find("bndbox")
            x1, y1, x2, y2 = (float(b.find(t).text) for t in ("xmin", "ymin", "xmax", "ymax"))
            src["annotations"].append({
                "image_id": iid, "category_id": name_to_id[obj.find("name").text.strip()],
                "bbox": [x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1]})
    assert len(exp.getImgIds()) == len(stems)
    got, want = _exported_boxes(exp.dataset), _source_boxes(src)
    assert len(got) == len(want) == len(src["annotations"])
    assert [g[:3] for g in got] == [w[:3] for w in want]
    assert np.abs(np.array([g[3:] for g in got]) - np.array([w[3:] for w in want])).max() < 1e-3
