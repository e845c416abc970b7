"""Parquet storage for the catalog, with all-or-nothing writes, on local disk or object storage.

Every row written carries ``content_sha256`` (computed from the image bytes when the caller
did not supply it; null only when those bytes are no image), and the manifest records the hash
algorithm when every row has one, so later code can check that splits share no image by
comparing one string column.

The catalog root is a local folder or a URI (``s3://bucket/prefix``, ``gs://...``; see
:mod:`catalog.storage` for endpoints and credentials). Layout under the root::

    datasets/<name>/dataset.json                 the manifest; a dataset exists iff it does
    datasets/<name>/<split>.parquet              local disk
    datasets/<name>/g-<time>-<id>/<split>.parquet   object storage: one folder per write
    class_sets/<id>.json

How a write is published so that readers never see half a dataset:

- **Local disk**: the dataset is written into a hidden staging folder next to its final
  place and renamed into place only when every split and the manifest are complete.
- **Object storage** (no folder rename there): the splits go into a fresh generation
  folder ``g-<time>-<id>/`` that nothing points at yet; the manifest is written last, in
  one object write, and names that generation (``"storage": {"generation": ...}``). A
  reader reads the manifest first and then the splits it points at, so it sees the old
  dataset or the new one. An interrupted write leaves only an unreferenced generation,
  removed by the next successful write of that dataset. The previous generation is kept
  until the write after next, so a reader that read the old manifest can still finish.

Readers accept both layouts anywhere (a local catalog copied to S3 with ``aws s3 sync``
reads as is). An import that fails half way (a truncated JPEG, a bad json) leaves the
catalog exactly as it was.
"""
from __future__ import annotations

import os
import posixpath
import re
import time
import uuid
from pathlib import Path
from typing import Iterable, Mapping

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from catalog.content_hash import CONTENT_HASH_ALGO, fill_content_hashes
from catalog.schema import IMAGE_SCHEMA, SPLITS, DatasetManifest
from catalog.storage import ParquetSource, Storage

DEFAULT_ROOT_ENV = "FEWSHOT_CATALOG"
MANIFEST = "dataset.json"
_GEN_RE = re.compile(r"^g-(\d{8}T\d{6}\d{6})Z-[0-9a-f]{8}$")


def default_root() -> Path | str:
    """Catalog root: ``$FEWSHOT_CATALOG`` (a path or a URI) or ``~/.cache/fewshot/catalog``."""
    env = os.environ.get(DEFAULT_ROOT_ENV)
    if env:
        return env if "://" in env else Path(env)
    return Path.home() / ".cache" / "fewshot" / "catalog"


class DatasetNotFound(KeyError):
    pass


def _new_generation() -> str:
    t = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(t)) + f"{int(t % 1 * 1e6):06d}"
    return f"g-{stamp}Z-{uuid.uuid4().hex[:8]}"


