"""The queryable tables, a few Parquet parts per hash prefix and table (hive layout
``prefix=<pp>``), kept up to date by append from the index step's change markers.

``images``: one row per stored original. ``objects``: one row per annotated box.
"""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.compute as pc

from workloads.images import ImageParams
from workloads.lake import get_json, read_parquet, write_parquet
from workloads.layout import (
    PENDING_TABLES,
    hashes_key,
    index_state_key,
    output_key,
    part_key,
    raw_index_key,
    raw_key,
    table_dir,
    tables_state_key,
)
from workloads.versions import HASH_PREFIXES, canonical_json, sha256_hex, split_for, table_hash

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
        ("label", pa.string()),
        ("split", pa.string()),
    ]
)
TABLES = {"images": IMAGES_SCHEMA, "objects": OBJECTS_SCHEMA}


# Parts per prefix: new rows are appended as a part; a part is merged into the one before it
# when that one is at most FANOUT times bigger (size-tiered, so each row is rewritten
# O(log rows) times and a prefix has O(log rows) parts), and never more than MAX_PARTS.
FANOUT = 2
MAX_PARTS = 16
# The prefix's data version is a hash of the SET of its rows, kept as a sum of per-row digests
# mod 2**1024 (a multiset hash, as LtHash): adding or replacing k rows costs O(k) whatever the
# prefix holds, and the version does not depend on how the rows are split into parts.
DIGEST_BITS = 1024


def live_parts(state: dict | None, table: str, prefix: str) -> list[str]:
    """The keys a reader of ``table`` takes for ``prefix``: the parts its state names (an
    object the state does not name is a killed write's leftover or a superseded part)."""
    if not state:
        return []
    parts = state.get("parts") or [
        {"id": "0", "images": state.get("images", 0), "objects": state.get("objects", 0)}
    ]
    return [part_key(table, prefix, p["id"]) for p in parts if p[table]]


def table_keys(lake) -> dict[str, list[str]]:
    """``{table: live part keys}`` over every prefix: one small read per prefix, 16 at a time."""
    from workloads.lake import get_many

    states = get_many(lake, {p: tables_state_key(p) for p in HASH_PREFIXES})
    return {
        name: [k for p in sorted(states) for k in live_parts(states[p], name, p)] for name in TABLES
    }


def read_prefix_table(lake, table: str, prefix: str) -> pa.Table:
    """All live rows of ``table`` in ``prefix``, sorted as a rebuild writes them."""
    parts = [
        _read_part(lake, k, table)
        for k in live_parts(get_json(lake, tables_state_key(prefix)), table, prefix)
    ]
    return _sorted(pa.concat_tables([TABLES[table].empty_table(), *parts]), SORT_KEYS[table])


def _read_part(lake, key: str, table: str) -> pa.Table:
    return read_parquet(lake, key).select(TABLES[table].names).cast(TABLES[table])


def _hashes_of(
    lake, stage: str, params: ImageParams, prefix: str, shas: pa.Array
) -> dict[str, str]:
    """The hash index of ``stage`` for just ``shas`` (filtered in Arrow, not as Python rows)."""
    key = hashes_key(stage, params, prefix)
    if not lake.exists(key):
        return {}
    t = read_parquet(lake, key)
    t = t.filter(pc.is_in(t["sha256"], value_set=shas))
    return dict(zip(t["sha256"].to_pylist(), t["output_sha256"].to_pylist()))


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
            objects.append({"sha256": sha, "box": i, **b, "label": r["label"], "split": split})
    return images, objects


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


SORT_KEYS = {"images": ["sha256"], "objects": ["sha256", "box"]}


def _sorted(table: pa.Table, keys: list[str]) -> pa.Table:
    return table.take(pc.sort_indices(table, sort_keys=[(k, "ascending") for k in keys]))


def pending_table_changes(
    lake, prefix: str, absorbed: list[str] = ()
) -> tuple[list[str], set[str], set[str]]:
    """(marker keys, sha256s of the rows the index step changed since the tables absorbed them,
    those of them that were new to the index: no part can hold them). Markers the last commit
    ``absorbed`` (killed before it dropped them) are listed, to be dropped, but not read again."""
    keys = [k for k in lake.keys(f"{PENDING_TABLES}{prefix}/") if k.endswith(".json")]
    markers = [json.loads(lake.get(k)) for k in keys if k not in absorbed]
    changed = {s for m in markers for s in m["sha256"]}
    # a sha new in one marker but changed again in a later one is still new; old markers say nothing
    new = (
        {s for m in markers for s in m.get("new", [])}
        if all("new" in m for m in markers)
        else set()
    )
    return keys, changed, new


