"""What every lake shares (``LocalLake``, ``S3Lake``): valid keys, listing entries, the
request counters the steps report, and the retries every AWS client makes."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass

# botocore's retries for every AWS client, the lake's and the orchestrator's (resources/aws.py):
# adaptive, so a burst of 503 SlowDown or describe throttles slows the client down instead of
# failing the step; ten attempts, backing off. Reads of a response body that breaks off are
# retried by the lake itself (S3Lake), which botocore does not do.
RETRIES = {"mode": "adaptive", "max_attempts": 10}


def check_key(key: str) -> str:
    """``key`` if it names an object inside the lake: relative, and no empty, "." or ".." part."""
    framed = f"/{key}/"
    if "//" in framed or "/./" in framed or "/../" in framed or "\\" in key:
        raise ValueError(f"invalid lake key {key!r}")
    return key


class Counters(Counter):
    """Request and byte counts; increments are safe across threads (stages write from a pool)."""

    def __init__(self):
        self._lock = threading.RLock()  # before Counter's init, which calls update
        super().__init__()

    def add(self, kind: str, n: int = 1) -> None:
        with self._lock:
            self[kind] += n

    def update(self, *args, **kwargs) -> None:  # a fork's counts, added while others add theirs
        with self._lock:
            super().update(*args, **kwargs)

    def since(self, before: dict) -> dict[str, int]:
        """What was counted after the snapshot ``before`` (``dict(counters)``)."""
        return {k: v - before.get(k, 0) for k, v in sorted(self.items()) if v - before.get(k, 0)}


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
