"""One filesystem layer for every path the project reads or writes: local paths and ``s3://``, ``gs://``, ``abfs://``
URIs through ``pyarrow.fs`` (which Ray Data and Ray Train use too), Parquet through Polars (which reads the same URIs).

Credentials and endpoints come from each cloud SDK's standard environment and config (for S3: ``AWS_ACCESS_KEY_ID``,
``AWS_PROFILE``, an IAM role, ``AWS_ENDPOINT_URL`` for an S3-compatible server, ...): nothing here reads, logs or
writes them.

Object stores have no directory rename, so a *partition* (a folder whose files are replaced together: one day of a
clean table, one built feature day) is versioned instead of swapped::

    <partition>/<version>/<files>          written first, under a new version (never overwritten)
    <partition>/_manifest.json             the pointer: {"version": ..., "files": [...], ...}, written last

Writing the pointer is the commit (one object PUT, or a file rename on a local disk): readers follow it and see the
old version or the new one, never half of one; a run killed before it leaves the old version in place and an
unreferenced folder that ``collect_garbage`` deletes after the retention period (readers of the previous pointer may
still be reading that long). See docs/data.md, "Storage".
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import functools
import glob as _glob
import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

POINTER = "_manifest.json"  # a partition's default pointer name
RETENTION_S = 24 * 3600  # how long an unreferenced version outlives its replacement (a reader's longest read)
CHUNK = 8 << 20  # bytes per read when hashing a file


def is_uri(path: str) -> bool:
    """``scheme://...`` (object storage, or ``file://``) rather than a plain local path."""
    return "://" in path


def is_local(path: str) -> bool:
    return not is_uri(path) or path.startswith("file://")


def absolute(path: str) -> str:
    """A local path made absolute (a submitted Ray job runs in a temporary copy of the working directory); a URI as
    it is, without a trailing slash."""
    if is_uri(path):
        return path.rstrip("/")
    return str(Path(path).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)])


def name(path: str) -> str:
    """The last part of a path or URI."""
    return path.rstrip("/").rsplit("/", 1)[-1]


