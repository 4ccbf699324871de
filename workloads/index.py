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
    forget_raw_key,
    index_state_key,
    marker_pack,
    pack_keys,
    pack_prefix_key,
    pending_raw_key,
    pending_tables_key,
    raw_index_key,
    raw_key,
    recorded,
    unrecorded_key,
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


def label_order(source: str | None, origin: list[str]) -> tuple:
    """Which of an image's labels the index keeps: the smallest. An explicit label (labels.csv,
    a box format) beats a folder name, which beats none; ties go to the first [pack, member]."""
    return (-{None: 0, "folder": 1}.get(source, 2), origin)


def index_boxes(boxes: list[dict] | None) -> list[dict]:
    """A manifest row's boxes as the index keeps them: ``iscrowd`` False where a manifest written
    before boxes carried it has none (no format but COCO's marks a crowd)."""
    return [{**b, "iscrowd": bool(b.get("iscrowd"))} for b in boxes or []]


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
            "boxes": index_boxes(r["boxes"]),
            "label_from": origin,
            "boxes_from": origin if r["boxes"] else None,
        }
    if member in row["members"]:
        return row
    row["members"] = sorted([*row["members"], member])
    row["packs"] = sorted({*row["packs"], pack_id})
    if label_order(r["label_source"], origin) < label_order(row["label_source"], row["label_from"]):
        row["label"], row["label_source"], row["label_from"] = r["label"], r["label_source"], origin
    if r["boxes"] and (row["boxes_from"] is None or origin < row["boxes_from"]):
        row["boxes"], row["boxes_from"] = index_boxes(r["boxes"]), origin
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


def _current(schema: pa.Schema) -> bool:
    """An index of today's columns, its boxes with today's fields (``iscrowd``)."""
    boxes = schema.field("boxes").type if "boxes" in schema.names else None
    return schema.names == INDEX_SCHEMA.names and boxes.value_type.names == BOX_TYPE.names


def read_index(lake, prefix: str) -> pa.Table:
    """The prefix's index; one written before today's columns as it is (``merge_prefix``
    rebuilds it: a cast would make its boxes' ``iscrowd`` null)."""
    try:
        table = read_parquet(lake, raw_index_key(prefix))
    except FileNotFoundError:
        return INDEX_SCHEMA.empty_table()
    # Parquet names list items "element": back to Arrow's "item", so a merge writes what a rebuild writes.
    return table.cast(INDEX_SCHEMA) if _current(table.schema) else table


def _holders_rows(lake, prefix: str, old: dict, shas: set[str], dropped) -> dict[str, dict]:
    """The index rows of ``shas`` as the packs that still hold them make them (each holder's
    manifest rows of the prefix, just those shas): what a rebuild without ``dropped`` gives."""
    holders = sorted({p for sha in shas if sha in old for p in old[sha]["packs"]} - set(dropped))
    rows: dict[str, dict] = {}
    value_set = pa.array(sorted(shas), pa.string())
    for pack_id in holders:
        held = read_parquet(lake, pack_prefix_key(pack_id, prefix))
        held = held.filter(pc.is_in(held["sha256"], value_set=value_set))
        for r in sorted(held.to_pylist(), key=lambda r: r["member"]):
            rows[r["sha256"]] = _absorb(rows.get(r["sha256"]), pack_id, r)
    return rows


def merge_prefix(
    lake,
    prefix: str,
    packs: dict[str, list[dict]],
    index: pa.Table | None = None,
    dropped: dict[str, list[dict]] | None = None,
) -> tuple[dict, list[str], list[str], list[str]]:
    """Merge ``{pack id: its manifest rows of prefix}`` into the prefix's index and take the
    ``dropped`` packs' rows out of it; returns the prefix's stats, the sha256s whose rows changed
    (or went), those of them new to the index, and those gone from it (no pack holds them).
    Only the rows of images the packs bring or drop become Python objects; the rest stays in
    Arrow, and a dropped image is re-made from the packs that still hold it."""
    index = read_index(lake, prefix) if index is None else index
    # Written before indexes kept provenance, or boxes their iscrowd: rebuilt once from the packs'
    # manifests, and every row of it (or of the file it replaces) counts as changed.
    stale = set(index["sha256"].to_pylist()) if index.schema != INDEX_SCHEMA else None
    if stale is not None:
        index = rebuild_raw_index(lake, [prefix])[prefix]
    dropped = dropped or {}
    going = {r["sha256"] for rows in dropped.values() for r in rows}
    touched = sorted({r["sha256"] for rows in packs.values() for r in rows} | going)
    hit = pc.is_in(index["sha256"], value_set=pa.array(touched, pa.string()))
    old = {r["sha256"]: r for r in index.filter(hit).to_pylist()}
    rows = {
        sha: dict(r, boxes_from=r["boxes_from"] or None)
        for sha, r in old.items()
        if sha not in going
    }
    rows.update(_holders_rows(lake, prefix, old, going, dropped) if going else {})
    for pack_id in sorted(packs):
        for r in sorted(packs[pack_id], key=lambda r: r["member"]):
            rows[r["sha256"]] = _absorb(rows.get(r["sha256"]), pack_id, r)
    changed = sorted(sha for sha in old if sha not in rows)  # gone from the index
    for sha, row in rows.items():
        row["row_sha256"] = _row_sha(row)
        if sha not in old or old[sha]["row_sha256"] != row["row_sha256"]:
            changed.append(sha)
    gone = sorted(going - set(rows))
    # what the table step is told changed: a rebuilt index's every row (none of them new: the
    # tables may hold any)
    told = (
        sorted({*changed, *stale, *index["sha256"].to_pylist()}) if stale is not None else changed
    )
    if not told:
        stats = _stats(index, prefix_version(index["row_sha256"].to_pylist(), "raw"))
        return stats, [], [], gone
    fresh = pa.Table.from_pylist(
        [rows[s] for s in sorted(changed) if s in rows], schema=INDEX_SCHEMA
    )
    keep = index.filter(
        pc.invert(pc.is_in(index["sha256"], value_set=pa.array(changed, pa.string())))
    )
    merged = pa.concat_tables([keep, fresh])
    merged = merged.take(pc.sort_indices(merged, sort_keys=[("sha256", "ascending")]))
    version = prefix_version(merged["row_sha256"].to_pylist(), "raw")
    if merged.num_rows:
        write_parquet(lake, raw_index_key(prefix), merged)
    else:  # its packs forgotten: as if none had come (a missing index reads as empty)
        lake.delete(raw_index_key(prefix))
    new = sorted(set(changed) - set(old)) if stale is None else []
    return _stats(merged, version), told, new, gone


