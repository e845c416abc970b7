"""Unit tests: content hashes, assert_disjoint (support vs evaluation) and hold-out draws."""
from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from catalog.content_hash import (
    fill_content_hashes,
    image_bytes_sha256,
    pixels_sha256,
)
from catalog.holdout import stratified_holdout
from catalog.overlap import SharedImagesError, assert_disjoint, find_shared
from catalog.schema import IMAGE_SCHEMA


def _encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def pixels() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)


# ---- content hashes ----------------------------------------------------------------------
def test_hash_is_of_the_pixels_not_the_file(pixels):
    png = _encode(pixels, "PNG")
    assert image_bytes_sha256(png) == pixels_sha256(pixels)
    # other bytes, same pixels: recompressed PNG, BMP, PNG with a text chunk
    assert image_bytes_sha256(_encode(pixels, "PNG", compress_level=9)) == pixels_sha256(pixels)
    assert image_bytes_sha256(_encode(pixels, "BMP")) == pixels_sha256(pixels)
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "exported by some tool")
    tagged = _encode(pixels, "PNG", pnginfo=info)
    assert tagged != png and image_bytes_sha256(tagged) == pixels_sha256(pixels)
    # one pixel changed, or the same pixels in another shape: another hash
    other = pixels.copy()
    other[0, 0, 0] ^= 1
    assert pixels_sha256(other) != pixels_sha256(pixels)
    assert pixels_sha256(pixels.reshape(32, 24, 3)) != pixels_sha256(pixels)
    # a lossy re-encode changes the pixels: not the same image for an exact hash
    jpeg = _encode(pixels, "JPEG", quality=95)
    assert image_bytes_sha256(jpeg) != image_bytes_sha256(_encode(pixels, "JPEG", quality=80))


def test_fill_content_hashes_fills_only_missing(pixels):
    png = _encode(pixels, "PNG")
    t = pa.table({"image_id": [1, 2, 3], "image": [png, png, b""],
                  "content_sha256": ["given", None, None]})
    out = fill_content_hashes(t).column("content_sha256").to_pylist()
    assert out == ["given", pixels_sha256(pixels), None]  # b"" is no image: stays null
    legacy = pa.table({"image_id": [1], "image": [png]})
    assert fill_content_hashes(legacy).column("content_sha256").to_pylist() == [
        pixels_sha256(pixels)]


# ---- assert_disjoint ---------------------------------------------------------------------
def _row(image_id: int, file_name: str, digest: str | None) -> dict:
    return {"image_id": image_id, "file_name": file_name, "width": 8, "height": 8,
            "image": b"", "boxes": [], "category_ids": [], "iscrowd": [],
            "content_sha256": digest}


def test_assert_disjoint_passes_on_disjoint_sets():
    support = [_row(1, "a.jpg", "h1"), _row(2, "b.jpg", "h2")]
    evaluation = pa.Table.from_pylist([_row(3, "c.jpg", "h3"), _row(1, "x.jpg", "h4")],
                                      schema=IMAGE_SCHEMA)
    # id 1 is on both sides but both rows carry hashes and they differ: different images
    assert_disjoint(support, evaluation)
    assert_disjoint([], evaluation)


def test_assert_disjoint_refuses_a_support_image_in_the_eval_set_by_content():
    support = [_row(1, "a.jpg", "h1"), _row(2, "b.jpg", "h2")]
    evaluation = pa.Table.from_pylist([_row(30, "c.jpg", "h3"), _row(40, "copy_of_b.jpg", "h2")],
                                      schema=IMAGE_SCHEMA)
    with pytest.raises(SharedImagesError) as info:
        assert_disjoint(support, evaluation)
    msg = str(info.value)
    assert msg.startswith("refusing to evaluate on images the support rows came from")
    assert "support b.jpg (id 2) = evaluation copy_of_b.jpg (id 40) [same content_sha256]" in msg
    assert [(p.left_id, p.right_id, p.by) for p in info.value.pairs] == [
        (2, 40, "content_sha256")]
    # rows as a table on both sides, custom names in the message
    with pytest.raises(SharedImagesError, match="novel support .* val set"):
        assert_disjoint(pa.Table.from_pylist(support, schema=IMAGE_SCHEMA), evaluation,
                        support_name="novel support", eval_name="val")