class Catalog:
    """Datasets and class sets under one root: a local folder or a URI.

    ``filesystem`` (a ``pyarrow.fs.FileSystem``) or ``endpoint_url`` override how a URI
    is opened; by default S3 settings come from the AWS environment variables.
    On local disk :attr:`root`, :meth:`dataset_dir` and :meth:`split_path` are
    :class:`~pathlib.Path` objects as they always were; on object storage they are URIs.
    """

    def __init__(self, root: str | os.PathLike | None = None, *,
                 filesystem: pafs.FileSystem | None = None, endpoint_url: str | None = None):
        root = default_root() if root is None else root
        self.storage = Storage.from_uri(root, filesystem=filesystem, endpoint_url=endpoint_url)
        self.root: Path | str = Path(root) if self.storage.local and "://" not in os.fspath(root) \
            else self.storage.location(self.storage.root)

    def __repr__(self) -> str:
        return f"Catalog({self.uri!r})"

    @property
    def uri(self) -> str:
        """The root as a string: a local path or ``scheme://...``."""
        return self.storage.uri()

    @property
    def local(self) -> bool:
        return self.storage.local

    # ---- where things are -----------------------------------------------------------
    def _base(self, name: str) -> str:
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"invalid dataset name {name!r}")
        return self.storage.path("datasets", name)

    def _read_manifest(self, name: str) -> dict | None:
        try:
            return self.storage.read_json(posixpath.join(self._base(name), MANIFEST))
        except FileNotFoundError:
            return None

    def _data_dir(self, name: str, raw: dict | None = None) -> str:
        """The folder holding ``name``'s splits (and teacher caches) now."""
        raw = self._read_manifest(name) if raw is None else raw
        gen = ((raw or {}).get("storage") or {}).get("generation")
        return posixpath.join(self._base(name), gen) if gen else self._base(name)

    def dataset_dir(self, name: str) -> Path | str:
        """Where ``name``'s files are (a Path on local disk, a URI on object storage)."""
        return self.storage.location(self._data_dir(name))

    def split_path(self, name: str, split: str) -> Path | str:
        """The split's Parquet file (a Path on local disk, a URI on object storage); to read
        it with Ray Data or pyarrow anywhere, use :meth:`split_source`."""
        return self.storage.location(self._split_key(name, split))

    def _split_key(self, name: str, split: str) -> str:
        return posixpath.join(self._data_dir(name), f"{split}.parquet")

    def split_source(self, name: str, split: str) -> ParquetSource:
        """``(uri, filesystem)`` of a split's Parquet, for
        ``ray.data.read_parquet(src.uri, filesystem=src.filesystem)`` on any node."""
        key = self._split_key(name, split)
        if not self.storage.is_file(key):
            self.manifest(name)
            raise FileNotFoundError(f"dataset {name!r} has no split {split!r} ({self.storage.uri(key)})")
        return self.storage.parquet_source(key)

    # ---- datasets -------------------------------------------------------------------
    def has_dataset(self, name: str) -> bool:
        return self.storage.is_file(posixpath.join(self._base(name), MANIFEST))

    def has_split(self, name: str, split: str) -> bool:
        return self.storage.is_file(self._split_key(name, split))

    def occupied(self, name: str) -> bool:
        """Whether writing ``name`` would replace something: on local disk any folder of
        that name; on object storage a published dataset (an unreferenced generation left
        by an interrupted write does not count)."""
        if self.storage.local:
            return self.storage.exists(self._base(name))
        return self.has_dataset(name)

    def list_datasets(self) -> list[str]:
        return [i.base_name for i in self.storage.list_dir(self.storage.path("datasets"))
                if i.type == pafs.FileType.Directory and not i.base_name.startswith(".")
                and self.has_dataset(i.base_name)]

    def manifest(self, name: str) -> DatasetManifest:
        raw = self._read_manifest(name)
        if raw is None:
            known = ", ".join(self.list_datasets()) or "none"
            raise DatasetNotFound(
                f"dataset {name!r} is not in the catalog at {self.uri} (known: {known})"
            )
        return DatasetManifest.from_json(raw)

    def open_split(self, name: str, split: str) -> pq.ParquetFile:
        """The split as a ``pyarrow.parquet.ParquetFile`` (row groups, metadata)."""
        return pq.ParquetFile(self.storage.open_input_file(self._split_key(name, split)))

    def read_split(self, name: str, split: str, columns: list[str] | None = None) -> pa.Table:
        key = self._split_key(name, split)
        if not self.storage.is_file(key):
            self.manifest(name)  # raises a clear error for an unknown dataset
            raise FileNotFoundError(f"dataset {name!r} has no split {split!r} ({self.storage.uri(key)})")
        return pq.read_table(key, filesystem=self.storage.fs, columns=columns,
                             schema=IMAGE_SCHEMA if columns is None else None)

    def writer(self, manifest: DatasetManifest, overwrite: bool = False) -> "DatasetWriter":
        return DatasetWriter(self, manifest, overwrite=overwrite)

    def write_dataset(
        self,
        manifest: DatasetManifest,
        tables: Mapping[str, pa.Table | Iterable[dict]],
        overwrite: bool = False,
    ) -> Path | str:
        with self.writer(manifest, overwrite=overwrite) as w:
            for split, rows in tables.items():
                if isinstance(rows, pa.Table):
                    w.write_table(split, rows)
                else:
                    w.write_rows(split, rows)
        return self.dataset_dir(manifest.name)

    def delete_dataset(self, name: str) -> None:
        if not self.storage.local:  # unpublish first: readers stop finding it at once
            self.storage.delete_file(posixpath.join(self._base(name), MANIFEST))
        self.storage.delete_dir(self._base(name))


