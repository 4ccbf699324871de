"""Table writer role: bring the ``images`` / ``objects`` rows of prefixes up to date from the
lake's per-prefix records. Each writer leaves a result record per prefix
(``_results/<run>/tables/<pp>.json``); the step reads those."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod

import dagster as dg

from resources.compute import ImageCompute, tables_command
from workloads.image_params import ImageParams
from workloads.layout import result_key


class TableWriter(dg.ConfigurableResource, ABC):
    def writes_in_chain(self) -> bool:
        """Whether a chain task (``workloads.chain``, the image compute's) may write the tables:
        only when this writer is that workload."""
        return False

    @abstractmethod
    def run(
        self,
        context: dg.AssetExecutionContext,
        lake,
        lake_url: str,
        run_id: str,
        prefixes: list[str],
        params: ImageParams,
        groups: list[list[str]] | None = None,
    ) -> None:
        """Update both tables of ``prefixes``; each prefix's result record is its commit marker.
        ``groups``: the prefixes a remote task each (``ImageCompute.run_prefix_tasks``)."""


class PyArrowTableWriter(TableWriter):
    """``python -m workloads.tables`` over the prefixes, where the image compute runs its tasks
    (local processes, or Batch array children): the step reads none of the tables' data."""

    compute: ImageCompute

    def writes_in_chain(self) -> bool:
        return True

    def run(self, context, lake, lake_url, run_id, prefixes, params, groups=None):
        self.compute.run_prefix_tasks(
            context,
            "tables",
            lambda shard: tables_command(lake_url, run_id, shard, params),
            prefixes,
            run_id,
            groups,
        )


def write_results(lake, run_id: str, stats: dict[str, dict]) -> None:
    """Result records for prefixes whose tables were written in this process (the Spark writer)."""
    for prefix, s in stats.items():
        lake.put(
            result_key(run_id, "tables", prefix),
            json.dumps({"prefix": prefix, "stage": "tables", **s}, sort_keys=True).encode(),
        )
