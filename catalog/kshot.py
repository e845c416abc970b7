"""Seeded k-shot sampling of a detection split, following the few-shot protocol (TFA).

For each requested class, the images that contain it are visited in a seeded random order
and an image is taken when the number of its (non-crowd) instances of that class fits the
remaining need, until exactly ``k`` instances are held. In a taken image only the
annotations of the class it was taken for are kept; every other object in it becomes
unannotated background. An image taken for two classes appears once, with the kept
annotations of both. Crowd annotations never count and are dropped.

The order for a class is drawn from ``numpy.random.default_rng([seed, class_id])``, so the
support set of one class does not depend on which other classes are requested with it, and
is the same on every machine. When the greedy pass cannot hit ``k`` exactly (e.g. all that
is left are images with two instances and one is needed), an exact subset of the visited
images is searched for; only if none exists is the last image's annotation list truncated
(the first instances, by annotation order) so that the count is still exactly ``k``.

Only the annotation columns are scanned; image bytes are fetched for the chosen rows only.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["InsufficientInstances", "count_instances", "sample_kshot", "kshot_table"]

_ANN_COLUMNS = ("image_id", "category_ids", "iscrowd")


class InsufficientInstances(ValueError):
    """A class has fewer (non-crowd) instances in the split than the k asked for."""

    def __init__(self, k: int, available: dict[int, int]):
        self.k = k
        self.available = dict(available)
        detail = ", ".join(f"class {c}: {n}" for c, n in sorted(self.available.items()))
        super().__init__(
            f"cannot sample {k} shots: too few non-crowd instances for class ids "
            f"{sorted(self.available)} ({detail} available, {k} needed)"
        )


def _flat_annotations(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(row index per annotation, category id, iscrowd, image_id per row) as numpy arrays."""
    missing = [c for c in _ANN_COLUMNS if c not in table.column_names]
    if missing:
        raise KeyError(f"table lacks column(s) {missing}; expected the catalog IMAGE_SCHEMA")
    cats = table.column("category_ids").combine_chunks()
    crowd = table.column("iscrowd").combine_chunks()
    if len(cats) and (pc.any(pc.not_equal(pc.list_value_length(cats),
                                          pc.list_value_length(crowd))).as_py()):
        raise ValueError("category_ids and iscrowd differ in length in some row")
    rows = pc.list_parent_indices(cats).to_numpy(zero_copy_only=False).astype(np.int64)
    cat = cats.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    isc = crowd.flatten().to_numpy(zero_copy_only=False).astype(bool)
    image_ids = table.column("image_id").to_numpy().astype(np.int64)
    return rows, cat, isc, image_ids


def count_instances(table: pa.Table, class_ids: Sequence[int] | None = None) -> dict[int, int]:
    """Non-crowd instances per class id (all classes present when ``class_ids`` is None)."""
    _, cat, isc, _ = _flat_annotations(table.select(list(_ANN_COLUMNS)))
    cat = cat[~isc]
    ids, counts = np.unique(cat, return_counts=True)
    found = dict(zip(ids.tolist(), counts.tolist()))
    if class_ids is None:
        return found
    return {int(c): int(found.get(int(c), 0)) for c in class_ids}


def _subset_with_sum(counts: list[int], k: int) -> list[int] | None:
    """Indices (in order) of a subset of ``counts`` summing to exactly ``k``, or None."""
    reach: dict[int, list[int]] = {0: []}
    for i, c in enumerate(counts):
        if c > k:
            continue
        for s, picked in list(reach.items()):
            t = s + c
            if t <= k and t not in reach:
                reach[t] = picked + [i]
        if k in reach:
            return reach[k]
    return None


def _select_for_class(candidates: np.ndarray, counts: np.ndarray, k: int,
                      rng: np.random.Generator) -> list[tuple[int, int]]:
    """(row, number of instances to keep) pairs holding exactly ``k`` instances."""
    order = rng.permutation(len(candidates))
    picked: list[tuple[int, int]] = []
    need = k
    for i in order:
        c = int(counts[i])
        if c <= need:
            picked.append((int(candidates[i]), c))
            need -= c
            if need == 0:
                return picked
    # greedy missed: look for an exact subset in the same seeded order
    shuffled = [int(counts[i]) for i in order]
    subset = _subset_with_sum(shuffled, k)
    if subset is not None:
        return [(int(candidates[order[j]]), shuffled[j]) for j in subset]
    # none exists: take the greedy pick and a part of the next image that overshoots
    used = {row for row, _ in picked}
    for i in order:
        if int(candidates[i]) not in used and int(counts[i]) > need:
            picked.append((int(candidates[i]), need))
            return picked
    raise AssertionError("unreachable: total instances >= k was checked")  # pragma: no cover


