"""`pack_predictions` on the aws profile: the pack's scoring runs as a Batch job (the harness runs
the submitted command, `python -m workloads.predictions`, as a container would), writes to the S3
lake the rows onnxruntime gives on the same bytes, and Athena joins them with `images` through
the Glue table the step registers; DuckDB over the same S3 objects agrees."""

from __future__ import annotations

import hashlib
import json

from tests.aws.conftest import LAKE_URL
from tests.predictions_expected import ort_rows, zip_members


def small_export(lake, tmp_path, key: str = "m") -> tuple[bytes, dict]:
    """A classifier's export as ``exported_models`` lays it out (ONNX by ``torch.onnx.export`` as
    the exporter calls it, ``preprocess.json`` by ``preprocess_spec``, ``exports.json``), of a
    seeded, untrained small_cnn: what the job scores with is the subject here, not how good it is."""
    import torch

    from workloads.kernels import EdgeParams, ResizeParams
    from workloads.training.models import build_model
    from workloads.training.predict import preprocess_spec
    from workloads.training.preprocess import Preprocess

    torch.manual_seed(0)
    model = build_model(
        {"name": "small_cnn", "in_channels": 3, "num_classes": 2, "input_size": 32}
    ).eval()
    path = tmp_path / "model.onnx"
    torch.onnx.export(
        model,
        (torch.zeros(1, 3, 32, 32),),
        str(path),
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        dynamo=False,
    )
    onnx = path.read_bytes()
    record = {
        "key": key,
        "model_sha256": "0" * 64,
        "spec": {"input_size": 32, "variant": "resized"},
        "classes": ["0", "1"],
        "preprocess": Preprocess(32, 3, (0.8, 0.8, 0.8), (0.3, 0.3, 0.3)).to_json(),
    }
    pre = preprocess_spec(record, ResizeParams(), EdgeParams())
    sha = hashlib.sha256(onnx).hexdigest()
    lake.put(f"exports/{key}/onnx/model.onnx", onnx)
    lake.put(f"exports/{key}/preprocess.json", json.dumps(pre).encode())
    lake.put(
        f"exports/{key}/exports.json",
        json.dumps(
            {"key": key, "model_version": "1", "formats": {"onnx": {"sha256": sha}}}
        ).encode(),
    )
    return onnx, pre


IMAGES = 12  # a small pack: a dozen prefixes


def ingested(lake, zip_bytes: bytes) -> None:
    """Pack ``digits`` ingested into the S3 lake, and its prefixes indexed, resized, edge-mapped
    and tabled, by the workloads' own functions (the image stages' Batch path is tested apart)."""
    from workloads.image_params import ImageParams
    from workloads.images import process_prefix
    from workloads.index import build_raw_index
    from workloads.ingest import ingest_pack
    from workloads.tables import write_prefix_tables

    lake.put("incoming/digits.zip", zip_bytes)
    ingest_pack(lake, "digits", "incoming/digits.zip")
    prefixes = sorted(json.loads(lake.get("packs/digits/pack.json"))["prefixes"])
    build_raw_index(lake, prefixes)
    for p in prefixes:
        process_prefix(lake, p, ["resize", "edges"], ImageParams(), "prep")
        write_prefix_tables(lake, p, ImageParams())


def scores(rows) -> dict[str, dict]:
    return {r["sha256"]: {"class": r["class"], "probability": r["probability"]} for r in rows}


def test_pack_predictions_run_on_batch_and_athena_joins_them(
    aws, small_digits_pack, monkeypatch, tmp_path
):
    from cvgraph import Datasets
    from resources.catalog import DuckDBCatalog
    from resources.storage import LakeResource
    from workloads.lake import open_lake

    lake = open_lake(LAKE_URL)
    ingested(lake, small_digits_pack(IMAGES))
    onnx, pre = small_export(lake, tmp_path)
    want = ort_rows(zip_members(small_digits_pack(IMAGES)), onnx, pre)
    monkeypatch.setenv("CVGRAPH_LABELLER", "m")
    ds = Datasets()
    out = ds.predictions("digits")

    jobs = [r for r in aws.batch_runs if "workloads.predictions" in r["command"]]
    assert len(jobs) == 1 and jobs[0]["index"] is None  # one job for the pack, not an array
    assert jobs[0]["command"][jobs[0]["command"].index("--lake") + 1] == LAKE_URL
    assert scores(out["rows"]) == want and len(want) == IMAGES
    assert (out["model"], out["version"], out["scored_by"]) == (
        "m",
        1,
        "m v1 (no champion yet: its latest export)",
    )
    assert lake.exists("tables/predictions/digits.parquet")

    sql = (
        "SELECT p.sha256, p.class, p.probability, p.version, i.label FROM images AS i "
        "JOIN predictions AS p ON p.sha256 = i.sha256"
    )
    athena = ds.sql_query(sql).to_pylist()
    assert "JOIN predictions" in aws.athena_queries[-1]
    assert scores(athena) == want and {r["version"] for r in athena} == {1}
    assert {r["label"] for r in athena} == {"0", "1"}  # the pack's labels, beside the classes
    duckdb = DuckDBCatalog(lake=LakeResource(url=LAKE_URL)).query(sql).to_pylist()
    assert sorted(duckdb, key=lambda r: r["sha256"]) == sorted(athena, key=lambda r: r["sha256"])