class _Part:
    """One part of a prefix: an existing one (its state record, rows read on demand) or a new
    one (its rows, written at commit)."""

    def __init__(self, record: dict | None = None, tables: dict[str, pa.Table] | None = None):
        self.new = tables is not None
        self.tables = None
        if self.new:
            self.tables = {name: _sorted(tables[name], SORT_KEYS[name]) for name in TABLES}
            images = self.tables["images"]
            lacking = images.filter(
                pc.or_(pc.is_null(images["resized_key"]), pc.is_null(images["edges_key"]))
            )
            # {sha: [has resized, has edges]}: the row changes only when its hash indexes say otherwise
            missing = {
                r["sha256"]: [r["resized_key"] is not None, r["edges_key"] is not None]
                for r in lacking.select(["sha256", "resized_key", "edges_key"]).to_pylist()
            }
            record = {
                "id": sha256_hex(
                    (table_hash(images) + table_hash(self.tables["objects"])).encode()
                )[:16],
                **{name: self.tables[name].num_rows for name in TABLES},
                **({"missing": missing} if missing else {}),
            }
        self.record = record

    def load(self, lake, prefix: str) -> dict[str, pa.Table]:
        if self.tables is None:
            self.tables = {
                name: _read_part(lake, part_key(name, prefix, self.record["id"]), name)
                if self.record[name]
                else TABLES[name].empty_table()
                for name in TABLES
            }
        return self.tables


def _merged(lake, prefix: str, parts: list[_Part]) -> _Part:
    return _Part(
        tables={
            name: pa.concat_tables([p.load(lake, prefix)[name] for p in parts]) for name in TABLES
        }
    )


def _compact(lake, prefix: str, parts: list[_Part]) -> list[_Part]:
    """Merge the newest part into the one before while that one is at most FANOUT times bigger."""
    while len(parts) > 1 and (
        parts[-2].record["images"] <= FANOUT * parts[-1].record["images"] or len(parts) > MAX_PARTS
    ):
        parts[-2:] = [_merged(lake, prefix, parts[-2:])]
    return parts


def _commit(
    lake,
    prefix: str,
    params: ImageParams,
    parts: list[_Part],
    digests: dict[str, int],
    markers: list[str],
) -> dict:
    """Put the new parts, then the state (the commit point: readers take the parts it names),
    then drop what it no longer names (superseded parts, a killed write's leftovers) and the
    change markers it absorbed. Parts are named by their content: a re-run writes the same."""
    for part in parts:
        if part.new:
            for name in TABLES:
                if part.record[name]:
                    write_parquet(
                        lake, part_key(name, prefix, part.record["id"]), part.tables[name]
                    )
    records = [p.record for p in parts]
    stats = {
        **{name: sum(r[name] for r in records) for name in TABLES},
        "missing_variants": sum(len(r.get("missing", [])) for r in records),
        "data_version": tables_version(digests),
    }
    state = {
        **stats,
        "parts": records,
        "absorbed": sorted(markers),
        "digests": {k: f"{v:x}" for k, v in digests.items()},
        "params": {"resize": params.resize_id, "edges": params.edges_id},
    }
    lake.put(tables_state_key(prefix), json.dumps(state, sort_keys=True).encode())
    _clean(lake, prefix, state, markers)
    return stats


def _clean(lake, prefix: str, state: dict, markers: list[str]) -> None:
    """Drop what the committed ``state`` no longer names, then the change markers it absorbed."""
    live = {k for name in TABLES for k in live_parts(state, name, prefix)}
    for name in TABLES:
        for k in lake.keys(table_dir(name, prefix)):
            if k not in live:
                lake.delete(k)
    for k in markers:
        lake.delete(k)


def commit_prefix_tables(
    lake, prefix: str, params: ImageParams, images: pa.Table, objects: pa.Table, markers: list[str]
) -> dict:
    """The prefix rebuilt: all its rows as one part."""
    parts = [_Part(tables={"images": images, "objects": objects})] if images.num_rows else []
    return _commit(
        lake,
        prefix,
        params,
        parts,
        {"images": rows_digest(images), "objects": rows_digest(objects)},
        markers,
    )


def empty_tables_stats() -> dict:
    """What ``write_prefix_tables`` gives a prefix with no images."""
    return {
        "images": 0,
        "objects": 0,
        "missing_variants": 0,
        "data_version": tables_version({"images": 0, "objects": 0}),
    }


def _fresh_rows(
    lake, prefix: str, params: ImageParams, raw: pa.Table, shas: pa.Array
) -> dict[str, pa.Table]:
    rows = raw.filter(pc.is_in(raw["sha256"], value_set=shas)).to_pylist() if raw.num_rows else []
    hashes = {stage: _hashes_of(lake, stage, params, prefix, shas) for stage in ("resize", "edges")}
    images, objects = rows_of(rows, prefix, params, hashes)
    return {
        "images": pa.Table.from_pylist(images, schema=IMAGES_SCHEMA),
        "objects": pa.Table.from_pylist(objects, schema=OBJECTS_SCHEMA),
    }


