"""k-shot sampling: exact counts, seeds, crowd handling, merging, and clear errors."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from catalog.kshot import InsufficientInstances, count_instances, kshot_table, sample_kshot
from catalog.schema import IMAGE_SCHEMA
from catalog.synthetic import WorldConfig, generate_row


def _table(cat_lists, crowd_lists=None, first_id=1):
    rows = []
    for i, cats in enumerate(cat_lists):
        crowd = crowd_lists[i] if crowd_lists else [False] * len(cats)
        rows.append({
            "image_id": first_id + i, "file_name": f"{i}.png", "width": 64, "height": 64,
            "image": f"img{i}".encode(),
            "boxes": [[float(j), float(j), float(j) + 5, float(j) + 5] for j in range(len(cats))],
            "category_ids": list(cats), "iscrowd": list(crowd),
        })
    return pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA)


@pytest.fixture(scope="module")
def random_table():
    rng = np.random.default_rng(123)
    cats, crowd = [], []
    for _ in range(400):
        n = int(rng.integers(1, 7))
        cats.append(rng.integers(1, 9, size=n).tolist())
        crowd.append((rng.random(n) < 0.05).tolist())
    return _table(cats, crowd)


@pytest.fixture(scope="module")
def world_table():
    cfg = WorldConfig()
    return pa.Table.from_pylist([generate_row(0, "train", i, cfg) for i in range(200)],
                                schema=IMAGE_SCHEMA)


def _kept(rows):
    c = Counter()
    for r in rows:
        assert len(r["boxes"]) == len(r["category_ids"]) == len(r["iscrowd"])
        assert not any(r["iscrowd"])
        c.update(r["category_ids"])
    return c


@pytest.mark.parametrize("k", [1, 2, 3, 5, 10])
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_exactly_k_per_class(random_table, k, seed):
    classes = [1, 3, 4, 8]
    rows = sample_kshot(random_table, classes, k, seed)
    assert _kept(rows) == {c: k for c in classes}
    ids = [r["image_id"] for r in rows]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


@pytest.mark.parametrize("k", [1, 2, 3, 5, 10])
def test_exactly_k_on_the_synthetic_world(world_table, k):
    classes = [2, 5, 11, 17, 20]
    rows = sample_kshot(world_table, classes, k, seed=3)
    assert _kept(rows) == {c: k for c in classes}
    by_id = {r["image_id"]: r for r in world_table.to_pylist()}
    for r in rows:
        src = by_id[r["image_id"]]
        assert r["image"] == src["image"]  # image bytes are the original ones
        for b, c in zip(r["boxes"], r["category_ids"]):
            assert any(b == sb and c == sc for sb, sc in zip(src["boxes"], src["category_ids"]))


def test_stable_for_a_seed_and_different_across_seeds(world_table):
    a = sample_kshot(world_table, [1, 2, 3], 5, seed=0)
    b = sample_kshot(world_table, [1, 2, 3], 5, seed=0)
    assert a == b
    picks = {tuple(r["image_id"] for r in sample_kshot(world_table, [1, 2, 3], 5, seed=s))
             for s in range(10)}
    assert len(picks) >= 9


def test_class_selection_independent_of_other_classes_and_row_order(random_table):
    alone = [r for r in sample_kshot(random_table, [3], 3, seed=5)]
    together = sample_kshot(random_table, [1, 3], 3, seed=5)
    ids_alone = {r["image_id"] for r in alone}
    ids_with_3 = {r["image_id"] for r in together if 3 in r["category_ids"]}
    assert ids_alone == ids_with_3
    shuffled = random_table.take(pa.array(np.random.default_rng(0).permutation(random_table.num_rows)))
    assert sample_kshot(shuffled, [1, 3], 3, seed=5) == together


def test_only_selected_class_kept_and_merge_when_image_selected_twice():
    # a single image holds both classes: selecting both must merge into one row
    table = _table([[1, 2, 5, 5]])
    rows = sample_kshot(table, [1, 2], 1, seed=0)
    assert len(rows) == 1
    assert sorted(rows[0]["category_ids"]) == [1, 2]
    rows = sample_kshot(table, [5], 2, seed=0)
    assert rows[0]["category_ids"] == [5, 5]
    assert rows[0]["boxes"] == [[2.0, 2.0, 7.0, 7.0], [3.0, 3.0, 8.0, 8.0]]


def test_crowd_never_counts():
    table = _table([[1, 1], [1]], [[True, False], [True]])
    assert count_instances(table, [1]) == {1: 1}
    rows = sample_kshot(table, [1], 1, seed=0)
    assert len(rows) == 1 and rows[0]["image_id"] == 1 and rows[0]["iscrowd"] == [False]
    with pytest.raises(InsufficientInstances):
        sample_kshot(table, [1], 2, seed=0)


def test_exact_even_when_greedy_cannot():
    # only two-instance images and one three-instance image: 5 = 2 + 3 for every order
    table = _table([[4, 4], [4, 4], [4, 4, 4], [4, 4]])
    for seed in range(10):
        assert _kept(sample_kshot(table, [4], 5, seed)) == {4: 5}
    # no subset sums to 3: one image gives part of its instances
    table = _table([[4, 4], [4, 4]])
    for seed in range(5):
        assert _kept(sample_kshot(table, [4], 3, seed)) == {4: 3}


def test_insufficient_instances_message(random_table):
    counts = count_instances(random_table, [1, 9, 10])
    assert counts[9] == 0 and counts[1] > 0
    with pytest.raises(InsufficientInstances) as e:
        sample_kshot(random_table, [1, 9, 10], 3, seed=0)
    assert isinstance(e.value, ValueError)
    msg = str(e.value)
    assert "9" in msg and "10" in msg and "class 9: 0" in msg and "3 needed" in msg
    assert e.value.available == {9: 0, 10: 0}


def test_count_instances_matches_python(random_table):
    expected = Counter()
    for r in random_table.to_pylist():
        expected.update(c for c, isc in zip(r["category_ids"], r["iscrowd"]) if not isc)
    assert count_instances(random_table) == dict(expected)
    assert count_instances(random_table, [2, 99]) == {2: expected[2], 99: 0}


def test_bad_arguments(random_table):
    with pytest.raises(ValueError):
        sample_kshot(random_table, [1, 1], 1, seed=0)
    with pytest.raises(ValueError):
        sample_kshot(random_table, [1], 0, seed=0)


def test_kshot_table_schema(random_table):
    t = kshot_table(random_table, [2], 2, seed=0)
    assert t.schema == IMAGE_SCHEMA
    assert sum(len(x) for x in t.column("category_ids").to_pylist()) == 2
