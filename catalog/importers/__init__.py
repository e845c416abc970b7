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

Splits never share an image. Every image's content hash (:mod:`catalog.content_hash`: the
decoded pixels, so renamed copies and metadata-only differences are caught; lossy re-encodes
are not) is compared across the imported and the existing splits; by default an import that
finds one image in two splits is refused, naming some pairs, and ``on_overlap`` keeps each in
one split instead (``keep-in-train`` | ``keep-in-eval``), counted in the report.

Selection on val, report on test: a dataset left without a test split gets a seeded,
class-stratified hold-out (:mod:`catalog.holdout`), ``test_fraction`` (0.2) of **train** —
val stays whole for selection — or of val when there is no train; a dataset with train but no
val gets ``val_fraction`` (0.1) of train as val. COCO train + val -> train 80 % / test 20 %
of train, val as published; a train-only import -> 70 / 10 / 20. BCCD, whose ImageSets has
train/val/test, keeps its own. Hold-outs are recorded in the manifest (``split_origins``:
source split, fraction, seed, the ids moved and their sha256) and are *derived*: a later
import returns their images to the source split and draws again, so importing COCO's train
and then its val gives the same dataset as the other order, and a real val or test replaces
a held-out one.
"""
from __future__ import annotations

import logging
import shutil
import time
import tempfile
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from catalog.content_hash import CONTENT_HASH_COLUMN, fill_content_hashes
from catalog.holdout import ids_sha256, stratified_holdout
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
from catalog.schema import IMAGE_SCHEMA, SPLITS, DatasetManifest, SplitOrigin
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
    SplitOverlapError,
    clip_boxes,
    list_some,
)

__all__ = [
    "import_coco", "import_voc", "write_source", "parse_coco", "parse_voc", "parse_split_map",
    "SourceDataset", "SourceImage", "ImportReport", "DatasetImportError",
    "MalformedAnnotationsError", "MissingKeysError", "DuplicateEntryError",
    "MissingImageFilesError", "CorruptImageError", "CategoryMismatchError", "SplitExistsError",
    "SplitOverlapError", "OVERLAP_POLICIES", "DEFAULT_TEST_FRACTION", "DEFAULT_VAL_FRACTION",
]

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (split, done, total)


OVERLAP_POLICIES = ("refuse", "keep-in-train", "keep-in-eval")
# which split keeps an image found in several: the first of these that holds it
_KEEP_ORDER = {"keep-in-train": ("train", "val", "test"), "keep-in-eval": ("test", "val", "train")}
DEFAULT_TEST_FRACTION = 0.2
DEFAULT_VAL_FRACTION = 0.1
HOLDOUT_IDS_CAP = 50_000  # hold-outs larger than this record only the ids' sha256
_EXAMPLES = 5  # offending pairs named in an overlap error


def import_coco(
    catalog: Catalog,
    name: str,
    annotations: str | Path,
    images: str | Path | None = None,
    split: str | None = None,
    overwrite: bool = False,
    workers: int | None = None,
    progress: Progress | None = None,
    **split_options,
) -> ImportReport:
    """Import one COCO ``instances_*.json`` as ``split`` of dataset ``name``.

    ``images`` defaults to COCO's layout (``annotations/instances_val2017.json`` ->
    ``val2017/``); ``split`` defaults to the one named in the file name (train/val/test).
    ``split_options`` (``on_overlap``, ``test_fraction``, ``val_fraction``, ``holdout_seed``)
    are :func:`write_source`'s.
    """
    source = parse_coco(annotations, images, split)
    return write_source(catalog, name, source, overwrite=overwrite, workers=workers,
                        progress=progress, **split_options)


def import_voc(
    catalog: Catalog,
    name: str,
    root: str | Path,
    split: str | None = None,
    split_map: dict[str, str] | str | None = None,
    overwrite: bool = False,
    workers: int | None = None,
    progress: Progress | None = None,
    **split_options,
) -> ImportReport:
    """Import a Pascal VOC folder (``Annotations/``, ``JPEGImages/``, ``ImageSets/Main/``).

    With ``split`` every annotated image goes into that one split; otherwise
    ``ImageSets/Main/<set>.txt`` files are mapped to catalog splits by ``split_map``
    (default ``train=train,val=val,test=test``). ``split_options`` are :func:`write_source`'s.
    """
    source = parse_voc(root, split=split, split_map=split_map)
    return write_source(catalog, name, source, overwrite=overwrite, workers=workers,
                        progress=progress, **split_options)


def _check_files(source: SourceDataset) -> None:
    missing = [img.file_name for imgs in source.splits.values() for img in imgs
               if not img.path.is_file()]
    if missing:
        raise MissingImageFilesError(
            f"{len(missing)} image file(s) referenced by {source.source} are missing under "
            f"{source.images_root}: {list_some(missing)}",
            missing,
        )


def _check_split_options(on_overlap: str, test_fraction: float, val_fraction: float) -> None:
    if on_overlap not in OVERLAP_POLICIES:
        raise DatasetImportError(
            f"unknown overlap policy {on_overlap!r}; expected one of {', '.join(OVERLAP_POLICIES)}")
    for label, f in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
        if not 0.0 <= float(f) < 1.0:
            raise DatasetImportError(f"{label} must be in [0, 1), got {f}")
    if test_fraction + val_fraction >= 1.0:
        raise DatasetImportError(
            f"test_fraction + val_fraction must be below 1 (got {test_fraction} + "
            f"{val_fraction}): something must be left to train on")


@dataclass
class _Plan:
    manifest: DatasetManifest
    kept: dict[str, int]  # imported splits carried over unchanged: split -> images
    folded: dict[str, str]  # held-out splits whose images return to their source: split -> source
    dropped: dict[str, str]  # held-out splits dropped with their replaced source: split -> source
    origins: dict[str, SplitOrigin]  # origins of the carried-over splits


def _plan(catalog: Catalog, name: str, source: SourceDataset, overwrite: bool) -> _Plan:
    """The manifest to write and what happens to the dataset's existing splits.

    Held-out splits are *derived*: an import first returns their images to the split they
    were taken from, then draws hold-outs again for whatever the dataset lacks. So importing
    a real val (or test) into a dataset whose val (or test) was held out replaces the hold-out
    without ``overwrite``, and the result does not depend on the order of the imports.
    """
    categories = list(source.categories)
    if not catalog.has_dataset(name):
        if catalog.occupied(name) and not overwrite:
            raise DatasetImportError(
                f"{catalog.dataset_dir(name)} exists but holds no dataset manifest; "
                "remove it or pass overwrite (--overwrite)"
            )
        return _Plan(DatasetManifest(name=name, categories=categories, source=source.format,
                                     info={}), {}, {}, {}, {})
    existing = catalog.manifest(name)
    present = {s: n for s, n in existing.splits.items()
               if catalog.has_split(name, s)}
    derived = {s: existing.origin(s).source for s in present if existing.origin(s).held_out}
    imported = {s: n for s, n in present.items() if s not in derived}
    clash = sorted(set(source.splits) & set(imported))
    if clash and not overwrite:
        raise SplitExistsError(
            f"dataset {name!r} already has split(s) {', '.join(clash)}; pass overwrite "
            "(--overwrite) to replace them (the other splits are kept)"
        )
    kept = {s: n for s, n in imported.items() if s not in source.splits}
    folded = {s: src for s, src in derived.items() if src in kept}
    dropped = {s: src for s, src in derived.items() if src not in kept}
    if not kept:  # everything is replaced: a fresh dataset under the same name
        return _Plan(DatasetManifest(name=name, categories=categories, source=source.format,
                                     class_splits=list(existing.class_splits), info={}),
                     {}, {}, dropped, {})
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
    manifest = DatasetManifest(name=name, categories=list(existing.categories),
                               class_splits=list(existing.class_splits),
                               source="+".join(sources), info=info)
    return _Plan(manifest, kept, folded, dropped, {s: existing.origin(s) for s in kept})


@dataclass
class _Pool:
    """One Parquet file feeding the written dataset, and the metadata of its rows."""

    path: Path | str
    label: str  # the imported split its rows belong to
    stored_as: str  # where the rows are now ("train", "test (held out)", "new val"...)
    image_ids: list[int] = field(default_factory=list)
    file_names: list[str] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)
    classes: list[list[int]] = field(default_factory=list)  # non-crowd category ids per row
    boxes: list[int] = field(default_factory=list)  # stored boxes per row (crowd included)
    dest: list[str | None] = field(default_factory=list)  # final split per row, None: dropped
    opener: Callable[[], pq.ParquetFile] | None = None  # how to read ``path`` (default: a local file)

    def open(self) -> pq.ParquetFile:
        return self.opener() if self.opener is not None else pq.ParquetFile(self.path)

    def add(self, image_id: int, file_name: str, digest: str, cids, crowd) -> None:
        self.image_ids.append(int(image_id))
        self.file_names.append(file_name)
        self.hashes.append(digest)
        self.classes.append(sorted({int(c) for c, z in zip(cids, crowd) if not z}))
        self.boxes.append(len(cids))
        self.dest.append(self.label)


def _read_pool(catalog: Catalog, name: str, split: str, label: str, stored_as: str) -> _Pool:
    """Metadata of an existing split (local or object storage); hashes computed from the
    images when the split was written before rows carried them."""
    pool = _Pool(catalog.split_path(name, split), label, stored_as,
                 opener=lambda: catalog.open_split(name, split))
    pf = pool.open()
    has_hash = CONTENT_HASH_COLUMN in pf.schema_arrow.names
    cols = ["image_id", "file_name", "category_ids", "iscrowd"]
    cols += [CONTENT_HASH_COLUMN] if has_hash else []
    batches = pf.iter_batches(batch_size=256, columns=cols)
    legacy = None if has_hash else pf.iter_batches(batch_size=256, columns=["image"])
    for batch in batches:
        t = pa.Table.from_batches([batch])
        if legacy is not None:
            t = t.append_column("image", pa.Table.from_batches([next(legacy)]).column("image"))
        t = fill_content_hashes(t)
        for iid, f, cids, crowd, h in zip(*(t.column(c).to_pylist() for c in (
                "image_id", "file_name", "category_ids", "iscrowd", CONTENT_HASH_COLUMN))):
            pool.add(iid, f, h, cids, crowd)
    return pool


def _resolve_overlaps(pools: list[_Pool], policy: str, report: ImportReport) -> None:
    """Find images (by content hash) in more than one imported split; refuse or keep each in
    one split only, as ``policy`` says (marks the other rows dropped)."""
    where: dict[str, list[tuple[_Pool, int]]] = {}
    for pool in pools:
        for i, h in enumerate(pool.hashes):
            where.setdefault(h, []).append((pool, i))
    shared = {h: rows for h, rows in where.items() if len({p.label for p, _ in rows}) > 1}
    within = {h: rows for h, rows in where.items() if len(rows) > 1 and h not in shared}
    if within:
        ex = [" = ".join(f"{p.label}/{p.file_names[i]}" for p, i in rows)
              for rows in list(within.values())[:_EXAMPLES]]
        report.warnings.append(
            f"{len(within)} image(s) appear more than once inside one split (same pixels, "
            f"kept as they are): {list_some(ex, _EXAMPLES)}")
    report.overlap = {"method": CONTENT_HASH_COLUMN, "policy": policy, "groups": len(shared),
                      "removed": {}}
    if not shared:
        return
    pairs, examples = [], []
    for rows in shared.values():
        first = rows[0]
        for p, i in rows[1:]:
            if p.label != first[0].label:
                pairs.append((first[0].label, first[0].file_names[first[1]],
                              first[0].image_ids[first[1]], p.label, p.file_names[i],
                              p.image_ids[i]))
    for a, fa, ia, b, fb, ib in pairs[:_EXAMPLES]:
        examples.append(f"{a}/{fa} (id {ia}) = {b}/{fb} (id {ib})")
    report.overlap["examples"] = examples
    if policy == "refuse":
        splits = sorted({p.label for rows in shared.values() for p, _ in rows})
        raise SplitOverlapError(
            f"{len(shared)} image(s) are in more than one split ({', '.join(splits)}), found "
            f"by content hash of the decoded pixels whatever the file names: "
            f"{list_some(examples, _EXAMPLES)}. Nothing was written. Evaluating on images "
            "trained on inflates every figure; pass on_overlap (--on-overlap) keep-in-train "
            "or keep-in-eval to keep each such image in one split only",
            pairs,
        )
    order = _KEEP_ORDER[policy]
    removed: Counter = Counter()
    for rows in shared.values():
        keep = next(s for s in order if any(p.label == s for p, _ in rows))
        for p, i in rows:
            if p.label != keep:
                p.dest[i] = None
                removed[p.label] += 1
    report.overlap["removed"] = {s: removed[s] for s in SPLITS if removed[s]}
    report.notes.append(
        f"{len(shared)} image(s) were in more than one split; kept in "
        f"{' > '.join(order)} order ({policy}): removed "
        + ", ".join(f"{n} from {s}" for s, n in report.overlap["removed"].items()))


def _draw(pools: list[_Pool], source: str, target: str, fraction: float, seed: int,
          stream: int, report: ImportReport, manifest: DatasetManifest) -> SplitOrigin | None:
    """Move a stratified ``fraction`` of ``source``'s remaining rows to ``target``."""
    rows = [(p, i) for p in pools for i in range(len(p.dest)) if p.dest[i] == source]
    ids = [p.image_ids[i] for p, i in rows]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise DatasetImportError(
            f"cannot hold out {target!r} from {source!r}: image id(s) repeated in {source!r}: "
            f"{list_some(dup)}")
    result = stratified_holdout(ids, [p.classes[i] for p, i in rows], fraction, seed, stream)
    if not result.held:
        report.warnings.append(
            f"no {target!r} split: {source!r} has {len(ids)} image(s), too few to hold out "
            f"{fraction:.0%} of them")
        return None
    held = set(result.held)
    for p, i in rows:
        if p.image_ids[i] in held:
            p.dest[i] = target
    names = {c.id: c.name for c in manifest.categories}
    if result.unsplit_classes:
        report.warnings.append(
            f"hold-out {target!r}: {len(result.unsplit_classes)} class(es) with 2+ images in "
            f"{source!r} landed on one side only: "
            f"{list_some([names.get(c, str(c)) for c in result.unsplit_classes], 10)}")
    report.holdouts[target] = {
        "from": source, "fraction": fraction, "seed": seed, "stratify": "rarest_class",
        "images": len(result.held), "source_images": len(ids),
        "actual_fraction": round(result.actual_fraction, 4),
        "ids_sha256": ids_sha256(result.held),
    }
    return SplitOrigin(
        kind="held_out", source=source, fraction=fraction, seed=seed, stratify="rarest_class",
        images=len(result.held), ids_sha256=ids_sha256(result.held),
        image_ids=tuple(result.held) if len(result.held) <= HOLDOUT_IDS_CAP else (),
    )


