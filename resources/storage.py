"""Object store role: the lake (a local directory or an S3 bucket/prefix)."""

from __future__ import annotations

import dagster as dg
from pydantic import PrivateAttr

from workloads.lake import open_lake


class LakeResource(dg.ConfigurableResource):
    """The lake at ``url``: a directory (local profile) or ``s3://bucket/prefix`` (aws profile)."""

    url: str
    endpoint_url: str | None = None

    _lake = PrivateAttr(default=None)

    def lake(self):
        if self._lake is None:
            self._lake = open_lake(self.url, endpoint_url=self.endpoint_url)
        return self._lake
