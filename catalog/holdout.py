"""Seeded, class-stratified hold-outs: a test (or val) split for a dataset that has none.

Rule of the house: selection on val, report on test; a dataset without a test split gets one
at import. The draw, for a ``fraction`` of a source split's images:

- classes are visited from the rarest (fewest images holding a non-crowd box of it) to the
  most common; each image is assigned when its rarest class is visited, together with the
  other images of that class not assigned yet. The images of a class with ``n`` images are
  split so that ``round(n * fraction)`` of them are held out, at least 1 and at most
  ``n - 1`` when ``n >= 2``, counting the ones rarer classes already placed. So every class
  with 2 or more images lands in both parts, unless rarer classes already put all its images
  on one side (rare; such classes are reported);
- images with no (non-crowd) box are split by the same fraction on their own;
- the order inside a class comes from ``numpy.random.default_rng([seed, stream, class_id])``
  over the sorted image ids: the same ids, seed and fraction give the same hold-out on every
  machine, whatever order the images were read in.

Rare classes therefore pull the held-out share above ``fraction`` on small datasets (a class
with 2 images gives one of them); :class:`HoldOut` reports the share actually held out.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

__all__ = ["HoldOut", "stratified_holdout", "ids_sha256"]

_NEGATIVES = 0  # rng stream key for images without boxes (class ids get 1 + id)


@dataclass
class HoldOut:
    held: list[int]  # image ids moved to the hold-out, sorted
    kept: list[int]  # image ids left in the source split, sorted
    fraction: float  # requested
    unsplit_classes: list[int] = field(default_factory=list)  # >= 2 images, one side only

    @property
    def actual_fraction(self) -> float:
        total = len(self.held) + len(self.kept)
        return len(self.held) / total if total else 0.0


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def ids_sha256(ids: Sequence[int]) -> str:
    """sha256 of the sorted ids, one per line: a short fingerprint of a hold-out."""
    text = "".join(f"{int(i)}\n" for i in sorted(ids))
    return hashlib.sha256(text.encode()).hexdigest()


def stratified_holdout(image_ids: Sequence[int], classes: Sequence[Sequence[int]],
                       fraction: float, seed: int, stream: int = 0) -> HoldOut:
    """Hold out about ``fraction`` of ``image_ids``, stratified by class (module docstring).

    ``classes[i]`` are the (non-crowd) category ids of image ``image_ids[i]``; ``stream``
    separates independent draws with the same seed (the importer draws test with stream 0,
    then val from what is left with stream 1).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"a hold-out fraction is in [0, 1), got {fraction}")
    if len(image_ids) != len(classes):
        raise ValueError("image_ids and classes differ in length")
    if len(set(int(i) for i in image_ids)) != len(image_ids):
        raise ValueError("image ids must be unique within the source split")
    order = sorted(range(len(image_ids)), key=lambda i: int(image_ids[i]))
    ids = [int(image_ids[i]) for i in order]
    sets = [sorted({int(c) for c in classes[i]}) for i in order]
    if fraction == 0.0 or len(ids) < 2:
        return HoldOut(held=[], kept=sorted(ids), fraction=fraction)

    members: dict[int, list[int]] = {}  # class id -> positions (ascending id order)
    for pos, cs in enumerate(sets):
        for c in cs:
            members.setdefault(c, []).append(pos)
    side = np.full(len(ids), -1, dtype=np.int8)  # -1 unassigned, 0 kept, 1 held out

    def place(positions: list[int], want_held: int, rng_key: list[int]) -> None:
        rng = np.random.default_rng([int(seed), int(stream)] + rng_key)
        perm = [positions[i] for i in rng.permutation(len(positions))]
        for j, pos in enumerate(perm):
            side[pos] = 1 if j < want_held else 0

    for c in sorted(members, key=lambda c: (len(members[c]), c)):
        pos = members[c]
        n = len(pos)
        free = [p for p in pos if side[p] == -1]
        if not free:
            continue
        held = int(np.count_nonzero(side[pos] == 1))
        kept = int(np.count_nonzero(side[pos] == 0))
        target = _round(n * fraction)
        if n >= 2:
            target = min(max(target, 1), n - 1)
        x = min(max(target - held, 0), len(free))
        if n >= 2 and held + x == 0:
            x = 1
        if n >= 2 and kept + len(free) - x == 0 and x > 0 and held + x - 1 >= 1:
            x -= 1
        place(free, x, [1 + int(c)])

    negatives = [p for p in range(len(ids)) if side[p] == -1]  # images with no class
    if negatives:
        place(negatives, min(_round(len(negatives) * fraction), len(negatives)), [_NEGATIVES])

    unsplit = [c for c, pos in sorted(members.items())
               if len(pos) >= 2 and len(set(side[pos].tolist())) < 2]
    return HoldOut(
        held=sorted(ids[p] for p in range(len(ids)) if side[p] == 1),
        kept=sorted(ids[p] for p in range(len(ids)) if side[p] == 0),
        fraction=fraction,
        unsplit_classes=unsplit,
    )
