"""Parse and check a COCO ``instances_*.json`` (detection boxes only).

Checked before anything is written, each with an error that names what is wrong:

- the file is JSON and has ``images``, ``annotations`` and ``categories`` lists;
- every image has ``id``/``file_name``/``width``/``height``, every annotation
  ``id``/``image_id``/``category_id``/``bbox``, every category ``id``/``name``
  (:class:`~catalog.validation.MissingKeysError` lists the items and keys);
- ids are integers, sizes positive, ``bbox`` four finite numbers;
- no two categories share an id or a name, no image id and no ``file_name`` appears twice
  (:class:`~catalog.validation.DuplicateEntryError`);
- every annotation points at a known image and category.

Kept as they are: category ids (COCO's are non-contiguous: 1..90 for 80 classes; the manifest
stores them), image ids, ``file_name``, and the ``iscrowd`` flag (crowd boxes are ignored in
training and respected in evaluation). Images without annotations are kept (valid negatives);
image files in the folder that the json does not reference are ignored and counted.
Boxes are converted from ``[x, y, w, h]`` to ``[x1, y1, x2, y2]``; clipping to the image and
dropping zero-area boxes happens once the real image size is known, in the import driver.
Segmentations and keypoints are not imported.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from catalog.importers.images import SourceDataset, SourceImage, list_image_files
from catalog.schema import SPLITS, Category
from catalog.validation import (
    DatasetImportError,
    DuplicateEntryError,
    MalformedAnnotationsError,
    MissingKeysError,
    is_finite_number,
    list_some,
)

REQUIRED_TOP = ("images", "annotations", "categories")
REQUIRED_ITEM = {
    "images": ("id", "file_name", "width", "height"),
    "annotations": ("id", "image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}


def infer_split(path: Path) -> str | None:
    """``instances_val2017.json`` -> ``"val"``; None unless exactly one split is named."""
    tokens = set(re.split(r"[^a-z]+", path.stem.lower()))
    found = [s for s in SPLITS if s in tokens]
    return found[0] if len(found) == 1 else None


def infer_images_dir(annotations: Path) -> Path | None:
    """COCO's layout: ``<root>/annotations/instances_val2017.json`` -> ``<root>/val2017``."""
    stem = annotations.stem
    if "_" not in stem:
        return None
    candidate = annotations.parent.parent / stem.split("_", 1)[1]
    return candidate if candidate.is_dir() else None


