"""Partition definitions, and nothing else."""

import dagster as dg

from workloads.versions import HASH_PREFIXES

# image assets: one partition per sha256 prefix, 00 ... ff
hash_prefix_partitions_def = dg.StaticPartitionsDefinition(list(HASH_PREFIXES))
pack_partitions_def = dg.DynamicPartitionsDefinition(name="packs")
subset_partitions_def = dg.DynamicPartitionsDefinition(name="subsets")
model_partitions_def = dg.DynamicPartitionsDefinition(name="models")
# a model scored on a subset: one partition per (model, subset) pair
evaluation_partitions_def = dg.MultiPartitionsDefinition(
    {"model": model_partitions_def, "subset": subset_partitions_def}
)
