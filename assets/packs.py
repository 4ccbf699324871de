"""raw_packs: one zip from ``incoming/`` unpacked into content-addressed originals."""

import json

import dagster as dg

from assets.versioning import md_table, request_metadata
from partitions import pack_partitions_def
from resources.compute import ImageCompute
from resources.settings import CostSettings
from resources.storage import LakeResource
from workloads.costs import ingest_estimate
from workloads.lake import get_json, read_parquet
from workloads.layout import incoming_key, pack_keys, result_key
from workloads.pack_zip import image_members
from workloads.staging import Swept
from workloads.tasks import PACK_REPLACED, PACK_UNREADABLE

PACK_KEY_TAG = "cvgraph/pack_key"


def pack_zip_key(context: dg.AssetExecutionContext, pack_id: str) -> str:
    """The zip the run's sensor saw (its tag), else the default upload key of ``pack_id``."""
    return context.run.tags.get(PACK_KEY_TAG, incoming_key(pack_id))


@dg.asset(
    partitions_def=pack_partitions_def,
    code_version="1",
    group_name="ingest",
    kinds={"python", "s3"},
    description="A pack unpacked: originals at raw/<pp>/<sha256>.<ext>, packs/<id>/manifest.parquet and rejects.parquet.",
    check_specs=[
        dg.AssetCheckSpec(
            "manifest_matches_record",
            asset="raw_packs",
            description="manifest rows = accepted + duplicates",
        )
    ],
)
def raw_packs(
    context: dg.AssetExecutionContext,
    lake: LakeResource,
    image_compute: ImageCompute,
    cost_settings: CostSettings,
):
    pack_id = context.partition_key
    key = pack_zip_key(context, pack_id)
    store = lake.lake()
    if not store.exists(key):
        raise dg.Failure(
            description=f"pack {pack_id}: {key} is not in the lake", metadata={"key": key}
        )
    # The estimate of a first ingest. A pack ingested before is hashed first and costs more only
    # if its bytes changed, which nothing knows before the hash; what is no zip fails with its
    # reason, and that is all its step says.
    members = None if store.exists(pack_keys(pack_id)["record"]) else image_members(store, key)
    estimate = {}
    if members:
        images, image_bytes = members
        estimate = cost_settings.log_estimate(
            context,
            ingest_estimate([(images, store.size(key), image_bytes)], cost_settings.rates()),
        )
    code = image_compute.run_ingest(context, lake.url, pack_id, key)
    if code == PACK_REPLACED:  # the task's record has the reason (also under packs/<id>/replaced/)
        task = get_json(store, result_key(context.run.run_id, "ingest", pack_id), {})
        reason = task.get("error", f"pack {pack_id}: {key} was replaced; refused")
        raise dg.Failure(description=reason, metadata={"pack": pack_id, "key": key})
    if code == PACK_UNREADABLE:
        reasons = read_parquet(store, pack_keys(pack_id)["rejects"]).to_pylist()
        reason = reasons[0]["reason"] if reasons else "not a readable zip"
        raise dg.Failure(
            description=f"pack {pack_id} ({key}) is {reason}",
            metadata={"pack": pack_id, "key": key, "reason": reason},
        )
    result = json.loads(store.get(pack_keys(pack_id)["record"]))
    task = get_json(store, result_key(context.run.run_id, "ingest", pack_id), {})
    swept = Swept(**task.get("swept", {"entries": 0, "bytes": 0}))
    if swept.entries:
        context.log.info(f"pack {pack_id}: {swept}")
    rejects = result["rejected"]
    for r in rejects:
        context.log.warning(f"pack {pack_id}: rejected {r['member']!r}: {r['reason']}")
    for c in result.get("label_conflicts", []):
        context.log.warning(
            f"pack {pack_id}: {c['member']!r} is labelled {c['labels']}; the index keeps {c['kept']!r}"
        )
    # The ingest record says what its manifest holds: this process reads records, not manifests.
    manifest_rows = (
        result["manifest_rows"]
        if "manifest_rows" in result
        else read_parquet(store, pack_keys(pack_id)["manifest"]).num_rows
    )
    yield dg.MaterializeResult(
        metadata={
            "key": key,
            "zip_sha256": result["zip_sha256"],
            "accepted": result["accepted"],
            "duplicates": result["duplicates"],
            "rejected": len(rejects),
            "skipped_os_junk": result["skipped"],
            "boxes_accepted": result.get("boxes", {}).get("accepted", 0),
            "boxes_rejected": result.get("boxes", {}).get("rejected", 0),
            "bytes_stored": result["bytes_stored"],
            "rejects": dg.MetadataValue.md(md_table(rejects[:50], ["member", "reason"])),
            "labels": dg.MetadataValue.md(
                md_table(
                    [{"label": k, "images": v} for k, v in result["labels"].items()],
                    ["label", "images"],
                )
            ),
            "label_conflicts": dg.MetadataValue.md(
                md_table(
                    [
                        {"member": c["member"], "labels": c["labels"], "kept": c["kept"]}
                        for c in result.get("label_conflicts", [])[:50]
                    ],
                    ["member", "labels", "kept"],
                )
            ),
            "manifest": pack_keys(pack_id)["manifest"],
            "prefixes_touched": len(result.get("prefixes", {})),
            "staging_swept": swept.entries,
            **request_metadata({}, [task]),
            **estimate,
        },
        # the zip and how it was read: another reader (new formats, rules) is another version
        data_version=dg.DataVersion(f"{result['zip_sha256'][:24]}.r{result.get('reader', 1)}"),
    )
    expected = result["accepted"] + result["duplicates"]
    split = sum(result.get("prefixes", {}).values()) if "prefixes" in result else manifest_rows
    yield dg.AssetCheckResult(
        check_name="manifest_matches_record",
        passed=manifest_rows == expected == split,
        metadata={
            "manifest_rows": manifest_rows,
            "accepted_plus_duplicates": expected,
            "rows_split_by_prefix": split,
        },
    )
