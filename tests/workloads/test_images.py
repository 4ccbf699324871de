import json

import cv2
import numpy as np

from cvgraph.demo_packs import sample_image
from workloads.image_params import ImageParams
from workloads.images import process_prefix
from workloads.index import build_raw_index
from workloads.ingest import ingest_pack
from workloads.kernels import (
    EdgeParams,
    ResizeParams,
    decode,
    edges_png,
    reduction_factor,
    resize_bytes,
)
from workloads.layout import hashes_key, output_key, result_key
from workloads.versions import HASH_PREFIXES

PHOTOS = [
    "china.jpg",
    "flower.jpg",
    "rocket.jpg",
    "retina.jpg",
    "astronaut.png",
    "coffee.png",
    "camera.png",
    "logo.png",
    "horse.png",
    "no_time_for_that_tiny.gif",
]


def ingested(lake, put_pack):
    key = put_pack("photos", {f"p/{n}": sample_image(n) for n in PHOTOS})
    ingest_pack(lake, "photos", key)
    stats = build_raw_index(lake, list(HASH_PREFIXES))
    return {p: s for p, s in stats.items() if s["images"]}


def test_resize_and_edges_fused_then_incremental(lake, put_pack):
    prefixes = ingested(lake, put_pack)
    assert sum(s["images"] for s in prefixes.values()) == len(PHOTOS)
    params = ImageParams(ResizeParams(size=48), EdgeParams())
    first = {p: process_prefix(lake, p, ["resize", "edges"], params, "run1") for p in prefixes}
    for p, recs in first.items():
        assert (
            recs["resize"]["processed"] == prefixes[p]["images"] and recs["resize"]["failed"] == []
        )
        assert recs["edges"]["processed"] == prefixes[p]["images"]
        assert json.loads(lake.get(result_key("run1", "resize", p))) == recs["resize"]
    some = next(iter(prefixes))
    reindexed = build_raw_index(lake, [some])  # index unchanged by the image stages
    rows = [o.key for o in lake.list(f"resized/{params.resize_id}/{some}/")]
    img = cv2.imdecode(np.frombuffer(lake.get(rows[0]), np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (48, 48, 3)
    edges = cv2.imdecode(
        np.frombuffer(
            lake.get(
                rows[0]
                .replace("resized/" + params.resize_id, "edges/" + params.edges_id)
                .replace(".jpg", ".png")
            ),
            np.uint8,
        ),
        cv2.IMREAD_UNCHANGED,
    )
    assert edges.shape == (48, 48) and set(np.unique(edges)) <= {0, 255}
    # second run: nothing to do, same versions, same bytes
    before = {o.key: lake.get(o.key) for o in lake.list("resized/")}
    again = {p: process_prefix(lake, p, ["resize", "edges"], params, "run2") for p in prefixes}
    for p in prefixes:
        assert (
            again[p]["resize"]["processed"] == 0
            and again[p]["resize"]["skipped"] == prefixes[p]["images"]
        )
        assert again[p]["resize"]["data_version"] == first[p]["resize"]["data_version"]
        assert again[p]["edges"]["data_version"] == first[p]["edges"]["data_version"]
    assert {o.key: lake.get(o.key) for o in lake.list("resized/")} == before
    assert reindexed[some]["data_version"] == prefixes[some]["data_version"]


def test_separate_stages_give_the_same_bytes_as_fused(lake, put_pack, tmp_path):
    from workloads.lake import LocalLake

    prefixes = ingested(lake, put_pack)
    params = ImageParams(ResizeParams(size=40), EdgeParams())
    for p in prefixes:
        process_prefix(lake, p, ["resize", "edges"], params, "fused")
    fused = {o.key: lake.get(o.key) for o in lake.list("edges/")}
    for k in fused:
        lake.delete(k)
    for p in prefixes:  # the hash index is the record of what is done: it goes with the outputs
        lake.delete(hashes_key("edges", params, p))
        process_prefix(lake, p, ["edges"], params, "edges-only")
    assert {o.key: lake.get(o.key) for o in lake.list("edges/")} == fused
    assert isinstance(lake, LocalLake)


def test_modes_are_normalised_alpha_on_white_gray_to_color():
    logo = sample_image("logo.png")  # RGBA with transparent background
    img = decode(logo, "PNG", 500, 500, 64)
    assert img.shape == (500, 500, 3) and img.dtype == np.uint8
    assert tuple(img[0, 0]) == (255, 255, 255)  # transparent corner composited on white
    gray = decode(sample_image("camera.png"), "PNG", 512, 512, 64)
    assert gray.shape == (512, 512, 3)
    gif = decode(sample_image("no_time_for_that_tiny.gif"), "GIF", 14, 25, 8)
    assert gif.shape[2] == 3


def test_dct_scaled_decode_covers_the_target_with_room_for_the_area_resize():
    assert reduction_factor(3000, 2000, 224) == 8  # 250 px: 1/8 needs only to cover
    assert reduction_factor(3000, 2000, 256) == 2  # 1/8 does not cover, 1/4 leaves 500 px < 2 x 256
    assert reduction_factor(1500, 1000, 126) == 2  # 1/8 gives 125 px; 1/4's 250 px < 2 x 126
    assert reduction_factor(2400, 1600, 200) == 8 and reduction_factor(2400, 1600, 201) == 2
    assert reduction_factor(640, 427, 64) == 2
    assert reduction_factor(640, 427, 300) == 1
    china = sample_image("china.jpg")  # 640x427
    img = decode(china, "JPEG", 640, 427, 64, fast=True)
    assert img.shape == (214, 320, 3)


def test_output_keys_are_namespaced_by_params():
    a, b = ImageParams(ResizeParams(size=64)), ImageParams(ResizeParams(size=32))
    assert output_key("resize", a, "ab", "x") != output_key("resize", b, "ab", "x")
    assert output_key("edges", a, "ab", "x").startswith(f"edges/{a.edges_id}/ab/")


def test_hash_index_matches_outputs_and_heals_after_a_killed_run(lake, put_pack):
    from workloads.variant_hashes import read_hashes
    from workloads.versions import sha256_hex

    prefixes = ingested(lake, put_pack)
    params = ImageParams(ResizeParams(size=32), EdgeParams())
    p = max(prefixes, key=lambda k: prefixes[k]["images"])
    process_prefix(lake, p, ["resize", "edges"], params, "h1")
    for stage in ("resize", "edges"):
        hashes = read_hashes(lake, stage, params, p)
        outputs = {
            o.key.rsplit("/", 1)[1].split(".")[0]: sha256_hex(lake.get(o.key))
            for o in lake.list(
                output_key(stage, params, p, "")[: -len(".jpg" if stage == "resize" else ".png")]
            )
        }
        assert hashes == outputs and len(hashes) == prefixes[p]["images"]
    # a run killed after writing outputs but before its index update: the next run re-hashes them
    lake.delete(hashes_key("resize", params, p))
    process_prefix(lake, p, ["resize", "edges"], params, "h2")
    assert len(read_hashes(lake, "resize", params, p)) == prefixes[p]["images"]


def test_edge_maps_are_1_bit_pngs_that_decode_to_the_canny_output():
    params = EdgeParams()
    for size in (33, 64, 97):  # odd widths: 1-bit rows are padded to whole bytes
        resized = resize_bytes(sample_image("coffee.png"), "PNG", 600, 400, ResizeParams(size=size))
        png = edges_png(resized, params)
        assert png[24:26] == b"\x01\x00"  # IHDR: bit depth 1, grayscale
        gray = cv2.imdecode(np.frombuffer(resized, np.uint8), cv2.IMREAD_GRAYSCALE)
        expected = cv2.Canny(gray, params.low, params.high)
        assert 0 < int(expected.astype(bool).sum()) < size * size
        assert np.array_equal(
            cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED), expected
        )


def test_a_prefix_in_shards_then_merged_equals_the_prefix_in_one_task(tmp_path):
    import shutil

    from cvgraph.demo_packs import zip_bytes
    from workloads.images import main as images_main
    from workloads.lake import LocalLake
    from workloads.tasks import shard_tasks
    from workloads.versions import sha256_hex

    assert shard_tasks({"ab": 7, "cd": 3, "ef": 0}, 3) == [
        "ab.0of3",
        "ab.1of3",
        "ab.2of3",
        "cd",
        "ef",
    ]
    pngs, seed = [], 0
    while len(pngs) < 7:  # seven images in prefix "ab"
        data = cv2.imencode(
            ".png", np.random.default_rng(seed).integers(0, 256, (20, 30, 3), dtype=np.uint8)
        )[1].tobytes()
        seed += 1
        if sha256_hex(data).startswith("ab"):
            pngs.append(data)
    one = LocalLake(tmp_path / "one")
    one.put("incoming/p.zip", zip_bytes({f"x/{i}.png": d for i, d in enumerate(pngs)}))
    ingest_pack(one, "p", "incoming/p.zip")
    build_raw_index(one, ["ab"])
    sharded = LocalLake(tmp_path / "sharded")
    shutil.copytree(one.root, sharded.root)
    params = ImageParams(ResizeParams(size=16), EdgeParams())
    whole = process_prefix(one, "ab", ["resize", "edges"], params, "r")

    cli = ["--lake", str(sharded.root), "--run-id", "r", "--size", "16"]
    assert images_main([*cli, "--prefixes", "ab.0of3,ab.1of3,ab.2of3"]) == 0
    shard_records = [
        json.loads(sharded.get(result_key("r", "resize", f"ab.{s}of3"))) for s in range(3)
    ]
    assert sum(r["processed"] for r in shard_records) == 7 and all(
        r["processed"] < 7 for r in shard_records
    )
    assert not sharded.exists(hashes_key("resize", params, "ab"))  # not done until merged
    assert images_main([*cli, "--merge", "--prefixes", "ab"]) == 0
    assert (
        images_main([*cli, "--merge", "--prefixes", "ab"]) == 0
    )  # a retried merge child: the same record
    for stage in ("resize", "edges"):
        merged = json.loads(sharded.get(result_key("r", stage, "ab")))
        drop = lambda r: {k: v for k, v in r.items() if k not in ("seconds", "requests", "shards")}
        assert drop(merged) == drop(whole[stage]) and merged["shards"] == 3
        assert sharded.get(hashes_key(stage, params, "ab")) == one.get(
            hashes_key(stage, params, "ab")
        )
        assert not [
            k
            for k in sharded.keys(hashes_key(stage, params, "ab")[: -len(".parquet")])
            if ".shard-" in k
        ]  # deltas folded in
    for key in one.keys("resized/") + one.keys("edges/"):
        assert sharded.get(key) == one.get(key), key
    # the next run finds the merged prefix done
    again = process_prefix(sharded, "ab", ["resize", "edges"], params, "r2")
    assert again["resize"]["processed"] == 0 and again["edges"]["skipped"] == 7


def test_a_stage_result_record_reads_back_as_written_and_an_empty_one_has_no_counts():
    """``StageResult``: the record a task writes last reads back whole (a merged prefix's
    ``shards`` and its requests too); an empty prefix's is the version of no images."""
    from workloads.images import StageResult, empty_stage_record
    from workloads.versions import prefix_version

    params = ImageParams()
    shas = ["ab" + "0" * 62, "ab" + "1" * 62]
    rec = StageResult.of(
        prefix="ab",
        stage="resize",
        params=params,
        present=shas,
        processed=1,
        skipped=1,
        failed=[
            {"sha256": "ab" + "f" * 62, "reason": "x"},
            {"sha256": "ab" + "2" * 62, "reason": "y"},
        ],
        bytes_written=10,
        seconds=0.5,
        shards=2,
    )
    written = {**rec.to_json(), "requests": {"get": 3, "put": 2}}
    back = StageResult.from_json(json.loads(json.dumps(written)))
    assert back.to_json() == written and back.shards == 2 and back.requests == {"get": 3, "put": 2}
    assert [f["reason"] for f in back.failed] == ["y", "x"]  # by sha256
    assert back.data_version == prefix_version(shas, params.stage_id("resize"))
    assert empty_stage_record("edges", params, "00") == {
        "prefix": "00",
        "stage": "edges",
        "params_id": params.stage_id("edges"),
        "images": 0,
        "processed": 0,
        "skipped": 0,
        "failed": [],
        "bytes_written": 0,
        "seconds": 0.0,
        "data_version": prefix_version([], params.stage_id("edges")),
    }
