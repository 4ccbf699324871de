"""The aws profile's whole graph (ingest → tables → freeze → train → export) through a proxy that
injects S3 and service faults (503 SlowDown, 500 InternalError, responses reset mid-body, S3
writes' answers lost after S3 did them, delays) on 5% of requests, the orchestrator's and the Batch and SageMaker workloads' alike: it converges
to the bytes, rows and data versions of the same graph run without faults."""

from __future__ import annotations

import hashlib
import json
import re

import dagster as dg
from fault_proxy import FaultProxy

# What may differ between two runs of the same graph: when, where and by which run things were
# done (the training's scratch dir is the harness's temp dir; on SageMaker /opt/ml/checkpoints).
RUN_FIELDS = {"seconds", "dagster_run_id", "mlflow_run_id", "checkpoint_dir"}
# Objects no two runs write alike, faults or none: the training job's checkpoint and output
# archive hold its timings (the weights, model.pt, are compared); torch writes a random
# serialization id into every TorchScript file and numbers traced classes per process (its parity
# is compared instead).
NOT_REPRODUCIBLE = (
    r"^models/[^/]+/checkpoints/",
    r"^models/[^/]+/sagemaker/.*/model\.tar\.gz$",
    r"^exports/[^/]+/torchscript/",
)
AREAS = (
    "raw/",
    "index/",
    "resized/",
    "edges/",
    "tables/",
    "packs/",
    "subsets/",
    "models/",
    "exports/",
)


def _run_free(obj):
    if isinstance(obj, dict):
        if obj.get("file", "").startswith("torchscript/"):  # see NOT_REPRODUCIBLE
            obj = {k: v for k, v in obj.items() if k not in ("bytes", "sha256")}
        return {k: _run_free(v) for k, v in obj.items() if k not in RUN_FIELDS}
    if isinstance(obj, list):
        return [_run_free(v) for v in obj]
    return obj


def snapshot(lake) -> dict[str, str]:
    """Every object of the lake's data areas: its sha256, or its JSON without run fields."""
    out = {}
    for area in AREAS:
        for key in lake.keys(area):
            data = lake.get(key)
            if any(re.search(p, key) for p in NOT_REPRODUCIBLE):
                continue
            out[key] = (
                json.dumps(_run_free(json.loads(data)), sort_keys=True)
                if key.endswith(".json")
                else hashlib.sha256(data).hexdigest()
            )
    return out


def data_versions(instance) -> dict:
    """Each materialised (asset, partition)'s last data version, over every asset of the graph."""
    from orchestration.definitions import ASSETS

    versions = {}
    for key in (k for a in ASSETS for k in a.keys):
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key), limit=10000
        ).records
        for r in sorted(records, key=lambda r: r.storage_id):
            mat = r.event_log_entry.asset_materialization
            versions[(key.to_user_string(), mat.partition)] = mat.tags.get("dagster/data_version")
    return versions


def run_graph(tmp_path, monkeypatch, digits_zip) -> dict:
    from cvgraph.sdk import Datasets

    tmp_path.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    # Dagster's instance sets DAGSTER_HOME for good: set here, it is the suite's again after.
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home" / "dagster"))
    pack = tmp_path / "digits.zip"
    pack.write_bytes(digits_zip(40))
    ds = Datasets()
    report = ds.ingest(pack)
    ds.sync()
    subset = ds.freeze_dataset("zeros_and_ones", "SELECT * FROM images WHERE label IN ('0', '1')")
    model = ds.train("zo-cnn", "zeros_and_ones", epochs=2)
    exports = ds.export("zo-cnn")
    return {
        "accepted": report["accepted"],
        "rows": subset["rows"],
        "test_accuracy": model["test_accuracy"],
        "parity": {f: e["top1_agreement"] for f, e in exports["formats"].items()},
        "lake": snapshot(ds.lake),
        "versions": data_versions(ds.instance),
    }


def test_the_graph_with_injected_faults_converges_to_the_run_without(
    moto_endpoint, fresh_aws, small_digits_pack, monkeypatch, tmp_path
):
    fresh_aws(tmp_path / "clean")
    clean = run_graph(tmp_path / "clean", monkeypatch, small_digits_pack)

    with FaultProxy(moto_endpoint, rate=0.05, seed=7) as proxy:
        harness = fresh_aws(tmp_path / "faulty")
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        harness.client_endpoint = proxy.url  # the Batch and SageMaker workloads too
        faulty = run_graph(tmp_path / "faulty", monkeypatch, small_digits_pack)
        stats = dict(proxy.stats)

    print(f"fault proxy: {stats}")
    faults = sum(stats.get(k, 0) for k in ("slowdown", "internal", "reset", "lost"))
    assert stats["requests"] > 1000 and faults > 20, stats
    assert stats["lost"] > stats.get("lost_not_applicable", 0), stats  # some writes' answers lost
    assert stats["retries"] >= stats["slowdown"] + stats["internal"], stats
    assert (clean["accepted"], clean["rows"]) == (faulty["accepted"], faulty["rows"]) == (40, 40)
    differ = sorted(
        k
        for k in clean["lake"].keys() | faulty["lake"].keys()
        if clean["lake"].get(k) != faulty["lake"].get(k)
    )
    assert differ == [], differ
    assert faulty["versions"] == clean["versions"]
    assert faulty["test_accuracy"] == clean["test_accuracy"]
    assert faulty["parity"] == clean["parity"]
