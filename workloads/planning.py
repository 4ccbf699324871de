"""What a prefix owes each stage, from the lake's records: the decisions the Dagster steps, the
plan, the owed sensor and a chain task (``workloads.chain``) all make, written once.

Dagster-free: a Batch child decides with the same functions the orchestrator does, so a chain
task runs exactly the image and table work the steps after it would have run.
"""

from __future__ import annotations

import json

from workloads.lake import get_many
from workloads.layout import legacy_versions_dir, marker_pack, pack_keys, versions_key

# The prefix assets whose records a table row's inputs are.
INPUTS = ("raw_images", "resized_images", "edge_maps")
# The image stages and the asset each records.
STAGE_ASSETS = {"resize": "resized_images", "edges": "edge_maps"}


def tagged_records(lake, asset: str) -> tuple[dict[str, dict], str | None]:
    """(``{prefix: record}`` of ``_versions/<asset>.json``, the object's tag). A lake written
    before the records were one object per asset has ``_versions/<asset>/<pp>.json``: read those
    until the first update folds them in."""
    data, tag = lake.get_tagged(versions_key(asset))
    if data is not None:
        return json.loads(data)["prefixes"], tag
    legacy = get_many(lake, {o.key: o.key for o in lake.list(legacy_versions_dir(asset))})
    return {rec["prefix"]: rec for rec in legacy.values()}, None


def asset_records(lake, asset: str) -> dict[str, dict]:
    """The recorded ``_versions`` of every materialised prefix of ``asset``: one read."""
    return tagged_records(lake, asset)[0]


def stage_work(prior: dict | None, raw: dict | None, params_id: str) -> bool:
    """Whether a prefix's stage must run: its images or params changed since it last ran, or
    images failed then."""
    if prior is None:
        return bool(raw and raw["images"])
    return (
        prior.get("inputs") != {"raw_images": (raw or {}).get("data_version")}
        or prior["params_id"] != params_id
        or bool(prior.get("failed"))  # (a record a bench wrote by hand has none)
    )


def pending_count(prior: dict | None, raw: dict | None, params_id: str) -> int:
    """Images of a prefix a stage has still to make, from its records (the stage's own count
    leaves out images that failed)."""
    images = (raw or {}).get("images", 0)
    return (
        images
        if prior is None or prior["params_id"] != params_id
        else max(0, images - prior["images"])
    )


def tables_work(prior: dict | None, raw: dict | None, inputs: dict) -> bool:
    """A prefix's tables change only when an input's version did, or rows still lack a variant."""
    if prior is None:
        return bool((raw or {}).get("images"))
    return prior.get("inputs") != inputs or bool(prior.get("missing_variants"))


def new_rows(prior: dict | None, raw: dict | None) -> int:
    """Rows a prefix's tables are to gain (its originals not in them yet)."""
    return max(0, (raw or {}).get("images", 0) - (prior or {}).get("images", 0))


def images_owed(stages: dict[str, dict | None], raw: dict | None, params) -> tuple[bool, int]:
    """(whether the image stages of a prefix must run, the images the most behind of them has
    to make): ``stages`` maps each selected stage to the prefix's record of it (None: never
    recorded), ``raw`` is its ``raw_images`` record, ``params`` the ``ImageParams``."""
    work = any(stage_work(prior, raw, params.stage_id(s)) for s, prior in stages.items())
    pending = max(pending_count(prior, raw, params.stage_id(s)) for s, prior in stages.items())
    return work, pending


def stage_inputs(raw: dict | None) -> dict:
    """The inputs an image stage's record names: the index version it was made from."""
    return {"raw_images": (raw or {}).get("data_version")}


def table_inputs(records: dict[str, dict | None]) -> dict:
    """The inputs an ``image_tables`` record names: ``records`` of the prefix, by asset."""
    return {a: (records.get(a) or {}).get("data_version") for a in INPUTS}


def arriving_rows(lake, pending: list[str]) -> tuple[dict[str, dict[str, int]], dict[str, float]]:
    """(``{prefix: {pack: rows}}`` the committed pending packs bring, the mean stored bytes of an
    original of each), from the pending markers' keys ``pending`` (one listing of
    ``PENDING_RAW``, made by the caller) and one record read per pack."""
    found = {m for k in pending if (m := marker_pack(k))}
    forgotten = {p for p, forgetting in found if forgetting}
    ids = {p for p, forgetting in found if not forgetting} - forgotten
    records = get_many(lake, {p: pack_keys(p)["record"] for p in ids})
    arriving: dict[str, dict[str, int]] = {}
    for pack_id, rec in records.items():
        for prefix, rows in rec.get("prefixes", {}).items():
            arriving.setdefault(prefix, {})[pack_id] = rows
    mean = {p: rec["bytes_stored"] / max(1, rec["accepted"]) for p, rec in records.items()}
    return arriving, mean
