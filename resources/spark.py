"""Spark table writer (dagster-pyspark): the same rows as the pyarrow writer, for large rebuilds.

Spark reads every prefix's raw index at once and derives the rows with DataFrame
expressions; each prefix's output is then put in place as ``part-0.parquet`` through the
lake, so readers never see a half-written prefix and both writers share one layout.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pyarrow.parquet as pq
from dagster_pyspark import LazyPySparkResource

from resources.tables import TableWriter
from workloads.images import ImageParams, hashes_key, output_dir, raw_index_key
from workloads.lake import write_parquet
from workloads.tables import IMAGES_SCHEMA, OBJECTS_SCHEMA, table_key
from workloads.versions import canonical_json, prefix_version


class SparkTableWriter(TableWriter):
    spark: LazyPySparkResource

    def write(self, lake, prefixes, params: ImageParams):
        from pyspark.sql import functions as F

        spark = self.spark.spark_session
        fs, base = lake.arrow_filesystem()
        if not base.startswith("/"):
            raise ValueError("SparkTableWriter reads the lake through the local filesystem here; on S3 configure s3a on the cluster")
        keys = [raw_index_key(p) for p in prefixes if lake.exists(raw_index_key(p))]
        present = [(k,) for p in prefixes for stage in ("resize", "edges") for k in lake.keys(output_dir(stage, params, p))]
        stats = {p: {"images": 0, "objects": 0, "missing_variants": 0, "data_version": prefix_version([], "tables")} for p in prefixes}
        if not keys:
            return stats
        raw = spark.read.parquet(*[f"file://{base}/{k}" for k in keys]).withColumn("prefix", F.substring("sha256", 1, 2))
        have = spark.createDataFrame(present or [("",)], "key string")
        first_pack = F.col("packs")[0]
        sha = F.col("sha256")
        rows = (
            raw.withColumn("pack_id", first_pack)
            .withColumn("member", F.expr("substring(filter(members, m -> startswith(m, concat(packs[0], '/')))[0], length(packs[0]) + 2)"))
            .withColumn("bucket", F.conv(F.substring(sha, 1, 8), 16, 10).cast("long") % 100)
            .withColumn("split", F.when(F.col("bucket") < 80, "train").when(F.col("bucket") < 90, "val").otherwise("test"))
            .withColumn("original_key", F.concat(F.lit("raw/"), F.col("prefix"), F.lit("/"), sha, F.lit("."), F.col("ext")))
            .withColumn("resized_want", F.concat(F.lit(f"resized/{params.resize_id}/"), F.col("prefix"), F.lit("/"), sha, F.lit(".jpg")))
            .withColumn("edges_want", F.concat(F.lit(f"edges/{params.edges_id}/"), F.col("prefix"), F.lit("/"), sha, F.lit(".png")))
        )
        rows = (
            rows.join(have.withColumnRenamed("key", "resized_key"), F.col("resized_want") == F.col("resized_key"), "left")
            .join(have.withColumnRenamed("key", "edges_key"), F.col("edges_want") == F.col("edges_key"), "left")
            .withColumn("boxes_n", F.size("boxes").cast("int"))
        )
        for stage, key_col, hash_col in (("resize", "resized_key", "resized_sha256"), ("edges", "edges_key", "edges_sha256")):
            files = [f"file://{base}/{hashes_key(stage, params, p)}" for p in prefixes if lake.exists(hashes_key(stage, params, p))]
            h = spark.read.parquet(*files) if files else spark.createDataFrame([], "sha256 string, output_sha256 string")
            h = h.select(F.col("sha256").alias("_h_sha"), F.col("output_sha256").alias("_h_out"))
            rows = rows.join(h, sha == F.col("_h_sha"), "left").withColumn(hash_col, F.when(F.col(key_col).isNotNull(), F.col("_h_out"))).drop("_h_sha", "_h_out")
        images = rows.select(*[F.col("boxes_n").alias("boxes") if f.name == "boxes" else F.col(f.name) for f in IMAGES_SCHEMA], "prefix")
        objects = rows.select("sha256", "prefix", "label", "split", F.posexplode("boxes").alias("box", "b")).select(
            "sha256", F.col("box").cast("int").alias("box"), "b.category", "b.x", "b.y", "b.w", "b.h", "label", "split", "prefix"
        )
        with tempfile.TemporaryDirectory(prefix="cvgraph-spark-") as tmp:
            for name, df, schema in (("images", images, IMAGES_SCHEMA), ("objects", objects, OBJECTS_SCHEMA)):
                out = Path(tmp) / name
                df.repartition("prefix").sortWithinPartitions("sha256", *(["box"] if name == "objects" else [])).write.partitionBy("prefix").parquet(f"file://{out}")
                for p in prefixes:
                    files = sorted((out / f"prefix={p}").glob("*.parquet"))
                    key = table_key(name, p)
                    if not files:
                        if lake.exists(key):
                            lake.delete(key)
                        continue
                    table = pq.read_table(files, partitioning=None).select(schema.names).cast(schema)  # Spark types → ours
                    write_parquet(lake, key, table)
                    rows_p = table.to_pylist()
                    st = stats[p]
                    st[name] = len(rows_p)
                    st.setdefault("_rows", []).extend(rows_p)
                    if name == "images":
                        st["missing_variants"] = sum(1 for r in rows_p if r["resized_key"] is None or r["edges_key"] is None)
        for st in stats.values():
            st["data_version"] = prefix_version([canonical_json(r) for r in st.pop("_rows", [])], "tables")
        return stats