def parent(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[0]


@functools.lru_cache(maxsize=32)
def _filesystem(scheme: str, bucket: str) -> pafs.FileSystem:
    """One pyarrow filesystem per (scheme, bucket): made from the URI, i.e. from the SDK's environment and config."""
    return pafs.FileSystem.from_uri(f"{scheme}://{bucket}")[0]


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) of a local path or a URI."""
    if not is_uri(path):
        return pafs.LocalFileSystem(), absolute(path)
    if path.startswith("file://"):
        return pafs.LocalFileSystem(), path.removeprefix("file://")
    scheme, rest = path.split("://", 1)
    return _filesystem(scheme, rest.split("/", 1)[0]), rest.rstrip("/")


def uri_of(path: str, inner: str) -> str:
    """The URI of ``inner`` (a path inside ``path``'s filesystem), in ``path``'s form."""
    return f"{path.split('://', 1)[0]}://{inner}" if is_uri(path) and not path.startswith("file://") else inner


def exists(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def is_dir(path: str) -> bool:
    fs, p = resolve(path)
    return fs.get_file_info(p).type == pafs.FileType.Directory


def listing(path: str, recursive: bool = False) -> list[pafs.FileInfo]:
    """Everything below folder ``path`` (empty when it does not exist), sorted by path."""
    fs, p = resolve(path)
    infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True, recursive=recursive))
    return sorted(infos, key=lambda i: i.path)


def file_sizes(path: str, suffix: str = ".parquet") -> list[tuple[str, int]]:
    """(URI in ``path``'s form, size) of the files directly in folder ``path`` whose names end with ``suffix``
    (hidden ``.``/``_`` names left out), sorted."""
    return [
        (uri_of(path, i.path), i.size)
        for i in listing(path)
        if i.type == pafs.FileType.File and i.base_name.endswith(suffix) and not i.base_name.startswith((".", "_"))
    ]


def list_files(path: str, suffix: str = ".parquet") -> list[str]:
    """``file_sizes`` without the sizes."""
    return [f for f, _ in file_sizes(path, suffix)]


def list_dirs(path: str, prefix: str = "") -> list[str]:
    """Names of the folders directly in ``path`` that start with ``prefix``, sorted."""
    return [i.base_name for i in listing(path) if i.type == pafs.FileType.Directory and i.base_name.startswith(prefix)]


def glob(pattern: str) -> list[str]:
    """Files matching a shell pattern (``*``, ``?``, ``[...]``; ``~`` expanded on a local disk), sorted, in the
    pattern's form: a local path or a URI."""
    if not is_uri(pattern):
        return sorted(f for f in _glob.glob(os.path.expanduser(pattern)) if os.path.isfile(f))
    parts = pattern.split("/")
    fixed = next((i for i, p in enumerate(parts) if any(c in p for c in "*?[")), len(parts))
    if fixed == len(parts):  # no wildcard: the file itself
        return [pattern] if exists(pattern) and not is_dir(pattern) else []
    root = "/".join(parts[:fixed])
    recursive = fixed < len(parts) - 1
    files = [uri_of(root, i.path) for i in listing(root, recursive) if i.type == pafs.FileType.File]
    return sorted(f for f in files if fnmatch.fnmatchcase(f, pattern) and f.count("/") == pattern.count("/"))


def read_bytes(path: str) -> bytes:
    fs, p = resolve(path)
    with fs.open_input_stream(p) as f:
        return f.read()


@contextmanager
def whole_file(path: str) -> Iterator[pa.NativeFile]:
    """An output stream for ``path`` whose content appears whole: readers see the old file or the new one, never
    part. On a local disk through a hidden temporary sibling, renamed over the file when the block ends and removed
    when it fails; on an object store the object appears when the stream closes (pyarrow exposes no abort, so a block
    that fails part-way still closes it: data files go under new versions, which no pointer names until they are
    complete)."""
    fs, p = resolve(path)
    if not isinstance(fs, pafs.LocalFileSystem):
        with fs.open_output_stream(p) as f:
            yield f
        return
    fs.create_dir(parent(p), recursive=True)
    tmp = f"{parent(p)}/.{name(p)}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open_output_stream(tmp) as f:
            yield f
        os.replace(tmp, p)  # a file rename (atomic on POSIX), not a folder's
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file at once (``whole_file``)."""
    with whole_file(path) as f:
        f.write(data)


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path))


def read_json_or_none(path: str) -> Any | None:
    """The JSON at ``path``, or None when there is no such file."""
    try:
        return read_json(path)
    except FileNotFoundError:
        return None


def write_json(path: str, obj: object) -> None:
    """``obj`` as JSON (numpy scalars as numbers, other unknown objects as strings), written whole (``write_bytes``)."""
    text = json.dumps(obj, indent=1, default=lambda x: x.item() if hasattr(x, "item") else str(x))
    write_bytes(path, text.encode())


def remove(path: str) -> None:
    """Delete a file or a folder with everything below it; nothing when it does not exist."""
    fs, p = resolve(path)
    kind = fs.get_file_info(p).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(p)
    elif kind == pafs.FileType.File:
        fs.delete_file(p)


def download(path: str, local_dir: str) -> str:
    """Copy the folder ``path`` (local or a URI) with everything below it into the local folder ``local_dir``;
    returns ``local_dir``."""
    fs, root = resolve(path)
    for i in listing(path, recursive=True):
        if i.type == pafs.FileType.File:
            dst = Path(local_dir) / i.path[len(root) :].lstrip("/")
            dst.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(i.path) as f:
                dst.write_bytes(f.read())
    return local_dir


def content_hash(path: str) -> str:
    """BLAKE2b of the file's bytes (reads the whole file)."""
    fs, p = resolve(path)
    h = hashlib.blake2b(digest_size=16)
    with fs.open_input_stream(p) as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


# --- Parquet ------------------------------------------------------------------------------------------------------


def write_parquet(df: pl.DataFrame | pa.Table, path: str, **kwargs: Any) -> None:
    """``df`` (Polars, or an Arrow table: written by pyarrow) as one Parquet file at ``path``, written whole
    (``whole_file``)."""
    with whole_file(path) as f:
        if isinstance(df, pa.Table):
            pq.write_table(df, f, **kwargs)
        else:
            df.write_parquet(f, **kwargs)


def scan_parquet(files: list[str]) -> pl.LazyFrame:
    """A lazy scan of ``files`` (local paths or URIs; Polars reads them with the same SDK environment)."""
    return pl.scan_parquet(list(files))


def read_parquet(files: list[str], columns: list[str] | None = None) -> pl.DataFrame:
    return pl.read_parquet(list(files), columns=columns)


def parquet_file(path: str) -> pq.ParquetFile:
    """The file's footer (schema, row count) without reading its data."""
    fs, p = resolve(path)
    return pq.ParquetFile(fs.open_input_file(p))


def num_rows(files: Iterable[str]) -> int:
    return sum(parquet_file(f).metadata.num_rows for f in files)


# --- versioned partitions -----------------------------------------------------------------------------------------


def new_version() -> str:
    """A new version folder name: ``v<UTC time>-<random>`` (sorts by time; its age is in its name)."""
    return f"v{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"


def version_age_s(version: str, now: dt.datetime | None = None) -> float | None:
    """Seconds since ``version`` was made (from its name), or None for a name that is not a version."""
    try:
        made = dt.datetime.strptime(version[1:16], "%Y%m%dT%H%M%S").replace(tzinfo=dt.timezone.utc)
    except ValueError:
        return None
    return ((now or dt.datetime.now(dt.timezone.utc)) - made).total_seconds()


def publish(partition: str, manifest: dict, pointer: str = POINTER) -> None:
    """Commit ``partition`` to ``manifest["version"]`` (whose ``manifest["files"]`` are written): write the pointer."""
    if "version" not in manifest or "files" not in manifest:
        raise ValueError(f"a partition manifest needs 'version' and 'files': {sorted(manifest)}")
    write_json(join(partition, pointer), manifest)


def current(partition: str, pointer: str = POINTER) -> dict | None:
    """The committed manifest of ``partition``, or None when nothing was committed there."""
    return read_json_or_none(join(partition, pointer))


def files_of(partition: str, manifest: dict) -> list[str]:
    """The files of a committed version, as paths or URIs."""
    return [join(partition, manifest["version"], f) for f in manifest["files"]]


def current_files(partition: str, pointer: str = POINTER) -> list[str]:
    """The files of the committed version of ``partition``; FileNotFoundError naming it when none is committed."""
    m = current(partition, pointer)
    if m is None:
        raise FileNotFoundError(f"no committed version at {partition} (no {pointer})")
    return files_of(partition, m)


def collect_garbage(partition: str, pointer: str = POINTER, retention_s: float = RETENTION_S) -> list[str]:
    """Delete the versions of ``partition`` other than the committed one that are older than ``retention_s`` (replaced
    ones, and the leftovers of runs killed before their commit); returns their names."""
    keep = (current(partition, pointer) or {}).get("version")
    gone = []
    for v in list_dirs(partition, "v"):
        age = version_age_s(v)
        if v != keep and age is not None and age > retention_s:
            remove(join(partition, v))
            gone.append(v)
    return gone
