"""``cvgraph plan``: what a sync or a backfill would do, told before it runs, against what the
runs then did (their counted lake requests, their images, their own first log lines)."""

import json
import subprocess
import sys

import dagster as dg
import pytest

from cvgraph.demo_packs import build_digits_pack
from workloads.costs import Rates

# A sync's run selects every prefix asset: its index step starts the chain tasks that index,
# make the images and write the tables; each asset's step still counts its tasks' requests.
CHAIN_ASSETS = ["raw_images", "resized_images", "edge_maps", "image_tables"]


def _stage(plan: dict, name: str) -> dict:
    return next(s for s in plan["stages"] if s["stage"] == name)


def _runs(inst, assets: list[str]) -> dict[str, dict]:
    """{run id: metadata of the run's materialisation} of ``assets`` (a ranged run gives each
    partition the range's metadata: one per run and asset counts)."""
    out: dict[str, dict] = {}
    for a in assets:
        for r in inst.fetch_materializations(dg.AssetKey(a), limit=10_000).records:
            out.setdefault(r.run_id, {}).setdefault(a, r.asset_materialization.metadata)
    return out


def _requests(inst, assets: list[str]) -> int:
    return sum(
        m["lake_requests"].value for run in _runs(inst, assets).values() for m in run.values()
    )


def _close(estimated: float, counted: float, within: float = 0.02) -> bool:
    return abs(estimated - counted) <= within * counted


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CVGRAPH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CVGRAPH_LAKE_URL", raising=False)
    # this home's instance, and the suite's back after (orchestration.instance sets the variable;
    # a delenv of an unset one would not be undone)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home" / "dagster"))
    return tmp_path / "home"


def test_a_plan_says_what_the_sync_then_does(home, tmp_path):
    from cvgraph.sdk import Datasets

    pack = tmp_path / "digits.zip"
    members = build_digits_pack(pack)
    ds = Datasets()
    ds.upload(pack)

    # Not ingested: the zip's central directory says how many images; nothing ran.
    before = ds.plan()
    assert [p["pack_id"] for p in before["packs_to_ingest"]] == ["digits"]
    assert before["packs_to_ingest"][0]["images"] == members
    assert _stage(before, "ingest")["tasks"] == 1
    assert _stage(before, "ingest")["images"] == members
    assert not ds.instance.get_runs()

    ds.tick_incoming()
    rec = ds.record("pack", "digits")
    assert rec["accepted"] == members
    assert _close(_stage(before, "ingest")["requests_total"], _requests(ds.instance, ["raw_packs"]))
    # The ingest step logged the same estimate first, and put it in its metadata.
    (ingest_run,) = ds.instance.get_runs()
    first = next(
        e.user_message for e in ds.instance.all_logs(ingest_run.run_id) if e.dagster_event is None
    )
    assert first.startswith("estimate ingest: ")
    assert f"{members:,} images" in first

    # Ingested, not indexed: exactly the prefixes the pack's rows are in, and its images.
    plan = ds.plan()
    assert plan["packs_to_index"] == ["digits"] and plan["packs_to_ingest"] == []
    touched = len(rec["prefixes"])
    # one chain task a prefix (index, both image stages, tables) in Batch children of about a
    # minute of work each (the default rates: a prefix's records, faster many prefixes at a
    # time, and its images); the prefixes past the suite's shard
    # threshold are only indexed there: their shards, merges and tables are the image and table
    # steps' own tasks
    chain, images, tables = (_stage(plan, s) for s in ("chain", "images", "tables"))
    sharded = images["prefixes"]
    assert 0 < sharded < touched and tables["prefixes"] == sharded
    assert chain["prefixes"] == touched and chain["images"] + images["images"] == members
    r = Rates()
    work = (
        touched * r.record_task_s
        + (touched - sharded) * 2 * r.record_task_s
        + chain["images"] / r.images_per_vcpu_s
    )
    assert chain["tasks"] == -(-work // r.child_work_s) < touched
    assert [s["stage"] for s in plan["stages"] if s["tasks"]] == ["chain", "images", "tables"]

    ds.sync()
    inst = ds.instance
    estimated = sum(s["requests_total"] for s in (chain, images, tables))
    assert _close(estimated, _requests(inst, CHAIN_ASSETS))
    # Each step's own estimate (first log line, metadata) is the plan's: the index step's the
    # chain, the image step's its shard tasks and merges, the table step's the sharded prefixes.
    (run,) = _runs(inst, CHAIN_ASSETS).values()
    for asset, stage in (
        ("raw_images", chain),
        ("resized_images", images),
        ("image_tables", tables),
    ):
        step = run[asset]["estimate"].value
        for k in ("stage", "images", "tasks", "prefixes", "requests_total"):
            assert step[k] == stage[k], (asset, k)
    processed = sum(
        m["range_processed"].value
        for r in _runs(inst, ["resized_images"]).values()
        for m in r.values()
    )
    assert processed == members

    # Up to date: nothing to do, and it says so.
    after = ds.plan()
    assert after["total"]["tasks"] == 0 and after["total"]["usd"] == 0
    from cvgraph.plan import render

    assert "nothing to do" in render(after)


def test_a_backfill_plan_covers_its_prefixes_only(home, tmp_path, monkeypatch):
    from cvgraph.sdk import Datasets

    pack = tmp_path / "digits.zip"
    build_digits_pack(pack)
    ds = Datasets()
    ds.ingest(pack)
    ds.sync()
    raw = json.loads(ds.lake.get("_versions/raw_images.json"))["prefixes"]

    # Another image size: every prefix's variants are to be made again, and a backfill of
    # 00-3f makes those of its 64 prefixes.
    monkeypatch.setenv("CVGRAPH_IMAGE_SIZE", "48")
    runs = len(ds.instance.get_runs())
    plan = Datasets().plan("00-3f")
    assert plan["scope"] == "backfill of 64 prefixes"
    images = _stage(plan, "images")
    assert images["images"] == sum(r["images"] for p, r in raw.items() if p <= "3f")
    assert images["prefixes"] == sum(1 for p, r in raw.items() if p <= "3f" and r["images"])
    assert _stage(plan, "chain")["tasks"] == 0 and _stage(plan, "ingest")["tasks"] == 0
    # a plan runs and writes nothing
    assert len(ds.instance.get_runs()) == runs
    assert json.loads(ds.lake.get("_versions/raw_images.json"))["prefixes"] == raw


def test_plan_cli_names_a_bad_range_in_one_line(home):
    out = subprocess.run(
        [sys.executable, "-m", "cvgraph.cli", "plan", "--prefixes", "00-zz"],
        check=False,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1
    assert (
        out.stderr.strip() == "Error: --prefixes '00-zz': '00-zz' is no prefix or range of 00..ff"
    )
    done = subprocess.run(
        [sys.executable, "-m", "cvgraph.cli", "plan"], capture_output=True, text=True, check=True
    )
    assert "nothing to do" in done.stdout
