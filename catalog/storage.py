"""Where the catalog's files live: a local folder or object storage, named by a URI.

    Storage.from_uri("/data/catalog")                  # local disk
    Storage.from_uri("s3://bucket/fewshot/catalog")    # S3, MinIO, moto, any S3 API
    Storage.from_uri("gs://bucket/catalog")            # and the other pyarrow.fs schemes

Every file the catalog reads or writes goes through a :class:`Storage`: a pyarrow
``FileSystem`` and a root folder inside it. Paths handed around inside the catalog are
paths *inside that filesystem* (``bucket/prefix/datasets/x/train.parquet`` on S3, an
absolute path on local disk); :meth:`Storage.uri` turns one into the URI a user (or
``ray.data.read_parquet``) sees.

S3 endpoint and credentials come from the standard AWS settings, so the same code runs
against AWS, MinIO and a moto test server:

- ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (e.g. ``http://minio:9000``), or
  ``endpoint_url=`` (an explicit option wins);
- ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, or the rest of
  the AWS default chain (``~/.aws``, web identity on EKS, instance profiles);
- ``AWS_REGION`` or ``AWS_DEFAULT_REGION``.

A URI with a query string (``s3://b/p?endpoint_override=...``) is handed to
``pyarrow.fs.FileSystem.from_uri`` as is, so every pyarrow option stays reachable; a
ready-made ``filesystem=`` is used as given.

Atomic writes. Object stores have no rename, only single-object writes that appear whole.
:meth:`Storage.write_bytes` and :meth:`Storage.publish` therefore write to a temporary
name and move it into place (a rename on local disk, copy-then-delete on S3: either way a
reader sees the old object or the new one, never a part). Whole folders cannot be moved on
object storage; :mod:`catalog.store` publishes a dataset by writing its manifest last.
"""
from __future__ import annotations

import json
import os
import posixpath
import uuid
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

import pyarrow.fs as pafs

__all__ = ["Storage", "ParquetSource", "s3_filesystem", "resolve_uri", "is_uri"]

ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
REGION_ENV = ("AWS_REGION", "AWS_DEFAULT_REGION")


def is_uri(location: str | os.PathLike) -> bool:
    """True for ``scheme://...`` (``file://`` included), False for a plain local path."""
    s = os.fspath(location)
    return "://" in s and not (len(s) > 1 and s[1] == ":")  # not a Windows drive


def _env(names: tuple[str, ...]) -> str | None:
    for n in names:
        v = os.environ.get(n)
        if v:
            return v
    return None


def s3_filesystem(endpoint_url: str | None = None, region: str | None = None, *,
                  access_key: str | None = None, secret_key: str | None = None,
                  session_token: str | None = None) -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem configured from explicit options, else the AWS variables.

    ``endpoint_url`` (or ``$AWS_ENDPOINT_URL_S3`` / ``$AWS_ENDPOINT_URL``) selects a
    non-AWS server such as MinIO; its scheme (http/https) is kept. Without explicit keys
    pyarrow uses the AWS default credential chain (environment, profile, web identity,
    instance metadata).
    """
    kwargs: dict = {}
    endpoint_url = endpoint_url or _env(ENDPOINT_ENV)
    if endpoint_url:
        u = urlparse(endpoint_url if "://" in endpoint_url else f"https://{endpoint_url}")
        kwargs["endpoint_override"] = u.netloc
        kwargs["scheme"] = u.scheme or "https"
    region = region or _env(REGION_ENV)
    if region:
        kwargs["region"] = region
    if access_key or secret_key:
        if not (access_key and secret_key):
            raise ValueError("give both access_key and secret_key, or neither")
        kwargs.update(access_key=access_key, secret_key=secret_key)
        if session_token:
            kwargs["session_token"] = session_token
    return pafs.S3FileSystem(**kwargs)


def resolve_uri(uri: str | os.PathLike, *, filesystem: pafs.FileSystem | None = None,
                endpoint_url: str | None = None) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)`` for a local path or a URI.

    This is what Ray wants for ``RunConfig(storage_path=path, storage_filesystem=fs)``
    and ``ray.data.read_parquet(path, filesystem=fs)``.
    """
    s = os.fspath(uri)
    if filesystem is not None:
        return filesystem, _strip_scheme(s) if is_uri(s) else os.path.abspath(s)
    if not is_uri(s):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(s))
    u = urlparse(s)
    if u.scheme in ("s3", "s3a") and not u.query:
        return s3_filesystem(endpoint_url), _strip_scheme(s)
    fs, path = pafs.FileSystem.from_uri(s)
    return fs, path


def _strip_scheme(uri: str) -> str:
    u = urlparse(uri)
    if u.scheme == "file":
        return u.path
    return (u.netloc + u.path).rstrip("/")


