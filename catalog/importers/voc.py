"""Parse and check a Pascal VOC folder: ``Annotations/*.xml``, ``JPEGImages/``,
``ImageSets/Main/<set>.txt``.

Conventions (stated here because VOC leaves them to the reader):

- **Coordinates.** VOC pixel coordinates are 1-based and inclusive: a box covering the whole
  of a 640-pixel-wide image is ``xmin=1, xmax=640``. They are converted to the catalog's
  0-based continuous float pixels as ``(xmin - 1, ymin - 1, xmax, ymax)``; clipping to the
  image and dropping zero-area boxes happen in the import driver.
- **difficult.** Objects marked ``<difficult>1</difficult>`` are stored with the ``iscrowd``
  flag: ignored in training and respected in evaluation (pycocotools treats them as "ignore"
  regions, as the VOC devkit ignores difficult objects). ``truncated``/``pose`` are not kept.
- **Categories** are the object names found in *all* the folder's annotation files, given ids
  1..N in sorted name order, so separate imports of different splits of the same folder agree.
- **Image ids** are the file stems as integers when every stem is a number (``000005`` -> 5),
  otherwise 1..N in sorted stem order.
- **Splits.** ``ImageSets/Main/<set>.txt`` files are mapped to catalog splits
  (default ``train=train,val=val,test=test``); annotated images in none of the mapped sets
  are ignored and counted. Passing ``split`` puts every annotated image into that split.
- The folder may be the VOC root itself or a folder holding exactly one VOC root
  (``bccd/`` -> ``bccd/BCCD``, ``VOCdevkit/`` -> ``VOCdevkit/VOC2007``). Stray XML files next
  to the root (``all.xml``) are not read.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from catalog.importers.images import SourceDataset, SourceImage, list_image_files
from catalog.schema import SPLITS, Category
from catalog.validation import (
    DatasetImportError,
    DuplicateEntryError,
    MalformedAnnotationsError,
    MissingKeysError,
    list_some,
)

DEFAULT_SPLIT_MAP = {"train": "train", "val": "val", "test": "test"}


def parse_split_map(text: str | dict[str, str] | None) -> dict[str, str]:
    """``"train=train,val=val,trainval=train"`` -> ``{voc_set: catalog_split}``."""
    if text is None:
        return dict(DEFAULT_SPLIT_MAP)
    if isinstance(text, dict):
        pairs = list(text.items())
    else:
        pairs = []
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            if part.count("=") != 1:
                raise DatasetImportError(
                    f"bad split map entry {part!r}: expected VOC_SET=SPLIT, e.g. train=train")
            a, b = (s.strip() for s in part.split("="))
            pairs.append((a, b))
    out: dict[str, str] = {}
    for voc_set, split in pairs:
        if not voc_set or split not in SPLITS:
            raise DatasetImportError(
                f"bad split map entry {voc_set}={split}: the split must be one of "
                f"{', '.join(SPLITS)}")
        out[voc_set] = split
    if not out:
        raise DatasetImportError("the split map is empty")
    return out


def find_voc_root(path: str | Path) -> Path:
    """The folder holding ``Annotations/`` (``path`` itself or a single sub-folder)."""
    path = Path(path)
    if not path.is_dir():
        raise DatasetImportError(f"VOC folder not found: {path}")
    if (path / "Annotations").is_dir():
        return path
    found = sorted(p.parent for p in path.glob("*/Annotations") if p.is_dir())
    if not found:
        found = sorted(p.parent for p in path.glob("*/*/Annotations") if p.is_dir())
    if len(found) == 1:
        return found[0]
    if not found:
        raise DatasetImportError(
            f"{path} is not a Pascal VOC folder: no Annotations/ folder in it or below it")
    raise DatasetImportError(
        f"{path} holds several VOC folders ({list_some([str(f) for f in found])}); "
        "pass one of them")


def _text(elem: ET.Element, tag: str) -> str | None:
    child = elem.find(tag)
    if child is None or child.text is None:
        return None
    return child.text.strip()


def _number(elem: ET.Element, tag: str) -> float | None:
    value = _text(elem, tag)
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _parse_xml(path: Path) -> tuple[dict | None, list[str], list[str]]:
    """One annotation file -> (record, missing-key problems, other problems)."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        return None, [], [f"{path.name}: not valid XML ({exc})"]
    if root.tag != "annotation":
        return None, [], [f"{path.name}: root element is <{root.tag}>, not <annotation>"]
    missing: list[str] = []
    bad: list[str] = []
    size = root.find("size")
    declared = None
    if size is not None:
        w, h = _number(size, "width"), _number(size, "height")
        if w and h and w > 0 and h > 0:
            declared = (int(w), int(h))
    objects = []
    for k, obj in enumerate(root.findall("object")):
        name = _text(obj, "name")
        box = obj.find("bndbox")
        absent = (["name"] if not name else []) + (["bndbox"] if box is None else [])
        if box is not None:
            absent += [t for t in ("xmin", "ymin", "xmax", "ymax") if _text(box, t) is None]
        if absent:
            missing.append(f"{path.name} object {k}: missing {', '.join(absent)}")
            continue
        coords = [_number(box, t) for t in ("xmin", "ymin", "xmax", "ymax")]
        if any(c is None for c in coords):
            bad.append(f"{path.name} object {k} ({name}): non-numeric bndbox")
            continue
        diff = _text(obj, "difficult")
        try:
            difficult = bool(int(float(diff))) if diff else False
        except ValueError:
            bad.append(f"{path.name} object {k} ({name}): difficult={diff!r} is not 0 or 1")
            continue
        x1, y1, x2, y2 = coords
        objects.append((name, (x1 - 1.0, y1 - 1.0, x2, y2), difficult))
    return {"filename": _text(root, "filename"), "size": declared, "objects": objects}, \
        missing, bad


