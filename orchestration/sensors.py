"""Sensors: zips under ``incoming/`` with no committed pack become ingest runs; prefixes the lake
is owed work for become ranged runs (``assets.owed``, the definition plan and sync share); packs
the labeller's export has not scored become ``pack_predictions`` runs."""

import hashlib
import json
import time

import dagster as dg

from assets.images import image_stages, raw_images
from assets.owed import PREFIX_STEPS, incoming_zips, owed, owed_ranges, run_keys, zip_state
from assets.packs import PACK_KEY_TAG, raw_packs
from assets.predictions import pack_predictions
from assets.tables import image_tables
from orchestration.liveness import RANGE_TAGS, held, held_prefixes
from partitions import pack_partitions_def
from resources.events import IncomingListing, PackEvents
from resources.labeller import Labeller, LabellerExport, LabellerRefused
from resources.settings import ImageSettings
from resources.storage import LakeResource
from workloads.lake import get_many
from workloads.layout import INCOMING, pack_keys
from workloads.predictions import pack_version, predictions_version, scored_packs


def new_packs(
    lake, instance: dg.DagsterInstance, cursor: str | None
) -> tuple[list[tuple[str, str]], str | None]:
    """(pack id, key) of zips listed after ``cursor`` that the lake is owed an ingest for (no
    committed pack record: ``assets.owed``) and no live run is ingesting, and the new
    cursor. Whatever partitions exist: a tick killed after adding them loses no pack."""
    listed = list(lake.list(INCOMING, start_after=cursor or None))
    zips = incoming_zips(lake, listed=listed)
    busy = held(instance).get(raw_packs.node_def.name, set()) if zips else set()
    found = [(z.pack_id, z.key) for z in zips if z.state == "owed" and z.pack_id not in busy]
    return found, listed[-1].key if listed else cursor


def attempt_key(instance: dg.DagsterInstance, pack_id: str, key: str) -> str:
    """The run key of an ingest of ``key``: the key, then ``key#<n>`` after n ended attempts (the
    daemon launches a run key once; a pack whose run died is owed another)."""
    ended = instance.get_runs_count(
        dg.RunsFilter(
            tags={"dagster/partition": pack_id},
            statuses=[dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED],
        )
    )
    return f"{key}#{ended}" if ended else key


def pack_sensor_result(
    context: dg.SensorEvaluationContext,
    found: list[tuple[str, str]],
    cursor: str,
    source: str,
    replaced: list[tuple[str, str, str]] = (),
) -> dg.SensorResult:
    """Each new (pack id, key): a ``packs`` partition and an ingest run (run key = object key).
    Each (pack id, key, ETag) of an event for an ingested pack's key: an ingest run, a no-op for
    the same bytes and a recorded refusal for others (run key = key@ETag: once per upload)."""
    if found:
        context.log.info(f"new packs from {source}: {[p for p, _ in found]}")
    if replaced:
        context.log.info(f"ingested packs' keys written again: {[k for _, k, _ in replaced]}")

    def request(pack_id: str, key: str, run_key: str) -> dg.RunRequest:
        return dg.RunRequest(
            run_key=run_key,
            partition_key=pack_id,
            asset_selection=[raw_packs.key],
            tags={PACK_KEY_TAG: key},
        )

    return dg.SensorResult(
        run_requests=[request(p, k, attempt_key(context.instance, p, k)) for p, k in found]
        + [request(p, k, f"{k}@{etag}") for p, k, etag in replaced],
        dynamic_partitions_requests=[pack_partitions_def.build_add_request([p for p, _ in found])]
        if found
        else [],
        cursor=cursor,
    )


def parse_cursor(raw: str | None) -> dict:
    return json.loads(raw) if raw else {"after": None, "full_listing_at": 0.0}


