"""What ``cvgraph plan`` says a sync of a new pack costs, by pack size: ``python -m bench.plan_costs``.

For each pack (100 of scikit-learn's digits; the demo's two packs, 1,812 images; a zip of
250,000 members) uploaded into a new lake, the plan of the sync on the local profile and with
the aws profile's image compute (each image stage an array job of its own): Batch tasks,
vCPU-hours, wall time and dollars, per stage and in all. Nothing runs; the plan reads the zips'
central directories. The 250,000-member zip is made here, each member 100 KB of zeros deflated:
its counts and declared sizes are a real pack's, but the zip itself is small, so its ingest
line reads 60 MB where a real one reads 25 GB (the ingest is one task per pack, whatever the
grouping of prefix tasks)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from bench.common import REPO, log

SIZES = ("100", "demo", "250000")


def _packs(which: str, root: Path) -> list[Path]:
    from cvgraph.demo_packs import build_digits_pack, build_photos_pack, digit_members, zip_bytes

    if which == "100":
        path = root / "digits100.zip"
        path.write_bytes(zip_bytes(digit_members(size=96, limit=100)))
        return [path]
    if which == "demo":
        build_digits_pack(root / "digits.zip")
        build_photos_pack(root / "photos.zip")
        return [root / "digits.zip", root / "photos.zip"]
    path, blob = root / "big.zip", bytes(100_000)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for i in range(int(which)):
            zf.writestr(f"images/class{i % 10}/{i:06d}.jpg", blob)
    return [path]


def one(which: str) -> dict:
    """The plans of ``which`` (a new home: run in a process of its own)."""
    import dagster as dg

    from cvgraph.plan import plan
    from cvgraph.sdk import Datasets
    from resources.batch import BatchArrayClient

    ds = Datasets()
    for p in _packs(which, Path(os.environ["CVGRAPH_HOME"])):
        ds.upload(p)
    local = ds.plan()
    batch = BatchArrayClient(job_queue="q", job_definition="d")  # only its split is used
    aws = plan(
        ds.instance,
        dg.Definitions(resources={**ds.definitions.resources, "image_compute": batch}),
    )
    keep = ("stage", "images", "tasks", "vcpu_hours", "wall_s", "usd")
    return {
        name: {
            "stages": [{k: s.get(k) for k in keep} for s in p["stages"]],
            "total": {k: p["total"].get(k) for k in keep},
            "lines": p["lines"],
        }
        for name, p in (("local", local), ("aws", aws))
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", choices=SIZES, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help="write the figures here as JSON")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one)))
        return
    out = {}
    for which in SIZES:
        with tempfile.TemporaryDirectory(prefix="plan-") as home:
            env = {
                **os.environ,
                "CVGRAPH_HOME": home,
                "DAGSTER_HOME": f"{home}/dagster",
                "CVGRAPH_PROFILE": "local",
            }
            env.pop("CVGRAPH_LAKE_URL", None)
            done = subprocess.run(
                [sys.executable, "-m", "bench.plan_costs", "--one", which],
                env=env,
                cwd=REPO,
                capture_output=True,
                text=True,
                check=True,
            )
            out[which] = json.loads(done.stdout.strip().splitlines()[-1])
        for profile in ("local", "aws"):
            t = out[which][profile]["total"]
            wall = f"{t['wall_s'] / 60:.1f} min wall" if t["wall_s"] is not None else "no wall"
            log(
                f"{which} images ({profile}): {t['tasks']} tasks, {t['vcpu_hours']} vCPU-h, {wall}, ${t['usd']}"
            )
            for line in out[which][profile]["lines"]:
                log(f"    {line}")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
