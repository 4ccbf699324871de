"""Names of subsets, models and packs: safe as partition keys, lake path parts and job names."""

import hashlib
import re

KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def check_key(kind: str, key: str) -> str:
    if not KEY_RE.match(key) or ".." in key:
        raise ValueError(
            f"{kind} key {key!r} is not allowed: use 1-100 of A-Z a-z 0-9 . _ - (starting with a letter or digit)"
        )
    return key


def safe_key(name: str) -> str:
    """``name`` if it is already a valid key, else a cleaned form plus a hash of the original,
    so two different names never map to the same key."""
    if KEY_RE.match(name) and ".." not in name:
        return name
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")[:80].replace("..", "_") or "pack"
    return f"{cleaned}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def require_key(kind: str, key: str) -> str:
    """``check_key`` for an asset step: a bad partition key fails the step with the reason."""
    import dagster as dg

    try:
        return check_key(kind, key)
    except ValueError as e:
        raise dg.Failure(description=str(e)) from None
