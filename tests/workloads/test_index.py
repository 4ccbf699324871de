"""The index and the tables by delta: after many packs absorbed in any order, in any batches,
with image stages run in between or not, they equal a from-scratch rebuild, bytes and versions."""

import csv
import io
import json
import random
import threading

import cv2
import numpy as np
import pytest

from cvgraph.demo_packs import zip_bytes
from workloads.image_params import ImageParams
from workloads.images import process_prefix
from workloads.index import build_raw_index, mark_forgotten, rebuild_raw_index
from workloads.ingest import ingest_pack
from workloads.kernels import EdgeParams, ResizeParams
from workloads.lake import LocalLake, parquet_table
from workloads.layout import PENDING_RAW, PENDING_TABLES, pending_packs, raw_index_key
from workloads.tables import read_prefix_table, write_prefix_tables
from workloads.versions import HASH_PREFIXES, sha256_hex

PARAMS = ImageParams(ResizeParams(size=16), EdgeParams())
N_PACKS = 12


def png(seed: int) -> bytes:
    img = np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    return cv2.imencode(".png", img)[1].tobytes()


def packs() -> dict[str, dict[str, bytes]]:
    """Packs that overlap: shared images under other folders, labels.csv and COCO labels that
    conflict with folder names and with each other, the same image twice in one pack."""
    rng = random.Random(7)
    out = {}
    for i in range(N_PACKS):
        members = {}
        for j in range(rng.randint(8, 20)):
            image = rng.randrange(120)  # 120 distinct images over ~170 members: many duplicates
            members[f"{rng.choice(['cat', 'dog', 'bird'])}/{j:03d}.png"] = png(image)
        names = sorted(members)
        if i % 3 == 0:
            buf = io.StringIO()
            w = csv.writer(buf)
            w.writerow(["member", "label"])
            for name in names[::2]:
                w.writerow([name, rng.choice(["fox", "owl"])])
            members["labels.csv"] = buf.getvalue().encode()
        if i % 4 == 1:
            coco = {
                "images": [{"id": k, "file_name": n} for k, n in enumerate(names[:4])],
                "categories": [{"id": 1, "name": "eye"}, {"id": 2, "name": "ear"}],
                "annotations": [
                    {"id": k, "image_id": k % 4, "category_id": 1 + k % 2, "bbox": [k, 1, 2, 3]}
                    for k in range(6)
                ],
            }
            members["annotations.json"] = json.dumps(coco).encode()
        out[f"pack{i:02d}"] = members
    return out


def table_rows(lake, name: str) -> dict[str, list[dict]]:
    """Every prefix's rows, however they are split into parts."""
    return {
        p: rows for p in HASH_PREFIXES if (rows := read_prefix_table(lake, name, p).to_pylist())
    }


def summary(stats: dict) -> dict:
    """Each prefix's index stats that a rebuild must equal."""
    return {
        p: {k: s[k] for k in ("images", "bytes", "labels", "data_version")}
        for p, s in stats.items()
    }


