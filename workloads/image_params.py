"""The image stages' parameters: the ids that name their outputs and versions, and the
command-line flags that carry them to a workload (``ImageParams.cli_args`` writes what
``add_params_args`` reads).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from workloads.versions import params_id

# Part of every params id: a change that alters output bytes gets new output directories.
# 2: the 1/2 decode needs a 2x margin, 1/4 dropped; edge maps as 1-bit PNG.
KERNEL_VERSION = 2
# Images a prefix task's stages make at once (threads overlap their reads and writes): the
# workloads' --threads, the local pool's and the Batch client's default.
IMAGE_THREADS = 4


@dataclass(frozen=True)
class ResizeParams:
    size: int = 64  # short side, then centre-cropped to size x size
    jpeg_quality: int = 90


@dataclass(frozen=True)
class EdgeParams:
    low: int = 50
    high: int = 150


@dataclass(frozen=True)
class ImageParams:
    resize: ResizeParams = field(default_factory=ResizeParams)
    edges: EdgeParams = field(default_factory=EdgeParams)

    @property
    def resize_id(self) -> str:
        return params_id(
            {"stage": "resize", "kernel": KERNEL_VERSION, **dataclasses.asdict(self.resize)}
        )

    @property
    def edges_id(self) -> str:
        return params_id(
            {"stage": "edges", "resize": self.resize_id, **dataclasses.asdict(self.edges)}
        )

    def stage_id(self, stage: str) -> str:
        return self.resize_id if stage == "resize" else self.edges_id

    def cli_args(self) -> list[str]:
        r, e = self.resize, self.edges
        return [
            "--size",
            str(r.size),
            "--jpeg-quality",
            str(r.jpeg_quality),
            "--edge-low",
            str(e.low),
            "--edge-high",
            str(e.high),
        ]


def add_params_args(ap: argparse.ArgumentParser) -> None:
    """The image parameters (``ImageParams.cli_args`` writes them)."""
    ap.add_argument("--size", type=int, default=ResizeParams.size)
    ap.add_argument("--jpeg-quality", type=int, default=ResizeParams.jpeg_quality)
    ap.add_argument("--edge-low", type=int, default=EdgeParams.low)
    ap.add_argument("--edge-high", type=int, default=EdgeParams.high)


def params_from_args(args: argparse.Namespace) -> ImageParams:
    return ImageParams(
        ResizeParams(args.size, args.jpeg_quality), EdgeParams(args.edge_low, args.edge_high)
    )