def _pending(lake, prefix: str) -> tuple[list[str], list[str]]:
    """(packs pending for ``prefix`` whose ingest committed, packs being forgotten there), from
    one listing. An uncommitted pack stays pending; a forgotten one is dropped, not absorbed."""
    markers = [m for k in lake.keys(f"{PENDING_RAW}{prefix}/") if (m := marker_pack(k))]
    forget = sorted(p for p, forgetting in markers if forgetting)
    ids = [p for p, forgetting in markers if not forgetting]
    absorb = [p for p in sorted(ids) if p not in forget and lake.exists(pack_keys(p)["record"])]
    return absorb, forget


def absorb_pending(lake, prefix: str) -> dict:
    """Bring ``prefix``'s index up to date with its pending packs (absorbed) and forgotten ones
    (dropped); returns the prefix's stats (``images``, ``bytes``, ``labels``, ``data_version``,
    ``packs_merged``, ``packs_dropped``, ``changed`` rows).

    Order of writes: the index, the table step's change list, the state record, the originals
    no pack holds any more go, then the markers. Killed anywhere, a re-run does the same merge
    again, which changes nothing."""
    state_key = index_state_key(prefix)
    pending, forget = _pending(lake, prefix)
    if not pending and not forget:
        return {
            **get_json(lake, state_key, empty_index_stats()),
            "packs_merged": [],
            "packs_dropped": [],
            "changed": 0,
        }
    packs = {p: read_parquet(lake, pack_prefix_key(p, prefix)).to_pylist() for p in pending}
    dropped = {p: read_parquet(lake, pack_prefix_key(p, prefix)).to_pylist() for p in forget}
    stats, changed, new, gone = merge_prefix(lake, prefix, packs, dropped=dropped)
    if changed:
        # "new": rows no table can hold yet (the table step appends them without looking)
        lake.put(
            pending_tables_key(prefix, stats["data_version"]),
            json.dumps({"sha256": changed, "new": new}).encode(),
        )
    if stats["images"]:
        lake.put(state_key, json.dumps(stats, sort_keys=True).encode())
    else:  # a missing state reads as empty_index_stats(), which these are
        lake.delete(state_key)
    # until the step records this version, the prefix's index is owed (the markers go next)
    lake.put(unrecorded_key(prefix, stats["data_version"]), b"")
    ext = {r["sha256"]: r["ext"] for rows in dropped.values() for r in rows}
    for sha in gone:
        lake.delete(raw_key(sha, ext[sha]))
    for p in pending:
        lake.delete(pending_raw_key(prefix, p))
    for p in forget:
        lake.delete(pending_raw_key(prefix, p))  # an ingest marker it may still have
        lake.delete(forget_raw_key(prefix, p))
    return {**stats, "packs_merged": pending, "packs_dropped": forget, "changed": len(changed)}


def mark_forgotten(lake, pack_id: str) -> list[str]:
    """Start forgetting ``pack_id``: a ``.forget`` marker in each prefix it has rows for, then its
    record goes (from then on it is no ingested pack); returns those prefixes. Each prefix's
    index step drops its rows (``absorb_pending``); the pack's own objects stay until then."""
    under = pack_prefix_key(pack_id, "")[: -len(".parquet")]
    prefixes = sorted(k[len(under) :].removesuffix(".parquet") for k in lake.keys(under))
    for p in prefixes:
        lake.put(forget_raw_key(p, pack_id), b"")
    lake.delete(pack_keys(pack_id)["record"])
    return prefixes


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


def index_task(lake, prefix: str) -> dict:
    """The index task of one prefix: ``absorb_pending``, as its result record holds it."""
    stats = absorb_pending(lake, prefix)
    return {**stats, "changed": stats.pop("changed", 0)}


def main(argv: list[str] | None = None) -> int:
    """``python -m workloads.index --lake URL --run-id R --prefixes 00,01``: absorb each prefix's
    pending packs; ``_results/<run>/index/<pp>.json`` records the prefix's stats and changes."""
    from workloads.tasks import prefix_parser, run_prefix_tasks

    args = prefix_parser("absorb pending packs into the prefixes' raw index").parse_args(argv)
    return run_prefix_tasks(args, "index", index_task)


if __name__ == "__main__":
    import sys

    sys.exit(main())