def scratch(tmp_path, all_packs) -> tuple[LocalLake, dict, dict]:
    """Every pack ingested, then one absorb, stages and tables: the reference."""
    lake = LocalLake(tmp_path / "scratch")
    for pack_id in sorted(all_packs):
        lake.put(f"incoming/{pack_id}.zip", zip_bytes(all_packs[pack_id]))
        ingest_pack(lake, pack_id, f"incoming/{pack_id}.zip")
    index = build_raw_index(lake, list(HASH_PREFIXES))
    busy = [p for p, s in index.items() if s["images"]]
    for p in busy:
        process_prefix(lake, p, ["resize", "edges"], PARAMS, "scratch")
    tables = {p: write_prefix_tables(lake, p, PARAMS) for p in HASH_PREFIXES}
    return lake, index, tables


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    all_packs = packs()
    return all_packs, scratch(tmp_path_factory.mktemp("ref"), all_packs)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_incremental_index_and_tables_equal_a_rebuild_in_any_order(tmp_path, reference, seed):
    all_packs, (ref, ref_index, ref_tables) = reference
    rng = random.Random(seed)
    order = sorted(all_packs)
    rng.shuffle(order)
    lake = LocalLake(tmp_path / "lake")
    absorbed_rows = 0
    for n, pack_id in enumerate(order):
        lake.put(f"incoming/{pack_id}.zip", zip_bytes(all_packs[pack_id]))
        result = ingest_pack(lake, pack_id, f"incoming/{pack_id}.zip")
        assert sum(result.prefixes.values()) == result.accepted + result.duplicates
        if rng.random() < 0.6 or n == len(order) - 1:  # packs absorbed in batches of any size
            stats = build_raw_index(lake, list(HASH_PREFIXES))
            absorbed_rows += sum(len(s["packs_merged"]) for s in stats.values())
            busy = [p for p, s in stats.items() if s["images"]]
            if rng.random() < 0.5:  # stages now or later: tables then fill variants in later
                for p in busy:
                    process_prefix(lake, p, ["resize", "edges"], PARAMS, f"r{n}")
            for p in HASH_PREFIXES:
                write_prefix_tables(lake, p, PARAMS)
    index = build_raw_index(lake, list(HASH_PREFIXES))
    busy = [p for p, s in index.items() if s["images"]]
    for p in busy:
        process_prefix(lake, p, ["resize", "edges"], PARAMS, "last")
    tables = {p: write_prefix_tables(lake, p, PARAMS) for p in HASH_PREFIXES}

    # the same index bytes as the reference, which equals a rebuild from every pack's full manifest
    rebuilt = rebuild_raw_index(ref, list(HASH_PREFIXES))
    for p in HASH_PREFIXES:
        assert lake.exists(raw_index_key(p)) == ref.exists(raw_index_key(p)), p
        if ref.exists(raw_index_key(p)):
            assert lake.get(raw_index_key(p)) == ref.get(raw_index_key(p)), p
            assert parquet_table(ref.get(raw_index_key(p))).equals(rebuilt[p]), p
    assert summary(index) == summary(ref_index)
    assert tables == ref_tables
    for name in ("images", "objects"):
        assert table_rows(lake, name) == table_rows(ref, name)
    assert sum(s["images"] for s in tables.values()) == 120 - sum(
        1
        for i in range(120)
        if not any(m == png(i) for p in all_packs.values() for m in p.values())
    )
    # every change absorbed: no pack marker left (the index steps' unrecorded marks are the
    # raw_images asset's to delete once it records them; this test calls the workload)
    assert not pending_packs(lake) and not lake.keys(PENDING_TABLES)
    assert all(k.endswith(".unrecorded") for k in lake.keys(PENDING_RAW))
    assert absorbed_rows >= N_PACKS  # each pack merged into at least one prefix


def test_a_prefix_with_nothing_pending_is_one_listing_and_one_small_read(tmp_path, reference):
    all_packs, _ = reference
    lake = LocalLake(tmp_path / "lake")
    lake.put("incoming/pack00.zip", zip_bytes(all_packs["pack00"]))
    result = ingest_pack(lake, "pack00", "incoming/pack00.zip")
    first = build_raw_index(lake, list(HASH_PREFIXES))
    touched = set(result.prefixes)
    assert {p for p, s in first.items() if s["packs_merged"]} == touched
    untouched = next(p for p in HASH_PREFIXES if p not in touched)
    lake.counters.clear()
    again = build_raw_index(lake, [sorted(touched)[0], untouched])
    assert [again[p]["packs_merged"] for p in sorted(again)] == [[], []]
    assert again[sorted(touched)[0]] == {
        **first[sorted(touched)[0]],
        "packs_merged": [],
        "changed": 0,
    }
    # per prefix: one listing of its pending markers, one read of its state (absent for the untouched)
    assert dict(lake.counters) == {
        "list": 2,
        "get": 2,
        "bytes_read": len(lake.get("index/raw/" + sorted(touched)[0] + ".json")),
    }


class Killed(Exception):
    pass


def killing_put(key_part: str):
    """``LocalLake.put`` (every lake instance's: a task's threads work on forks of its lake)
    that dies, as a killed task would, when it writes a key containing ``key_part``; after that
    every put dies (the process is gone, whichever of its threads wrote)."""
    put, dead = LocalLake.put, threading.Event()

    def dying(self, key, data):
        if dead.is_set() or key_part in key:
            dead.set()
            raise Killed(key)
        put(self, key, data)

    return dying