def load_coco_json(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DatasetImportError(f"COCO annotation file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise MalformedAnnotationsError(
            f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None
    except UnicodeDecodeError as exc:
        raise MalformedAnnotationsError(f"{path} is not UTF-8 JSON ({exc})") from None
    if not isinstance(data, dict):
        raise MalformedAnnotationsError(
            f"{path}: a COCO file is a JSON object, got {type(data).__name__}")
    return data


def _int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def check_coco_dict(data: dict, where: str) -> None:
    """Structural checks: required keys and types (raises, names every offending item)."""
    missing_top = [k for k in REQUIRED_TOP if k not in data]
    if missing_top:
        raise MissingKeysError(
            f"{where} is missing required key(s) {', '.join(repr(k) for k in missing_top)} "
            f"(a COCO detection file needs {', '.join(REQUIRED_TOP)})"
        )
    problems: list[str] = []
    for key in REQUIRED_TOP:
        if not isinstance(data[key], list):
            raise MalformedAnnotationsError(
                f"{where}: {key!r} must be a list, got {type(data[key]).__name__}")
        for i, item in enumerate(data[key]):
            if not isinstance(item, dict):
                problems.append(f"{key}[{i}] is not an object")
                continue
            absent = [k for k in REQUIRED_ITEM[key] if k not in item]
            if absent:
                label = f"{key}[{i}]" + (f" (id {item['id']})" if "id" in item else "")
                problems.append(f"{label} missing {', '.join(repr(k) for k in absent)}")
    if problems:
        raise MissingKeysError(
            f"{where}: {len(problems)} item(s) lack required keys: {list_some(problems)}")

    bad: list[str] = []
    for i, img in enumerate(data["images"]):
        if _int(img["id"]) is None:
            bad.append(f"images[{i}].id={img['id']!r} is not an integer")
        if not isinstance(img["file_name"], str) or not img["file_name"].strip():
            bad.append(f"images[{i}].file_name={img['file_name']!r} is not a file name")
        for k in ("width", "height"):
            v = _int(img[k])
            if v is None or v <= 0:
                bad.append(f"images[{i}].{k}={img[k]!r} is not a positive integer")
    for i, ann in enumerate(data["annotations"]):
        for k in ("id", "image_id", "category_id"):
            if _int(ann[k]) is None:
                bad.append(f"annotations[{i}].{k}={ann[k]!r} is not an integer")
        box = ann["bbox"]
        if not (isinstance(box, (list, tuple)) and len(box) == 4
                and all(is_finite_number(v) for v in box)):
            bad.append(f"annotations[{i}] (id {ann['id']}).bbox={box!r} is not 4 finite numbers")
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1, True, False):
            bad.append(f"annotations[{i}] (id {ann['id']}).iscrowd={crowd!r} is not 0 or 1")
    for i, cat in enumerate(data["categories"]):
        if _int(cat["id"]) is None:
            bad.append(f"categories[{i}].id={cat['id']!r} is not an integer")
        if not isinstance(cat["name"], str) or not cat["name"].strip():
            bad.append(f"categories[{i}].name={cat['name']!r} is not a name")
    if bad:
        raise MalformedAnnotationsError(f"{where}: {len(bad)} bad value(s): {list_some(bad)}")


def _duplicates(values) -> list:
    seen, dup = set(), []
    for v in values:
        if v in seen and v not in dup:
            dup.append(v)
        seen.add(v)
    return dup


def parse_coco(
    annotations: str | Path,
    images: str | Path | None = None,
    split: str | None = None,
) -> SourceDataset:
    """Read and check a COCO json; returns the images of one split (see the module doc)."""
    ann_path = Path(annotations)
    if not ann_path.is_file():
        raise DatasetImportError(f"COCO annotation file not found: {ann_path}")
    if split is None:
        split = infer_split(ann_path)
        if split is None:
            raise DatasetImportError(
                f"cannot tell the split from {ann_path.name}; pass one of {', '.join(SPLITS)}")
    if split not in SPLITS:
        raise DatasetImportError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if images is None:
        images_dir = infer_images_dir(ann_path)
        if images_dir is None:
            raise DatasetImportError(
                f"no image folder given for {ann_path} and none found in COCO's layout "
                f"(expected {ann_path.parent.parent / ann_path.stem.split('_', 1)[-1]})")
    else:
        images_dir = Path(images)
    if not images_dir.is_dir():
        raise DatasetImportError(f"image folder not found: {images_dir}")

    data = load_coco_json(ann_path)
    where = str(ann_path)
    check_coco_dict(data, where)

    cats = data["categories"]
    dup_cat_ids = _duplicates(_int(c["id"]) for c in cats)
    if dup_cat_ids:
        raise DuplicateEntryError(f"{where}: category id(s) used twice: {list_some(dup_cat_ids)}")
    dup_names = _duplicates(c["name"].strip() for c in cats)
    if dup_names:
        detail = [f"{n!r} (ids {', '.join(str(c['id']) for c in cats if c['name'].strip() == n)})"
                  for n in dup_names]
        raise DuplicateEntryError(
            f"{where}: two or more categories share a name: {list_some(detail)}")
    categories = sorted(
        (Category(id=_int(c["id"]), name=c["name"].strip(),
                  supercategory=str(c.get("supercategory") or "")) for c in cats),
        key=lambda c: c.id,
    )
    if not categories:
        raise MalformedAnnotationsError(f"{where}: 'categories' is empty")

    imgs = data["images"]
    dup_ids = _duplicates(_int(i["id"]) for i in imgs)
    if dup_ids:
        raise DuplicateEntryError(
            f"{where}: image id(s) referenced twice in 'images': {list_some(dup_ids)}")
    dup_files = _duplicates(i["file_name"] for i in imgs)
    if dup_files:
        detail = [f"{f} (ids {', '.join(str(i['id']) for i in imgs if i['file_name'] == f)})"
                  for f in dup_files]
        raise DuplicateEntryError(
            f"{where}: image file(s) referenced twice in 'images': {list_some(detail)}")

    by_id: dict[int, SourceImage] = {}
    for img in imgs:
        iid = _int(img["id"])
        by_id[iid] = SourceImage(
            image_id=iid,
            file_name=img["file_name"],
            path=images_dir / img["file_name"],
            declared_size=(_int(img["width"]), _int(img["height"])),
        )
    cat_ids = {c.id for c in categories}
    unknown_img, unknown_cat = [], []
    ann_ids: list[int] = []
    for ann in data["annotations"]:
        aid, iid, cid = _int(ann["id"]), _int(ann["image_id"]), _int(ann["category_id"])
        ann_ids.append(aid)
        rec = by_id.get(iid)
        if rec is None:
            unknown_img.append(f"annotation {aid} -> image {iid}")
            continue
        if cid not in cat_ids:
            unknown_cat.append(f"annotation {aid} -> category {cid}")
            continue
        x, y, w, h = (float(v) for v in ann["bbox"])
        rec.boxes.append((x, y, x + w, y + h))
        rec.category_ids.append(cid)
        rec.iscrowd.append(bool(ann.get("iscrowd", 0)))
    if unknown_img:
        raise MalformedAnnotationsError(
            f"{where}: {len(unknown_img)} annotation(s) reference image ids not in 'images': "
            f"{list_some(unknown_img)}")
    if unknown_cat:
        raise MalformedAnnotationsError(
            f"{where}: {len(unknown_cat)} annotation(s) reference category ids not in "
            f"'categories': {list_some(unknown_cat)}")

    warnings = []
    dup_ann = _duplicates(ann_ids)
    if dup_ann:
        warnings.append(f"annotation id(s) used more than once (ids are not kept, boxes are): "
                        f"{list_some(dup_ann, 5)}")
    referenced = {i["file_name"].replace("\\", "/") for i in imgs}
    unreferenced = len(list_image_files(images_dir) - referenced)
    records = list(by_id.values())
    return SourceDataset(
        format="coco",
        source=str(ann_path),
        images_root=images_dir,
        categories=categories,
        splits={split: records},
        unreferenced_files=unreferenced,
        warnings=warnings,
        info={split: {"annotations": str(ann_path), "images": str(images_dir),
                      "json_images": len(imgs), "json_annotations": len(data["annotations"])}},
    )
