"""Partition definitions, and nothing else."""

import dagster as dg

from workloads.versions import HASH_PREFIXES

hash_prefixes = dg.StaticPartitionsDefinition(list(HASH_PREFIXES))
packs = dg.DynamicPartitionsDefinition(name="packs")
subsets = dg.DynamicPartitionsDefinition(name="subsets")
models = dg.DynamicPartitionsDefinition(name="models")
