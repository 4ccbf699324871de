import os

import dagster as dg
import pytest

from orchestration.definitions import defs
from partitions import evaluation_partitions_def, hash_prefix_partitions_def, pack_partitions_def

ASSETS = {
    "raw_packs",
    "raw_images",
    "resized_images",
    "edge_maps",
    "image_tables",
    "frozen_subsets",
    "training_shards",
    "trained_models",
    "exported_models",
    "model_evaluations",
    "pack_predictions",
}
PREFIX_ASSETS = {"raw_images", "resized_images", "edge_maps", "image_tables"}


def test_definitions_load():
    dg.Definitions.validate_loadable(defs)


def test_all_eleven_assets_with_code_versions_and_partitions():
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == ASSETS
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.code_version, key
        if key.to_user_string() in PREFIX_ASSETS:
            assert node.partitions_def == hash_prefix_partitions_def
            assert node.backfill_policy == dg.BackfillPolicy.single_run()
            # the owed_prefixes sensor runs them from the lake's records, not Dagster's automation
            assert node.automation_condition is None
    predictions = graph.get(dg.AssetKey("pack_predictions"))
    assert predictions.partitions_def == pack_partitions_def
    assert {p.to_user_string() for p in predictions.parent_keys} == {"raw_packs"}
    evaluations = graph.get(dg.AssetKey("model_evaluations")).partitions_def
    assert evaluations == evaluation_partitions_def
    assert [d.name for d in evaluations.partitions_defs] == ["model", "subset"]


def test_sensors_and_checks_are_registered():
    assert {s.name for s in defs.sensors} == {"incoming_packs", "owed_prefixes"}
    checks = {
        (k.asset_key.to_user_string(), k.name) for k in defs.resolve_asset_graph().asset_check_keys
    }
    assert {
        ("resized_images", "complete"),
        ("edge_maps", "complete"),
        ("image_tables", "rows_match_images"),
        ("exported_models", "parity"),
        ("frozen_subsets", "manifest_intact"),
        ("raw_packs", "manifest_matches_record"),
    } <= checks


def test_lineage_edges():
    graph = defs.resolve_asset_graph()
    parents = {
        k.to_user_string(): {p.to_user_string() for p in graph.get(k).parent_keys}
        for k in graph.get_all_asset_keys()
    }
    assert parents["raw_images"] == {"raw_packs"}
    assert parents["edge_maps"] == {"resized_images"}
    assert parents["image_tables"] == {"raw_images", "resized_images", "edge_maps"}
    assert parents["frozen_subsets"] == {"image_tables"}
    assert parents["training_shards"] == {"frozen_subsets"}
    assert parents["trained_models"] == {"frozen_subsets", "training_shards"}
    assert parents["exported_models"] == {"trained_models"}


AWS_ENV = {
    "CVGRAPH_LAKE_URL": "s3://lake-bucket/cvgraph",
    "CVGRAPH_BATCH_JOB_QUEUE": "images",
    "CVGRAPH_BATCH_JOB_DEFINITION": "cvgraph-workloads",
    "CVGRAPH_SAGEMAKER_ROLE_ARN": "arn:aws:iam::123456789012:role/cvgraph-training",
    "CVGRAPH_TRAINING_IMAGE": "123456789012.dkr.ecr.eu-west-1.amazonaws.com/cvgraph-train:1",
    "CVGRAPH_GLUE_DATABASE": "cvgraph",
    "MLFLOW_TRACKING_URI": "http://mlflow.internal:5000",
}


def test_profiles_give_the_same_resource_keys(monkeypatch, tmp_path):
    from orchestration.definitions import build_defs
    from orchestration.profiles import RESOURCES_BY_PROFILE, resources_for
    from orchestration.settings import PROFILES

    monkeypatch.setenv("CVGRAPH_HOME", str(tmp_path))
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    local, aws = resources_for("local"), resources_for("aws")
    assert set(RESOURCES_BY_PROFILE) == set(PROFILES)
    assert set(local) == set(aws)
    assert type(local["catalog"]).__name__ == "DuckDBCatalog"
    assert type(aws["catalog"]).__name__ == "AthenaCatalog"
    # the SQS sensor exists only where a queue is configured
    assert {s.name for s in build_defs("aws").sensors} == {"incoming_packs", "owed_prefixes"}
    monkeypatch.setenv("CVGRAPH_SQS_QUEUE_URL", "http://127.0.0.1:1/123456789012/incoming")
    aws_sqs = build_defs("aws")
    assert "incoming_packs_sqs" in {s.name for s in aws_sqs.sensors}
    dg.Definitions.validate_loadable(aws_sqs)
    # one setting for an image task's threads, whichever runs it
    monkeypatch.setenv("CVGRAPH_IMAGE_THREADS", "7")
    assert resources_for("local")["image_compute"].threads_per_worker == 7
    assert resources_for("aws")["image_compute"].threads_per_job == 7


def test_the_aws_profile_refuses_a_tracking_store_on_the_runs_disk_in_one_cli_line(
    monkeypatch, tmp_path
):
    """Every run on the orchestrator stack is a task of its own: SQLite or a directory there goes
    with the task, so the aws profile needs a tracking server, and says so on one line; the
    setting for a laptop try lets it through; a server keeps its own artifacts."""
    import subprocess
    import sys

    from orchestration.profiles import tracking_config

    env = {**os.environ, **AWS_ENV, "CVGRAPH_HOME": str(tmp_path), "CVGRAPH_PROFILE": "aws"}
    for uri in (f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "mlruns"), "file:///x/mlruns"):
        env["MLFLOW_TRACKING_URI"] = uri
        out = subprocess.run(
            [sys.executable, "-m", "cvgraph.cli", "plan"],
            check=False,
            env=env,
            capture_output=True,
            text=True,
        )
        assert out.returncode == 1, out
        assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
        assert "needs MLFLOW_TRACKING_URI=http(s)://" in out.stderr, out.stderr
    monkeypatch.setenv("MLFLOW_TRACKING_URI", AWS_ENV["MLFLOW_TRACKING_URI"])
    assert tracking_config(tmp_path, "aws") == {
        "experiment_name": "cvgraph",
        "mlflow_tracking_uri": "http://mlflow.internal:5000",
        "artifact_location": None,  # the server's own: proxied to its artifacts destination
    }
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("CVGRAPH_ALLOW_LOCAL_TRACKING", "true")
    assert (
        tracking_config(tmp_path, "aws")["artifact_location"]
        == (tmp_path / "mlflow" / "artifacts").as_uri()
    )


def test_an_unknown_profile_is_named(monkeypatch):
    from orchestration.settings import profile

    monkeypatch.setenv("CVGRAPH_PROFILE", "azure")
    with pytest.raises(
        ValueError, match=r"CVGRAPH_PROFILE='azure': expected one of \['aws', 'local'\]"
    ):
        profile()