def _hold_out(pools: list[_Pool], labels: set[str], test_fraction: float, val_fraction: float,
              seed: int, report: ImportReport, manifest: DatasetManifest
              ) -> dict[str, SplitOrigin]:
    """Hold out test (and val) for a dataset that has none.

    test comes from train when there is one (val is kept whole for selection), else from val;
    val comes from train, from what the test draw left, and only when there is no val.
    """
    origins: dict[str, SplitOrigin] = {}
    n_train = sum(d == "train" for p in pools for d in p.dest)
    test_from = None
    if "test" not in labels and test_fraction > 0:
        test_from = "train" if "train" in labels else "val" if "val" in labels else None
        if test_from is not None:
            o = _draw(pools, test_from, "test", test_fraction, seed, 0, report, manifest)
            if o is not None:
                origins["test"] = o
    if "val" not in labels and "train" in labels and val_fraction > 0:
        share = val_fraction / (1.0 - test_fraction) if "test" in origins and \
            test_from == "train" else val_fraction
        o = _draw(pools, "train", "val", min(share, 0.99), seed, 1, report, manifest)
        if o is not None:  # fractions are of train as imported, before the test draw
            origins["val"] = replace(o, fraction=val_fraction)
            report.holdouts["val"].update(fraction=val_fraction, source_images=n_train,
                                          actual_fraction=round(o.images / n_train, 4))
    if "test" not in labels and "test" not in origins:
        report.warnings.append(
            "the dataset has no test split: figures can only be reported on val"
            + (" (test_fraction is 0)" if test_fraction == 0 else ""))
    return origins