def write_prefix_tables(lake, prefix: str, params: ImageParams) -> dict:
    """Bring both tables of one prefix up to date; returns counts and the prefix's data version.

    By append: the rows the index step changed (its markers) and rows still missing a variant
    become one new part. Rows new to the index are appended without looking at any part; a
    replaced row's part is read and rewritten without it (merged into the new part). Nothing
    changed: one listing and one small read. New image parameters (or no state): rebuilt."""
    state = get_json(lake, tables_state_key(prefix))
    markers, changed, new = pending_table_changes(lake, prefix, (state or {}).get("absorbed", []))
    full = (
        state is None
        or "digests" not in state
        or state["params"] != {"resize": params.resize_id, "edges": params.edges_id}
    )
    if (
        not full
        and not changed
        and state["images"] != (get_json(lake, index_state_key(prefix)) or {}).get("images", 0)
    ):
        full = True  # nothing pending, yet the index has rows the tables never heard of (an index task killed before its marker)
    missing = (
        {}
        if full
        else {sha: has for p in state["parts"] for sha, has in p.get("missing", {}).items()}
    )
    if missing:  # a row missing a variant is replaced only when a hash index now has what it lacked
        lookup = pa.array(sorted(missing), pa.string())
        hashes = {
            stage: _hashes_of(lake, stage, params, prefix, lookup) for stage in ("resize", "edges")
        }
        missing = {
            sha: has
            for sha, has in missing.items()
            if [sha in hashes["resize"], sha in hashes["edges"]] != has
        }
    if not full and not changed and not missing:
        if markers:  # a commit killed before its clean-up: finish it
            _clean(lake, prefix, state, markers)
        return {k: state[k] for k in ("images", "objects", "missing_variants", "data_version")}
    key = raw_index_key(prefix)
    raw = (
        read_parquet(lake, key)
        if lake.exists(key)
        else pa.table({"sha256": pa.array([], pa.string())})
    )

    def rebuild() -> dict:
        fresh = _fresh_rows(lake, prefix, params, raw, raw["sha256"])
        return commit_prefix_tables(
            lake, prefix, params, fresh["images"], fresh["objects"], markers
        )

    if full:
        return rebuild()
    delta = pa.array(sorted(changed | set(missing)), pa.string())
    fresh = _fresh_rows(lake, prefix, params, raw, delta)
    # Which parts can hold a row being replaced: those naming it as missing a variant; every
    # part when a row already in the index changed (an image seen again in a later pack).
    look_everywhere = bool(changed - new - set(missing))
    parts, rewritten = [], []
    for record in state["parts"]:
        part = _Part(record)
        if (look_everywhere or set(record.get("missing", {})) & set(missing)) and pc.any(
            pc.is_in(part.load(lake, prefix)["images"]["sha256"], value_set=delta)
        ).as_py():
            rewritten.append(part)
        else:
            parts.append(part)
    digests, kept = {}, {}
    for name in TABLES:
        old = pa.concat_tables(
            [TABLES[name].empty_table(), *(p.load(lake, prefix)[name] for p in rewritten)]
        )
        gone = pc.is_in(old["sha256"], value_set=delta)
        digests[name] = (
            int(state["digests"][name], 16)
            - rows_digest(old.filter(gone))
            + rows_digest(fresh[name])
        ) % (1 << DIGEST_BITS)
        kept[name] = pa.concat_tables([old.filter(pc.invert(gone)), fresh[name]])
    if kept["images"].num_rows:
        parts.append(_Part(tables=kept))
    if (
        sum(p.record["images"] for p in parts) != raw.num_rows
    ):  # every index row has one table row, or the prefix is rebuilt
        return rebuild()
    return _commit(lake, prefix, params, _compact(lake, prefix, parts), digests, markers)


def main(argv: list[str] | None = None) -> int:
    """``python -m workloads.tables --lake URL --run-id R [params] --prefixes 00,01``: bring each
    prefix's tables up to date; ``_results/<run>/tables/<pp>.json`` records counts and version."""
    from workloads.images import add_params_args, params_from_args
    from workloads.tasks import prefix_parser, run_prefix_tasks

    ap = prefix_parser("update the images / objects tables of prefixes")
    add_params_args(ap)
    args = ap.parse_args(argv)
    params = params_from_args(args)
    return run_prefix_tasks(
        args, "tables", lambda lake, prefix: write_prefix_tables(lake, prefix, params)
    )


if __name__ == "__main__":
    import sys

    sys.exit(main())
