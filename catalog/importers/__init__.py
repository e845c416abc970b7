"""Bring your own data: import COCO json and Pascal VOC XML into the Parquet catalog.

    from catalog import Catalog
    from catalog.importers import import_coco, import_voc

    cat = Catalog()
    report = import_coco(cat, "coco-mini", "annotations/instances_train2017.json",
                         images="train2017", split="train")
    report = import_coco(cat, "coco-mini", "annotations/instances_val2017.json",
                         images="val2017", split="val")        # adds a split
    report = import_voc(cat, "bccd", "bccd/")                  # train/val/test from ImageSets
    print(report.format_table())

An import is all-or-nothing. The annotation file is checked completely before anything is
written (missing keys, duplicates, unknown ids, missing image files — the last all listed in
one error); images are then decoded into a staging folder, and a corrupt image aborts the
import with an error that names it. In every failure the catalog is left exactly as it was.

Adding a split to an existing dataset rewrites the dataset atomically: the existing splits are
copied, the new one is added, and the categories must match (same ids and names). Importing a
split that already exists is refused unless ``overwrite=True``, which replaces that split and
keeps the others.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from catalog.importers.coco import parse_coco
from catalog.importers.images import (
    NormalizedImage,
    SourceDataset,
    SourceImage,
    map_ordered,
    normalize_image,
    ImageDecodeError,
)
from catalog.importers.voc import parse_voc, parse_split_map
from catalog.schema import SPLITS, DatasetManifest
from catalog.store import Catalog
from catalog.validation import (
    CategoryMismatchError,
    CorruptImageError,
    DatasetImportError,
    DuplicateEntryError,
    ImportReport,
    MalformedAnnotationsError,
    MissingImageFilesError,
    MissingKeysError,
    SplitExistsError,
    clip_boxes,
    list_some,
)

__all__ = [
    "import_coco", "import_voc", "write_source", "parse_coco", "parse_voc", "parse_split_map",
    "SourceDataset", "SourceImage", "ImportReport", "DatasetImportError",
    "MalformedAnnotationsError", "MissingKeysError", "DuplicateEntryError",
    "MissingImageFilesError", "CorruptImageError", "CategoryMismatchError", "SplitExistsError",
]

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (split, done, total)


def import_coco(
    catalog: Catalog,
    name: str,
    annotations: str | Path,
    images: str | Path | None = None,
    split: str | None = None,
    overwrite: bool = False,
    workers: int | None = None,
    progress: Progress | None = None,
) -> ImportReport:
    """Import one COCO ``instances_*.json`` as ``split`` of dataset ``name``.

    ``images`` defaults to COCO's layout (``annotations/instances_val2017.json`` ->
    ``val2017/``); ``split`` defaults to the one named in the file name (train/val/test).
    """
    source = parse_coco(annotations, images, split)
    return write_source(catalog, name, source, overwrite=overwrite, workers=workers,
                        progress=progress)


def import_voc(
    catalog: Catalog,
    name: str,
    root: str | Path,
    split: str | None = None,
    split_map: dict[str, str] | str | None = None,
    overwrite: bool = False,
    workers: int | None = None,
    progress: Progress | None = None,
) -> ImportReport:
    """Import a Pascal VOC folder (``Annotations/``, ``JPEGImages/``, ``ImageSets/Main/``).

    With ``split`` every annotated image goes into that one split; otherwise
    ``ImageSets/Main/<set>.txt`` files are mapped to catalog splits by ``split_map``
    (default ``train=train,val=val,test=test``).
    """
    source = parse_voc(root, split=split, split_map=split_map)
    return write_source(catalog, name, source, overwrite=overwrite, workers=workers,
                        progress=progress)


def _check_files(source: SourceDataset) -> None:
    missing = [img.file_name for imgs in source.splits.values() for img in imgs
               if not img.path.is_file()]
    if missing:
        raise MissingImageFilesError(
            f"{len(missing)} image file(s) referenced by {source.source} are missing under "
            f"{source.images_root}: {list_some(missing)}",
            missing,
        )


def _plan(catalog: Catalog, name: str, source: SourceDataset, overwrite: bool
          ) -> tuple[DatasetManifest, dict[str, int]]:
    """The manifest to write and the existing splits to carry over (split -> images)."""
    categories = list(source.categories)
    if not catalog.has_dataset(name):
        if catalog.occupied(name) and not overwrite:
            raise DatasetImportError(
                f"{catalog.dataset_dir(name)} exists but holds no dataset manifest; "
                "remove it or pass overwrite (--overwrite)"
            )
        return DatasetManifest(name=name, categories=categories, source=source.format,
                               info={}), {}
    existing = catalog.manifest(name)
    present = {s: n for s, n in existing.splits.items() if catalog.has_split(name, s)}
    clash = sorted(set(source.splits) & set(present))
    if clash and not overwrite:
        raise SplitExistsError(
            f"dataset {name!r} already has split(s) {', '.join(clash)}; pass overwrite "
            "(--overwrite) to replace them (the other splits are kept)"
        )
    kept = {s: n for s, n in present.items() if s not in source.splits}
    if not kept:  # everything is replaced: a fresh dataset under the same name
        return DatasetManifest(name=name, categories=categories, source=source.format,
                               class_splits=list(existing.class_splits), info={}), {}
    old = {c.id: c.name for c in existing.categories}
    new = {c.id: c.name for c in categories}
    if old != new:
        diff = sorted(
            f"{cid}: {old.get(cid, '-')!r} vs {new.get(cid, '-')!r}"
            for cid in set(old) | set(new) if old.get(cid) != new.get(cid)
        )
        raise CategoryMismatchError(
            f"cannot add split(s) {', '.join(source.splits)} to dataset {name!r}: its "
            f"categories differ from the import's (id: existing vs new): {list_some(diff)}"
        )
    info = dict(existing.info)
    sources = sorted({existing.source, source.format} - {""})
    return DatasetManifest(name=name, categories=list(existing.categories),
                           class_splits=list(existing.class_splits),
                           source="+".join(sources), info=info), kept


def write_source(
    catalog: Catalog,
    name: str,
    source: SourceDataset,
    overwrite: bool = False,
    workers: int | None = None,
    progress: Progress | None = None,
) -> ImportReport:
    """Decode, normalise and write a parsed source into the catalog, all or nothing."""
    t0 = time.perf_counter()
    for split, imgs in source.splits.items():
        if split not in SPLITS:
            raise DatasetImportError(f"unknown split {split!r}; expected one of {SPLITS}")
        if not imgs:
            raise DatasetImportError(f"{source.source}: split {split!r} has no images")
    _check_files(source)
    manifest, kept = _plan(catalog, name, source, overwrite)

    report = ImportReport(
        dataset=name, source_format=source.format, source=source.source,
        categories={c.id: c.name for c in manifest.categories},
        unreferenced_files=source.unreferenced_files,
        unassigned_images=source.unassigned_images,
        kept_splits=kept, warnings=list(source.warnings),
    )
    imports = dict(manifest.info.get("imports", {}))
    for split in source.splits:
        imports[split] = {"format": source.format, "source": source.source,
                          **source.info.get(split, {})}
    manifest.info["imports"] = imports

    # on local disk, folders this import creates are removed again if it fails
    created = [p for p in (catalog.root, catalog.root / "datasets") if not p.exists()] \
        if catalog.local else []
    bad: list[str] = []
    bad_files: list[str] = []
    mismatched: list[str] = []
    rotated_mismatch: list[str] = []
    try:
        with catalog.writer(manifest, overwrite=catalog.occupied(name)) as w:
            for split in kept:
                pf = catalog.open_split(name, split)
                for batch in pf.iter_batches(batch_size=256):
                    w.write_table(split, pa.Table.from_batches([batch]))
            for split, imgs in source.splits.items():
                stats = report.split(split)
                total = len(imgs)
                for i, (src, norm, err) in enumerate(map_ordered(_decode, imgs, workers), 1):
                    if err is not None:
                        bad.append(f"{src.file_name} ({err.reason})")
                        bad_files.append(src.file_name)
                        continue
                    if bad:  # keep decoding to list every corrupt file, write nothing more
                        continue
                    row = _row(src, norm, stats)
                    if src.declared_size and src.declared_size != (norm.width, norm.height):
                        stats.size_mismatch += 1
                        if (norm.width, norm.height) != norm.raw_size \
                                and src.declared_size == norm.raw_size:
                            rotated_mismatch.append(src.file_name)
                        else:
                            mismatched.append(
                                f"{src.file_name} (annotated {src.declared_size[0]}x"
                                f"{src.declared_size[1]}, image {norm.width}x{norm.height})")
                    w.write_row(split, row)
                    if progress is not None:
                        progress(split, i, total)
            if bad:
                raise CorruptImageError(
                    f"{len(bad)} image file(s) under {source.images_root} cannot be decoded: "
                    f"{list_some(bad)}",
                    bad_files,
                )
    except BaseException:
        for p in reversed(created):  # leave no empty folders behind
            try:
                p.rmdir()
            except OSError:
                pass
        raise
    if mismatched:
        report.warnings.append(
            f"{len(mismatched)} image(s) differ in size from their annotations; boxes were "
            f"clipped to the real image: {list_some(mismatched, 5)}")
    if rotated_mismatch:
        report.warnings.append(
            f"{len(rotated_mismatch)} EXIF-rotated image(s) are annotated with their stored "
            "(un-rotated) size; boxes were assumed to be in the displayed orientation: "
            f"{list_some(rotated_mismatch, 5)}")
    for st_name, st in report.splits.items():
        if st.dropped_zero_area:
            report.warnings.append(
                f"{st_name}: dropped {st.dropped_zero_area} box(es) with zero area after "
                "clipping to the image")
    total = report.total
    empty = [f"{n} ({cid})" for cid, n in sorted(report.categories.items())
             if not total.per_class.get(cid)]
    if empty:
        report.warnings.append(
            f"{len(empty)} categor(ies) have no boxes in this import (kept in the manifest): "
            f"{list_some(empty, 10)}")
    report.seconds = time.perf_counter() - t0
    log.info("imported %s\n%s", name, report.format_table(max_classes=30))
    return report


def _decode(src: SourceImage) -> tuple[SourceImage, NormalizedImage | None,
                                       ImageDecodeError | None]:
    try:
        return src, normalize_image(src.path), None
    except ImageDecodeError as exc:
        return src, None, exc


def _row(src: SourceImage, norm: NormalizedImage, stats) -> dict:
    n = len(src.boxes)
    if n:
        boxes, was_clipped, keep = clip_boxes(np.asarray(src.boxes, dtype=np.float64),
                                              norm.width, norm.height)
    else:
        boxes = np.zeros((0, 4), np.float32)
        was_clipped = keep = np.zeros(0, bool)
    cids = [c for c, k in zip(src.category_ids, keep) if k]
    crowd = [bool(c) for c, k in zip(src.iscrowd, keep) if k]
    stats.images += 1
    stats.boxes += len(cids)
    stats.crowd += sum(crowd)
    stats.clipped += int(np.count_nonzero(was_clipped & keep))
    stats.dropped_zero_area += int(n - np.count_nonzero(keep))
    if not cids:
        stats.negatives += 1
    for c, cr in zip(cids, crowd):
        stats.per_class[c] += 1
        if cr:
            stats.per_class_crowd[c] += 1
    for conv in norm.conversions:
        stats.converted[conv] += 1
    stats.reencoded += int(norm.reencoded)
    stats.bytes_stored += len(norm.data)
    return {
        "image_id": int(src.image_id),
        "file_name": src.file_name,
        "width": int(norm.width),
        "height": int(norm.height),
        "image": norm.data,
        "boxes": boxes[keep].tolist(),
        "category_ids": cids,
        "iscrowd": crowd,
    }
