"""``workloads.chain``: one task for a prefix's index, images and tables makes what the three
workloads make one after the other, decides from the records as the steps do, leaves sharded
prefixes to the steps, and a chain killed anywhere then run again converges."""

import json

import pytest
from test_index import PARAMS, Killed, killing_put, packs, pngs_in_prefix

from assets.versioning import version_record, write_prefix_records
from cvgraph.demo_packs import zip_bytes
from workloads.chain import run_chain
from workloads.images import process_prefix
from workloads.index import index_task
from workloads.ingest import ingest_pack
from workloads.lake import LocalLake
from workloads.layout import result_key
from workloads.planning import stage_inputs, table_inputs
from workloads.tables import write_prefix_tables
from workloads.tasks import prefix_results
from workloads.versions import HASH_PREFIXES

VOLATILE = ("seconds", "requests")


def ingested(path, all_packs: dict) -> LocalLake:
    lake = LocalLake(path)
    for pack_id in sorted(all_packs):
        lake.put(f"incoming/{pack_id}.zip", zip_bytes(all_packs[pack_id]))
        ingest_pack(lake, pack_id, f"incoming/{pack_id}.zip")
    return lake


def objects(lake) -> dict[str, bytes]:
    """Every object but the run's result records and the packs' (their seconds differ)."""
    return {
        k: lake.get(k)
        for k in lake.keys("")
        if not k.startswith("_results/") and not k.endswith("/pack.json")
    }


def results(lake, run_id: str, stage: str) -> dict[str, dict]:
    out = {}
    for p in HASH_PREFIXES:
        if lake.exists(key := result_key(run_id, stage, p)):
            out[p] = {k: v for k, v in json.loads(lake.get(key)).items() if k not in VOLATILE}
    return out


def three_workloads(lake, run_id: str) -> None:
    """What the index, image and table steps' tasks do on a lake with no records yet: every
    prefix indexed, the ones with images made and their tables written."""
    index = prefix_results(lake, run_id, "index", list(HASH_PREFIXES), index_task)
    busy = [p for p, r in index.items() if r["images"]]
    for p in busy:
        process_prefix(lake, p, ["resize", "edges"], PARAMS, run_id)
    prefix_results(
        lake, run_id, "tables", busy, lambda lake, p: write_prefix_tables(lake, p, PARAMS)
    )