@pytest.mark.parametrize("dies_at", ["index/raw/", "_pending/image_tables/", "index/tables/"])
def test_a_killed_index_or_table_task_rerun_converges(tmp_path, reference, dies_at, monkeypatch):
    all_packs, (ref, _, ref_tables) = reference
    lake = LocalLake(tmp_path / "lake")
    for pack_id in sorted(all_packs):
        lake.put(f"incoming/{pack_id}.zip", zip_bytes(all_packs[pack_id]))
        ingest_pack(lake, pack_id, f"incoming/{pack_id}.zip")
    with monkeypatch.context() as m:
        m.setattr(LocalLake, "put", killing_put(dies_at))
        with pytest.raises(Killed):
            stats = build_raw_index(lake, list(HASH_PREFIXES))
            for p in [p for p, s in stats.items() if s["images"]]:
                process_prefix(lake, p, ["resize", "edges"], PARAMS, "k")
            for p in HASH_PREFIXES:
                write_prefix_tables(lake, p, PARAMS)
    stats = build_raw_index(lake, list(HASH_PREFIXES))  # the re-run
    for p in [p for p, s in stats.items() if s["images"]]:
        process_prefix(lake, p, ["resize", "edges"], PARAMS, "r")
    tables = {p: write_prefix_tables(lake, p, PARAMS) for p in HASH_PREFIXES}
    assert tables == ref_tables
    for p in HASH_PREFIXES:
        assert lake.exists(raw_index_key(p)) == ref.exists(raw_index_key(p)) and (
            not ref.exists(raw_index_key(p))
            or lake.get(raw_index_key(p)) == ref.get(raw_index_key(p))
        ), p
    for name in ("images", "objects"):
        assert table_rows(lake, name) == table_rows(ref, name)
    assert not pending_packs(lake) and not lake.keys(PENDING_TABLES)


def pngs_in_prefix(prefix: str, n: int) -> list[bytes]:
    """``n`` distinct PNGs whose sha256 starts with ``prefix``."""
    from workloads.versions import sha256_hex

    out, seed = [], 10_000
    while len(out) < n:
        data = png(seed)
        seed += 1
        if sha256_hex(data).startswith(prefix):
            out.append(data)
    return out


def test_tables_by_append_new_rows_read_no_part_replaced_rows_rewrite_theirs(tmp_path):
    import shutil

    from workloads.layout import tables_state_key

    images = pngs_in_prefix("ab", 10)
    lake = LocalLake(tmp_path / "lake")
    reads: list[str] = []
    get = lake.get
    lake.get = lambda key: reads.append(key) or get(key)

    def absorb(pack_id: str, members: dict[str, bytes]) -> dict:
        lake.put(f"incoming/{pack_id}.zip", zip_bytes(members))
        ingest_pack(lake, pack_id, f"incoming/{pack_id}.zip")
        build_raw_index(lake, ["ab"])
        process_prefix(lake, "ab", ["resize", "edges"], PARAMS, pack_id)
        reads.clear()
        return write_prefix_tables(lake, "ab", PARAMS)

    def parts() -> list[int]:
        return [p["images"] for p in json.loads(get(tables_state_key("ab")))["parts"]]

    def rebuilt() -> tuple[dict, list[dict]]:
        """The same prefix from scratch (no tables state: one part)."""
        other = LocalLake(tmp_path / f"rebuilt{len(list(tmp_path.iterdir()))}")
        shutil.copytree(lake.root, other.root)
        other.delete(tables_state_key("ab"))
        return write_prefix_tables(other, "ab", PARAMS), read_prefix_table(
            other, "images", "ab"
        ).to_pylist()

    absorb("a", {f"cat/{i}.png": data for i, data in enumerate(images[:8])})
    assert parts() == [8]
    # one new image: appended as its own part, no part read (8 > FANOUT x 1, so no compaction)
    stats = absorb("b", {"dog/new.png": images[8]})
    assert parts() == [8, 1] and not [k for k in reads if k.startswith("tables/")]
    assert (stats, read_prefix_table(lake, "images", "ab").to_pylist()) == rebuilt()
    # an image already in the lake seen again: the part holding it is rewritten, merged with the new row
    stats = absorb("c", {"bird/again.png": images[0], "bird/fresh.png": images[9]})
    assert parts() == [
        10
    ]  # [1] kept, [8] rewritten with the new rows as 9, then merged (1 <= FANOUT x 9)
    assert (
        stats["images"] == 10
        and (stats, read_prefix_table(lake, "images", "ab").to_pylist()) == rebuilt()
    )
    row = next(
        r
        for r in read_prefix_table(lake, "images", "ab").to_pylist()
        if r["sha256"] == sha256_hex(images[0])
    )
    assert row["packs"] == ["a", "c"]
    # the lake holds exactly the parts the state names: superseded ones are gone
    named = {
        f"tables/images/prefix=ab/part-{p['id']}.parquet"
        for p in json.loads(get(tables_state_key("ab")))["parts"]
    }
    assert set(lake.keys("tables/images/prefix=ab/")) == named


