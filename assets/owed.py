"""What the lake is owed: the one definition ``cvgraph plan``, ``cvgraph sync``, the sensors and a
freeze share.

The lake's own records decide, never Dagster's partitions or run statuses (a killed run leaves
those saying anything):
- a zip in ``incoming/`` is owed an ingest unless its pack's record (``packs/<id>/pack.json``) is
  committed, its pack is being forgotten, or the lake holds a verdict on these very bytes
  (``packs/<id>/unreadable.json``: not a readable zip);
- a prefix is owed ``raw_images`` while pending markers wait for its index, the image stages
  while their records lag the index or its params (or images failed), ``image_tables`` while
  its records lag their inputs or rows lack a variant; and, once the lake holds any pack, every
  asset is owed a record of every prefix (an uninterrupted sync records all 256).

Reads: one listing of ``incoming/``, one HEAD per zip there (two for a zip with no record), one
listing each of the pending markers, one ``_versions`` object per prefix asset.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import dagster as dg

from assets.images import EDGES, RESIZED, STAGE_OF
from workloads.lake import get_json
from workloads.layout import (
    INCOMING,
    PENDING_RAW,
    PENDING_TABLES,
    marker_pack,
    pack_id_for,
    pack_keys,
    pending_raw_prefix,
    pending_tables_prefix,
    unreadable_key,
)
from workloads.planning import INPUTS, asset_records, stage_work, tables_work
from workloads.versions import HASH_PREFIXES

RAW_IMAGES = "raw_images"
PREFIX_ASSETS = (RAW_IMAGES, RESIZED.to_user_string(), EDGES.to_user_string(), "image_tables")


@dataclass(frozen=True)
class IncomingZip:
    """A zip under ``incoming/`` and what the lake says of it."""

    pack_id: str
    key: str
    bytes: int
    state: str  # "owed" | "ingested" | "forgetting" | "unreadable"
    reason: str = ""  # an unreadable zip's recorded reason


@dataclass(frozen=True)
class Owed:
    """What the lake is owed: zips to ingest, and per prefix asset the prefixes to run."""

    zips: tuple[IncomingZip, ...] = ()
    prefixes: dict[str, frozenset[str]] = field(default_factory=dict)
    # why each owed prefix is owed, per asset: "markers", "stale", "failed", "no record"
    reasons: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def packs(self) -> list[IncomingZip]:
        """The zips owed an ingest."""
        return [z for z in self.zips if z.state == "owed"]

    @property
    def all_prefixes(self) -> set[str]:
        return set().union(*self.prefixes.values()) if self.prefixes else set()

    def __bool__(self) -> bool:
        return bool(self.packs or self.all_prefixes)

    def summary(self) -> str:
        """One line: how many packs and prefixes wait."""
        parts = []
        if self.packs:
            parts.append(
                f"{len(self.packs)} pack(s) to ingest ({', '.join(z.pack_id for z in self.packs[:5])}{' ...' if len(self.packs) > 5 else ''})"
            )
        if self.all_prefixes:
            per = ", ".join(f"{a} {len(p)}" for a, p in self.prefixes.items() if p)
            parts.append(f"{len(self.all_prefixes)} prefix(es) with work owed ({per})")
        return "; ".join(parts) or "nothing owed"

    def todo(self, busy: set[str]) -> dict[str, set[str]]:
        """``{asset: owed prefixes}`` less ``busy`` (prefixes live runs hold)."""
        return {a: set(p) - busy for a, p in self.prefixes.items() if set(p) - busy}

    def why(self, todo: dict[str, set[str]]) -> str:
        """Why ``todo`` is owed, per asset, on one line."""
        return "; ".join(
            f"{a} {len(p)} prefix(es) ({', '.join(sorted({self.reasons[a][x] for x in p}))})"
            for a, p in todo.items()
        )

    def to_json(self) -> dict:
        return {
            "packs": [z.pack_id for z in self.packs],
            "prefixes": {a: sorted(p) for a, p in self.prefixes.items() if p},
        }


def zip_state(
    lake, key: str, size: int | None = None, forgetting: set[str] | None = None
) -> IncomingZip:
    """What the lake says of the zip at ``key`` (``size``: from a listing, else one HEAD):
    a HEAD of its pack's record, and if there is none a read of a verdict."""
    pack_id = pack_id_for(key)
    if size is None:
        size = lake.size(key) if lake.exists(key) else -1
    if lake.exists(pack_keys(pack_id)["record"]):
        return IncomingZip(pack_id, key, size, "ingested")
    if forgetting is None:
        forgetting = forgetting_packs(lake)
    if pack_id in forgetting:
        return IncomingZip(pack_id, key, size, "forgetting")
    verdict = get_json(lake, unreadable_key(pack_id))
    if verdict and verdict.get("bytes") == size and verdict.get("key") == key:
        return IncomingZip(pack_id, key, size, "unreadable", verdict.get("reason", ""))
    return IncomingZip(pack_id, key, size, "owed")