def record(lake, run_id: str, prefixes: list[str]) -> None:
    """The records the steps write from this run's results (as ``assets.images``/``tables`` do)."""
    found = {s: results(lake, run_id, s) for s in ("index", "resize", "edges", "tables")}
    raw = {p: version_record(r, ("stage",)) for p, r in found["index"].items()}
    write_prefix_records(lake, "raw_images", raw)
    stages = {}
    for stage, asset in (("resize", "resized_images"), ("edges", "edge_maps")):
        stages[asset] = {
            p: version_record(r, inputs=stage_inputs(raw.get(p))) for p, r in found[stage].items()
        }
        write_prefix_records(lake, asset, stages[asset])
    write_prefix_records(
        lake,
        "image_tables",
        {
            p: version_record(
                r,
                inputs=table_inputs(
                    {"raw_images": raw.get(p), **{a: s.get(p) for a, s in stages.items()}}
                ),
            )
            for p, r in found["tables"].items()
        },
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    all_packs = packs()
    lake = ingested(tmp_path_factory.mktemp("three") / "lake", all_packs)
    three_workloads(lake, "r")
    return all_packs, lake


def test_a_chain_makes_what_the_three_workloads_make(tmp_path, reference):
    all_packs, ref = reference
    lake = ingested(tmp_path / "lake", all_packs)
    ran = run_chain(lake, "r", list(HASH_PREFIXES), PARAMS, threads=2, shard_images=10_000)
    assert objects(lake) == objects(ref)
    for stage in ("index", "resize", "edges", "tables"):
        assert results(lake, "r", stage) == results(ref, "r", stage), stage
    busy = sorted(results(ref, "r", "resize"))
    assert ran == {"index": list(HASH_PREFIXES), "images": busy, "tables": busy}


def test_a_chain_decides_from_the_records_as_the_steps_do(tmp_path, reference):
    """With the records written, a new pack: only the prefixes whose index changed get images
    and tables; an up-to-date prefix only its index (one listing)."""
    all_packs, _ = reference
    lake = ingested(tmp_path / "lake", all_packs)
    run_chain(lake, "r1", list(HASH_PREFIXES), PARAMS, threads=2, shard_images=10_000)
    record(lake, "r1", list(HASH_PREFIXES))
    new = {f"new/{i}.png": png for i, png in enumerate(pngs_in_prefix("a7", 2))}
    lake.put("incoming/late.zip", zip_bytes(new))
    ingest_pack(lake, "late", "incoming/late.zip")
    ran = run_chain(lake, "r2", list(HASH_PREFIXES), PARAMS, threads=2, shard_images=10_000)
    assert ran["images"] == ["a7"] and ran["tables"] == ["a7"]
    assert results(lake, "r2", "resize")["a7"]["processed"] == 2


def test_a_prefix_past_the_shard_threshold_is_only_indexed(tmp_path, reference):
    all_packs, ref = reference
    lake = ingested(tmp_path / "lake", all_packs)
    counts = {p: r["images"] for p, r in results(ref, "r", "index").items() if r["images"]}
    threshold = sorted(counts.values())[len(counts) // 2]
    ran = run_chain(lake, "r", list(HASH_PREFIXES), PARAMS, threads=2, shard_images=threshold)
    big = {p for p, n in counts.items() if n > threshold}
    assert big and set(ran["images"]) == set(counts) - big == set(ran["tables"])
    assert set(results(lake, "r", "resize")) == set(counts) - big
    assert len(results(lake, "r", "index")) == len(HASH_PREFIXES)


def test_a_chain_without_tables_leaves_them_to_their_writer(tmp_path, reference):
    all_packs, _ = reference
    lake = ingested(tmp_path / "lake", all_packs)
    ran = run_chain(
        lake, "r", list(HASH_PREFIXES), PARAMS, threads=2, shard_images=10_000, tables=False
    )
    assert ran["tables"] == [] and not results(lake, "r", "tables") and ran["images"]


def test_prefix_tasks_at_once_count_each_prefixs_requests_as_one_at_a_time(tmp_path, reference):
    """A task runs its prefixes' index and table parts 8 at a time, each thread on a fork of the
    lake: the lake, every result record (its requests too) and the lake's own request counts are
    what one prefix at a time gives."""
    all_packs, _ = reference
    got = {}
    for threads in (1, 8):
        lake = ingested(tmp_path / f"t{threads}", all_packs)
        before = dict(lake.counters)
        for stage, task in (
            ("index", index_task),
            ("tables", lambda lake, p: write_prefix_tables(lake, p, PARAMS)),
        ):
            prefix_results(lake, "r", stage, list(HASH_PREFIXES), task, threads=threads)
        records = {s: results(lake, "r", s) for s in ("index", "tables")}
        requests = {
            s: {p: json.loads(lake.get(result_key("r", s, p)))["requests"] for p in records[s]}
            for s in records
        }
        # (bytes aside: the result records hold their seconds)
        counted = {k: v for k, v in lake.counters.since(before).items() if "bytes" not in k}
        got[threads] = (records, requests, counted, objects(lake))
    assert got[8] == got[1]
    assert len(got[1][0]["index"]) == len(HASH_PREFIXES)


def killed_chain(lake, dies_at: str, monkeypatch) -> LocalLake:
    """``lake`` after a chain of run "k" died at its first write of a key holding ``dies_at``."""
    with monkeypatch.context() as m:
        m.setattr(LocalLake, "put", killing_put(dies_at))
        with pytest.raises(Killed):
            run_chain(lake, "k", list(HASH_PREFIXES), PARAMS, threads=2, shard_images=10_000)
    return lake


@pytest.mark.parametrize(
    "dies_at", ["index/raw/", "_results/k/index/", "resized/", "index/edges/", "index/tables/"]
)
def test_a_killed_chain_run_again_converges(tmp_path, reference, dies_at, monkeypatch):
    """Killed at a write of its index, its images, their hash index or its tables, a chain run
    again (a new run, as a retried Batch child or the next sync) makes the reference's lake."""
    all_packs, ref = reference
    lake = killed_chain(ingested(tmp_path / "lake", all_packs), dies_at, monkeypatch)
    run_chain(lake, "r", list(HASH_PREFIXES), PARAMS, threads=2, shard_images=10_000)
    assert objects(lake) == objects(ref)


@pytest.mark.parametrize("dies_at", ["_results/k/index/", "resized/", "index/tables/"])
def test_a_retried_chain_goes_on_from_its_last_attempt(tmp_path, reference, dies_at, monkeypatch):
    """The same run's task again (Batch's retry of a reclaimed child, the pool's re-run of a
    killed worker): the parts with a result record are kept as the first attempt wrote them (the
    index's merged packs, which the index step's record and clean-up go by), the rest is done."""
    all_packs, ref = reference
    lake = killed_chain(ingested(tmp_path / "lake", all_packs), dies_at, monkeypatch)
    first = results(lake, "k", "index")
    run_chain(lake, "k", list(HASH_PREFIXES), PARAMS, threads=2, shard_images=10_000)
    assert objects(lake) == objects(ref)
    assert results(lake, "k", "index") == results(ref, "r", "index")
    assert {p: r for p, r in results(lake, "k", "index").items() if p in first} == first
    assert results(lake, "k", "tables") == results(ref, "r", "tables")
    assert set(results(lake, "k", "edges")) == set(results(ref, "r", "edges"))