def _selection(table: pa.Table, class_ids: Sequence[int], k: int, seed: int):
    class_ids = [int(c) for c in class_ids]
    if len(set(class_ids)) != len(class_ids):
        raise ValueError(f"class ids repeat: {class_ids}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    rows, cat, isc, image_ids = _flat_annotations(table.select(list(_ANN_COLUMNS)))
    valid = ~isc
    available = {}
    per_class = {}
    for c in class_ids:
        sel = valid & (cat == c)
        cand, counts = np.unique(rows[sel], return_counts=True)
        available[c] = int(counts.sum())
        per_class[c] = (cand, counts)
    short = {c: n for c, n in available.items() if n < k}
    if short:
        raise InsufficientInstances(k, short)

    keep: dict[int, dict[int, int]] = {}  # row -> {class id: instances to keep}
    for c in class_ids:
        cand, counts = per_class[c]
        # visit candidates in image_id order before shuffling, so table order does not matter
        by_id = np.argsort(image_ids[cand], kind="stable")
        cand, counts = cand[by_id], counts[by_id]
        rng = np.random.default_rng([int(seed), c])
        for row, n in _select_for_class(cand, counts, k, rng):
            keep.setdefault(row, {})[c] = n
    return keep


def sample_kshot(table: pa.Table, class_ids: Sequence[int], k: int, seed: int) -> list[dict]:
    """Rows (IMAGE_SCHEMA dicts) whose annotations hold exactly ``k`` instances per class.

    Rows come sorted by ``image_id``. Raises :class:`InsufficientInstances` when a class has
    fewer than ``k`` non-crowd instances in ``table``.
    """
    keep = _selection(table, class_ids, k, seed)
    chosen = sorted(keep)
    taken = table.take(pa.array(chosen, type=pa.int64())).to_pylist()
    out = []
    for row_index, row in zip(chosen, taken):
        quota = dict(keep[row_index])
        boxes, cats, crowd = [], [], []
        for box, c, isc in zip(row["boxes"], row["category_ids"], row["iscrowd"]):
            if not isc and quota.get(c, 0) > 0:
                quota[c] -= 1
                boxes.append(box)
                cats.append(c)
                crowd.append(False)
        row["boxes"], row["category_ids"], row["iscrowd"] = boxes, cats, crowd
        out.append(row)
    out.sort(key=lambda r: r["image_id"])
    return out


def kshot_table(table: pa.Table, class_ids: Sequence[int], k: int, seed: int) -> pa.Table:
    """:func:`sample_kshot` as a pyarrow Table with the input's schema."""
    return pa.Table.from_pylist(sample_kshot(table, class_ids, k, seed), schema=table.schema)


def sample_support(table: pa.Table, new_ids: Sequence[int], old_ids: Sequence[int], k: int,
                   seed: int, replay: bool = True) -> tuple[list[dict], list[dict]]:
    """The fine-tuning set of one few-shot episode: ``(novel_rows, replay_rows)``.

    ``novel_rows`` hold exactly ``k`` instances of each new class; ``replay_rows`` (TFA's
    balanced fine-tuning set, Wang et al. 2020) hold ``k`` instances of each old class, or
    as many as the rarest old class has, so the old classes keep being seen. Same ``seed``,
    same rows."""
    novel = sample_kshot(table, new_ids, k, seed)
    if not replay or not old_ids:
        return novel, []
    counts = count_instances(table, old_ids)
    k_old = min([k] + [counts.get(i, 0) for i in old_ids])
    if k_old <= 0:
        return novel, []
    try:
        return novel, sample_kshot(table, old_ids, k_old, seed)
    except InsufficientInstances:
        return novel, []