def write_source(
    catalog: Catalog,
    name: str,
    source: SourceDataset,
    overwrite: bool = False,
    workers: int | None = None,
    progress: Progress | None = None,
    *,
    on_overlap: str = "refuse",
    test_fraction: float = DEFAULT_TEST_FRACTION,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    holdout_seed: int = 0,
) -> ImportReport:
    """Decode, normalise and write a parsed source into the catalog, all or nothing.

    Then, before anything reaches the catalog:

    - **overlap**: images in more than one split (the imported ones and the dataset's
      existing ones), by content hash: ``on_overlap="refuse"`` (default) raises
      :class:`SplitOverlapError` naming some pairs; ``"keep-in-train"`` keeps each in the
      first of train > val > test that holds it, ``"keep-in-eval"`` in the first of
      test > val > train, and removes it from the others (counted in the report);
    - **hold-outs**: a dataset left without test gets a seeded, class-stratified
      ``test_fraction`` of train (of val when there is no train); one left without val but
      with train gets ``val_fraction`` of train's images. 0 turns a hold-out off.
      Held-out splits are recorded in the manifest (``split_origins``) and re-derived by
      later imports, which first return their images to the source split.
    """
    t0 = time.perf_counter()
    _check_split_options(on_overlap, test_fraction, val_fraction)
    for split, imgs in source.splits.items():
        if split not in SPLITS:
            raise DatasetImportError(f"unknown split {split!r}; expected one of {SPLITS}")
        if not imgs:
            raise DatasetImportError(f"{source.source}: split {split!r} has no images")
    _check_files(source)
    plan = _plan(catalog, name, source, overwrite)
    manifest = plan.manifest

    report = ImportReport(
        dataset=name, source_format=source.format, source=source.source,
        categories={c.id: c.name for c in manifest.categories},
        unreferenced_files=source.unreferenced_files,
        unassigned_images=source.unassigned_images,
        kept_splits=dict(plan.kept), warnings=list(source.warnings),
    )
    imports = dict(manifest.info.get("imports", {}))
    for split in source.splits:
        imports[split] = {"format": source.format, "source": source.source,
                          **source.info.get(split, {})}
    manifest.info["imports"] = imports
    for split, src in plan.folded.items():
        report.notes.append(f"the {split!r} hold-out returned to {src!r} before the hold-outs "
                            "were drawn again")
    for split, src in plan.dropped.items():
        report.notes.append(f"the {split!r} hold-out left with the {src!r} split it came from")

    # on local disk, folders this import creates are removed again if it fails; the staging
    # folder is local whatever the catalog's storage (s3://... included)
    created = [p for p in (catalog.root, catalog.root / "datasets") if not p.exists()] \
        if catalog.local else []
    stage = Path(tempfile.mkdtemp(prefix=f"fewshot-import-{name}-"))
    bad: list[str] = []
    bad_files: list[str] = []
    mismatched: list[str] = []
    rotated_mismatch: list[str] = []
    try:
        # 1. existing splits that stay (imported ones, and hold-outs returning to them)
        pools = [_read_pool(catalog, name, s, s, s) for s in plan.kept]
        pools += [_read_pool(catalog, name, s, src, f"{s} (held out)")
                  for s, src in plan.folded.items()]
        # 2. the new splits, decoded into the staging folder
        for split, imgs in source.splits.items():
            stats = report.split(split)
            total = len(imgs)
            pool = _Pool(stage / f"{split}.parquet", split, split)
            buf: list[dict] = []
            with pq.ParquetWriter(pool.path, IMAGE_SCHEMA) as staged:
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
                    pool.add(row["image_id"], row["file_name"], row[CONTENT_HASH_COLUMN],
                             row["category_ids"], row["iscrowd"])
                    buf.append(row)
                    if len(buf) >= 64:
                        staged.write_table(pa.Table.from_pylist(buf, schema=IMAGE_SCHEMA))
                        buf = []
                    if progress is not None:
                        progress(split, i, total)
                if buf and not bad:
                    staged.write_table(pa.Table.from_pylist(buf, schema=IMAGE_SCHEMA))
            pools.append(pool)
        if bad:
            raise CorruptImageError(
                f"{len(bad)} image file(s) under {source.images_root} cannot be decoded: "
                f"{list_some(bad)}",
                bad_files,
            )
        # 3. no image in two splits; 4. hold-outs for what the dataset lacks
        _resolve_overlaps(pools, on_overlap, report)
        labels = set(plan.kept) | set(source.splits)
        held = _hold_out(pools, labels, test_fraction, val_fraction, holdout_seed, report,
                         manifest)
        # 5. the dataset, written atomically
        origins = dict(plan.origins)
        for split in source.splits:
            origins[split] = SplitOrigin(kind="imported", source=source.source,
                                         format=source.format)
        origins.update(held)
        final = [s for s in SPLITS if s in origins]
        manifest.split_origins = {s: origins[s] for s in final}
        manifest.overlap = {k: v for k, v in report.overlap.items() if k != "examples"}
        with catalog.writer(manifest, overwrite=catalog.occupied(name)) as w:
            for split in final:  # every split exists, even one left empty
                w.write_table(split, IMAGE_SCHEMA.empty_table())
            for pool in pools:
                _copy_pool(pool, w)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        for p in reversed(created):  # leave no empty folders behind
            try:
                p.rmdir()
            except OSError:
                pass
        raise
    shutil.rmtree(stage, ignore_errors=True)

    for split in final:
        rows = [(p, i) for p in pools for i, d in enumerate(p.dest) if d == split]
        o = origins[split]
        kind = (f"held out from {o.source}" if o.held_out
                else "imported now" if split in source.splits else f"kept ({o.kind})")
        report.stored[split] = {"images": len(rows), "boxes": sum(p.boxes[i] for p, i in rows),
                                "origin": kind}
        if not rows:
            report.warnings.append(f"split {split!r} is empty")
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


def _copy_pool(pool: _Pool, writer) -> None:
    """Stream ``pool``'s rows into the writer, each to its final split (or nowhere)."""
    dest = np.array([d or "" for d in pool.dest], dtype=object)
    offset = 0
    for batch in pool.open().iter_batches(batch_size=256):
        table = pa.Table.from_batches([batch])
        # the hashes read (or, for a legacy file, computed) once: the writer need not decode
        hashes = pa.array(pool.hashes[offset:offset + table.num_rows], type=pa.string())
        if CONTENT_HASH_COLUMN in table.column_names:
            table = table.drop_columns([CONTENT_HASH_COLUMN])
        table = table.append_column(CONTENT_HASH_COLUMN, hashes)
        part = dest[offset:offset + table.num_rows]
        offset += table.num_rows
        for split in SPLITS:
            idx = np.flatnonzero(part == split)
            if len(idx) == len(part):
                writer.write_table(split, table)
            elif len(idx):
                writer.write_table(split, table.take(pa.array(idx, type=pa.int64())))
    if offset != len(pool.dest):
        raise RuntimeError(f"{pool.path} changed while importing ({offset} rows, "
                           f"expected {len(pool.dest)})")


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
        CONTENT_HASH_COLUMN: norm.content_sha256,
    }