def test_a_table_commit_killed_before_it_drops_its_markers_appends_nothing_twice(
    tmp_path, monkeypatch
):
    images = pngs_in_prefix("cd", 3)
    lake = LocalLake(tmp_path / "lake")
    for i, data in enumerate(images):
        lake.put(f"incoming/p{i}.zip", zip_bytes({f"x/{i}.png": data}))
        ingest_pack(lake, f"p{i}", f"incoming/p{i}.zip")
        build_raw_index(lake, ["cd"])
        if i == 2:  # the third commit dies after its state, before it drops the change markers
            delete = lake.delete
            monkeypatch.setattr(
                lake,
                "delete",
                lambda key: (
                    (_ for _ in ()).throw(Killed(key))
                    if key.startswith(PENDING_TABLES)
                    else delete(key)
                ),
            )
            with pytest.raises(Killed):
                write_prefix_tables(lake, "cd", PARAMS)
            monkeypatch.undo()
        stats = write_prefix_tables(lake, "cd", PARAMS)
    assert stats["images"] == 3 and len(read_prefix_table(lake, "images", "cd")) == 3
    assert not lake.keys(f"{PENDING_TABLES}cd/")
    # the re-run finished the killed commit's clean-up: the lake holds exactly the parts the state names
    from workloads.layout import tables_state_key
    from workloads.table_parts import live_parts

    state = json.loads(lake.get(tables_state_key("cd")))
    assert set(lake.keys("tables/images/prefix=cd/")) == set(live_parts(state, "images", "cd"))


def test_rows_still_missing_a_variant_are_not_rewritten_until_one_arrives(tmp_path):
    images = pngs_in_prefix("ef", 3)
    lake = LocalLake(tmp_path / "lake")
    lake.put("incoming/p.zip", zip_bytes({f"x/{i}.png": d for i, d in enumerate(images)}))
    ingest_pack(lake, "p", "incoming/p.zip")
    build_raw_index(lake, ["ef"])
    first = write_prefix_tables(
        lake, "ef", PARAMS
    )  # no stage has run: every row lacks both variants
    assert first["missing_variants"] == 3
    reads: list[str] = []
    get = lake.get
    lake.get = lambda key: reads.append(key) or get(key)
    assert write_prefix_tables(lake, "ef", PARAMS) == first and not [
        k for k in reads if k.startswith("tables/")
    ]
    lake.get = get
    process_prefix(lake, "ef", ["resize", "edges"], PARAMS, "r")
    done = write_prefix_tables(lake, "ef", PARAMS)
    assert (
        done["missing_variants"] == 0
        and done["images"] == 3
        and done["data_version"] != first["data_version"]
    )
    assert all(
        r["resized_key"] and r["edges_key"]
        for r in read_prefix_table(lake, "images", "ef").to_pylist()
    )


def test_forgetting_packs_equals_never_having_ingested_them(tmp_path, reference):
    """Three packs forgotten (one whose labels.csv names images others hold, one whose COCO boxes
    do): the index, hash indexes, variants, originals and tables are those of a lake that only
    ever held the other packs, bytes and versions."""
    all_packs, _ = reference
    lake = LocalLake(tmp_path / "lake")
    for pack_id in sorted(all_packs):
        lake.put(f"incoming/{pack_id}.zip", zip_bytes(all_packs[pack_id]))
        ingest_pack(lake, pack_id, f"incoming/{pack_id}.zip")
    stats = build_raw_index(lake, list(HASH_PREFIXES))
    for p in [p for p, s in stats.items() if s["images"]]:
        process_prefix(lake, p, ["resize", "edges"], PARAMS, "before")
    for p in HASH_PREFIXES:
        write_prefix_tables(lake, p, PARAMS)

    gone = ["pack00", "pack01", "pack05"]
    touched = sorted({p for g in gone for p in mark_forgotten(lake, g)})
    index = build_raw_index(lake, list(HASH_PREFIXES))
    assert {p for p, s in index.items() if s["packs_dropped"]} == set(touched)
    for p in sorted({p for p, s in index.items() if s["images"]} | set(touched)):
        process_prefix(lake, p, ["resize", "edges"], PARAMS, "after")  # as plan_tasks picks them
    tables = {p: write_prefix_tables(lake, p, PARAMS) for p in HASH_PREFIXES}

    kept, kept_index, kept_tables = scratch(
        tmp_path, {k: v for k, v in all_packs.items() if k not in gone}
    )
    areas = ("raw/", "resized/", "edges/", "index/raw/", "index/resized/", "index/edges/")
    objects = lambda lk: {k: sha256_hex(lk.get(k)) for a in areas for k in lk.keys(a)}
    assert objects(lake) == objects(kept)
    assert summary(index) == summary(kept_index)
    assert tables == kept_tables
    for name in ("images", "objects"):
        assert table_rows(lake, name) == table_rows(kept, name)
    assert not pending_packs(lake) and not lake.keys(PENDING_TABLES)
