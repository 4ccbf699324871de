"""Spark table writer (dagster-pyspark): the same rows as the pyarrow writer, for large rebuilds.

Spark reads every prefix's raw index at once and derives the rows with DataFrame
expressions; each prefix's output is then committed through the lake as the pyarrow writer commits it
(one object per prefix and table, then its state), so both writers share one layout and version.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pyarrow.parquet as pq
from dagster_pyspark import LazyPySparkResource

from resources.tables import TableWriter, write_results
from workloads.image_params import ImageParams
from workloads.layout import RAW, STAGE_EXTS, hashes_key, raw_index_key, stage_root
from workloads.table_parts import commit_prefix_tables
from workloads.table_rows import IMAGES_SCHEMA, TABLES
from workloads.tables import pending_table_changes


class SparkTableWriter(TableWriter):
    spark: LazyPySparkResource

    def run(self, context, lake, lake_url, run_id, prefixes, params, groups=None):
        write_results(lake, run_id, self.write(lake, prefixes, params))

    def write(self, lake, prefixes, params: ImageParams):
        """Rebuild both tables of ``prefixes`` in this Spark session; stats per prefix."""
        spark = self.spark.spark_session
        fs, base = lake.arrow_filesystem()
        if not base.startswith("/"):
            raise ValueError(
                "SparkTableWriter reads the lake through the local filesystem here; on S3 configure s3a on the cluster"
            )
        # The change markers this rebuild absorbs, listed before it reads the indexes: one the
        # index step writes meanwhile stays for the next run.
        markers = {p: pending_table_changes(lake, p)[0] for p in prefixes}
        keys = [raw_index_key(p) for p in prefixes if lake.exists(raw_index_key(p))]
        if keys:
            rows = _index_rows(spark, [f"file://{base}/{k}" for k in keys], params)
            rows = _with_variants(spark, lake, base, rows, prefixes, params)
            built = _collect_by_prefix(_table_frames(rows), prefixes)
        else:
            empty = {name: schema.empty_table() for name, schema in TABLES.items()}
            built = {p: empty for p in prefixes}
        # A rebuild absorbs every change the index step recorded for these prefixes.
        return {
            p: commit_prefix_tables(
                lake, p, params, built[p]["images"], built[p]["objects"], markers[p]
            )
            for p in prefixes
        }


def _output_key(stage: str, params: ImageParams, sha):
    """The column of ``layout.output_key`` of each row's image."""
    from pyspark.sql import functions as F

    return F.concat(
        F.lit(stage_root(stage, params)), F.col("prefix"), F.lit("/"), sha, F.lit(STAGE_EXTS[stage])
    )


def _index_rows(spark, files: list[str], params: ImageParams):
    """The raw index rows with the columns derived from them alone (as ``table_rows.rows_of``
    derives them): pack, member, split, the original's key and the variants' keys if made."""
    from pyspark.sql import functions as F

    # mergeSchema: indexes written before boxes carried iscrowd beside those written after
    raw = (
        spark.read.option("mergeSchema", "true")
        .parquet(*files)
        .withColumn("prefix", F.substring("sha256", 1, 2))
    )
    first_pack = F.col("packs")[0]
    sha = F.col("sha256")
    rows = (
        raw.withColumn("pack_id", first_pack)
        .withColumn(
            "member",
            F.expr(
                "substring(filter(members, m -> startswith(m, concat(packs[0], '/')))[0], length(packs[0]) + 2)"
            ),
        )
        .withColumn("bucket", F.conv(F.substring(sha, 1, 8), 16, 10).cast("long") % 100)
        .withColumn(
            "split",
            F.when(F.col("bucket") < 80, "train")
            .when(F.col("bucket") < 90, "val")
            .otherwise("test"),
        )
        .withColumn(
            "original_key",
            F.concat(F.lit(RAW), F.col("prefix"), F.lit("/"), sha, F.lit("."), F.col("ext")),
        )
        .withColumn("resized_want", _output_key("resize", params, sha))
        .withColumn("edges_want", _output_key("edges", params, sha))
    )
    return rows.withColumn("boxes_n", F.size("boxes").cast("int"))


def _with_variants(spark, lake, base: str, rows, prefixes, params: ImageParams):
    """``rows`` with each variant's key and sha256, where its stage's hash index has it (the
    record of what is done)."""
    from pyspark.sql import functions as F

    for stage, key_col, hash_col in (
        ("resize", "resized_key", "resized_sha256"),
        ("edges", "edges_key", "edges_sha256"),
    ):
        files = [
            f"file://{base}/{hashes_key(stage, params, p)}"
            for p in prefixes
            if lake.exists(hashes_key(stage, params, p))
        ]
        h = (
            spark.read.parquet(*files)
            if files
            else spark.createDataFrame([], "sha256 string, output_sha256 string")
        )
        h = h.select(F.col("sha256").alias("_h_sha"), F.col("output_sha256").alias(hash_col))
        want = "resized_want" if stage == "resize" else "edges_want"
        rows = (
            rows.join(h, F.col("sha256") == F.col("_h_sha"), "left")
            .withColumn(key_col, F.when(F.col(hash_col).isNotNull(), F.col(want)))
            .drop("_h_sha")
        )
    return rows


def _table_frames(rows) -> dict:
    """``{table: DataFrame}`` of the tables' columns, plus ``prefix``."""
    from pyspark.sql import functions as F

    images = rows.select(
        *[
            F.col("boxes_n").alias("boxes") if f.name == "boxes" else F.col(f.name)
            for f in IMAGES_SCHEMA
        ],
        "prefix",
    )
    # an index written before boxes carried iscrowd has none: False, as table_rows.rows_of says
    crowd = (
        F.coalesce(F.col("b.iscrowd"), F.lit(False))
        if "iscrowd" in rows.schema["boxes"].dataType.elementType.fieldNames()
        else F.lit(False)
    )
    objects = rows.select(
        "sha256", "prefix", "label", "split", F.posexplode("boxes").alias("box", "b")
    ).select(
        "sha256",
        F.col("box").cast("int").alias("box"),
        "b.category",
        "b.x",
        "b.y",
        "b.w",
        "b.h",
        crowd.alias("iscrowd"),
        "label",
        "split",
        "prefix",
    )
    return {"images": images, "objects": objects}


def _collect_by_prefix(frames: dict, prefixes) -> dict[str, dict]:
    """``{prefix: {table: pyarrow table}}``: each frame written by Spark partitioned by prefix,
    read back in our types and the order a rebuild writes."""
    with tempfile.TemporaryDirectory(prefix="cvgraph-spark-") as tmp:
        built: dict[str, dict] = {p: {} for p in prefixes}
        for name, df in frames.items():
            schema = TABLES[name]
            out = Path(tmp) / name
            df.repartition("prefix").sortWithinPartitions(
                "sha256", *(["box"] if name == "objects" else [])
            ).write.partitionBy("prefix").parquet(f"file://{out}")
            for p in prefixes:
                files = sorted((out / f"prefix={p}").glob("*.parquet"))
                table = (
                    pq.read_table(files, partitioning=None).select(schema.names).cast(schema)
                    if files
                    else schema.empty_table()
                )  # Spark types → ours
                built[p][name] = table.sort_by(
                    [
                        ("sha256", "ascending"),
                        *([("box", "ascending")] if name == "objects" else []),
                    ]
                )
    return built
