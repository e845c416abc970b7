"""Teacher embeddings of ground-truth boxes, cached with the dataset.

CLIP distillation (``fewshot.clip.distillation``) pulls each foreground RoI's feature toward the
teacher embedding of the ground-truth box it matched. Those embeddings depend only on the
image, the box and the teacher, so they are computed once per split and stored next to it:

    <root>/datasets/<dataset>/teacher/<teacher_id>/<split>.parquet

one row per image of the split, in the split's order: ``image_id`` and ``embeddings``
(``list<list<float32>>``), one embedding per box of the row **in the row's box order, all
boxes included** (crowd boxes and every category), so the data layer filters embeddings
exactly as it filters boxes. The Parquet schema metadata records the teacher id, the
embedding width. Files are written to a temporary name and moved into place (readers never
see a partial cache), on local disk or object storage alike (:mod:`catalog.storage`).
The cache lives in the dataset's data folder, so rebuilding the dataset (a new folder, or a
new generation on object storage) leaves its stale caches behind with the old data.

The catalog never imports the learning code: the builder takes any ``teacher`` object with
``id`` and ``embed_boxes(image_bytes, boxes) -> [n, E]`` (``fewshot.clip.teacher.Teacher`` is
one; its optional ``embed_boxes_many`` batches images), or a plain callable plus
``teacher_id``. torch is never imported here.
"""
from __future__ import annotations

import json
import posixpath
import re
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from catalog.schema import TEACHER_EMB_COLUMN
from catalog.store import Catalog

__all__ = [
    "CACHE_SCHEMA", "TeacherCacheError", "cache_dir", "cache_path", "has_teacher_cache",
    "list_teacher_caches", "build_teacher_cache", "load_teacher_cache", "cache_info",
    "TEACHER_EMB_COLUMN", "join_teacher_embeddings",
]

CACHE_SCHEMA = pa.schema([
    pa.field("image_id", pa.int64(), nullable=False),
    pa.field("embeddings", pa.list_(pa.list_(pa.float32())), nullable=False),
])
_META_KEY = b"fewshot.teacher_cache"
_ID_RE = re.compile(r"^[A-Za-z0-9._-]+$")


class TeacherCacheError(ValueError):
    pass


def _check_id(teacher_id: str) -> str:
    if not isinstance(teacher_id, str) or not _ID_RE.match(teacher_id) or teacher_id in (".", ".."):
        raise TeacherCacheError(
            f"teacher id {teacher_id!r} must be letters, digits, '.', '_' or '-' (it names a folder)")
    return teacher_id


def _dir_key(catalog: Catalog, dataset: str, teacher_id: str) -> str:
    return posixpath.join(catalog._data_dir(dataset), "teacher", _check_id(teacher_id))


def _key(catalog: Catalog, dataset: str, split: str, teacher_id: str) -> str:
    return posixpath.join(_dir_key(catalog, dataset, teacher_id), f"{split}.parquet")


def cache_dir(catalog: Catalog, dataset: str, teacher_id: str) -> Path | str:
    """The teacher's cache folder (a Path on local disk, a URI on object storage)."""
    return catalog.storage.location(_dir_key(catalog, dataset, teacher_id))


def cache_path(catalog: Catalog, dataset: str, split: str, teacher_id: str) -> Path | str:
    """The cache file of one split (a Path on local disk, a URI on object storage)."""
    return catalog.storage.location(_key(catalog, dataset, split, teacher_id))


def has_teacher_cache(catalog: Catalog, dataset: str, split: str, teacher_id: str) -> bool:
    return catalog.storage.is_file(_key(catalog, dataset, split, teacher_id))


def list_teacher_caches(catalog: Catalog, dataset: str) -> dict[str, list[str]]:
    """teacher id -> splits cached for ``dataset``."""
    st = catalog.storage
    base = posixpath.join(catalog._data_dir(dataset), "teacher")
    return {d.base_name: sorted(f.base_name[:-len(".parquet")] for f in st.list_dir(d.path)
                                if f.is_file and f.base_name.endswith(".parquet")
                                and not f.base_name.startswith("."))
            for d in st.list_dir(base) if d.type == pafs.FileType.Directory}


def _missing(catalog: Catalog, dataset: str, split: str, teacher_id: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"no teacher cache for teacher {teacher_id!r} on {dataset}/{split} "
        f"({cache_path(catalog, dataset, split, teacher_id)}); "
        "build it with catalog.teacher_cache.build_teacher_cache")


