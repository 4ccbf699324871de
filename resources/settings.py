"""Image parameter set: one resource so every stage agrees on the ``params_id``; and how big
one task of image work may get."""

from __future__ import annotations

import dagster as dg

from workloads.image_params import ImageParams
from workloads.kernels import EdgeParams, ResizeParams


class ImageSettings(dg.ConfigurableResource):
    size: int = ResizeParams.size
    jpeg_quality: int = ResizeParams.jpeg_quality
    edge_low: int = EdgeParams.low
    edge_high: int = EdgeParams.high
    # A prefix with more pending images than this is split into (prefix, shard) tasks of about
    # this many: a Batch child's work stays bounded whatever a backfill holds.
    shard_images: int = 20_000

    def params(self) -> ImageParams:
        return ImageParams(
            ResizeParams(self.size, self.jpeg_quality), EdgeParams(self.edge_low, self.edge_high)
        )
