"""The manifest's `objects` column (each image's boxes, in box order, aligned to the manifest),
and the `manifest_intact` check's listing of the variants a manifest names."""

import random

import pyarrow as pa

from assets.subsets import _boxes_of, _missing_variants
from workloads.annotations import BOX_TYPE


def _objects(rows):
    names = ("sha256", "box", "category", "x", "y", "w", "h", "iscrowd")
    types = (
        pa.string(),
        pa.int64(),
        pa.string(),
        pa.float64(),
        pa.float64(),
        pa.int64(),
        pa.int64(),
        pa.bool_(),
    )
    cols = list(zip(*rows)) if rows else [[] for _ in names]
    return pa.table({n: pa.array(c, t) for n, c, t in zip(names, cols, types)})


def test_boxes_follow_the_manifest_rows_repeats_and_gaps_included():
    rng = random.Random(7)
    shas = [f"{i:064x}" for i in range(500)]
    for _ in range(20):
        rows = [
            (
                s,
                b,
                rng.choice(["cat", "dog", None]),
                rng.random(),
                rng.random(),
                rng.randint(1, 9),
                4,
                rng.choice([True, False, None]),  # null: a part Athena reads from before iscrowd
            )
            for s in rng.sample(shas, rng.randint(0, 200))
            for b in rng.sample(range(6), rng.randint(1, 4))  # box numbers with gaps
        ]
        rng.shuffle(rows)
        manifest = sorted(rng.choices(shas, k=rng.randint(0, 120)))  # a query may repeat an image
        half = len(manifest) // 2
        column = _boxes_of(
            pa.chunked_array([manifest[:half], manifest[half:]], pa.string()), _objects(rows)
        )
        expected = [
            [
                {"category": c, "x": x, "y": y, "w": float(w), "h": float(h), "iscrowd": bool(k)}
                for _, _, c, x, y, w, h, k in sorted(r for r in rows if r[0] == sha)
            ]
            for sha in manifest
        ]
        assert column.type == pa.list_(BOX_TYPE)
        assert column.null_count == 0
        assert column.to_pylist() == expected


def test_missing_variants_names_what_is_gone_over_many_directories(lake):
    """Listed a directory at a time, several at once: a gone file, a file in a directory that is
    gone, a null key are missing; a file in another directory with the same name is not there."""
    resized = [f"resized/r1/{p:02x}/{p:02x}{i}.jpg" for p in range(20) for i in range(3)]
    edges = [k.replace("resized/r1", "edges/e1").replace(".jpg", ".png") for k in resized]
    for k in resized + edges:
        lake.put(k, b"x")
    lake.delete(resized[4])
    lake.delete(edges[7])
    for k in [e for e in edges if e.startswith("edges/e1/0a/")]:
        lake.delete(k)
    lake.put("resized/r1/05/" + resized[4].rsplit("/", 1)[1], b"elsewhere")
    manifest = pa.table({"resized_key": resized, "edges_key": [*edges[:-1], None]})
    count, first = _missing_variants(lake, manifest)
    gone_dir = [e for e in edges if e.startswith("edges/e1/0a/")]
    assert count == 1 + 1 + len(gone_dir) + 1
    assert first == [resized[4], edges[7], *gone_dir, ""][:5]


def test_a_stopped_listing_lists_no_more_and_a_failure_does_not_wait_for_it(lake):
    import threading

    import pytest

    from assets.subsets import variants_listed_beside

    keys = [f"resized/r1/{p:02x}/x{p}.jpg" for p in range(40)]
    for k in keys:
        lake.put(k, b"x")
    manifest = pa.table(
        {"resized_key": keys, "edges_key": pa.array([None] * len(keys), pa.string())}
    )
    stop = threading.Event()
    stop.set()
    before = lake.counters["list"]
    assert _missing_variants(lake, manifest, stop)[0] == 2 * len(keys)  # nothing listed: absent
    assert lake.counters["list"] == before
    # a failure inside leaves at once, with the listing stopped (its result is not waited for)
    with pytest.raises(RuntimeError, match="write failed"):
        with variants_listed_beside(lake) as list_variants:
            future = list_variants(manifest)
            raise RuntimeError("write failed")
    assert future.done()
    with variants_listed_beside(lake) as list_variants:
        assert list_variants(manifest).result() == (len(keys), [""] * 5)  # edges: no keys
