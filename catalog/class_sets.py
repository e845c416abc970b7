"""Class sets: the ordered class lists that model versions in the registry point at.

A :class:`ClassSet` is an ordered tuple of class names of one dataset; the order is the
order of the detector's classifier rows (row i+1 is ``classes[i]``, row 0 background), so a
child made with :func:`extend` keeps its parent's rows and appends new ones. Its id is
derived from (dataset, classes) only (``cs-<sha1[:10]>``), so the same list always gets
the same id on every machine, whatever its parent.

Stored as JSON under ``<catalog.root>/class_sets/<id>.json`` (local disk or object storage,
through the catalog's :class:`~catalog.storage.Storage`; each file is written whole).
"""
from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

__all__ = [
    "ClassSet", "ClassSetNotFound", "class_set_id", "make_class_set", "extend",
    "split_class_set", "save_class_set", "load_class_set", "list_class_sets",
]


def class_set_id(dataset: str, classes: Sequence[str]) -> str:
    """``cs-`` + the first 10 hex digits of the sha1 of (dataset, classes in order)."""
    payload = json.dumps({"dataset": dataset, "classes": list(classes)}, separators=(",", ":"))
    return "cs-" + hashlib.sha1(payload.encode("utf-8")).hexdigest()[:10]


def _check_classes(classes: Sequence[str]) -> tuple[str, ...]:
    if isinstance(classes, str):
        raise TypeError("classes must be a sequence of class names, not a single string")
    classes = tuple(classes)
    if not classes:
        raise ValueError("a class set needs at least one class")
    for c in classes:
        if not isinstance(c, str) or not c:
            raise ValueError(f"class names must be non-empty strings, got {c!r}")
    seen, dup = set(), []
    for c in classes:
        if c in seen and c not in dup:
            dup.append(c)
        seen.add(c)
    if dup:
        raise ValueError(f"duplicate class name(s) in class set: {', '.join(dup)}")
    return classes


@dataclass(frozen=True)
class ClassSet:
    """An ordered class list of one dataset; ``parent`` is the id of the set it extends."""

    id: str
    dataset: str
    classes: tuple[str, ...]
    parent: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "classes", _check_classes(self.classes))
        expected = class_set_id(self.dataset, self.classes)
        if self.id != expected:
            raise ValueError(
                f"class set id {self.id!r} does not match its dataset and classes "
                f"(expected {expected!r}); build class sets with make_class_set()"
            )

    @classmethod
    def create(cls, dataset: str, classes: Sequence[str], parent: str | None = None) -> "ClassSet":
        classes = _check_classes(classes)
        return cls(class_set_id(dataset, classes), dataset, classes, parent)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def index(self, name: str) -> int:
        """Position of ``name`` in the set (0-based; the classifier row is index + 1)."""
        try:
            return self.classes.index(name)
        except ValueError:
            raise KeyError(f"class {name!r} is not in class set {self.id}") from None

    def new_classes(self, parent: "ClassSet | None") -> tuple[str, ...]:
        """Classes this set adds to ``parent`` (all of them when there is none)."""
        return self.classes[len(parent.classes):] if parent is not None else self.classes

    def to_json(self) -> dict:
        return {"id": self.id, "dataset": self.dataset, "classes": list(self.classes),
                "parent": self.parent}

    @classmethod
    def from_json(cls, data: dict) -> "ClassSet":
        return cls(id=data["id"], dataset=data["dataset"], classes=tuple(data["classes"]),
                   parent=data.get("parent"))


class ClassSetNotFound(KeyError):
    pass


def make_class_set(dataset: str, classes: Sequence[str], parent: str | None = None) -> ClassSet:
    """A class set with its derived id."""
    return ClassSet.create(dataset, classes, parent)


def extend(parent: ClassSet, new_classes: Iterable[str]) -> ClassSet:
    """The child of ``parent`` that appends ``new_classes`` (in order) to its classes."""
    new_classes = tuple(new_classes)
    if isinstance(new_classes, str) or not new_classes:
        raise ValueError(f"extend() needs at least one new class for class set {parent.id}")
    again = [c for c in new_classes if c in parent.classes]
    if again:
        raise ValueError(
            f"class(es) {', '.join(again)} already in class set {parent.id} "
            f"({', '.join(parent.classes)}); a class can be added only once"
        )
    return ClassSet.create(parent.dataset, parent.classes + new_classes, parent=parent.id)


def split_class_set(manifest, split: str, part: str = "base") -> ClassSet:
    """The class set of the ``base`` (or ``novel``, or ``all``: base then novel) classes of
    a dataset's class split, e.g. the starting point of the few-shot protocol."""
    cs = manifest.class_split(split)
    if part == "base":
        classes = cs.base
    elif part == "novel":
        classes = cs.novel
    elif part == "all":
        classes = tuple(cs.base) + tuple(cs.novel)
    else:
        raise ValueError(f"part must be 'base', 'novel' or 'all', got {part!r}")
    return make_class_set(manifest.name, classes)


def _dir(catalog) -> str:
    return catalog.storage.path("class_sets")


def _key(catalog, id: str) -> str:
    return posixpath.join(_dir(catalog), f"{id}.json")


def save_class_set(catalog, cs: ClassSet) -> Path | str:
    """Write ``cs`` (atomically) to the catalog and return where it is (a Path on local
    disk, a URI on object storage).

    The id names the ordered class list, so a set already stored under the id is kept as
    is: saving again is a no-op, even when the same list was reached through another
    parent (the first lineage recorded wins; model versions carry their own parent tag).
    """
    st = catalog.storage
    key = _key(catalog, cs.id)
    if not st.is_file(key):
        st.write_json(key, cs.to_json())
    return st.location(key)


def load_class_set(catalog, id: str) -> ClassSet:
    try:
        data = catalog.storage.read_json(_key(catalog, id))
    except FileNotFoundError:
        known = ", ".join(c.id for c in list_class_sets(catalog)) or "none"
        raise ClassSetNotFound(f"class set {id!r} is not in the catalog at {catalog.uri} "
                               f"(known: {known})") from None
    return ClassSet.from_json(data)


def list_class_sets(catalog, dataset: str | None = None) -> list[ClassSet]:
    """All stored class sets (of ``dataset`` only, if given), sorted by id."""
    st = catalog.storage
    out = []
    for info in st.list_dir(_dir(catalog)):
        name = info.base_name
        if not (name.startswith("cs-") and name.endswith(".json")) or not info.is_file:
            continue
        cs = ClassSet.from_json(st.read_json(info.path))
        if dataset is None or cs.dataset == dataset:
            out.append(cs)
    return out
