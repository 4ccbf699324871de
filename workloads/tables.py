"""The queryable tables, a few Parquet parts per hash prefix and table (hive layout
``prefix=<pp>``), kept up to date by append from the index step's change markers.

``images``: one row per stored original. ``objects``: one row per annotated box. Their rows
are ``workloads.table_rows``, the parts they are stored in ``workloads.table_parts``.

    python -m workloads.tables --lake URL --run-id R [params] --prefixes 00,01
"""

from __future__ import annotations

import json
import sys

import pyarrow as pa
import pyarrow.compute as pc

from workloads.image_params import ImageParams, add_params_args, params_from_args
from workloads.lake import get_json, get_many, read_parquet
from workloads.layout import PENDING_TABLES, index_state_key, raw_index_key, tables_state_key
from workloads.table_parts import (
    TablePart,
    commit_parts,
    commit_prefix_tables,
    compact_parts,
    finish_commit,
    live_parts,
    read_part,
)
from workloads.table_rows import (
    DIGEST_BITS,
    IMAGES_SCHEMA,
    OBJECTS_SCHEMA,
    ROWS_VERSION,
    SORT_KEYS,
    TABLES,
    rows_digest,
    rows_of,
    sort_rows,
    tables_version,
)
from workloads.tasks import prefix_parser, run_prefix_tasks
from workloads.variant_hashes import hashes_among
from workloads.versions import HASH_PREFIXES

STATS = ("images", "objects", "missing_variants", "data_version")


def table_keys(lake) -> dict[str, list[str]]:
    """``{table: live part keys}`` over every prefix: one small read per prefix, 16 at a time."""
    states = get_many(lake, {p: tables_state_key(p) for p in HASH_PREFIXES})
    return {
        name: [k for p in sorted(states) for k in live_parts(states[p], name, p)] for name in TABLES
    }


def read_prefix_table(lake, table: str, prefix: str) -> pa.Table:
    """All live rows of ``table`` in ``prefix``, sorted as a rebuild writes them."""
    parts = [
        read_part(lake, k, table)
        for k in live_parts(get_json(lake, tables_state_key(prefix)), table, prefix)
    ]
    return sort_rows(pa.concat_tables([TABLES[table].empty_table(), *parts]), SORT_KEYS[table])


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
    hashes = {
        stage: hashes_among(lake, stage, params, prefix, shas) for stage in ("resize", "edges")
    }
    images, objects = rows_of(rows, prefix, params, hashes)
    return {
        "images": pa.Table.from_pylist(images, schema=IMAGES_SCHEMA),
        "objects": pa.Table.from_pylist(objects, schema=OBJECTS_SCHEMA),
    }


def _must_rebuild(lake, prefix: str, params: ImageParams, state: dict | None, changed) -> bool:
    """No state (or one from before digests), other image parameters, rows of another
    ``ROWS_VERSION`` (their digests are of other rows), or nothing pending while the index has
    rows the tables never heard of (an index task killed before its marker)."""
    if (
        state is None
        or "digests" not in state
        or state["params"] != {"resize": params.resize_id, "edges": params.edges_id}
        or state.get("rows_version") != ROWS_VERSION
    ):
        return True
    if changed:
        return False
    return state["images"] != (get_json(lake, index_state_key(prefix)) or {}).get("images", 0)


def _variants_found(lake, prefix: str, params: ImageParams, state: dict) -> dict[str, list[bool]]:
    """The rows missing a variant whose hash indexes now have what they lacked (only these are
    replaced), as ``{sha: [had resized, had edges]}``."""
    missing = {sha: has for p in state["parts"] for sha, has in p.get("missing", {}).items()}
    if not missing:
        return {}
    lookup = pa.array(sorted(missing), pa.string())
    hashes = {
        stage: hashes_among(lake, stage, params, prefix, lookup) for stage in ("resize", "edges")
    }
    return {
        sha: has
        for sha, has in missing.items()
        if [sha in hashes["resize"], sha in hashes["edges"]] != has
    }


