"""Exact, content-derived versions: per-prefix data versions and Merkle roots over them."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping

HASH_PREFIXES: tuple[str, ...] = tuple(f"{i:02x}" for i in range(256))


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def params_id(params: Mapping) -> str:
    """Stable short id of a parameter set; namespaces derived outputs in the lake."""
    return sha256_hex(canonical_json(dict(params)))[:12]


def prefix_version(items: Iterable[str | bytes], params: str = "") -> str:
    """Data version of one prefix partition: hash of its sorted item list and params id."""
    h = hashlib.sha256(params.encode() + b"\n")
    for item in sorted(i.encode() if isinstance(i, str) else i for i in items):
        h.update(item + b"\n")
    return h.hexdigest()[:24]


def merkle_root(versions: Mapping[str, str]) -> str:
    """Merkle root over ``{partition: version}``; a fan-in asset's exact input version."""
    level = [sha256_hex(f"{k}={versions[k]}".encode()) for k in sorted(versions)]
    if not level:
        return sha256_hex(b"")[:24]
    while len(level) > 1:
        if len(level) % 2:
            level.append(level[-1])
        level = [sha256_hex((a + b).encode()) for a, b in zip(level[::2], level[1::2])]
    return level[0][:24]


SPLITS = ("train", "val", "test")


def split_for(sha256: str) -> str:
    """Deterministic train/val/test split (80/10/10) from the content hash."""
    bucket = int(sha256[:8], 16) % 100
    return "train" if bucket < 80 else "val" if bucket < 90 else "test"


def table_hash(table) -> str:
    """Content hash of a pyarrow table's rows, in order: its CSV text (Arrow's C++ writer, so a
    million rows hash in well under a second), list columns joined with a unit separator.
    Independent of Parquet encoding, chunking and compression."""
    import io

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    cols = []
    for name in table.schema.names:
        col = table[name]
        if (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)) and pa.types.is_struct(
            col.type.value_type
        ):  # boxes: each list as canonical JSON (no CSV form; only subsets' manifests have them)
            col = pa.array([canonical_json(v).decode() for v in col.to_pylist()], pa.string())
        elif pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            col = pc.binary_join(pc.cast(col, pa.list_(pa.string())), "\x1f")
        cols.append(col)
    buf = io.BytesIO()
    pacsv.write_csv(
        pa.table(cols, names=table.schema.names),
        buf,
        pacsv.WriteOptions(include_header=True, batch_size=65536),
    )
    return hashlib.sha256(buf.getvalue()).hexdigest()