@dg.sensor(
    name="incoming_packs",
    minimum_interval_seconds=10,
    default_status=dg.DefaultSensorStatus.RUNNING,
    asset_selection=[raw_packs],
    description="Lists incoming/ (in full every relist period, else after the last key seen); each new .zip becomes a packs partition and an ingest run.",
)
def incoming_packs_sensor(
    context: dg.SensorEvaluationContext, lake: LakeResource, incoming_listing: IncomingListing
) -> dg.SensorResult:
    cursor = parse_cursor(context.cursor)
    now = time.time()
    # Listing after the last key seen misses keys that sort before it (S3 lists in key order).
    full = now - cursor["full_listing_at"] >= incoming_listing.relist_seconds
    found, last = new_packs(lake.lake(), context.instance, None if full else cursor["after"])
    if full:
        cursor["full_listing_at"] = now
    if last is not None and (cursor["after"] is None or last > cursor["after"]):
        cursor["after"] = last
    return pack_sensor_result(context, found, json.dumps(cursor, sort_keys=True), "the listing")


@dg.sensor(
    name="incoming_packs_sqs",
    minimum_interval_seconds=10,
    default_status=dg.DefaultSensorStatus.RUNNING,
    asset_selection=[raw_packs],
    description="Drains S3 event notifications for incoming/ from SQS; the listing sensor stays as a safety net.",
)
def incoming_packs_sqs_sensor(
    context: dg.SensorEvaluationContext, lake: LakeResource, pack_events: PackEvents
) -> dg.SensorResult:
    # Messages received last tick are deleted now: the cursor that carried their receipts was
    # only stored after Dagster recorded that tick's run requests.
    previous = json.loads(context.cursor) if context.cursor else {"delete": []}
    if previous["delete"]:
        pack_events.delete(previous["delete"])
    store = lake.lake()
    lake_prefix = (
        f"{store.prefix}/" if getattr(store, "prefix", "") else ""
    )  # keys in events are bucket keys
    messages = pack_events.receive()
    busy = held(context.instance).get(raw_packs.node_def.name, set()) if messages else set()
    seen: set[tuple[str, str]] = set()
    found: list[tuple[str, str]] = []
    replaced: list[tuple[str, str, str]] = []
    for msg in messages:
        for _bucket, s3_key, etag in msg["objects"]:
            key = (
                s3_key[len(lake_prefix) :]
                if lake_prefix and s3_key.startswith(lake_prefix)
                else s3_key
            )
            if (
                (key, etag) in seen
                or not key.startswith(INCOMING)
                or not key.lower().endswith(".zip")
            ):
                continue
            seen.add((key, etag))  # a multipart upload can notify twice
            if key in {k for _, k in found}:
                continue
            z = zip_state(store, key)
            if z.state == "owed" and z.pack_id not in busy:
                found.append((z.pack_id, key))
            elif z.state == "ingested" and etag:  # other bytes are refused, the same a no-op
                replaced.append((z.pack_id, key, etag))
    return pack_sensor_result(
        context,
        found,
        json.dumps({"delete": [m["receipt"] for m in messages]}),
        "S3 events",
        replaced,
    )


# A round whose owed work is what the last tick requested, once those runs have ended, waits
# before the same runs are requested again: 30 s, doubling, at most an hour (failed images, a
# failing worker).
RETRY_BASE_S, RETRY_MAX_S = 30, 3600


@dg.sensor(
    name="owed_prefixes",
    minimum_interval_seconds=10,
    default_status=dg.DefaultSensorStatus.RUNNING,
    asset_selection=[raw_images, image_stages, image_tables],
    description="Runs what the lake is owed (the definition `cvgraph plan` and `cvgraph sync` share): the prefix assets over the owed prefixes no live run holds, as ranged runs.",
)
def owed_prefixes_sensor(
    context: dg.SensorEvaluationContext, lake: LakeResource, image_settings: ImageSettings
) -> dg.SensorResult | dg.SkipReason:
    owes = owed(lake.lake(), image_settings.params())
    taken = held(context.instance)
    ingesting = taken.get(raw_packs.node_def.name, set())
    if ingesting:  # their markers come before their records: index them once they commit
        return dg.SkipReason(f"{len(ingesting)} pack(s) being ingested: prefixes after them")
    todo = owes.todo(held_prefixes(taken, PREFIX_STEPS))
    if not todo:
        return dg.SkipReason(
            "nothing owed" if not owes.all_prefixes else "owed prefixes are held by live runs"
        )
    cursor = json.loads(context.cursor) if context.cursor else {}
    signature = hashlib.sha256(
        json.dumps({a: sorted(p) for a, p in todo.items()}, sort_keys=True).encode()
    ).hexdigest()[:16]
    now = time.time()
    tries = cursor.get("tries", 0) if cursor.get("signature") == signature else 0
    wait = min(RETRY_MAX_S, RETRY_BASE_S * 2 ** max(0, tries - 1)) if tries else 0
    if now - cursor.get("at", 0.0) < wait:
        return dg.SkipReason(
            f"still owed after {tries} round(s): {owes.why(todo)}; again in {wait:.0f} s"
        )
    keys = run_keys(todo)
    requests = [
        dg.RunRequest(asset_selection=keys, tags=dict(zip(RANGE_TAGS, rng)))
        for rng in owed_ranges(set().union(*todo.values()))
    ]
    context.log.info(f"owed: {owes.why(todo)}; {len(requests)} ranged run(s)")
    return dg.SensorResult(
        run_requests=requests,
        cursor=json.dumps({"signature": signature, "tries": tries + 1, "at": now}),
    )


