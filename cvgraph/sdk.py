"""What a data scientist imports: SQL over the tables, and freezing subsets through Dagster."""

from __future__ import annotations

import json
import os

import pyarrow as pa

from resources.catalog import ensure_select


class FreezeRefused(Exception):
    """The freeze did not happen (bad SQL, a different query under a frozen key, ...)."""


class Datasets:
    """Entry point of the SDK; the profile and CVGRAPH_HOME come from the environment."""

    def __init__(self, home: str | None = None):
        if home:
            os.environ["CVGRAPH_HOME"] = str(home)
        from orchestration import runs
        from orchestration.definitions import build_defs

        self._runs = runs
        self.definitions = build_defs()  # the profile of the environment now, not at first import
        self._resources = self.definitions.resources
        self.instance = runs.instance()

    # -- runs on the Dagster instance (what the CLI and the demo use) --------------------
    def materialize(self, keys, **kw):
        return self._runs.materialize(self.instance, keys, definitions=self.definitions, **kw)

    def tick_incoming(self, **kw):
        return self._runs.tick_incoming(self.instance, definitions=self.definitions, **kw)

    def sync(self, **kw):
        return self._runs.sync(self.instance, definitions=self.definitions, **kw)

    def ensure_partition(self, partitions_def, key: str) -> None:
        self._runs.ensure_partition(self.instance, partitions_def, key)

    @property
    def lake(self):
        return self._resources["lake"].lake()

    def sql_query(self, sql: str) -> pa.Table:
        """Run one read-only SELECT over ``images`` and ``objects``; returns an Arrow table."""
        return self._resources["catalog"].query(sql)

    def freeze_dataset(self, key: str, sql: str) -> dict:
        """Materialise the ``frozen_subsets`` partition ``key`` from ``sql``; returns its record.

        Freezing the same key with the same query again returns the same subset; a
        different query under a frozen key is refused.
        """
        from assets.subsets import frozen_subsets, subset_keys
        from partitions import subsets

        from assets.keys import check_key

        try:
            check_key("subset", key)
            ensure_select(sql)
        except ValueError as e:  # QueryRefused is a ValueError too
            raise FreezeRefused(str(e)) from None
        self.ensure_partition(subsets, key)
        run_config = {"ops": {"frozen_subsets": {"config": {"sql": sql}}}}
        try:
            self.materialize([frozen_subsets.key], partition_key=key, run_config=run_config)
        except self._runs.RunFailed as e:
            raise FreezeRefused(f"freeze of {key!r} failed: {e}") from None
        return json.loads(self.lake.get(subset_keys(key)["record"]))

    def subset(self, key: str) -> dict:
        from assets.subsets import verify_subset

        return verify_subset(self.lake, key)