def _resolve(teacher, teacher_id: str | None) -> tuple[Callable, Callable | None, str]:
    if hasattr(teacher, "embed_boxes"):
        tid = teacher_id or getattr(teacher, "id", None)
        many = getattr(teacher, "embed_boxes_many", None)
        return teacher.embed_boxes, many, _check_id(str(tid))
    if callable(teacher):
        if not teacher_id:
            raise TeacherCacheError("a plain embed_boxes callable needs teacher_id=")
        return teacher, None, _check_id(teacher_id)
    raise TypeError("teacher must have embed_boxes(image, boxes) and id, or be a callable")


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _chunk_table(ids: list[int], arrays: list, dim: int) -> pa.Table:
    """Rows of (image_id, [n_i, dim] embeddings) as an Arrow table, built from numpy."""
    counts = np.asarray([0 if a is None else a.shape[0] for a in arrays], dtype=np.int32)
    flat = [a.reshape(-1) for a in arrays if a is not None]
    values = np.concatenate(flat).astype(np.float32) if flat else np.zeros(0, np.float32)
    n_boxes = int(counts.sum())
    inner = pa.ListArray.from_arrays(
        pa.array(np.arange(n_boxes + 1, dtype=np.int32) * dim), pa.array(values, pa.float32()))
    outer = pa.ListArray.from_arrays(
        pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)), inner)
    return pa.Table.from_arrays([pa.array(ids, pa.int64()), outer], schema=CACHE_SCHEMA)


def _batches(table: pa.Table, images_per_batch: int) -> Iterator[list[dict]]:
    for batch in table.to_batches(max_chunksize=images_per_batch):
        yield batch.to_pylist()


def build_teacher_cache(
    catalog: Catalog,
    dataset: str,
    split: str,
    teacher,
    progress: bool = False,
    *,
    teacher_id: str | None = None,
    overwrite: bool = True,
    images_per_batch: int = 32,
) -> Path | str:
    """Embed every box of ``dataset``/``split`` with ``teacher``; write the cache; return its path.

    ``teacher``: an object with ``id`` and ``embed_boxes(image_bytes, boxes)`` (and
    optionally ``embed_boxes_many(images, boxes_list)``), or a callable
    ``embed_boxes(image_bytes, boxes) -> array [n, E]`` together with ``teacher_id``.
    With ``overwrite=False`` an existing cache is kept and its path returned.
    """
    embed_one, embed_many, tid = _resolve(teacher, teacher_id)
    st = catalog.storage
    final = _key(catalog, dataset, split, tid)
    if not overwrite and st.is_file(final):
        return st.location(final)
    table = catalog.read_split(dataset, split, columns=["image_id", "image", "boxes"])
    bar = None
    if progress:
        from catalog.progress import progress_bar

        bar = progress_bar(table.num_rows, f"teacher cache {dataset}/{split}", "img")
    # stream row groups into a temporary file, published with one rename at the end; the
    # writer opens once the embedding width is known (it goes into the schema metadata)
    st.make_dirs(posixpath.dirname(final))
    tmp = st.temp_name(final)
    writer: pq.ParquetWriter | None = None
    pending: list[tuple[list[int], list[np.ndarray]]] = []
    dim: int | None = None

    def open_writer(width: int) -> pq.ParquetWriter:
        meta = {"teacher_id": tid, "dataset": dataset, "split": split, "dim": width}
        schema = CACHE_SCHEMA.with_metadata({_META_KEY: json.dumps(meta).encode()})
        return pq.ParquetWriter(tmp, schema, filesystem=st.fs)

    try:
        for rows in _batches(table, images_per_batch):
            boxes = [[list(map(float, b)) for b in r["boxes"]] for r in rows]
            if embed_many is not None:
                embs = embed_many([r["image"] for r in rows], boxes)
            else:
                embs = [embed_one(r["image"], b) if b else None for r, b in zip(rows, boxes)]
            ids, arrays = [], []
            for r, b, e in zip(rows, boxes, embs):
                ids.append(int(r["image_id"]))
                if not b:
                    arrays.append(None)
                    continue
                arr = _to_numpy(e)
                if arr.ndim != 2 or arr.shape[0] != len(b):
                    raise TeacherCacheError(
                        f"image {r['image_id']}: teacher gave shape {arr.shape} for {len(b)} boxes")
                if dim is None:
                    dim = int(arr.shape[1])
                elif arr.shape[1] != dim:
                    raise TeacherCacheError(f"embedding width changed from {dim} to {arr.shape[1]}")
                arrays.append(arr)
            pending.append((ids, arrays))
            if dim is not None:
                writer = writer or open_writer(dim)
                for chunk in pending:
                    writer.write_table(_chunk_table(*chunk, dim))
                pending.clear()
            if bar is not None:
                bar.update(len(rows))
        if writer is None:  # no box at all in the split
            writer = open_writer(0)
        for chunk in pending:
            writer.write_table(_chunk_table(*chunk, dim or 0))
        writer.close()
        writer = None
        st.publish(tmp, final)
    finally:
        if writer is not None:
            writer.close()
        st.delete_file(tmp)  # gone already after publish; a failed build leaves nothing
        if bar is not None:
            bar.close()
    return st.location(final)