def _raw_index(lake, prefix: str) -> pa.Table:
    key = raw_index_key(prefix)
    if lake.exists(key):
        return read_parquet(lake, key)
    return pa.table({"sha256": pa.array([], pa.string())})


def _rebuild(lake, prefix: str, params: ImageParams, raw: pa.Table, markers: list[str]) -> dict:
    fresh = _fresh_rows(lake, prefix, params, raw, raw["sha256"])
    return commit_prefix_tables(lake, prefix, params, fresh["images"], fresh["objects"], markers)


def _split_parts(
    lake, prefix: str, state: dict, delta: pa.Array, look_everywhere: bool, missing: dict
) -> tuple[list[TablePart], list[TablePart]]:
    """(parts kept as they are, parts holding a row of ``delta``: rewritten without it). A part
    is read only if it can hold such a row: it names one as missing a variant, or
    ``look_everywhere``."""
    parts, rewritten = [], []
    for record in state["parts"]:
        part = TablePart(record)
        if (look_everywhere or set(record.get("missing", {})) & set(missing)) and pc.any(
            pc.is_in(part.load(lake, prefix)["images"]["sha256"], value_set=delta)
        ).as_py():
            rewritten.append(part)
        else:
            parts.append(part)
    return parts, rewritten


def _replace_rows(
    lake,
    prefix: str,
    state: dict,
    rewritten: list[TablePart],
    delta: pa.Array,
    fresh: dict[str, pa.Table],
) -> tuple[dict[str, int], dict[str, pa.Table]]:
    """The prefix's digests and the rows of its new part: the ``rewritten`` parts' rows out of
    ``delta``, plus the ``fresh`` rows."""
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
    return digests, kept


def write_prefix_tables(lake, prefix: str, params: ImageParams) -> dict:
    """Bring both tables of one prefix up to date; returns counts and the prefix's data version.

    By append: the rows the index step changed (its markers) and rows still missing a variant
    become one new part. Rows new to the index are appended without looking at any part; a
    replaced row's part is read and rewritten without it (merged into the new part). Nothing
    changed: one listing and one small read. New image parameters (or no state): rebuilt."""
    state = get_json(lake, tables_state_key(prefix))
    markers, changed, new = pending_table_changes(lake, prefix, (state or {}).get("absorbed", []))
    full = _must_rebuild(lake, prefix, params, state, changed)
    missing = {} if full else _variants_found(lake, prefix, params, state)
    if not full and not changed and not missing:
        if markers:  # a commit killed before its clean-up: finish it
            finish_commit(lake, prefix, state, markers)
        return {k: state[k] for k in STATS}
    raw = _raw_index(lake, prefix)
    if full:
        return _rebuild(lake, prefix, params, raw, markers)
    delta = pa.array(sorted(changed | set(missing)), pa.string())
    fresh = _fresh_rows(lake, prefix, params, raw, delta)
    # Which parts can hold a row being replaced: those naming it as missing a variant; every
    # part when a row already in the index changed (an image seen again in a later pack).
    look_everywhere = bool(changed - new - set(missing))
    parts, rewritten = _split_parts(lake, prefix, state, delta, look_everywhere, missing)
    digests, kept = _replace_rows(lake, prefix, state, rewritten, delta, fresh)
    if kept["images"].num_rows:
        parts.append(TablePart(tables=kept))
    if sum(p.record["images"] for p in parts) != raw.num_rows:
        return _rebuild(lake, prefix, params, raw, markers)  # every index row has one table row
    return commit_parts(lake, prefix, params, compact_parts(lake, prefix, parts), digests, markers)


def main(argv: list[str] | None = None) -> int:
    """Bring each prefix's tables up to date; ``_results/<run>/tables/<pp>.json`` records counts
    and version."""
    ap = prefix_parser("update the images / objects tables of prefixes")
    add_params_args(ap)
    args = ap.parse_args(argv)
    params = params_from_args(args)
    return run_prefix_tasks(
        args, "tables", lambda lake, prefix: write_prefix_tables(lake, prefix, params)
    )


if __name__ == "__main__":
    sys.exit(main())
