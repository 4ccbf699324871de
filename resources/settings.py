"""Image parameter set: one resource so every stage agrees on the ``params_id``; how big one
task of image work may get; and the rates and prices that estimate a step's cost."""

from __future__ import annotations

import dagster as dg

from workloads.costs import Estimate, Prices, Rates, summary_line
from workloads.image_params import EdgeParams, ImageParams, ResizeParams


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


class CostSettings(dg.ConfigurableResource):
    """The rates and prices estimates use (``workloads.costs``): a plan, and each step's first log
    line and metadata; and how prefix tasks are grouped into Batch array children."""

    images_per_vcpu_s: float = Rates.images_per_vcpu_s
    task_start_s: float = Rates.task_start_s
    task_vcpus: float = Rates.task_vcpus
    task_memory_gb: float = Rates.task_memory_gb
    child_work_s: float = Rates.child_work_s
    max_children: int = Rates.max_children
    prefix_task_s: float = Rates.prefix_task_s
    record_speedup: float = Rates.record_speedup
    vcpu_hour_usd: float = Prices.vcpu_hour
    gb_hour_usd: float = Prices.gb_hour
    s3_put_per_1000_usd: float = Prices.s3_put_per_1000
    s3_get_per_1000_usd: float = Prices.s3_get_per_1000

    def rates(self) -> Rates:
        return Rates(
            images_per_vcpu_s=self.images_per_vcpu_s,
            task_start_s=self.task_start_s,
            task_vcpus=self.task_vcpus,
            task_memory_gb=self.task_memory_gb,
            child_work_s=self.child_work_s,
            max_children=self.max_children,
            prefix_task_s=self.prefix_task_s,
            record_speedup=self.record_speedup,
        )

    def prices(self) -> Prices:
        return Prices(
            self.vcpu_hour_usd, self.gb_hour_usd, self.s3_put_per_1000_usd, self.s3_get_per_1000_usd
        )

    def log_estimate(self, context, est: Estimate) -> dict:
        """Log ``est`` as the step's first line; returns its metadata."""
        context.log.info(f"estimate {summary_line(est, self.prices(), self.rates())}")
        data = est.to_json(self.prices(), self.rates())
        return {"estimate": dg.MetadataValue.json(data), "estimated_usd": data["usd"]}
