"""Hash-prefix image assets: raw_images (the index), resized_images and edge_maps.

Every step takes the whole partition range of its run (``context.partition_keys``), so a
256-prefix backfill is one run and, on AWS, one Batch array job per stage.
"""


import json

import dagster as dg

from assets.packs import raw_packs
from assets.versioning import record_prefixes, version_key
from partitions import hash_prefixes
from resources.compute import ImageCompute
from resources.settings import ImageSettings
from resources.storage import LakeResource
from workloads.images import result_key
from workloads.index import build_raw_index

# Eager, except that one unreadable (failed) pack must not hold every prefix back.
prefix_automation = dg.AutomationCondition.eager().without(~dg.AutomationCondition.any_deps_missing())
single_run = dg.BackfillPolicy.single_run()


@dg.asset(
    partitions_def=hash_prefixes,
    deps=[dg.AssetDep(raw_packs, partition_mapping=dg.AllPartitionMapping())],
    backfill_policy=single_run,
    automation_condition=prefix_automation,
    code_version="1",
    group_name="images",
    kinds={"parquet"},
    description="Index of the originals whose sha256 starts with the prefix: labels, boxes and the packs they came from.",
)
def raw_images(context: dg.AssetExecutionContext, lake: LakeResource) -> dg.MaterializeResult:
    stats = build_raw_index(lake.lake(), list(context.partition_keys))
    total = sum(s["images"] for s in stats.values())
    context.log.info(f"indexed {total} originals over {len(stats)} prefixes")
    return record_prefixes(context, lake.lake(), context.asset_key, stats, ("images", "bytes"))


RESIZED = dg.AssetKey("resized_images")
EDGES = dg.AssetKey("edge_maps")
STAGE_OF = {RESIZED: "resize", EDGES: "edges"}


@dg.multi_asset(
    specs=[
        dg.AssetSpec(RESIZED, deps=[raw_images], partitions_def=hash_prefixes, code_version="2", group_name="images", kinds={"opencv"}, automation_condition=prefix_automation, skippable=True,
                     description="Every original of the prefix resized (short side N, centre crop) as JPEG, under resized/<params_id>/."),
        dg.AssetSpec(EDGES, deps=[RESIZED], partitions_def=hash_prefixes, code_version="2", group_name="images", kinds={"opencv"}, automation_condition=prefix_automation, skippable=True,
                     description="Canny edges of each resized image as PNG, under edges/<params_id>/."),
    ],
    check_specs=[
        dg.AssetCheckSpec("complete", asset=RESIZED, description="resized count = raw count in every prefix of the run"),
        dg.AssetCheckSpec("complete", asset=EDGES, description="edge map count = raw count in every prefix of the run"),
    ],
    can_subset=True,
    backfill_policy=single_run,
)
def image_stages(context: dg.AssetExecutionContext, lake: LakeResource, image_compute: ImageCompute, image_settings: ImageSettings):
    """resize and edges; fused into one pass (one download, two outputs) when both are selected."""
    store = lake.lake()
    params = image_settings.params()
    selected = [k for k in (RESIZED, EDGES) if k in context.selected_asset_keys]
    stages = [STAGE_OF[k] for k in selected]
    prefixes = list(context.partition_keys)
    run_id = context.run.run_id
    image_compute.run_image_stages(context, lake.url, run_id, stages, prefixes, params)
    for key in selected:
        stage = STAGE_OF[key]
        stats = {}
        for p in prefixes:
            rk = result_key(run_id, stage, p)
            if not store.exists(rk):
                raise dg.Failure(description=f"{stage} prefix {p}: no result record {rk} (task did not finish)")
            stats[p] = json.loads(store.get(rk))
        failed = [dict(f, prefix=p) for p, s in stats.items() for f in s["failed"]]
        for f in failed[:20]:
            context.log.warning(f"{stage} {f['prefix']}/{f['sha256']}: {f['reason']}")
        yield record_prefixes(context, store, key, stats, ("images", "processed", "skipped", "bytes_written", "seconds", "params_id"))
        raw_counts = {p: json.loads(store.get(version_key("raw_images", p)))["images"] for p in prefixes if store.exists(version_key("raw_images", p))}
        mismatched = {p: (stats[p]["images"], raw_counts.get(p, 0)) for p in prefixes if stats[p]["images"] != raw_counts.get(p, 0)}
        yield dg.AssetCheckResult(
            asset_key=key,
            check_name="complete",
            passed=not mismatched and not failed,
            metadata={"prefixes": len(prefixes), "mismatched_prefixes": json.dumps(dict(list(mismatched.items())[:20])), "failed_images": len(failed), "params_id": params.stage_id(stage)},
        )
