"""One module per stage; asset checks live beside their assets."""

import warnings

import dagster as dg

# Single-run backfills (backfill_policy) are a Dagster beta that cvgraph relies on by design:
# the warning each prefix asset raises as it loads tells no one running cvgraph anything.
warnings.filterwarnings("ignore", message="Parameter `backfill_policy`", category=dg.BetaWarning)
# So are dagster-mlflow's hook and the (model, subset) partition mapping of evaluations.
warnings.filterwarnings(
    "ignore", message="Function `_create_mlflow_run_hook`", category=dg.BetaWarning
)
warnings.filterwarnings(
    "ignore", message="Class `MultiToSingleDimensionPartitionMapping`", category=dg.BetaWarning
)
