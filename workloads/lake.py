"""The lake: a key/value object store addressed by keys like ``raw/ab/<sha256>.jpg``.

``open_lake(url)`` returns a ``LocalLake`` for a directory (the embedded profile's bucket).
Writes are atomic: a reader sees a whole object or none.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO


def check_key(key: str) -> str:
    """``key`` if it names an object inside the lake: relative, and no empty, "." or ".." part."""
    framed = f"/{key}/"
    if "//" in framed or "/./" in framed or "/../" in framed or "\\" in key:
        raise ValueError(f"invalid lake key {key!r}")
    return key


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


class LocalLake:
    """A directory used as a bucket. Keys are POSIX relative paths under ``root``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self.url = self._root_str = str(self.root)

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
        return self.path(key).is_file()

    def get(self, key: str) -> bytes:
        # Plain fd reads: most objects are a few KB, where a buffered file object's setup is
        # a third of the cost.
        fd = os.open(self._file(key), os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            data = os.read(fd, size)
            if len(data) < size:  # large objects arrive in pieces (Linux reads <= 2 GiB at a time)
                chunks = [data]
                while chunk := os.read(fd, 1 << 30):
                    chunks.append(chunk)
                data = b"".join(chunks)
            return data
        finally:
            os.close(fd)

    def size(self, key: str) -> int:
        return self.path(key).stat().st_size

    @contextlib.contextmanager
    def open_read(self, key: str) -> Iterator[BinaryIO]:
        with open(self.path(key), "rb") as f:
            yield f

    def _scan(self, prefix: str, start_after: str | None) -> list[tuple[str, os.DirEntry]]:
        """(key, entry) of the objects under ``prefix``, sorted: one ``scandir`` per directory
        that can hold such keys; symlinked directories are not followed, in-flight ``.tmp-*``
        writes are not objects."""
        cut = len(self._root_str) + 1
        found = []
        stack = [os.path.join(self._root_str, prefix.rsplit("/", 1)[0]) if "/" in prefix else self._root_str]
        while stack:
            try:
                entries = os.scandir(stack.pop())
            except (FileNotFoundError, NotADirectoryError):
                continue
            with entries:
                for e in entries:
                    if e.name.startswith(".tmp-"):
                        continue
                    key = e.path[cut:]
                    if e.is_dir(follow_symlinks=False):
                        if (key + "/").startswith(prefix) or prefix.startswith(key + "/"):
                            stack.append(e.path)
                    elif key.startswith(prefix) and (start_after is None or key > start_after) and e.is_file():
                        found.append((key, e))
        found.sort(key=lambda item: item[0])
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

    # -- writes ----------------------------------------------------------------
    def _tmp(self, key: str) -> tuple[Path, Path]:
        dest = self._write_path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=dest.parent)
        os.close(fd)
        return dest, Path(tmp)

    def put(self, key: str, data: bytes) -> None:
        dest, tmp = self._tmp(key)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def put_file(self, key: str, src: str | os.PathLike) -> None:
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
        dest, tmp = self._tmp(key)
        try:
            shutil.copyfile(src, tmp)
            os.link(tmp, dest)  # atomic, fails if dest exists
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def delete(self, key: str) -> None:
        self._write_path(key).unlink(missing_ok=True)

    # -- tables ----------------------------------------------------------------
    def arrow_filesystem(self):
        """(pyarrow filesystem, base path) for reading Parquet datasets in place."""
        import pyarrow.fs as pafs

        return pafs.LocalFileSystem(), str(self.root)


def open_lake(url: str, endpoint_url: str | None = None):
    """The lake behind ``url``: a directory path (or ``file://``) or ``s3://bucket/prefix``."""
    if url.startswith("s3://"):
        from workloads.s3lake import S3Lake  # noqa: PLC0415 - only the AWS profile needs boto3

        return S3Lake(url, endpoint_url=endpoint_url)
    if url.startswith("file://"):
        url = url[len("file://") :]
    return LocalLake(url)


def parquet_table(data: bytes):
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(data))


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