def cache_info(catalog: Catalog, dataset: str, split: str, teacher_id: str) -> dict:
    """The metadata recorded with a cache (teacher id, dataset, split, dim, num_rows)."""
    key = _key(catalog, dataset, split, teacher_id)
    if not catalog.storage.is_file(key):
        raise _missing(catalog, dataset, split, teacher_id)
    pf = pq.ParquetFile(catalog.storage.open_input_file(key))
    info = json.loads((pf.schema_arrow.metadata or {}).get(_META_KEY, b"{}"))
    info["num_rows"] = pf.metadata.num_rows
    return info


def load_teacher_cache(catalog: Catalog, dataset: str, split: str, teacher_id: str,
                       verify: bool = True) -> dict[int, np.ndarray]:
    """image_id -> float32 array [n_boxes, E] (row order = the row's box order).

    ``verify`` checks the cache still matches the split (same images, same number of boxes
    per image) and raises :class:`TeacherCacheError` if the dataset changed since."""
    key = _key(catalog, dataset, split, teacher_id)
    if not catalog.storage.is_file(key):
        raise _missing(catalog, dataset, split, teacher_id)
    path = catalog.storage.uri(key)
    table = pq.read_table(key, filesystem=catalog.storage.fs)
    info = json.loads((table.schema.metadata or {}).get(_META_KEY, b"{}"))
    dim = int(info.get("dim") or 0)
    ids = table.column("image_id").to_numpy()
    col = table.column("embeddings").combine_chunks()
    counts = col.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    values = col.flatten().flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    flat = values.reshape(-1, dim) if dim else np.zeros((int(counts.sum()), 0), np.float32)
    if flat.shape[0] != counts.sum():
        raise TeacherCacheError(f"teacher cache {path} is corrupt (ragged embeddings)")
    parts = np.split(flat, np.cumsum(counts)[:-1]) if len(counts) else []
    out = {int(i): np.ascontiguousarray(e) for i, e in zip(ids, parts)}
    if verify:
        split_table = catalog.read_split(dataset, split, columns=["image_id", "boxes"])
        lengths = split_table.column("boxes").combine_chunks().value_lengths().fill_null(0)
        want = {int(i): int(n) for i, n in zip(split_table.column("image_id").to_numpy(),
                                               lengths.to_numpy(zero_copy_only=False))}
        have = {i: e.shape[0] for i, e in out.items()}
        if want != have:
            missing = len(set(want) - set(have))
            raise TeacherCacheError(
                f"teacher cache {path} does not match {dataset}/{split} "
                f"({missing} images missing, or box counts differ); rebuild it")
    return out


def join_teacher_embeddings(table: pa.Table, catalog: Catalog, dataset: str, split: str,
                            teacher_id: str, column: str = TEACHER_EMB_COLUMN) -> pa.Table:
    """``table`` (rows of ``dataset``/``split``, any subset or order) with one more column,
    ``teacher_emb`` (``list<list<float32>>``, aligned with each row's ``boxes``; null for
    an image the cache does not have), ready to travel through Ray Data with the rows."""
    key = _key(catalog, dataset, split, teacher_id)
    if not catalog.storage.is_file(key):
        raise _missing(catalog, dataset, split, teacher_id)
    path = catalog.storage.uri(key)
    cache = pq.read_table(key, filesystem=catalog.storage.fs)
    position = {int(i): k for k, i in enumerate(cache.column("image_id").to_numpy())}
    wanted = [position.get(int(i), -1) for i in table.column("image_id").to_numpy()]
    idx = pa.array([k if k >= 0 else None for k in wanted], pa.int64())
    joined = cache.column("embeddings").take(idx)
    lengths = table.column("boxes").combine_chunks().value_lengths().fill_null(0).to_numpy(
        zero_copy_only=False)
    got = joined.combine_chunks().value_lengths().to_numpy(zero_copy_only=False)
    for k, (n, m) in enumerate(zip(lengths, got)):
        if wanted[k] >= 0 and int(n) != int(m):
            raise TeacherCacheError(
                f"teacher cache {path}: image {table.column('image_id')[k]} has {m} embeddings "
                f"for {n} boxes; rebuild the cache")
    if column in table.column_names:
        table = table.drop_columns([column])
    return table.append_column(pa.field(column, CACHE_SCHEMA.field("embeddings").type), joined)