class DatasetWriter:
    """Streams rows into per-split Parquet files in a staging folder; commits atomically.

    Use as a context manager: on an exception nothing reaches the catalog. On local disk
    the staging folder is renamed into place; on object storage the staging folder is a
    new generation that the manifest, written last, points at (see the module docstring).
    """

    def __init__(self, catalog: Catalog, manifest: DatasetManifest, overwrite: bool = False,
                 row_group_size: int = 256):
        self.catalog = catalog
        self.storage = catalog.storage
        self.manifest = manifest
        self.overwrite = overwrite
        self.row_group_size = row_group_size
        self.base = catalog._base(manifest.name)
        if self.storage.local:
            self.generation = None
            self.stage_dir = posixpath.join(posixpath.dirname(self.base),
                                            f".staging-{manifest.name}-{uuid.uuid4().hex[:8]}")
        else:
            self.generation = _new_generation()
            self.stage_dir = posixpath.join(self.base, self.generation)
        self._writers: dict[str, pq.ParquetWriter] = {}
        self._counts: dict[str, int] = {}
        self._buffers: dict[str, list[dict]] = {}
        self._unhashed = 0  # rows written without a content hash (undecodable image bytes)

    @property
    def final_dir(self) -> Path | str:
        return self.storage.location(self.base)

    def __enter__(self) -> "DatasetWriter":
        if self.catalog.occupied(self.manifest.name) and not self.overwrite:
            raise FileExistsError(
                f"dataset {self.manifest.name!r} already exists at {self.final_dir}; "
                "choose another name or pass overwrite"
            )
        if self.storage.local:
            self.storage.fs.create_dir(posixpath.dirname(self.stage_dir), recursive=True)
            os.mkdir(self.stage_dir)  # fails if it exists: the name is ours alone
        return self

    def _writer(self, split: str) -> pq.ParquetWriter:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if split not in self._writers:
            self._writers[split] = pq.ParquetWriter(
                posixpath.join(self.stage_dir, f"{split}.parquet"), IMAGE_SCHEMA,
                filesystem=self.storage.fs)
            self._counts[split] = 0
        return self._writers[split]

    def write_table(self, split: str, table: pa.Table) -> None:
        # rows without a content hash (the synthetic world's, a legacy dataset's being
        # copied) get one computed from their image bytes: every written row carries it
        table = fill_content_hashes(table)
        table = table.select(IMAGE_SCHEMA.names).cast(IMAGE_SCHEMA)
        self._unhashed += table.column("content_sha256").null_count
        self._writer(split).write_table(table, row_group_size=self.row_group_size)
        self._counts[split] += table.num_rows

    def write_row(self, split: str, row: dict) -> None:
        buf = self._buffers.setdefault(split, [])
        buf.append(row)
        if len(buf) >= self.row_group_size:
            self._flush(split)

    def write_rows(self, split: str, rows: Iterable[dict]) -> None:
        for row in rows:
            self.write_row(split, row)

    def _flush(self, split: str) -> None:
        buf = self._buffers.get(split)
        if buf:
            self.write_table(split, pa.Table.from_pylist(buf, schema=IMAGE_SCHEMA))
            self._buffers[split] = []

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                for split in list(self._buffers):
                    self._flush(split)
        finally:
            for w in self._writers.values():
                try:
                    w.close()
                except Exception:
                    if exc_type is None:
                        raise
        if exc_type is not None:
            self.storage.delete_dir(self.stage_dir)
            return
        self.manifest.splits = dict(self._counts)
        # the manifest vouches for hashes only when every row has one
        self.manifest.content_hash = CONTENT_HASH_ALGO if not self._unhashed else ""
        if self.storage.local:
            self._commit_local()
        else:
            self._commit_generation()

    def _commit_local(self) -> None:
        st = self.storage
        st.write_json(posixpath.join(self.stage_dir, MANIFEST), self.manifest.to_json())
        old = None
        if st.exists(self.base):
            old = posixpath.join(posixpath.dirname(self.base),
                                 f".old-{self.manifest.name}-{uuid.uuid4().hex[:8]}")
            os.rename(self.base, old)
        os.rename(self.stage_dir, self.base)
        if old is not None:
            st.delete_dir(old)

    def _commit_generation(self) -> None:
        st = self.storage
        previous = self.catalog._read_manifest(self.manifest.name)
        prev_gen = ((previous or {}).get("storage") or {}).get("generation")
        data = self.manifest.to_json()
        data["storage"] = {"generation": self.generation}
        try:
            st.write_json(posixpath.join(self.base, MANIFEST), data)  # the commit point
        except BaseException:
            st.delete_dir(self.stage_dir)
            raise
        self._collect_garbage(prev_gen, previous is not None)

    def _collect_garbage(self, prev_gen: str | None, had_previous: bool) -> None:
        """Remove what no manifest points at any more, conservatively.

        Kept: the manifest, the new generation and the previous one (a reader that read
        the old manifest may still be reading it). Deleted: generations older than the
        previous one (superseded data, interrupted writes). Generations newer than the
        previous one may belong to a write still in progress and stay until a later write.
        Files of the flat layout (a local catalog synced to object storage) are kept while
        they are the previous data and deleted by the write after.
        """
        st = self.storage
        keep = {MANIFEST, self.generation, prev_gen}
        for info in st.list_dir(self.base):
            name = info.base_name
            if name in keep:
                continue
            if _GEN_RE.match(name):
                if prev_gen is not None and name < prev_gen:
                    st.delete_dir(info.path)
            elif prev_gen is None and had_previous:
                continue  # the previous data is the flat layout: it stays one more write
            elif info.type == pafs.FileType.Directory:
                st.delete_dir(info.path)
            else:
                st.delete_file(info.path)
