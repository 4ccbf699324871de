"""training_shards: a frozen subset's images as WebDataset tar shards, the input a training
streams (a derived cache of the subset, which itself stays zero-copy and immutable)."""

import dagster as dg
from pydantic import Field

from assets.keys import require_key
from assets.subsets import frozen_subsets, verify_subset
from partitions import subset_partitions_def
from resources.compute import ImageCompute, WorkloadFailed, shards_command
from resources.storage import LakeResource
from workloads.lake import get_json
from workloads.layout import VARIANT_COLUMNS, shard_keys
from workloads.training.shards import TARGET_BYTES

TARGET_MB = TARGET_BYTES / 1e6


class ShardsConfig(dg.Config):
    variant: str = Field("resized", description="the image variant the shards hold")
    target_mb: float = Field(
        TARGET_MB, description="each shard's size, MB (AWS: 100-200 MB objects stream best)"
    )


def ensure_shards(
    context: dg.AssetExecutionContext,
    compute: ImageCompute,
    lake: LakeResource,
    subset: str,
    variant: str,
    target_mb: float = TARGET_MB,
    record: dict | None = None,
) -> dict:
    """The index of ``subset``'s ``variant`` shards: the lake's, if it is of the manifest frozen
    now and of this size, else written by a workload job (Batch on AWS) first. ``record``: the
    subset's, if the caller verified it already (else it is verified here)."""
    store = lake.lake()
    if variant not in VARIANT_COLUMNS:
        raise dg.Failure(
            description=f"variant {variant!r}: expected one of {', '.join(VARIANT_COLUMNS)}"
        )
    try:
        record = record or verify_subset(store, subset)
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise dg.Failure(description=f"subset {subset!r} is not usable: {e}") from None
    keys = shard_keys(subset, variant)
    target = int(target_mb * 1e6)
    index = get_json(store, keys["index"])
    if not (
        index
        and index["manifest_sha256"] == record["manifest_sha256"]
        and index["target_bytes"] == target
    ):
        context.log.info(f"writing the {variant} shards of subset {subset}")
        try:
            compute.run_job(
                context, "shards", subset, shards_command(lake.url, subset, variant, target_mb)
            )
        except WorkloadFailed as e:
            raise dg.Failure(description=f"shards of subset {subset}: {e}") from None
        index = get_json(store, keys["index"])
        if not index or index["manifest_sha256"] != record["manifest_sha256"]:
            raise dg.Failure(description=f"shards of subset {subset}: the job left no index")
    return index


def shards_metadata(index: dict) -> dict:
    splits = index["splits"]
    return {
        "variant": index["variant"],
        "images": sum(s["count"] for s in splits.values()),
        "shards": sum(len(s["shards"]) for s in splits.values()),
        "bytes": sum(e["bytes"] for s in splits.values() for e in s["shards"]),
        "per_split": dg.MetadataValue.json(
            {k: {"images": s["count"], "shards": len(s["shards"])} for k, s in splits.items()}
        ),
        "skipped": dg.MetadataValue.json(index["skipped"]),
    }


@dg.asset(
    partitions_def=subset_partitions_def,
    deps=[frozen_subsets],
    code_version="1",
    group_name="datasets",
    kinds={"webdataset", "batch"},
    description="The subset's images as WebDataset tar shards (~150 MB, per split, each image "
    "with its sha256), the input a training streams: subsets/<key>/shards/<variant>/.",
)
def training_shards(
    context: dg.AssetExecutionContext,
    config: ShardsConfig,
    lake: LakeResource,
    image_compute: ImageCompute,
) -> dg.MaterializeResult:
    subset = require_key("subset", context.partition_key)
    index = ensure_shards(context, image_compute, lake, subset, config.variant, config.target_mb)
    return dg.MaterializeResult(
        metadata=shards_metadata(index),
        data_version=dg.DataVersion(
            index["manifest_sha256"][:16] + f"-{config.variant}-{index['target_bytes']}"
        ),
    )
