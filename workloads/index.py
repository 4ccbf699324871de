"""Per-prefix index of originals, absorbed by delta from committed packs.

An ingest writes its manifest split by prefix (``packs/<id>/prefixes/<pp>.parquet``) and, for
each prefix it touched, a pending marker ``_pending/raw_images/<pp>/<id>.json``. A prefix's
index absorbs only its pending packs that are committed, reading only their rows for that
prefix: a new pack of k images costs O(k) rows read and merged, whatever the lake holds, and a
prefix with nothing pending costs one listing and one small state read. The merge is a pure
function of the set of (pack, member) rows, so the index does not depend on ingest order and
re-merging a pack changes nothing (a killed merge re-runs to the same bytes).
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc

from workloads.annotations import BOX_TYPE
from workloads.lake import get_json, read_parquet, write_parquet
from workloads.layout import (
    PENDING_RAW,
    index_state_key,
    pack_keys,
    pack_prefix_key,
    pending_raw_key,
    pending_tables_key,
    raw_index_key,
    recorded,
)
from workloads.versions import canonical_json, prefix_version, sha256_hex

# The columns of an index row; the version hashes these (per row, then over the prefix).
ROW_FIELDS = [
    ("sha256", pa.string()),
    ("ext", pa.string()),
    ("format", pa.string()),
    ("bytes", pa.int64()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("label", pa.string()),
    ("label_source", pa.string()),
    ("packs", pa.list_(pa.string())),
    ("members", pa.list_(pa.string())),
    ("boxes", pa.list_(BOX_TYPE)),
]
# Where the label and the boxes came from ([pack, member]) and the row's hash: what a later
# merge needs to apply the labels rule without the earlier packs' rows.
INDEX_SCHEMA = pa.schema(
    [
        *ROW_FIELDS,
        ("label_from", pa.list_(pa.string())),
        ("boxes_from", pa.list_(pa.string())),
        ("row_sha256", pa.string()),
    ]
)


def _label_rank(source: str | None) -> int:
    """An explicit label (labels.csv, COCO) beats a folder name, which beats none."""
    return {None: 0, "folder": 1}.get(source, 2)


def committed_packs(lake) -> list[str]:
    """Packs whose ingest finished (``pack.json`` is the commit marker). Lists ``packs/``: for
    rebuilds and tests, never on the incremental path."""
    return recorded(lake, "pack")


def _absorb(row: dict | None, pack_id: str, r: dict) -> dict:
    """``row`` with one more (pack, member) occurrence of its image. The label is the most
    explicit one, ties to the first (pack id, member); boxes are the first (pack id, member)'s
    that has any: the same result in any order of packs and members."""
    origin = [pack_id, r["member"]]
    member = f"{pack_id}/{r['member']}"
    if row is None:
        return {
            **{
                k: r[k]
                for k in (
                    "sha256",
                    "ext",
                    "format",
                    "bytes",
                    "width",
                    "height",
                    "label",
                    "label_source",
                )
            },
            "packs": [pack_id],
            "members": [member],
            "boxes": r["boxes"] or [],
            "label_from": origin,
            "boxes_from": origin if r["boxes"] else None,
        }
    if member in row["members"]:
        return row
    row["members"] = sorted([*row["members"], member])
    row["packs"] = sorted({*row["packs"], pack_id})
    if (-_label_rank(r["label_source"]), origin) < (
        -_label_rank(row["label_source"]),
        row["label_from"],
    ):
        row["label"], row["label_source"], row["label_from"] = r["label"], r["label_source"], origin
    if r["boxes"] and (row["boxes_from"] is None or origin < row["boxes_from"]):
        row["boxes"], row["boxes_from"] = r["boxes"], origin
    return row


def _row_sha(row: dict) -> str:
    return sha256_hex(canonical_json({name: row[name] for name, _ in ROW_FIELDS}))


def _stats(table: pa.Table, version: str) -> dict:
    labels = (
        dict(
            sorted(
                (str(r["values"] if r["values"] is not None else "(none)"), r["counts"])
                for r in pc.value_counts(table["label"]).to_pylist()
            )
        )
        if table.num_rows
        else {}
    )
    return {
        "images": table.num_rows,
        "bytes": int(pc.sum(table["bytes"]).as_py() or 0),
        "labels": labels,
        "data_version": version,
    }


def empty_index_stats() -> dict:
    """The stats of a prefix no pack touched."""
    return {"images": 0, "bytes": 0, "labels": {}, "data_version": prefix_version([], "raw")}


def read_index(lake, prefix: str) -> pa.Table:
    try:
        table = read_parquet(lake, raw_index_key(prefix))
    except FileNotFoundError:
        return INDEX_SCHEMA.empty_table()
    # Parquet names list items "element": back to Arrow's "item", so a merge writes what a rebuild writes.
    return table.cast(INDEX_SCHEMA) if table.schema.names == INDEX_SCHEMA.names else table


def merge_prefix(
    lake, prefix: str, packs: dict[str, list[dict]], index: pa.Table | None = None
) -> tuple[dict, list[str], list[str]]:
    """Merge ``{pack id: its manifest rows of prefix}`` into the prefix's index; returns the
    prefix's stats, the sha256s whose rows changed and those of them that are new to the index.
    Only the rows of images the packs bring become Python objects; the rest stays in Arrow."""
    index = read_index(lake, prefix) if index is None else index
    if (
        index.schema.names != INDEX_SCHEMA.names
    ):  # written before indexes kept provenance: rebuilt once
        index = rebuild_raw_index(lake, [prefix])[prefix]
    touched = sorted({r["sha256"] for rows in packs.values() for r in rows})
    hit = pc.is_in(index["sha256"], value_set=pa.array(touched, pa.string()))
    old = {r["sha256"]: r for r in index.filter(hit).to_pylist()}
    rows = {sha: dict(r, boxes_from=r["boxes_from"] or None) for sha, r in old.items()}
    for pack_id in sorted(packs):
        for r in sorted(packs[pack_id], key=lambda r: r["member"]):
            rows[r["sha256"]] = _absorb(rows.get(r["sha256"]), pack_id, r)
    changed = []
    for sha, row in rows.items():
        row["row_sha256"] = _row_sha(row)
        if sha not in old or old[sha]["row_sha256"] != row["row_sha256"]:
            changed.append(sha)
    if not changed:
        return _stats(index, prefix_version(index["row_sha256"].to_pylist(), "raw")), [], []
    fresh = pa.Table.from_pylist([rows[s] for s in sorted(changed)], schema=INDEX_SCHEMA)
    keep = index.filter(pc.invert(pc.is_in(index["sha256"], value_set=fresh["sha256"])))
    merged = pa.concat_tables([keep, fresh])
    merged = merged.take(pc.sort_indices(merged, sort_keys=[("sha256", "ascending")]))
    version = prefix_version(merged["row_sha256"].to_pylist(), "raw")
    write_parquet(lake, raw_index_key(prefix), merged)
    return _stats(merged, version), sorted(changed), sorted(set(changed) - set(old))


def _pending(lake, prefix: str) -> list[str]:
    """Pack ids pending for ``prefix`` whose ingest committed (an uncommitted one stays pending)."""
    ids = [
        k.rsplit("/", 1)[1][: -len(".json")]
        for k in lake.keys(f"{PENDING_RAW}{prefix}/")
        if k.endswith(".json")
    ]
    return sorted(p for p in ids if lake.exists(pack_keys(p)["record"]))


def absorb_pending(lake, prefix: str) -> dict:
    """Bring ``prefix``'s index up to date with its pending packs; returns the prefix's stats
    (``images``, ``bytes``, ``labels``, ``data_version``, ``packs_merged``, ``changed`` rows).

    Order of writes: the index, the table step's change list, the state record, then the pending
    markers go. Killed anywhere, a re-run merges the same packs again, which changes nothing."""
    state_key = index_state_key(prefix)
    pending = _pending(lake, prefix)
    if not pending:
        return {**get_json(lake, state_key, empty_index_stats()), "packs_merged": [], "changed": 0}
    packs = {p: read_parquet(lake, pack_prefix_key(p, prefix)).to_pylist() for p in pending}
    stats, changed, new = merge_prefix(lake, prefix, packs)
    if changed:
        # "new": rows no table can hold yet (the table step appends them without looking)
        lake.put(
            pending_tables_key(prefix, stats["data_version"]),
            json.dumps({"sha256": changed, "new": new}).encode(),
        )
    lake.put(state_key, json.dumps(stats, sort_keys=True).encode())
    for p in pending:
        lake.delete(pending_raw_key(prefix, p))
    return {**stats, "packs_merged": pending, "changed": len(changed)}


def build_raw_index(lake, prefixes: list[str]) -> dict[str, dict]:
    """``absorb_pending`` for each prefix: the index step's work."""
    return {p: absorb_pending(lake, p) for p in sorted(set(prefixes))}


