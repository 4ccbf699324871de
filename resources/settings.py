"""Image parameter set: one resource so every stage agrees on the ``params_id``; how big one
task of image work may get; and the rates and prices that estimate a step's cost."""

from __future__ import annotations

import dagster as dg
from pydantic import Field

from workloads.costs import Estimate, Prices, Rates, summary_line
from workloads.image_params import EdgeParams, ImageParams, ResizeParams


class ImageSettings(dg.ConfigurableResource):
    size: int = Field(
        ResizeParams.size, description="resized short side = crop size (part of params_id)"
    )
    jpeg_quality: int = Field(
        ResizeParams.jpeg_quality, description="resized JPEG quality (part of params_id)"
    )
    edge_low: int = Field(
        EdgeParams.low, description="Canny low threshold (part of the edges params_id)"
    )
    edge_high: int = Field(
        EdgeParams.high, description="Canny high threshold (part of the edges params_id)"
    )
    # (a Batch child's work stays bounded whatever a backfill holds)
    shard_images: int = Field(
        20_000,
        description="a prefix with more pending images runs as (prefix, shard) tasks of about this many",
    )

    def params(self) -> ImageParams:
        return ImageParams(
            ResizeParams(self.size, self.jpeg_quality), EdgeParams(self.edge_low, self.edge_high)
        )


class CostSettings(dg.ConfigurableResource):
    """The rates and prices estimates use (``workloads.costs``): a plan, and each step's first log
    line and metadata; and how prefix tasks are grouped into Batch array children."""

    images_per_vcpu_s: float = Field(
        Rates.images_per_vcpu_s, description="images one vCPU resizes and edge-maps per second"
    )
    task_start_s: float = Field(
        Rates.task_start_s, description="a Batch task's start (image pull, Python), billed"
    )
    task_vcpus: float = Field(Rates.task_vcpus, description="one worker task's vCPUs")
    task_memory_gb: float = Field(Rates.task_memory_gb, description="one worker task's memory")
    child_work_s: float = Field(
        Rates.child_work_s,
        description="seconds of work a Batch array child takes (one child when the work is less)",
    )
    max_children: int = Field(
        Rates.max_children,
        description="array children at most: what the compute environment runs at once",
    )
    prefix_task_s: float = Field(
        Rates.prefix_task_s, description="a prefix task's work besides its images: its records"
    )
    record_speedup: float = Field(
        Rates.record_speedup,
        description="how much faster a prefix's index or table part is in a task that runs many at once",
    )
    vcpu_hour_usd: float = Field(Prices.vcpu_hour, description="USD per vCPU-hour")
    gb_hour_usd: float = Field(Prices.gb_hour, description="USD per GB-hour")
    s3_put_per_1000_usd: float = Field(
        Prices.s3_put_per_1000, description="USD per 1,000 S3 PUT, COPY, POST and LIST requests"
    )
    s3_get_per_1000_usd: float = Field(
        Prices.s3_get_per_1000, description="USD per 1,000 S3 GET requests"
    )

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
