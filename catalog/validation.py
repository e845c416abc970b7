"""What an import found: the errors that stop it and the report that describes it.

Every importer (COCO json, Pascal VOC XML) checks its input before anything is written and
raises one of the :class:`DatasetImportError` subclasses below with a message that names the
file, the key or the item at fault. Quirks that real datasets have and that can be repaired
without guessing (boxes partly outside the image, zero-area boxes, grayscale/CMYK/EXIF-rotated
images, unreferenced files) are repaired and *counted* in an :class:`ImportReport`, which is
printed as a table (:meth:`ImportReport.format_table`) and logged as a flat dict of numbers
(:meth:`ImportReport.metrics`) or as JSON (:meth:`ImportReport.to_dict`).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

MAX_LISTED = 20  # how many offending items an error message names before summarising


# ---- errors ------------------------------------------------------------------------------
class DatasetImportError(ValueError):
    """Bad input: the import stops and the catalog is left as it was."""


class MalformedAnnotationsError(DatasetImportError):
    """The annotation file cannot be read (invalid JSON/XML, wrong types, bad values)."""


class MissingKeysError(MalformedAnnotationsError):
    """Required keys are missing from the annotation file or from some of its items."""


class DuplicateEntryError(DatasetImportError):
    """The same category name, image id or image file appears more than once."""


class MissingImageFilesError(DatasetImportError):
    """Annotations reference image files that do not exist. ``missing`` lists them all."""

    def __init__(self, message: str, missing: Sequence[str]):
        super().__init__(message)
        self.missing = list(missing)


class CorruptImageError(DatasetImportError):
    """Image files that cannot be fully decoded (truncated, not an image). ``files`` lists them."""

    def __init__(self, message: str, files: Sequence[str]):
        super().__init__(message)
        self.files = list(files)


class CategoryMismatchError(DatasetImportError):
    """A split is added to an existing dataset whose categories differ."""


class SplitExistsError(DatasetImportError):
    """The split being imported already exists in the dataset (pass overwrite to replace it)."""


class SplitOverlapError(DatasetImportError):
    """The same image (by content hash) is in two splits and the policy is to refuse.
    ``pairs`` lists every ``(split, file_name, image_id, split, file_name, image_id)``."""

    def __init__(self, message: str, pairs: Sequence[tuple]):
        super().__init__(message)
        self.pairs = list(pairs)


def list_some(items: Sequence[object], limit: int = MAX_LISTED) -> str:
    """``'a, b, c'`` or ``'a, b, ... and 12 more'`` for error messages."""
    items = [str(i) for i in items]
    shown = ", ".join(items[:limit])
    if len(items) > limit:
        shown += f", ... and {len(items) - limit} more"
    return shown


# ---- boxes -------------------------------------------------------------------------------
def clip_boxes(
    boxes: np.ndarray, width: int, height: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clip ``[N, 4]`` xyxy boxes to the image and find the ones left with no area.

    Returns ``(clipped_boxes float32 [N, 4], was_clipped bool [N], keep bool [N])``. A box is
    kept when ``x2 > x1`` and ``y2 > y1`` *in float32*, the dtype the catalog stores, so that
    no stored box can collapse to zero width (torchvision's detectors reject those).
    ``was_clipped`` is true for boxes whose coordinates changed by clipping.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    lim = np.array([width, height, width, height], dtype=np.float64)
    clipped = np.clip(boxes, 0.0, lim)
    was_clipped = np.any(clipped != boxes, axis=1)
    out = clipped.astype(np.float32)
    keep = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
    return out, was_clipped, keep


# ---- the report --------------------------------------------------------------------------
CONVERSIONS = ("grayscale", "cmyk", "palette", "alpha", "other_mode", "exif_rotated")


@dataclass
class SplitStats:
    """Counts for the images imported into one split."""

    images: int = 0
    negatives: int = 0  # images kept with no boxes at all (valid negatives)
    boxes: int = 0  # boxes stored, crowd included
    crowd: int = 0  # stored boxes flagged iscrowd (COCO) / difficult (VOC)
    clipped: int = 0  # stored boxes that were partly outside the image
    dropped_zero_area: int = 0  # boxes dropped: zero or negative area (after clipping)
    size_mismatch: int = 0  # images whose decoded size differs from the annotated size
    per_class: Counter = field(default_factory=Counter)  # category id -> stored boxes
    per_class_crowd: Counter = field(default_factory=Counter)  # category id -> crowd boxes
    converted: Counter = field(default_factory=Counter)  # CONVERSIONS -> images
    reencoded: int = 0  # images whose bytes were re-encoded (any conversion or format)
    bytes_stored: int = 0

    def add(self, other: "SplitStats") -> "SplitStats":
        out = SplitStats()
        for name in ("images", "negatives", "boxes", "crowd", "clipped", "dropped_zero_area",
                     "size_mismatch", "reencoded", "bytes_stored"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        out.per_class = self.per_class + other.per_class
        out.per_class_crowd = self.per_class_crowd + other.per_class_crowd
        out.converted = self.converted + other.converted
        return out

    def to_dict(self, names: dict[int, str] | None = None) -> dict:
        names = names or {}
        return {
            "images": self.images,
            "negatives": self.negatives,
            "boxes": self.boxes,
            "crowd": self.crowd,
            "clipped": self.clipped,
            "dropped_zero_area": self.dropped_zero_area,
            "size_mismatch": self.size_mismatch,
            "reencoded": self.reencoded,
            "bytes_stored": self.bytes_stored,
            "converted": {k: int(self.converted.get(k, 0)) for k in CONVERSIONS},
            "per_class": {
                names.get(cid, str(cid)): int(n) for cid, n in sorted(self.per_class.items())
            },
            "per_class_crowd": {
                names.get(cid, str(cid)): int(n)
                for cid, n in sorted(self.per_class_crowd.items())
            },
        }


def _metric_key(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z_\-./ ]", "_", text)


@dataclass
class ImportReport:
    """What one import did, split by split.

    ``crowd`` boxes (COCO ``iscrowd``, VOC ``difficult``) are stored with their flag: training
    ignores them, evaluation respects them (pycocotools treats crowd boxes as "ignore" regions).
    """

    dataset: str
    source_format: str  # "coco" | "voc"
    source: str  # the annotation file or folder imported
    categories: dict[int, str]  # category id -> name
    splits: dict[str, SplitStats] = field(default_factory=dict)
    unreferenced_files: int = 0  # image files in the folder that no annotation references
    unassigned_images: int = 0  # VOC: annotated images in none of the mapped ImageSets
    kept_splits: dict[str, int] = field(default_factory=dict)  # existing splits carried over
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # images found in more than one split by content hash and what was done:
    # {"method", "policy", "groups", "removed": {split: n}, "examples": [...]}
    overlap: dict = field(default_factory=dict)
    # hold-outs drawn at this import: {split: {"from", "fraction", "seed", "images", ...}}
    holdouts: dict[str, dict] = field(default_factory=dict)
    # the dataset as written: {split: {"images", "boxes", "origin"}}
    stored: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # decisions worth a line (not problems)

    @property
    def total(self) -> SplitStats:
        out = SplitStats()
        for stats in self.splits.values():
            out = out.add(stats)
        return out

    def split(self, name: str) -> SplitStats:
        return self.splits.setdefault(name, SplitStats())

    # -- serialisations --------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-serialisable, nested: the artifact logged next to an import."""
        return {
            "dataset": self.dataset,
            "source_format": self.source_format,
            "source": self.source,
            "categories": {str(k): v for k, v in sorted(self.categories.items())},
            "splits": {s: st.to_dict(self.categories) for s, st in self.splits.items()},
            "total": self.total.to_dict(self.categories),
            "unreferenced_files": self.unreferenced_files,
            "unassigned_images": self.unassigned_images,
            "kept_splits": dict(self.kept_splits),
            "overlap": dict(self.overlap),
            "holdouts": {k: dict(v) for k, v in self.holdouts.items()},
            "stored": {k: dict(v) for k, v in self.stored.items()},
            "notes": list(self.notes),
            "warnings": list(self.warnings),
            "seconds": round(self.seconds, 3),
        }

    def params(self) -> dict[str, str]:
        """Short string parameters (MLflow params)."""
        return {
            "dataset": self.dataset,
            "source_format": self.source_format,
            "source": self.source[-500:],
            "splits": ",".join(self.splits),
            "num_categories": str(len(self.categories)),
        }

    def metrics(self) -> dict[str, float]:
        """Flat ``{name: number}`` (MLflow metrics): ``<split>/<count>``, ``total/<count>``,
        ``total/class/<name>`` and the folder-level counts."""
        out: dict[str, float] = {}
        scopes = dict(self.splits)
        scopes["total"] = self.total
        for scope, st in scopes.items():
            d = st.to_dict(self.categories)
            for k, v in d.items():
                if isinstance(v, dict):
                    continue
                out[f"{scope}/{k}"] = float(v)
            for k, v in d["converted"].items():
                out[f"{scope}/converted_{k}"] = float(v)
        for name, n in self.total.to_dict(self.categories)["per_class"].items():
            out[_metric_key(f"total/class/{name}")] = float(n)
        for split, st in self.stored.items():
            out[f"stored/{split}/images"] = float(st.get("images", 0))
        for split, n in self.overlap.get("removed", {}).items():
            out[f"overlap/removed_{split}"] = float(n)
        if self.overlap:
            out["overlap/groups"] = float(self.overlap.get("groups", 0))
        for split, h in self.holdouts.items():
            out[f"holdout/{split}/images"] = float(h.get("images", 0))
        out["unreferenced_files"] = float(self.unreferenced_files)
        out["unassigned_images"] = float(self.unassigned_images)
        out["warnings"] = float(len(self.warnings))
        out["seconds"] = float(self.seconds)
        return out

    def format_table(self, max_classes: int | None = None) -> str:
        """A plain-text table for a terminal or a log file."""
        lines = [
            f"Import report for dataset {self.dataset!r} "
            f"({self.source_format}: {self.source})",
        ]
        split_names = list(self.splits)
        rows = [(s, self.splits[s]) for s in split_names]
        if len(rows) > 1:
            rows.append(("total", self.total))
        cols = ("images", "negatives", "boxes", "crowd", "clipped", "dropped_zero_area",
                "size_mismatch")
        headers = ("split",) + cols
        table = [headers] + [(name,) + tuple(str(getattr(st, c)) for c in cols)
                             for name, st in rows]
        lines += _render(table)

        total = self.total
        conv = ", ".join(f"{k} {total.converted.get(k, 0)}" for k in CONVERSIONS)
        lines.append(f"images converted: {conv}; re-encoded {total.reencoded}, "
                     f"kept as-is {total.images - total.reencoded}; "
                     f"{total.bytes_stored / 1e6:.1f} MB stored")
        lines.append(f"unreferenced image files ignored: {self.unreferenced_files}")
        if self.source_format == "voc":
            lines.append(f"annotated images in no mapped image set (ignored): "
                         f"{self.unassigned_images}")
        if self.kept_splits:
            kept = ", ".join(f"{s} ({n} images)" for s, n in self.kept_splits.items())
            lines.append(f"existing splits kept: {kept}")
        if self.overlap:
            lines.append(self.overlap_line())
        for split, h in self.holdouts.items():
            lines.append(
                f"held out {split!r} from {h['from']!r}: {h['images']} of {h['source_images']} "
                f"images ({h['actual_fraction']:.1%}; asked {h['fraction']:.0%}, seed "
                f"{h['seed']}, stratified by rarest class)")
        if self.stored:
            stable = [("stored split", "images", "boxes", "origin")] + [
                (s, str(v.get("images", 0)), str(v.get("boxes", 0)), str(v.get("origin", "")))
                for s, v in self.stored.items()]
            lines += _render(stable, left=(0, 3))
        lines += [f"note: {n}" for n in self.notes]

        any_crowd = total.crowd > 0
        lines.append("boxes per class" + (
            " (crowd: of these, flagged iscrowd/difficult: stored with the flag, ignored in "
            "training, respected in evaluation)" if any_crowd else "") + ":")
        cids = sorted(self.categories)
        if max_classes is not None and len(cids) > max_classes:
            shown = sorted(cids, key=lambda c: -total.per_class.get(c, 0))[:max_classes]
            cids = sorted(shown)
            omitted = len(self.categories) - max_classes
        else:
            omitted = 0
        multi = len(split_names) > 1
        ctable = [("id", "class") + tuple(split_names) + (("total",) if multi else ())
                  + (("crowd",) if any_crowd else ())]
        for cid in cids:
            cells = [str(self.splits[s].per_class.get(cid, 0)) for s in split_names]
            if multi:
                cells.append(str(total.per_class.get(cid, 0)))
            if any_crowd:
                cells.append(str(total.per_class_crowd.get(cid, 0)))
            ctable.append((str(cid), self.categories[cid]) + tuple(cells))
        lines += ["  " + line for line in _render(ctable, left=(1,))]
        if omitted:
            lines.append(f"  ... {omitted} more classes (see the JSON report)")
        if self.warnings:
            lines.append(f"warnings ({len(self.warnings)}):")
            lines += [f"  - {w}" for w in self.warnings]
        else:
            lines.append("warnings: none")
        lines.append(f"took {self.seconds:.1f} s")
        return "\n".join(lines)

    def overlap_line(self) -> str:
        ov = self.overlap
        if not ov.get("groups"):
            return "images in more than one split (by content hash): none"
        removed = ", ".join(f"{n} from {s}" for s, n in ov.get("removed", {}).items()) or "none"
        return (f"images in more than one split (by content hash): {ov['groups']}; policy "
                f"{ov.get('policy')}: removed {removed}")

    def __str__(self) -> str:
        return self.format_table()


def _render(rows: Iterable[Sequence[str]], left: Sequence[int] = (0,)) -> list[str]:
    """Align columns: the ``left`` ones left-justified, the rest (numbers) right-justified."""
    rows = [tuple(r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(c.ljust(w) if i in left else c.rjust(w)
                  for i, (c, w) in enumerate(zip(r, widths))).rstrip()
        for r in rows
    ]


def is_finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
