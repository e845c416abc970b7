"""Is any image in two places? Checks by content hash, for the importer, the gate and jobs.

- :func:`assert_disjoint` — the check ``add_classes`` needs before it evaluates: no image its
  support shots came from may be in the evaluation set. Compares ``content_sha256``;
  rows without one (datasets written before the column existed) are compared by
  ``image_id`` instead, which is exact within one dataset (ids are unique across its splits
  for COCO, VOC and the synthetic world) and conservative across datasets.
- :func:`split_overlaps` / :func:`assert_splits_disjoint` — the same question for the stored
  splits of a catalog dataset, reading one string column per split.
- :func:`shared_groups` — the primitive both use: which keys occur in more than one group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from catalog.content_hash import CONTENT_HASH_COLUMN
from catalog.validation import list_some

__all__ = [
    "SharedImagesError", "SharedImage", "assert_disjoint", "find_shared", "shared_groups",
    "split_overlaps", "assert_splits_disjoint",
]

MAX_PAIRS_SHOWN = 5


class SharedImagesError(ValueError):
    """The same image is on both sides of a line that must not be crossed. ``pairs`` holds
    every :class:`SharedImage` found."""

    def __init__(self, message: str, pairs: Sequence["SharedImage"]):
        super().__init__(message)
        self.pairs = list(pairs)


@dataclass(frozen=True)
class SharedImage:
    """One image found on both sides: how each side names it and what matched."""

    left_id: int
    left_file: str
    right_id: int
    right_file: str
    by: str  # "content_sha256" | "image_id"

    def describe(self, left: str = "support", right: str = "eval") -> str:
        return (f"{left} {self.left_file} (id {self.left_id}) = {right} {self.right_file} "
                f"(id {self.right_id}) [same {self.by}]")


def shared_groups(groups: Mapping[str, Iterable[str | None]]) -> dict[str, set[str]]:
    """``{key: {group names}}`` for every non-null key found in two or more groups."""
    seen: dict[str, set[str]] = {}
    for name, keys in groups.items():
        for key in keys:
            if key is not None:
                seen.setdefault(key, set()).add(name)
    return {k: g for k, g in seen.items() if len(g) > 1}


def _records(rows: pa.Table | Sequence[Mapping]) -> list[tuple[int, str, str | None]]:
    """(image_id, file_name, content_sha256 or None) for each row of a table or row dicts."""
    if isinstance(rows, pa.Table):
        n = rows.num_rows
        ids = rows.column("image_id").to_pylist()
        files = (rows.column("file_name").to_pylist() if "file_name" in rows.column_names
                 else [""] * n)
        hashes = (rows.column(CONTENT_HASH_COLUMN).to_pylist()
                  if CONTENT_HASH_COLUMN in rows.column_names else [None] * n)
        return [(int(i), f or "", h) for i, f, h in zip(ids, files, hashes)]
    return [(int(r["image_id"]), r.get("file_name") or "", r.get(CONTENT_HASH_COLUMN))
            for r in rows]


def find_shared(left: pa.Table | Sequence[Mapping], right: pa.Table | Sequence[Mapping]
                ) -> list[SharedImage]:
    """Images present on both sides: same ``content_sha256``; where a row on either side has
    no hash, same ``image_id`` (see the module docstring)."""
    a, b = _records(left), _records(right)
    pairs: list[SharedImage] = []
    b_by_hash: dict[str, list[tuple[int, str]]] = {}
    for i, f, h in b:
        if h is not None:
            b_by_hash.setdefault(h, []).append((i, f))
    for i, f, h in a:
        for j, g in b_by_hash.get(h, ()) if h is not None else ():
            pairs.append(SharedImage(i, f, j, g, CONTENT_HASH_COLUMN))
    # rows without a hash: fall back to ids, against every row of the other side
    b_by_id: dict[int, list[tuple[str, str | None]]] = {}
    for j, g, h in b:
        b_by_id.setdefault(j, []).append((g, h))
    found = {(p.left_id, p.right_id) for p in pairs}
    for i, f, h in a:
        for g, h2 in b_by_id.get(i, ()):
            if (h is None or h2 is None) and (i, i) not in found:
                pairs.append(SharedImage(i, f, i, g, "image_id"))
                found.add((i, i))
    return pairs


def assert_disjoint(support_rows: pa.Table | Sequence[Mapping],
                    eval_table: pa.Table | Sequence[Mapping], *,
                    support_name: str = "support", eval_name: str = "evaluation") -> None:
    """Raise :class:`SharedImagesError` when an image of ``support_rows`` (the few-shot
    support / fine-tuning rows) is also in ``eval_table`` (the rows a model is scored on).

    Both sides are catalog rows (a pyarrow Table or row dicts) with ``image_id`` and,
    normally, ``content_sha256`` and ``file_name``. Scoring a model on images it was
    fine-tuned on inflates its figures, so the caller must not evaluate.
    """
    pairs = find_shared(support_rows, eval_table)
    if pairs:
        shown = [p.describe(support_name, eval_name) for p in pairs]
        by_id = sum(p.by == "image_id" for p in pairs)
        note = (f"; {by_id} matched by image_id because rows lack content_sha256 (a dataset "
                "written before hashes were stored: re-import it to compare by content)"
                if by_id else "")
        raise SharedImagesError(
            f"refusing to evaluate on images the {support_name} rows came from: "
            f"{len(pairs)} image(s) are in both the {support_name} and the {eval_name} set: "
            f"{list_some(shown, MAX_PAIRS_SHOWN)}{note}",
            pairs,
        )


def split_overlaps(catalog, name: str, splits: Sequence[str] | None = None
                   ) -> dict[tuple[str, str], list[SharedImage]]:
    """``{(split_a, split_b): shared images}`` for each pair of stored splits sharing images.

    Reads ``image_id``, ``file_name`` and ``content_sha256`` only; rows of datasets written
    before hashes were stored are compared by ``image_id``.
    """
    manifest = catalog.manifest(name)
    names = [s for s in (splits or list(manifest.splits)) if manifest.splits.get(s)]
    tables = {}
    for s in names:
        path = catalog.split_path(name, s)
        cols = ["image_id", "file_name"]
        if CONTENT_HASH_COLUMN in pq.read_schema(path).names:
            cols.append(CONTENT_HASH_COLUMN)
        tables[s] = pq.read_table(path, columns=cols)
    out = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            pairs = find_shared(tables[a], tables[b])
            if pairs:
                out[(a, b)] = pairs
    return out


def assert_splits_disjoint(catalog, name: str, splits: Sequence[str] | None = None) -> None:
    """Raise :class:`SharedImagesError` when two stored splits of ``name`` share an image."""
    found = split_overlaps(catalog, name, splits)
    if found:
        lines, pairs = [], []
        for (a, b), ps in found.items():
            pairs += ps
            lines.append(f"{a}/{b}: {len(ps)} ({list_some([p.describe(a, b) for p in ps], 3)})")
        raise SharedImagesError(
            f"dataset {name!r} has images in more than one split: {'; '.join(lines)}", pairs)