def test_assert_disjoint_falls_back_to_image_ids_without_hashes():
    support = [_row(1, "a.jpg", "h1"), _row(2, "b.jpg", None)]
    no_hash_column = pa.table({"image_id": [7, 1], "file_name": ["g.jpg", "a.jpg"]})
    with pytest.raises(SharedImagesError) as info:
        assert_disjoint(support, no_hash_column)
    assert [(p.left_id, p.right_id, p.by) for p in info.value.pairs] == [(1, 1, "image_id")]
    assert "re-import it to compare by content" in str(info.value)
    # a support row without hash against eval rows with hashes: still compared by id
    evaluation = [_row(2, "b2.jpg", "h9"), _row(5, "e.jpg", "h5")]
    pairs = find_shared(support, evaluation)
    assert [(p.left_id, p.right_id, p.by) for p in pairs] == [(2, 2, "image_id")]
    # no shared id, no shared hash: fine
    assert_disjoint(support, [_row(8, "z.jpg", None)])


def test_assert_disjoint_counts_each_shared_image_once_per_pair():
    support = [_row(1, "a.jpg", "h1")]
    evaluation = [_row(1, "a.jpg", "h1"), _row(9, "a_again.jpg", "h1")]
    pairs = find_shared(support, evaluation)
    assert sorted((p.right_id, p.by) for p in pairs) == [(1, "content_sha256"),
                                                         (9, "content_sha256")]


# ---- stratified hold-outs ----------------------------------------------------------------
def _multilabel(n: int, seed: int = 0) -> tuple[list[int], list[list[int]]]:
    rng = np.random.default_rng(seed)
    ids = list(range(100, 100 + n))
    weights = np.array([40, 20, 10, 5, 2, 1, 0.5, 0.2], dtype=float)
    weights /= weights.sum()
    classes = []
    for _ in ids:
        k = int(rng.integers(0, 4))  # 0 .. 3 objects, some images are negatives
        classes.append(sorted(set(rng.choice(8, size=k, p=weights).tolist())))
    return ids, classes


def test_holdout_is_seeded_and_independent_of_input_order():
    ids, classes = _multilabel(300)
    a = stratified_holdout(ids, classes, 0.2, seed=3)
    perm = np.random.default_rng(1).permutation(len(ids))
    b = stratified_holdout([ids[i] for i in perm], [classes[i] for i in perm], 0.2, seed=3)
    assert a.held == b.held and a.kept == b.kept
    assert sorted(a.held + a.kept) == ids and not set(a.held) & set(a.kept)
    assert stratified_holdout(ids, classes, 0.2, seed=4).held != a.held
    assert stratified_holdout(ids, classes, 0.2, seed=3, stream=1).held != a.held


def test_holdout_puts_every_class_with_two_images_on_both_sides():
    ids, classes = _multilabel(300)
    h = stratified_holdout(ids, classes, 0.2, seed=0)
    by_id = dict(zip(ids, classes))
    n_images = Counter(c for cs in classes for c in cs)
    held = Counter(c for i in h.held for c in by_id[i])
    kept = Counter(c for i in h.kept for c in by_id[i])
    for c, n in n_images.items():
        if n >= 2:
            assert held[c] >= 1 and kept[c] >= 1, (c, n, held[c], kept[c])
        # roughly the fraction per class (at least 1, at most n - 1)
        if n >= 20:
            assert abs(held[c] / n - 0.2) < 0.08, (c, n, held[c])
    assert h.unsplit_classes == []
    assert abs(h.actual_fraction - 0.2) < 0.03
    negatives = [i for i, cs in zip(ids, classes) if not cs]
    assert 0 < sum(i in set(h.held) for i in negatives) < len(negatives)


def test_holdout_of_a_rare_class():
    # class 9 in exactly two images: one lands on each side, whatever the seed
    ids = list(range(20))
    classes = [[1] for _ in ids]
    classes[4], classes[11] = [1, 9], [9]
    for seed in range(10):
        h = stratified_holdout(ids, classes, 0.2, seed=seed)
        assert len({4, 11} & set(h.held)) == 1
        # class 1 is in 19 images: round(19 * 0.2) = 4 held out, counting image 4 if drawn
        assert sum(1 in classes[i] for i in h.held) == 4


def test_holdout_edge_cases():
    assert stratified_holdout([1, 2, 3], [[1], [1], [1]], 0.0, seed=0).held == []
    assert stratified_holdout([1], [[1]], 0.5, seed=0).held == []
    with pytest.raises(ValueError, match="in \\[0, 1\\)"):
        stratified_holdout([1, 2], [[1], [1]], 1.0, seed=0)
    with pytest.raises(ValueError, match="unique"):
        stratified_holdout([1, 1], [[1], [1]], 0.5, seed=0)