def forgetting_packs(lake, listed: list[str] | None = None) -> set[str]:
    """Packs being forgotten (``.forget`` markers): one listing (none with ``listed``)."""
    keys = lake.keys(PENDING_RAW) if listed is None else listed
    return {m[0] for k in keys if (m := marker_pack(k)) and m[1]}


def incoming_zips(
    lake,
    start_after: str | None = None,
    listed: list | None = None,
    forgetting: set[str] | None = None,
) -> list[IncomingZip]:
    """Every zip under ``incoming/`` (listed after ``start_after``, or the objects ``listed``)
    with its state: one listing, a HEAD or two each (``forgetting``: ``forgetting_packs``, if
    its listing was read already)."""
    objects = lake.list(INCOMING, start_after=start_after) if listed is None else listed
    zips = [
        (o.key, o.size)
        for o in objects
        if not o.key.endswith("/") and o.key.lower().endswith(".zip")
    ]
    if not zips:
        return []
    forgetting = forgetting_packs(lake) if forgetting is None else forgetting
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(lambda z: zip_state(lake, z[0], z[1], forgetting), zips))


def owed(lake, params, records: dict[str, dict] | None = None) -> Owed:
    """What ``lake`` is owed with image ``params`` (``ImageSettings.params()``); ``records``: the
    prefix assets' ``asset_records``, if read already."""
    pending = lake.keys(PENDING_RAW)
    zips = incoming_zips(lake, forgetting=forgetting_packs(lake, pending))
    # pack markers, and index changes a killed run never recorded (``unrecorded_key``)
    markers = {pending_raw_prefix(k) for k in pending}
    table_markers = {pending_tables_prefix(k) for k in lake.keys(PENDING_TABLES)}
    records = records or {a: asset_records(lake, a) for a in PREFIX_ASSETS}
    # a lake with any pack (ingested, or leaving) records every prefix of every asset
    started = bool(markers or records[RAW_IMAGES] or any(z.state == "ingested" for z in zips))
    raw = records[RAW_IMAGES]
    reasons: dict[str, dict[str, str]] = {a: {} for a in PREFIX_ASSETS}

    stage_ids = {k: params.stage_id(STAGE_OF[k]) for k in (RESIZED, EDGES)}

    def owe(asset: str, prefix: str, why: str) -> None:
        reasons[asset].setdefault(prefix, why)

    for p in HASH_PREFIXES:
        if p in markers:
            owe(RAW_IMAGES, p, "markers")
        elif started and p not in raw:
            owe(RAW_IMAGES, p, "no record")
        for key in (RESIZED, EDGES):
            asset = key.to_user_string()
            prior = records[asset].get(p)
            if p in reasons[RAW_IMAGES]:
                owe(asset, p, "index owed")
            elif stage_work(prior, raw.get(p), stage_ids[key]):
                owe(asset, p, "failed" if prior and prior.get("failed") else "stale")
            elif started and prior is None:
                owe(asset, p, "no record")
        inputs = {a: (records[a].get(p) or {}).get("data_version") for a in INPUTS}
        prior = records["image_tables"].get(p)
        if any(p in reasons[a] for a in INPUTS):
            owe("image_tables", p, "inputs owed")
        elif p in table_markers:
            owe("image_tables", p, "markers")
        elif tables_work(prior, raw.get(p), inputs):
            owe(
                "image_tables",
                p,
                "missing variants" if prior and prior.get("missing_variants") else "stale",
            )
        elif started and prior is None:
            owe("image_tables", p, "no record")
    return Owed(
        zips=tuple(zips),
        prefixes={a: frozenset(r) for a, r in reasons.items()},
        reasons=reasons,
    )


# The steps of the prefix assets (a run executing one holds its prefixes).
PREFIX_STEPS = ("raw_images", "image_stages", "image_tables")


def run_keys(todo: dict[str, set[str]]) -> list[dg.AssetKey]:
    """The assets of ``Owed.todo``, in the order a ranged run selects them."""
    return sorted((dg.AssetKey(a) for a in todo), key=lambda k: k.to_user_string())


def owed_ranges(keys: set[str]) -> list[tuple[str, str]]:
    """The single-run ranges that cover ``keys``: one, from the first to the last. A new pack
    scatters over the prefixes; a prefix in between with nothing owed costs its steps one record
    read, where a run of its own per gap would cost a Dagster run each."""
    ordered = [p for p in HASH_PREFIXES if p in keys]
    return [(ordered[0], ordered[-1])] if ordered else []
