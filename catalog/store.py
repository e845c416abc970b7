"""Parquet storage for the catalog, with all-or-nothing writes.

Every row written carries ``content_sha256`` (computed from the image bytes when the caller
did not supply it; null only when those bytes are no image), and the manifest records the hash
algorithm when every row has one, so later code can check that splits share no image by
comparing one string column.

A dataset is written into a hidden staging folder next to its final place and renamed into
place only when every split and the manifest are complete, so an import that fails half way
(a truncated JPEG, a bad json) leaves the catalog exactly as it was.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from catalog.content_hash import CONTENT_HASH_ALGO, fill_content_hashes
from catalog.schema import IMAGE_SCHEMA, SPLITS, DatasetManifest

DEFAULT_ROOT_ENV = "FEWSHOT_CATALOG"


def default_root() -> Path:
    """Catalog root: ``$FEWSHOT_CATALOG`` or ``~/.cache/fewshot/catalog``."""
    env = os.environ.get(DEFAULT_ROOT_ENV)
    return Path(env) if env else Path.home() / ".cache" / "fewshot" / "catalog"


class DatasetNotFound(KeyError):
    pass


class Catalog:
    """Datasets and class sets under one root folder."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_root()

    # ---- datasets -------------------------------------------------------------------
    def dataset_dir(self, name: str) -> Path:
        return self.root / "datasets" / name

    def has_dataset(self, name: str) -> bool:
        return (self.dataset_dir(name) / "dataset.json").is_file()

    def list_datasets(self) -> list[str]:
        base = self.root / "datasets"
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if (p / "dataset.json").is_file())

    def manifest(self, name: str) -> DatasetManifest:
        path = self.dataset_dir(name) / "dataset.json"
        if not path.is_file():
            known = ", ".join(self.list_datasets()) or "none"
            raise DatasetNotFound(
                f"dataset {name!r} is not in the catalog at {self.root} (known: {known})"
            )
        return DatasetManifest.from_json(json.loads(path.read_text()))

    def split_path(self, name: str, split: str) -> Path:
        return self.dataset_dir(name) / f"{split}.parquet"

    def read_split(self, name: str, split: str, columns: list[str] | None = None) -> pa.Table:
        path = self.split_path(name, split)
        if not path.is_file():
            self.manifest(name)  # raises a clear error for an unknown dataset
            raise FileNotFoundError(f"dataset {name!r} has no split {split!r} ({path})")
        return pq.read_table(path, columns=columns, schema=IMAGE_SCHEMA if columns is None else None)

    def writer(self, manifest: DatasetManifest, overwrite: bool = False) -> "DatasetWriter":
        return DatasetWriter(self, manifest, overwrite=overwrite)

    def write_dataset(
        self,
        manifest: DatasetManifest,
        tables: Mapping[str, pa.Table | Iterable[dict]],
        overwrite: bool = False,
    ) -> Path:
        with self.writer(manifest, overwrite=overwrite) as w:
            for split, rows in tables.items():
                if isinstance(rows, pa.Table):
                    w.write_table(split, rows)
                else:
                    w.write_rows(split, rows)
        return self.dataset_dir(manifest.name)

    def delete_dataset(self, name: str) -> None:
        shutil.rmtree(self.dataset_dir(name), ignore_errors=True)


class DatasetWriter:
    """Streams rows into per-split Parquet files in a staging folder; commits atomically.

    Use as a context manager: on an exception nothing reaches the catalog.
    """

    def __init__(self, catalog: Catalog, manifest: DatasetManifest, overwrite: bool = False,
                 row_group_size: int = 256):
        self.catalog = catalog
        self.manifest = manifest
        self.overwrite = overwrite
        self.row_group_size = row_group_size
        self.final_dir = catalog.dataset_dir(manifest.name)
        self.stage_dir = self.final_dir.parent / f".staging-{manifest.name}-{uuid.uuid4().hex[:8]}"
        self._writers: dict[str, pq.ParquetWriter] = {}
        self._counts: dict[str, int] = {}
        self._buffers: dict[str, list[dict]] = {}
        self._unhashed = 0  # rows written without a content hash (undecodable image bytes)

    def __enter__(self) -> "DatasetWriter":
        if self.final_dir.exists() and not self.overwrite:
            raise FileExistsError(
                f"dataset {self.manifest.name!r} already exists at {self.final_dir}; "
                "choose another name or pass overwrite"
            )
        self.stage_dir.mkdir(parents=True, exist_ok=False)
        return self

    def _writer(self, split: str) -> pq.ParquetWriter:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if split not in self._writers:
            self._writers[split] = pq.ParquetWriter(self.stage_dir / f"{split}.parquet", IMAGE_SCHEMA)
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
                w.close()
        if exc_type is not None:
            shutil.rmtree(self.stage_dir, ignore_errors=True)
            return
        self.manifest.splits = dict(self._counts)
        # the manifest vouches for hashes only when every row has one
        self.manifest.content_hash = CONTENT_HASH_ALGO if not self._unhashed else ""
        (self.stage_dir / "dataset.json").write_text(json.dumps(self.manifest.to_json(), indent=2))
        old = None
        if self.final_dir.exists():
            old = self.final_dir.parent / f".old-{self.manifest.name}-{uuid.uuid4().hex[:8]}"
            self.final_dir.rename(old)
        self.stage_dir.rename(self.final_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
