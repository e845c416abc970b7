"""Export a catalog split as a COCO detection dict / json file.

Used by evaluation (pycocotools ground truth) and by users taking their data back out, so it
reads only the annotation columns (never the image bytes) and builds the dict with numpy.

The result loads in pycocotools: ``coco = COCO(); coco.dataset = d; coco.createIndex()``.
Images keep their catalog ids, ``file_name`` and (EXIF-corrected) size; annotations get ids
1..N in table order, ``bbox`` as ``[x, y, w, h]``, ``area = w * h`` (the box area: the catalog
stores no segmentation), and ``iscrowd`` 0/1 (crowd/difficult boxes, which COCOeval ignores).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from catalog.schema import DatasetManifest
from catalog.storage import Storage, is_uri

if TYPE_CHECKING:
    from catalog.store import Catalog

ANNOTATION_COLUMNS = ["image_id", "file_name", "width", "height", "boxes", "category_ids",
                      "iscrowd"]


def _flat(column: pa.ChunkedArray | pa.Array, depth: int) -> pa.Array:
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    for _ in range(depth):
        arr = arr.flatten()
    return arr


def _lengths(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return np.asarray(pc.list_value_length(arr).fill_null(0).to_numpy(), dtype=np.int64)


def table_to_coco(
    table: pa.Table,
    manifest: DatasetManifest,
    category_names: Sequence[str] | None = None,
) -> dict:
    """A COCO dict for the rows of ``table`` (IMAGE_SCHEMA; the ``image`` column is not read).

    With ``category_names`` only those categories and their annotations are exported (every
    image is still listed: an image without those classes is a valid negative).
    """
    categories = list(manifest.categories)
    if category_names is not None:
        by_name = manifest.category_by_name()
        unknown = [n for n in category_names if n not in by_name]
        if unknown:
            raise KeyError(f"dataset {manifest.name!r} has no categor(ies) "
                           f"{', '.join(map(repr, unknown))}")
        wanted = set(category_names)
        categories = [c for c in categories if c.name in wanted]
    cat_ids = np.array(sorted(c.id for c in categories), dtype=np.int64)

    image_ids = np.asarray(table.column("image_id").to_numpy(), dtype=np.int64)
    widths = table.column("width").to_numpy()
    heights = table.column("height").to_numpy()
    file_names = table.column("file_name").to_pylist()
    images = [
        {"id": int(i), "file_name": f, "width": int(w), "height": int(h)}
        for i, f, w, h in zip(image_ids.tolist(), file_names, widths.tolist(), heights.tolist())
    ]

    annotations: list[dict] = []
    if table.num_rows:
        counts = _lengths(table.column("category_ids"))
        cids = np.asarray(_flat(table.column("category_ids"), 1).to_numpy(), dtype=np.int64)
        crowd = np.asarray(
            _flat(table.column("iscrowd"), 1).to_numpy(zero_copy_only=False), dtype=bool)
        boxes = np.asarray(_flat(table.column("boxes"), 2).to_numpy(), dtype=np.float64)
        boxes = boxes.reshape(-1, 4)
        if not (len(cids) == len(crowd) == len(boxes) == int(counts.sum())):
            raise ValueError("boxes, category_ids and iscrowd have different lengths")
        owner = np.repeat(image_ids, counts)
        keep = np.isin(cids, cat_ids) if category_names is not None else slice(None)
        owner, cids, crowd, boxes = owner[keep], cids[keep], crowd[keep], boxes[keep]
        xywh = boxes.copy()
        xywh[:, 2:] -= boxes[:, :2]
        area = np.round(xywh[:, 2] * xywh[:, 3], 4).tolist()
        xywh = np.round(xywh, 4).tolist()
        annotations = [
            {"id": k, "image_id": i, "category_id": c, "bbox": b, "area": a, "iscrowd": int(z)}
            for k, (i, c, b, a, z) in enumerate(
                zip(owner.tolist(), cids.tolist(), xywh, area, crowd.tolist()), start=1)
        ]
    return {
        "info": {"description": f"{manifest.name} exported from the fewshot catalog"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": c.id, "name": c.name, "supercategory": c.supercategory}
            for c in sorted(categories, key=lambda c: c.id)
        ],
    }


def export_coco(
    catalog: "Catalog",
    dataset: str,
    split: str,
    path: str | os.PathLike,
    category_names: Sequence[str] | None = None,
) -> Path | str:
    """Write ``split`` of ``dataset`` as a COCO json file at ``path`` (a local path or a
    URI such as ``s3://bucket/key.json``, written whole); returns where it went."""
    manifest = catalog.manifest(dataset)
    table = catalog.read_split(dataset, split, columns=ANNOTATION_COLUMNS)
    coco = table_to_coco(table, manifest, category_names)
    target = os.fspath(path)
    if is_uri(target):
        parent, name = target.rstrip("/").rsplit("/", 1)
    else:
        parent, name = os.path.split(os.path.abspath(target))
    st = Storage.from_uri(parent)
    key = st.path(name)
    st.make_dirs(st.root)
    st.write_bytes(key, json.dumps(coco).encode("utf-8"))
    return Path(path) if st.local else st.uri(key)
