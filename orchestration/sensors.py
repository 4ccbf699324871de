"""Sensors: new zips under ``incoming/`` become ``packs`` partitions and ingest runs."""

import json
import time

import dagster as dg

from assets.owed import incoming_zips, zip_state
from assets.packs import PACK_KEY_TAG, raw_packs
from orchestration.liveness import held
from partitions import pack_partitions_def
from resources.events import IncomingListing, PackEvents
from resources.storage import LakeResource
from workloads.layout import INCOMING


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


image_automation = dg.AutomationConditionSensorDefinition(
    "image_automation",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=10,
    description="Carries new packs through raw_images → resized_images/edge_maps → image_tables, as ranged runs.",
)
