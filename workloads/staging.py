"""A step's scratch space, and the sweep of what killed steps left there.

Scratch lives in one place per lake: ``<lake>/.tmp-staging/`` for a directory lake (on the
lake's own filesystem, so a staged file is renamed into place; listings skip ``.tmp-`` names),
the machine's temp dir for an S3 lake (an S3 put is atomic: only local files are staged).
Everything a step stages is in a directory ``<step>-<random>`` that holds a lock while the step
lives; a killed step leaves its directory unlocked, and the next run of that step removes it
once it is older than the grace period. The lake's own half-written ``.tmp-*`` files (a killed
put) sit there too and go the same way.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

STAGING = ".tmp-staging"
GRACE_S = 3600.0  # older than any put; a live step's directory is locked whatever its age
LOCK = ".lock"


def staging_root(lake) -> Path:
    """Where ``lake``'s steps stage: beside its objects for a directory lake, else local temp."""
    root = getattr(lake, "root", None)
    if isinstance(root, Path):
        return root / STAGING
    return Path(tempfile.gettempdir()) / "cvgraph-staging"


@dataclass(frozen=True)
class Swept:
    entries: int
    bytes: int

    def __str__(self) -> str:
        return (
            f"removed {self.entries} staging entr{'y' if self.entries == 1 else 'ies'} killed steps "
            f"left ({self.bytes:,} B)"
        )


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _unlocked(directory: Path) -> bool:
    """True if no live process holds ``directory``'s lock (flock: released when a process dies)."""
    try:
        fd = os.open(directory / LOCK, os.O_RDONLY)
    except FileNotFoundError:
        return True  # killed before it locked, or not a step's directory
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def sweep(root: Path, step: str, grace_s: float = GRACE_S) -> Swept:
    """Remove, under ``root``, ``step``'s directories no live step holds and every ``.tmp-*``
    file (a killed put), when older than ``grace_s``. One ``scandir`` of the staging root: the
    cost is what was left behind, never the lake."""
    entries = size = 0
    cutoff = time.time() - grace_s
    try:
        found = list(os.scandir(root))
    except FileNotFoundError:
        return Swept(0, 0)
    for e in found:
        try:
            if e.stat(follow_symlinks=False).st_mtime > cutoff:
                continue
            path = Path(e.path)
            if e.is_dir(follow_symlinks=False) and e.name.startswith(f"{step}-"):
                if not _unlocked(path):
                    continue
                n = _size(path)
                shutil.rmtree(path)
            elif e.is_file(follow_symlinks=False) and e.name.startswith(".tmp-"):
                n = e.stat(follow_symlinks=False).st_size
                path.unlink()
            else:
                continue
        except FileNotFoundError:  # another sweep took it first
            continue
        entries, size = entries + 1, size + n
    return Swept(entries, size)


@contextlib.contextmanager
def staging(lake, step: str, grace_s: float = GRACE_S, on_sweep=None) -> Iterator[Path]:
    """A fresh directory for ``step``'s scratch, locked while the block runs and removed after;
    first, what killed runs of ``step`` left (``on_sweep(Swept)`` hears of it when anything)."""
    root = staging_root(lake)
    root.mkdir(parents=True, exist_ok=True)
    swept = sweep(root, step, grace_s)
    if swept.entries and on_sweep is not None:
        on_sweep(swept)
    directory = Path(tempfile.mkdtemp(prefix=f"{step}-", dir=root))
    lock = os.open(directory / LOCK, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        os.close(lock)