class ParquetSource(NamedTuple):
    """A Parquet file as Ray Data reads it: ``ray.data.read_parquet(uri, filesystem=fs)``.

    Unpacks as ``uri, filesystem = source``; ``path`` is the path inside the filesystem.
    """

    uri: str
    filesystem: pafs.FileSystem

    @property
    def path(self) -> str:
        return resolve_uri(self.uri, filesystem=self.filesystem)[1]


class Storage:
    """A root folder on a pyarrow filesystem, with the few operations the catalog needs."""

    def __init__(self, filesystem: pafs.FileSystem, root: str, scheme: str = ""):
        self.fs = filesystem
        self.root = root.rstrip("/") or "/"
        self.scheme = scheme  # "" for local disk, "s3", "gs", ...
        self.local = isinstance(filesystem, pafs.LocalFileSystem)

    @classmethod
    def from_uri(cls, location: str | os.PathLike, *, filesystem: pafs.FileSystem | None = None,
                 endpoint_url: str | None = None) -> "Storage":
        s = os.fspath(location)
        fs, path = resolve_uri(s, filesystem=filesystem, endpoint_url=endpoint_url)
        scheme = urlparse(s).scheme if is_uri(s) else ""
        if scheme == "file" or isinstance(fs, pafs.LocalFileSystem):
            scheme = ""
        return cls(fs, path, scheme)

    def __repr__(self) -> str:
        return f"Storage({self.uri()!r})"

    def __reduce__(self):  # picklable for Ray tasks (pyarrow filesystems pickle)
        return (Storage, (self.fs, self.root, self.scheme))

    # ---- names ----------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """A path under the root, inside the filesystem."""
        return posixpath.join(self.root, *parts) if parts else self.root

    def uri(self, path: str | None = None) -> str:
        """What a user sees: a local path, or ``scheme://bucket/key``."""
        path = self.root if path is None else path
        return f"{self.scheme}://{path}" if self.scheme else path

    def location(self, path: str) -> Path | str:
        """A :class:`~pathlib.Path` on local disk (what the catalog always returned), the
        URI string on object storage."""
        return Path(path) if self.local else self.uri(path)

    def parquet_source(self, path: str) -> ParquetSource:
        return ParquetSource(self.uri(path), self.fs)

    # ---- queries --------------------------------------------------------------------
    def info(self, path: str) -> pafs.FileInfo:
        return self.fs.get_file_info(path)

    def is_file(self, path: str) -> bool:
        return self.info(path).type == pafs.FileType.File

    def is_dir(self, path: str) -> bool:
        return self.info(path).type == pafs.FileType.Directory

    def exists(self, path: str) -> bool:
        return self.info(path).type != pafs.FileType.NotFound

    def list_dir(self, path: str) -> list[pafs.FileInfo]:
        """Direct children of ``path`` (none when it does not exist), sorted by name."""
        sel = pafs.FileSelector(path, allow_not_found=True, recursive=False)
        try:
            infos = self.fs.get_file_info(sel)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(infos, key=lambda i: i.base_name)

    # ---- reading --------------------------------------------------------------------
    def read_bytes(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def read_json(self, path: str):
        return json.loads(self.read_bytes(path))

    def open_input_file(self, path: str):
        """A random-access file (what ``pyarrow.parquet.ParquetFile`` wants)."""
        return self.fs.open_input_file(path)

    # ---- writing --------------------------------------------------------------------
    def make_dirs(self, path: str) -> None:
        """Create a folder on local disk; object stores have none to create."""
        if self.local:
            self.fs.create_dir(path, recursive=True)

    def temp_name(self, path: str) -> str:
        """A hidden sibling of ``path`` to write to before :meth:`publish`."""
        d, name = posixpath.split(path)
        return posixpath.join(d, f".{name}.tmp-{uuid.uuid4().hex[:8]}")

    def open_output(self, path: str):
        self.make_dirs(posixpath.dirname(path))
        return self.fs.open_output_stream(path)

    def publish(self, tmp: str, path: str) -> None:
        """Move a finished temporary file into place (replacing what was there) in one
        step a reader cannot observe half-done."""
        self.fs.move(tmp, path)

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write ``path`` all or nothing (temporary name, then :meth:`publish`)."""
        tmp = self.temp_name(path)
        try:
            with self.open_output(tmp) as f:
                f.write(data)
            self.publish(tmp, path)
        except BaseException:
            self.delete_file(tmp)
            raise

    def write_json(self, path: str, data) -> None:
        self.write_bytes(path, json.dumps(data, indent=2).encode("utf-8"))

    def move(self, src: str, dst: str) -> None:
        self.fs.move(src, dst)

    def delete_file(self, path: str) -> None:
        try:
            self.fs.delete_file(path)
        except (FileNotFoundError, OSError):
            pass

    def delete_dir(self, path: str) -> None:
        """Delete a folder and everything under it; missing is fine."""
        if self.info(path).type == pafs.FileType.NotFound:
            return
        try:
            self.fs.delete_dir(path)
        except FileNotFoundError:
            pass
