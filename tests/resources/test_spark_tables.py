"""The Spark writer (dagster-pyspark) and the pyarrow writer produce the same rows and versions."""

import shutil

import pytest
from dagster_pyspark import LazyPySparkResource

from cvgraph.demo_packs import sample_image
from resources.spark import SparkTableWriter
from workloads.image_params import ImageParams
from workloads.images import process_prefix
from workloads.index import build_raw_index
from workloads.ingest import ingest_pack
from workloads.lake import LocalLake
from workloads.tables import read_prefix_table, write_prefix_tables
from workloads.versions import HASH_PREFIXES

pytest.importorskip("pyspark")


def rows(lake, table, prefix):
    return read_prefix_table(lake, table, prefix).to_pylist()


def test_spark_and_pyarrow_writers_agree(lake, put_pack, tmp_path):
    import json

    coco = {
        "images": [
            {"id": 1, "file_name": "pets/chelsea.png"},
            {"id": 2, "file_name": "pets/astronaut.png"},
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "person"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [60, 10, 300, 290]},
            {"id": 2, "image_id": 2, "category_id": 2, "bbox": [120, 0, 330, 512]},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [1, 2, 3, 4], "iscrowd": 1},
        ],
    }
    members = {f"pets/{n}": sample_image(n) for n in ("chelsea.png", "astronaut.png", "coffee.png")}
    members |= {f"city/{n}": sample_image(n) for n in ("china.jpg", "rocket.jpg")}
    members["annotations.json"] = json.dumps(coco).encode()
    ingest_pack(lake, "a", put_pack("a", members))
    ingest_pack(
        lake,
        "b",
        put_pack(
            "b",
            {
                "other/china.jpg": sample_image("china.jpg"),
                "x/flower.jpg": sample_image("flower.jpg"),
            },
        ),
    )
    stats = build_raw_index(lake, list(HASH_PREFIXES))
    busy = [p for p, s in stats.items() if s["images"]]
    params = ImageParams()
    for p in busy[:-1]:  # the last prefix has no variants yet: keys must be null in both writers
        process_prefix(lake, p, ["resize", "edges"], params, "r")
    prefixes = busy + ["00" if "00" not in busy else "ff"]
    other = LocalLake(tmp_path / "copy")
    shutil.copytree(lake.root, other.root)

    by_arrow = {p: write_prefix_tables(lake, p, params) for p in prefixes}
    spark = LazyPySparkResource(
        spark_config={
            "spark.master": "local[2]",
            "spark.ui.enabled": "false",
            "spark.sql.shuffle.partitions": "4",
        }
    )
    by_spark = SparkTableWriter(spark=spark).write(other, prefixes, params)
    assert by_spark == by_arrow
    assert (
        sum(s["images"] for s in by_arrow.values()) == 6
        and sum(s["objects"] for s in by_arrow.values()) == 3
    )
    for p in prefixes:
        for table in ("images", "objects"):
            assert rows(other, table, p) == rows(lake, table, p), (table, p)
    crowd = sorted(
        (r["category"], r["iscrowd"]) for p in prefixes for r in rows(other, "objects", p)
    )
    assert crowd == [("cat", False), ("cat", True), ("person", False)]
    last = rows(lake, "images", busy[-1])
    assert last and all(r["resized_key"] is None for r in last)
    spark.spark_session.stop()
