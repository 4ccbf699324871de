"""The lake: a key/value object store addressed by keys like ``raw/ab/<sha256>.jpg``.

``open_lake(url)`` returns a ``LocalLake`` for a directory (the embedded profile's bucket).
Writes are atomic: a reader sees a whole object or none.

Every lake counts what it is asked for in ``counters``: ``list``, ``get``, ``head``, ``put``,
``delete`` requests (on S3, the HTTP calls botocore makes, retries aside) and ``bytes_read`` /
``bytes_written``; the steps report them, so cost claims are measured, not argued.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from operator import itemgetter
from pathlib import Path
from typing import BinaryIO

from workloads.objects import Counters, ObjectInfo, check_key
from workloads.staging import STAGING


class LocalLake:
    """A directory used as a bucket. Keys are POSIX relative paths under ``root``."""

    # Directories listed at once by a check over many (``names``): listing here is Python work
    # under the GIL, and 8 threads took 1.8x as long as one (400,000 files).
    list_threads = 1

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self.url = self._root_str = str(self.root)
        self.counters = Counters()

    def fork(self) -> LocalLake:
        """The same lake with counters of its own (a thread's tasks count their own requests)."""
        return LocalLake(self.root)

    # -- paths -----------------------------------------------------------------
    def _file(self, key: str) -> str:
        """The file behind ``key``, by the key's text alone (reads are the hot path, and nothing
        the lake writes is a symlink)."""
        return f"{self._root_str}/{check_key(key)}"

    def path(self, key: str) -> Path:
        return Path(self._file(key))

    def _write_path(self, key: str) -> Path:
        """``path(key)``, and refused if a symlink in the lake would take the write outside it."""
        p = self.path(key)
        real = p.resolve()
        if real != self.root and self.root not in real.parents:
            raise ValueError(f"lake key {key!r} escapes the lake root")
        return p

    def uri(self, key: str) -> str:
        return str(self.path(key))

    # -- reads -----------------------------------------------------------------
    def exists(self, key: str) -> bool:
        self.counters.add("head")
        return self.path(key).is_file()

    def get(self, key: str) -> bytes:
        # Plain fd reads: most objects are a few KB, where a buffered file object's setup is
        # a third of the cost.
        self.counters.add("get")
        fd = os.open(self._file(key), os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            data = os.read(fd, size)
            if len(data) < size:  # large objects arrive in pieces (Linux reads <= 2 GiB at a time)
                chunks = [data]
                while chunk := os.read(fd, 1 << 30):
                    chunks.append(chunk)
                data = b"".join(chunks)
            self.counters.add("bytes_read", len(data))
            return data
        finally:
            os.close(fd)

    def get_tagged(self, key: str) -> tuple[bytes | None, str | None]:
        """The object at ``key`` and its tag for ``put_if_match`` (the MD5 of its bytes, as S3's
        ETag of a single-part put), or ``(None, None)`` when there is none."""
        try:
            data = self.get(key)
        except FileNotFoundError:
            return None, None
        return data, hashlib.md5(data).hexdigest()

    def size(self, key: str) -> int:
        self.counters.add("head")
        return self.path(key).stat().st_size

    def stream(self, key: str) -> BinaryIO:
        """The object's bytes as a stream (the file). Close it when done."""
        self.counters.add("get")
        return open(self._file(key), "rb")

    @contextlib.contextmanager
    def open_read(self, key: str) -> Iterator[BinaryIO]:
        self.counters.add("get")
        with open(self.path(key), "rb") as f:
            self.counters.add("bytes_read", os.fstat(f.fileno()).st_size)
            yield f

    def _scan(self, prefix: str, start_after: str | None) -> list[tuple[str, os.DirEntry]]:
        """(key, entry) of the objects under ``prefix``, sorted: one ``scandir`` per directory
        that can hold such keys; symlinked directories are not followed, in-flight ``.tmp-*``
        writes are not objects."""
        self.counters.add("list")
        cut = len(self._root_str) + 1
        found = []
        stack = [
            os.path.join(self._root_str, prefix.rsplit("/", 1)[0])
            if "/" in prefix
            else self._root_str
        ]
        while stack:
            path = stack.pop()
            rel = path[cut:] + "/" if len(path) > cut else ""
            inside = rel.startswith(prefix)  # every key in this directory has the prefix
            try:
                entries = os.scandir(path)
            except (FileNotFoundError, NotADirectoryError):
                continue
            with entries:
                for e in entries:
                    name = e.name
                    if name.startswith(".tmp-"):
                        continue
                    key = rel + name
                    if e.is_file():  # a symlink to a file is one; to a directory, neither
                        if (inside or key.startswith(prefix)) and (
                            start_after is None or key > start_after
                        ):
                            found.append((key, e))
                    elif e.is_dir(follow_symlinks=False) and (
                        inside or (key + "/").startswith(prefix) or prefix.startswith(key + "/")
                    ):
                        stack.append(e.path)
        found.sort(key=itemgetter(0))
        return found

    def list(self, prefix: str = "", start_after: str | None = None) -> Iterator[ObjectInfo]:
        """Objects whose key starts with ``prefix``, in key order (like S3 ListObjectsV2)."""
        for key, e in self._scan(prefix, start_after):
            try:
                yield ObjectInfo(key, e.stat().st_size)
            except FileNotFoundError:  # deleted while listing
                continue

    def keys(self, prefix: str = "") -> list[str]:
        """The keys ``list`` gives, without their sizes (no stat per object)."""
        return [key for key, _ in self._scan(prefix, None)]

    def names(self, directory: str) -> list[str]:
        """The names of the objects directly in ``directory`` (a key prefix ending in ``/``), in
        no order: one listing, nothing below it (``keys``: the whole tree, sorted, at about twice
        the cost a file)."""
        self.counters.add("list")
        try:  # the directory is a key (checked): never a path out of the lake
            entries = os.scandir(self._file(directory.removesuffix("/")))
        except (FileNotFoundError, NotADirectoryError):
            return []
        with entries:
            return [e.name for e in entries if e.is_file() and not e.name.startswith(".tmp-")]

    # -- writes ----------------------------------------------------------------
    def _tmp(self, key: str) -> tuple[Path, Path]:
        """``key``'s path and a new temp file to write it in, renamed into place when whole. The
        temp files all sit in the staging dir (same filesystem), where the next step's sweep
        finds what a killed write left, without listing the lake (``workloads/staging.py``)."""
        dest = self._write_path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = self.root / STAGING
        try:
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=staging)
        except FileNotFoundError:
            staging.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=staging)
        os.close(fd)
        return dest, Path(tmp)

    def _staged(self, key: str, data: bytes) -> tuple[Path, Path]:
        """``data`` durable in a temp file beside ``key``'s path: (path, temp file)."""
        dest, tmp = self._tmp(key)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return dest, tmp

    def put(self, key: str, data: bytes) -> None:
        self.counters.add("put")
        self.counters.add("bytes_written", len(data))
        dest, tmp = self._staged(key, data)
        try:
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def put_file(self, key: str, src: str | os.PathLike) -> None:
        self.counters.add("put")
        self.counters.add("bytes_written", os.path.getsize(src))
        dest, tmp = self._tmp(key)
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def put_file_if_absent(self, key: str, src: str | os.PathLike) -> bool:
        """Store ``src`` at ``key`` unless an object is already there; True if stored.

        Content-addressed keys make "already there" mean "same bytes" (the S3 store does
        this with a conditional put).
        """
        self.counters.add("put")
        dest, tmp = self._tmp(key)
        try:
            shutil.copyfile(src, tmp)
            os.link(tmp, dest)  # atomic, fails if dest exists
            self.counters.add("bytes_written", os.path.getsize(src))
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def put_if_match(self, key: str, data: bytes, tag: str | None) -> bool:
        """Store ``data`` at ``key`` only if the object there still has ``tag`` (``None``: only if
        there is none); True if stored. The compare-and-swap several runs updating one record
        need (S3: a conditional put); a lock file next to the key serialises the swaps of all
        processes on this machine, readers take no lock (the swap is a rename)."""
        self.counters.add("put")
        dest, tmp = self._staged(key, data)
        try:
            with open(dest.parent / f".tmp-lock-{dest.name}", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    current = hashlib.md5(dest.read_bytes()).hexdigest()
                except FileNotFoundError:
                    current = None
                if current != tag:
                    return False
                os.replace(tmp, dest)
            self.counters.add("bytes_written", len(data))
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def delete(self, key: str) -> None:
        self.counters.add("delete")
        self._write_path(key).unlink(missing_ok=True)

    # -- tables ----------------------------------------------------------------
    def arrow_filesystem(self):
        """(pyarrow filesystem, base path) for reading Parquet datasets in place."""
        import pyarrow.fs as pafs

        return pafs.LocalFileSystem(), str(self.root)


def open_lake(url: str, endpoint_url: str | None = None):
    """The lake behind ``url``: a directory path (or ``file://``) or ``s3://bucket/prefix``."""
    if url.startswith("s3://"):
        from workloads.s3lake import S3Lake  # only the AWS profile needs boto3

        return S3Lake(url, endpoint_url=endpoint_url)
    if url.startswith("file://"):
        url = url[len("file://") :]
    return LocalLake(url)


def get_json(lake, key: str, default=None):
    """The JSON object at ``key``, or ``default`` when there is none: one request either way."""
    try:
        return json.loads(lake.get(key))
    except FileNotFoundError:
        return default


def get_many(lake, keys: dict[str, str], threads: int = 16) -> dict[str, dict]:
    """``{name: JSON object}`` of the objects at ``{name: key}`` that exist, read ``threads`` at a time."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        found = dict(zip(keys, pool.map(lambda k: get_json(lake, k), keys.values())))
    return {name: obj for name, obj in found.items() if obj is not None}


def parquet_table(data: bytes, columns: list[str] | None = None):
    """``data`` (a Parquet object) as a table.

    The bytes are copied into an Arrow-owned buffer first. Reading the Python ``bytes`` in place
    (``pq.read_table(io.BytesIO(data))``, or a ``BufferReader`` over them) lets Arrow's scan
    threads hold the last reference to a Python-owned buffer after the call returns; when one
    drops it during interpreter exit it must take the GIL, Python ends the thread with
    pthread_exit inside a C++ destructor, and the process aborts ("terminate called without an
    active exception", exit -6; backtraces: arrow::py::PyBuffer::~PyBuffer on an Arrow thread,
    seen in 1-2 of 12-30 runs on a loaded machine, none in 60 after this copy)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = pa.BufferOutputStream()
    out.write(data)
    return pq.read_table(pa.BufferReader(out.getvalue()), columns=columns)


def read_parquet(lake, key: str):
    return parquet_table(lake.get(key))


def parquet_bytes(table, compression: str = "zstd") -> bytes:
    """``table`` as Parquet; the same rows give the same bytes."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, compression=compression, write_statistics=True)
    return buf.getvalue()


def write_parquet(lake, key: str, table, compression: str = "zstd") -> bytes:
    """Write ``table`` as one Parquet object; returns the bytes written."""
    data = parquet_bytes(table, compression)
    lake.put(key, data)
    return data
