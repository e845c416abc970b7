"""Class sets: stable ids, extension, duplicate errors, JSON round trip in the catalog."""
from __future__ import annotations

import json

import pytest

from catalog.class_sets import (ClassSet, ClassSetNotFound, class_set_id, extend,
                                list_class_sets, load_class_set, make_class_set, save_class_set,
                                split_class_set)
from catalog.store import Catalog


def test_id_is_stable_and_depends_on_dataset_and_order():
    a = make_class_set("synthworld", ["circle", "square"])
    assert a.id == make_class_set("synthworld", ("circle", "square")).id
    assert a.id == class_set_id("synthworld", ["circle", "square"])
    assert a.id.startswith("cs-") and len(a.id) == 13
    assert a.id != make_class_set("synthworld", ["square", "circle"]).id
    assert a.id != make_class_set("voc", ["circle", "square"]).id
    # a known value: ids must not drift between releases (registry tags point at them)
    assert class_set_id("synthworld", ["circle"]) == "cs-" + __import__("hashlib").sha1(
        b'{"dataset":"synthworld","classes":["circle"]}').hexdigest()[:10]


def test_frozen_and_id_checked():
    a = make_class_set("d", ["x"])
    with pytest.raises(Exception):
        a.classes = ("y",)
    with pytest.raises(ValueError, match="does not match"):
        ClassSet(id="cs-0000000000", dataset="d", classes=("x",))


def test_extend_appends_in_order_and_links_parent():
    base = make_class_set("d", ["a", "b"])
    child = extend(base, ["c", "e"])
    assert child.classes == ("a", "b", "c", "e")
    assert child.parent == base.id and child.dataset == "d"
    assert child.new_classes(base) == ("c", "e")
    assert child.index("c") == 2


def test_duplicate_class_errors():
    base = make_class_set("d", ["a", "b"])
    with pytest.raises(ValueError, match="already in class set"):
        extend(base, ["c", "b"])
    with pytest.raises(ValueError, match="duplicate"):
        extend(base, ["c", "c"])
    with pytest.raises(ValueError, match="duplicate"):
        make_class_set("d", ["a", "a"])
    with pytest.raises(ValueError):
        extend(base, [])


def test_save_load_list_round_trip(tmp_path):
    cat = Catalog(tmp_path)
    base = make_class_set("d", ["a", "b"])
    child = extend(base, ["c"])
    p = save_class_set(cat, base)
    save_class_set(cat, child)
    save_class_set(cat, child)  # idempotent
    assert p == tmp_path / "class_sets" / f"{base.id}.json"
    assert json.loads(p.read_text())["classes"] == ["a", "b"]
    assert load_class_set(cat, child.id) == child
    assert load_class_set(cat, base.id) == base
    assert list_class_sets(cat) == sorted([base, child], key=lambda c: c.id)
    assert list_class_sets(cat, dataset="other") == []
    # the same list reached through another parent keeps the first stored lineage
    other = make_class_set("d", ["a", "b", "c"], parent="cs-elsewhere")
    assert other.id == child.id
    save_class_set(cat, other)
    assert load_class_set(cat, child.id).parent == base.id
    with pytest.raises(ClassSetNotFound, match="cs-nope"):
        load_class_set(cat, "cs-nope")


def test_split_class_set():
    from catalog.world import world_manifest

    m = world_manifest()
    base = split_class_set(m, "split1")
    assert len(base.classes) == 15 and base.dataset == "synthworld"
    full = extend(base, m.class_split("split1").novel)
    assert full.classes == split_class_set(m, "split1", "all").classes
