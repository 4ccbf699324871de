"""The parts a prefix's tables are stored in, and their commit.

New rows are appended as a part, parts are compacted size-tiered, and the prefix's tables state
(``index/tables/<pp>.json``) is the commit point: readers take the parts it names, and what it
no longer names is dropped after it is written.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc

from workloads.image_params import ImageParams
from workloads.lake import read_parquet, write_parquet
from workloads.layout import part_key, table_dir, tables_state_key
from workloads.table_rows import (
    ADDED_COLUMNS,
    ROWS_VERSION,
    SORT_KEYS,
    TABLES,
    rows_digest,
    sort_rows,
    tables_version,
)
from workloads.versions import sha256_hex, table_hash

# Parts per prefix: new rows are appended as a part; a part is merged into the one before it
# when that one is at most FANOUT times bigger (size-tiered, so each row is rewritten
# O(log rows) times and a prefix has O(log rows) parts), and never more than MAX_PARTS.
FANOUT = 2
MAX_PARTS = 16


def live_parts(state: dict | None, table: str, prefix: str) -> list[str]:
    """The keys a reader of ``table`` takes for ``prefix``: the parts its state names (an
    object the state does not name is a killed write's leftover or a superseded part)."""
    if not state:
        return []
    parts = state.get("parts") or [
        {"id": "0", "images": state.get("images", 0), "objects": state.get("objects", 0)}
    ]
    return [part_key(table, prefix, p["id"]) for p in parts if p[table]]


def read_part(lake, key: str, table: str) -> pa.Table:
    """A part's rows in today's columns (one written before a column was added: its default)."""
    part = read_parquet(lake, key)
    for name, value in ADDED_COLUMNS.get(table, {}).items():
        if name not in part.schema.names:
            column = pa.array([value] * part.num_rows, TABLES[table].field(name).type)
            part = part.append_column(name, column)
    return part.select(TABLES[table].names).cast(TABLES[table])


class TablePart:
    """One part of a prefix: an existing one (its state record, rows read on demand) or a new
    one (its rows, written at commit)."""

    def __init__(self, record: dict | None = None, tables: dict[str, pa.Table] | None = None):
        self.new = tables is not None
        self.tables = None
        if self.new:
            self.tables = {name: sort_rows(tables[name], SORT_KEYS[name]) for name in TABLES}
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
                name: read_part(lake, part_key(name, prefix, self.record["id"]), name)
                if self.record[name]
                else TABLES[name].empty_table()
                for name in TABLES
            }
        return self.tables


def _merged(lake, prefix: str, parts: list[TablePart]) -> TablePart:
    return TablePart(
        tables={
            name: pa.concat_tables([p.load(lake, prefix)[name] for p in parts]) for name in TABLES
        }
    )


def compact_parts(lake, prefix: str, parts: list[TablePart]) -> list[TablePart]:
    """Merge the newest part into the one before while that one is at most FANOUT times bigger."""
    while len(parts) > 1 and (
        parts[-2].record["images"] <= FANOUT * parts[-1].record["images"] or len(parts) > MAX_PARTS
    ):
        parts[-2:] = [_merged(lake, prefix, parts[-2:])]
    return parts


def commit_parts(
    lake,
    prefix: str,
    params: ImageParams,
    parts: list[TablePart],
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
        "rows_version": ROWS_VERSION,
    }
    lake.put(tables_state_key(prefix), json.dumps(state, sort_keys=True).encode())
    finish_commit(lake, prefix, state, markers)
    return stats


def finish_commit(lake, prefix: str, state: dict, markers: list[str]) -> None:
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
    parts = [TablePart(tables={"images": images, "objects": objects})] if images.num_rows else []
    return commit_parts(
        lake,
        prefix,
        params,
        parts,
        {"images": rows_digest(images), "objects": rows_digest(objects)},
        markers,
    )
