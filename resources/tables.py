"""Table writer role: rebuild the ``images`` / ``objects`` rows of prefixes from the lake's
per-prefix records (the raw index and the variants present)."""

from __future__ import annotations

from abc import ABC, abstractmethod

import dagster as dg

from workloads.images import ImageParams
from workloads.tables import write_prefix_tables


class TableWriter(dg.ConfigurableResource, ABC):
    @abstractmethod
    def write(self, lake, prefixes: list[str], params: ImageParams) -> dict[str, dict]:
        """Write both tables for ``prefixes``; ``{prefix: {images, objects, missing_variants, data_version}}``."""


class PyArrowTableWriter(TableWriter):
    """One Parquet file per prefix and table, written by pyarrow in this process."""

    def write(self, lake, prefixes, params):
        return {p: write_prefix_tables(lake, p, params) for p in prefixes}