def pack_changes(instance: dg.DagsterInstance, after: str | None) -> tuple[set[str], str | None]:
    """Packs whose ``raw_packs`` was materialised after the event-log cursor ``after`` (new
    packs, and packs ingested again: a new reader is a new pack version), and the new cursor."""
    changed: set[str] = set()
    while True:
        result = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=raw_packs.key), limit=1000, cursor=after, ascending=True
        )
        changed |= {r.partition_key for r in result.records if r.partition_key}
        after = result.cursor or after
        if not result.has_more:
            return changed, after


def owed_predictions(
    lake, instance: dg.DagsterInstance, export: LabellerExport, changed: set[str]
) -> dict[str, str]:
    """``{pack: data version}`` of the packs ``export`` has not scored: those the scored packs
    (one read) do not hold, hold as scored by another export, or that ``changed``; each pack's
    version from its record (read for those only). A pack with no committed record yet is
    owed nothing (its ingest is not done)."""
    scored = scored_packs(lake)
    candidates = [
        p
        for p in instance.get_dynamic_partitions(pack_partitions_def.name)
        if p not in scored or scored[p]["onnx_sha256"] != export.onnx_sha256 or p in changed
    ]
    records = get_many(lake, {p: pack_keys(p)["record"] for p in candidates})
    owed = {}
    for p, record in sorted(records.items()):
        version = predictions_version(pack_version(record), export.onnx_sha256)
        if scored.get(p, {}).get("data_version") != version:
            owed[p] = version
    return owed


@dg.sensor(
    name="pack_predictions",
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    asset_selection=[pack_predictions],
    description="Scores every pack the labeller (CVGRAPH_LABELLER) has not scored with its champion's export: new packs, and every pack when the champion changes (the data version is f(pack, export)).",
)
def pack_predictions_sensor(
    context: dg.SensorEvaluationContext, lake: LakeResource, labeller: Labeller
) -> dg.SensorResult | dg.SkipReason:
    store = lake.lake()
    cursor = json.loads(context.cursor) if context.cursor else {"after": None, "changed": []}
    try:
        export = labeller.export(store)
    except LabellerRefused as e:  # no labeller, or no export to score with: one line says so
        return dg.SkipReason(str(e))
    changed, after = pack_changes(context.instance, cursor["after"])
    changed |= set(cursor["changed"])
    owed = owed_predictions(store, context.instance, export, changed)
    busy = held(context.instance).get(pack_predictions.node_def.name, set()) if owed else set()
    todo = {p: v for p, v in owed.items() if p not in busy}
    # a changed pack stays in the cursor until it is scored (its run may fail)
    new_cursor = json.dumps({"after": after, "changed": sorted(changed & set(owed))})
    if not todo:
        why = "being scored by live runs" if owed else "scored"
        return dg.SensorResult(
            skip_reason=f"every pack is {why} ({export.note})", cursor=new_cursor
        )
    context.log.info(f"{len(todo)} pack(s) to score with {export.note}: {sorted(todo)[:20]}")
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=attempt_key(context.instance, p, f"predictions:{p}@{v}"),
                partition_key=p,
                asset_selection=[pack_predictions.key],
            )
            for p, v in todo.items()
        ],
        cursor=new_cursor,
    )