def rebuild_raw_index(
    lake, prefixes: list[str], packs: list[str] | None = None
) -> dict[str, pa.Table]:
    """The index of ``prefixes`` from scratch, from every committed pack's full manifest, written
    nowhere: what the incremental index must equal."""
    packs = committed_packs(lake) if packs is None else packs
    rows: dict[str, dict[str, list[dict]]] = {p: {} for p in prefixes}
    for pack_id in packs:
        manifest = read_parquet(lake, pack_keys(pack_id)["manifest"])
        for r in manifest.filter(
            pc.is_in(manifest["prefix"], value_set=pa.array(sorted(prefixes)))
        ).to_pylist():
            rows[r["prefix"]].setdefault(pack_id, []).append(r)
    out = {}
    for p in prefixes:
        merged: dict[str, dict] = {}
        for pack_id in sorted(rows[p]):
            for r in sorted(rows[p][pack_id], key=lambda r: r["member"]):
                merged[r["sha256"]] = _absorb(merged.get(r["sha256"]), pack_id, r)
        for row in merged.values():
            row["row_sha256"] = _row_sha(row)
        out[p] = pa.Table.from_pylist([merged[s] for s in sorted(merged)], schema=INDEX_SCHEMA)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m workloads.index --lake URL --run-id R --prefixes 00,01``: absorb each prefix's
    pending packs; ``_results/<run>/index/<pp>.json`` records the prefix's stats and changes."""
    from workloads.tasks import prefix_parser, run_prefix_tasks

    args = prefix_parser("absorb pending packs into the prefixes' raw index").parse_args(argv)

    def task(lake, prefix: str) -> dict:
        stats = absorb_pending(lake, prefix)
        return {**stats, "changed": stats.pop("changed", 0)}

    return run_prefix_tasks(args, "index", task)


if __name__ == "__main__":
    import sys

    sys.exit(main())