def _resolve_image(stem: str, filename: str | None, files: set[str],
                   by_stem: dict[str, str]) -> str:
    """The image's name under JPEGImages/ (the xml's <filename>, else the stem + extension)."""
    if filename:
        name = Path(filename.replace("\\", "/")).name
        if name in files:
            return name
        if not Path(name).suffix:
            for ext in (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG"):
                if name + ext in files:
                    return name + ext
    if stem in by_stem:
        return by_stem[stem]
    return Path(filename.replace("\\", "/")).name if filename else stem + ".jpg"


def _read_set(path: Path) -> list[str]:
    stems = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if parts:
            stems.append(parts[0])
    return stems


def parse_voc(
    root: str | Path,
    split: str | None = None,
    split_map: dict[str, str] | str | None = None,
) -> SourceDataset:
    """Read and check a VOC folder; returns its images by catalog split (see the module doc)."""
    voc = find_voc_root(root)
    ann_dir = voc / "Annotations"
    img_dir = voc / "JPEGImages"
    if not img_dir.is_dir():
        raise DatasetImportError(f"{voc} has no JPEGImages/ folder")
    if split is not None and split_map is not None:
        raise DatasetImportError("give either one split for everything or a split map, not both")
    if split is not None and split not in SPLITS:
        raise DatasetImportError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")

    xml_files = sorted(ann_dir.glob("*.xml"))
    if not xml_files:
        raise DatasetImportError(f"{ann_dir} holds no .xml annotation files")
    files = list_image_files(img_dir)

    records: dict[str, dict] = {}
    missing: list[str] = []
    bad: list[str] = []
    for path in xml_files:
        rec, m, b = _parse_xml(path)
        missing += m
        bad += b
        if rec is not None:
            records[path.stem] = rec
    if bad:
        raise MalformedAnnotationsError(
            f"{ann_dir}: {len(bad)} problem(s) in the annotation files: {list_some(bad)}")
    if missing:
        raise MissingKeysError(
            f"{ann_dir}: {len(missing)} object(s) lack required elements: {list_some(missing)}")

    stems = sorted(records)
    names = sorted({o[0] for rec in records.values() for o in rec["objects"]})
    if not names:
        raise MalformedAnnotationsError(f"{ann_dir}: no <object> in any annotation file")
    cat_id = {n: i for i, n in enumerate(names, start=1)}
    categories = [Category(id=i, name=n) for n, i in cat_id.items()]

    numeric = all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems)
    image_id = {s: (int(s) if numeric else i) for i, s in enumerate(stems, start=1)}

    by_stem: dict[str, str] = {}
    for f in sorted(files):
        if "/" not in f:
            by_stem.setdefault(Path(f).stem, f)
    file_of = {s: _resolve_image(s, records[s]["filename"], files, by_stem) for s in stems}
    owners: dict[str, list[str]] = {}
    for s, f in file_of.items():
        owners.setdefault(f, []).append(s)
    twice = [f"{f} ({', '.join(o + '.xml' for o in own)})"
             for f, own in owners.items() if len(own) > 1]
    if twice:
        raise DuplicateEntryError(
            f"{ann_dir}: image file(s) referenced by more than one annotation file: "
            f"{list_some(twice)}")

    warnings: list[str] = []
    info: dict[str, dict] = {}
    assignment: dict[str, str] = {}
    if split is not None:
        assignment = {s: split for s in stems}
        info[split] = {"root": str(voc), "image_sets": "all annotation files"}
    else:
        mapping = parse_split_map(split_map)
        sets_dir = voc / "ImageSets" / "Main"
        used = []
        for voc_set, target in mapping.items():
            path = sets_dir / f"{voc_set}.txt"
            if not path.is_file():
                warnings.append(f"image set {voc_set}.txt not found; nothing imported into "
                                f"{target!r} from it")
                continue
            used.append(voc_set)
            listed = _read_set(path)
            unknown = [s for s in listed if s not in records]
            if unknown:
                raise MissingKeysError(
                    f"{path} lists {len(unknown)} image(s) with no annotation file in "
                    f"{ann_dir}: {list_some(unknown)}")
            clash = [f"{s} ({assignment[s]} and {target})" for s in listed
                     if assignment.get(s, target) != target]
            if clash:
                raise DuplicateEntryError(
                    f"the split map puts image(s) into two splits: {list_some(clash)}")
            for s in listed:
                assignment[s] = target
            info.setdefault(target, {"root": str(voc), "image_sets": []})
            info[target]["image_sets"].append(voc_set)
        if not used:
            raise DatasetImportError(
                f"{voc} has none of the image sets {', '.join(m + '.txt' for m in mapping)} "
                f"in ImageSets/Main; pass a split to import every annotated image into it")

    splits: dict[str, list[SourceImage]] = {}
    for s in stems:  # sorted: deterministic order inside each split
        target = assignment.get(s)
        if target is None:
            continue
        rec = records[s]
        img = SourceImage(image_id=image_id[s], file_name=file_of[s], path=img_dir / file_of[s],
                          declared_size=rec["size"])
        for name, box, difficult in rec["objects"]:
            img.boxes.append(box)
            img.category_ids.append(cat_id[name])
            img.iscrowd.append(difficult)
        splits.setdefault(target, []).append(img)
    splits = {k: splits[k] for k in SPLITS if k in splits}
    unassigned = len(stems) - len(assignment)
    if unassigned:
        warnings.append(f"{unassigned} annotated image(s) are in none of the mapped image sets "
                        "and were not imported")
    referenced = set(file_of.values())
    return SourceDataset(
        format="voc",
        source=str(voc),
        images_root=img_dir,
        categories=categories,
        splits=splits,
        unreferenced_files=len(files - referenced),
        unassigned_images=unassigned,
        warnings=warnings,
        info=info,
    )
