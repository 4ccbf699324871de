"""The rows of the ``images`` and ``objects`` tables: their schemas and order, how they are made
from raw index rows, and the multiset digest of a prefix's rows that is its data version.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.compute as pc

from workloads.image_params import ImageParams
from workloads.layout import output_key, raw_key
from workloads.versions import canonical_json, sha256_hex, split_for

IMAGES_SCHEMA = pa.schema(
    [
        ("sha256", pa.string()),
        ("pack_id", pa.string()),
        ("member", pa.string()),
        ("packs", pa.list_(pa.string())),
        ("label", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("format", pa.string()),
        ("bytes", pa.int64()),
        ("split", pa.string()),
        ("original_key", pa.string()),
        ("resized_key", pa.string()),
        ("edges_key", pa.string()),
        ("resized_sha256", pa.string()),
        ("edges_sha256", pa.string()),
        ("boxes", pa.int32()),
    ]
)
OBJECTS_SCHEMA = pa.schema(
    [
        ("sha256", pa.string()),
        ("box", pa.int32()),
        ("category", pa.string()),
        ("x", pa.float64()),
        ("y", pa.float64()),
        ("w", pa.float64()),
        ("h", pa.float64()),
        ("iscrowd", pa.bool_()),  # a COCO crowd region (iscrowd=1): a trainer may leave it out
        ("label", pa.string()),
        ("split", pa.string()),
    ]
)
TABLES = {"images": IMAGES_SCHEMA, "objects": OBJECTS_SCHEMA}
SORT_KEYS = {"images": ["sha256"], "objects": ["sha256", "box"]}
# The tables' rows as this code makes them; a prefix whose tables state records another (or
# none: written before) is rebuilt from its index when it is next written.
# 2: objects.iscrowd
ROWS_VERSION = 2
# Columns added since parts were first written, and what a part written before them reads as.
ADDED_COLUMNS = {"objects": {"iscrowd": False}}

# The prefix's data version is a hash of the SET of its rows, kept as a sum of per-row digests
# mod 2**1024 (a multiset hash, as LtHash): adding or replacing k rows costs O(k) whatever the
# prefix holds, and the version does not depend on how the rows are split into parts.
DIGEST_BITS = 1024


def rows_of(
    raw: list[dict], prefix: str, params: ImageParams, hashes: dict[str, dict[str, str]]
) -> tuple[list[dict], list[dict]]:
    """``images`` and ``objects`` rows of raw index rows; a variant is listed when its hash index
    has it (the record of what is done)."""
    images, objects = [], []
    for r in raw:
        sha = r["sha256"]
        split = split_for(sha)
        resized, edges = hashes["resize"].get(sha), hashes["edges"].get(sha)
        images.append(
            {
                "sha256": sha,
                "pack_id": r["packs"][0],
                # index members are "<pack>/<member>"; the table keeps the member within pack_id
                "member": next(m for m in r["members"] if m.startswith(r["packs"][0] + "/"))[
                    len(r["packs"][0]) + 1 :
                ],
                "packs": r["packs"],
                "label": r["label"],
                "width": r["width"],
                "height": r["height"],
                "format": r["format"],
                "bytes": r["bytes"],
                "split": split,
                "original_key": raw_key(sha, r["ext"]),
                "resized_key": output_key("resize", params, prefix, sha) if resized else None,
                "edges_key": output_key("edges", params, prefix, sha) if edges else None,
                "resized_sha256": resized,
                "edges_sha256": edges,
                "boxes": len(r["boxes"]),
            }
        )
        for i, b in enumerate(r["boxes"]):
            objects.append(
                {
                    "sha256": sha,
                    "box": i,
                    **b,
                    "iscrowd": bool(b.get("iscrowd")),  # an index written before it: False
                    "label": r["label"],
                    "split": split,
                }
            )
    return images, objects


def sort_rows(table: pa.Table, keys: list[str]) -> pa.Table:
    return table.take(pc.sort_indices(table, sort_keys=[(k, "ascending") for k in keys]))


def rows_digest(table: pa.Table) -> int:
    """Sum of the rows' digests mod 2**DIGEST_BITS: the multiset hash of ``table``'s rows."""
    total = 0
    for row in table.to_pylist():
        total += int.from_bytes(
            hashlib.shake_256(canonical_json(row)).digest(DIGEST_BITS // 8), "big"
        )
    return total % (1 << DIGEST_BITS)


def tables_version(digests: dict[str, int]) -> str:
    """The prefix's exact data version, from both tables' row digests."""
    return sha256_hex(f"{digests['images']:x}:{digests['objects']:x}".encode())[:24]
