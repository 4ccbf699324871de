"""The whole graph with CVGRAPH_PROFILE=aws against the moto server: upload → SQS sensor →
Batch (ingest, then one array job per workload — index, resize, edges, tables — whose children
run the workload CLI against the moto S3, while the orchestrator reads only records) → Glue tables → Athena SQL freeze → SageMaker training entry → export."""

import hashlib
import json
import re

import boto3
import dagster as dg

from workloads.lake import parquet_table


def test_whole_graph_on_the_aws_profile(aws, small_digits_pack, monkeypatch):
    from moto.batch.models import batch_backends

    from orchestration import runs
    from orchestration.definitions import build_defs
    from orchestration.sensors import incoming_packs_sensor, incoming_packs_sqs_sensor
    from resources.batch import BatchArrayClient
    from resources.catalog import AthenaCatalog
    from resources.training import SageMakerTrainer
    from workloads.s3lake import S3Lake

    defs = build_defs("aws")
    res = defs.resources
    assert (
        isinstance(res["image_compute"], BatchArrayClient)
        and isinstance(res["trainer"], SageMakerTrainer)
        and isinstance(res["catalog"], AthenaCatalog)
    )
    assert {s.name for s in defs.sensors} == {
        "incoming_packs",
        "incoming_packs_sqs",
        "owed_prefixes",
    }
    lake = res["lake"].lake()
    boto3.client("s3").put_object(
        Bucket="cvgraph-lake", Key="lake/incoming/digits.zip", Body=small_digits_pack(60)
    )

    def parent_jobs():
        return sorted(
            (
                j.job_name
                for jid, j in batch_backends["123456789012"]["us-east-1"]._jobs.items()
                if ":" not in jid
            )
        )

    read_here = []  # object keys read in this process (Batch children run in their own)
    for name in ("get", "open_read"):
        original = getattr(S3Lake, name)
        monkeypatch.setattr(
            S3Lake,
            name,
            lambda self, key, _original=original: (read_here.append(key), _original(self, key))[1],
        )

    with dg.instance_for_test() as inst:
        from cvgraph.plan import plan

        # the zip's central directory, read with ranged requests from S3
        before = plan(inst, defs)
        assert [(p["pack_id"], p["images"]) for p in before["packs_to_ingest"]] == [("digits", 60)]
        assert runs.tick_incoming(inst, definitions=defs, sensor=incoming_packs_sqs_sensor) == [
            "digits"
        ]
        assert (
            runs.tick_incoming(inst, definitions=defs, sensor=incoming_packs_sensor) == []
        )  # the safety net finds nothing new
        pack = json.loads(lake.get("packs/digits/pack.json"))
        assert (pack["accepted"], pack["duplicates"], pack["rejected"]) == (60, 0, [])
        assert len(parent_jobs()) == 1 and parent_jobs()[0].endswith("ingest-digits-digits")

        indexing = {s["stage"]: s for s in plan(inst, defs)["stages"]}
        launched = runs.sync(inst, definitions=defs)
        assert [r["range"] for r in launched] == [
            ("00", "ff")
        ]  # one ranged run for all 256 prefixes
        names = parent_jobs()
        # ingest, then one array job for the whole chain: every prefix's index, images and tables
        # in one task start (the image and table steps find their prefixes done)
        assert [sum(f"-{w}-" in n for n in names) for w in ("ingest", "chain")] == [1, 1]
        assert len(names) == 2, names
        # S3 requests per new image, as the steps count them (orchestrator and Batch children)
        requests = 0
        for run_id in [r.run_id for r in inst.get_runs()]:
            seen = set()
            for rec in inst.get_records_for_run(
                run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
            ).records:
                mat = rec.event_log_entry.asset_materialization
                if (
                    "lake_requests" in mat.metadata and mat.asset_key not in seen
                ):  # a ranged result is repeated per partition
                    seen.add(mat.asset_key)
                    requests += mat.metadata["lake_requests"].value
        print(
            f"S3 requests for a 60-image pack into an empty lake: {requests} ({requests / 60:.1f} per new image)"
        )
        # The plan told them: the Batch children the chain's array job had (a group of prefix
        # tasks a child: a 60-image pack is a few seconds of work, one child)
        jobs = batch_backends["123456789012"]["us-east-1"]._jobs
        children = sum(
            max(1, (j.array_properties or {}).get("size", 1))
            for jid, j in jobs.items()
            if ":" not in jid and "-chain-" in j.job_name
        )
        assert children == indexing["chain"]["tasks"] == 1
        # the step links the chain's job on every partition it materialized, in the UI
        [chain_job] = [jid for jid, j in jobs.items() if "-chain-" in j.job_name]
        links = {
            r.asset_materialization.metadata["batch_job_chain"].value
            for r in inst.fetch_materializations(dg.AssetKey("raw_images"), limit=1000).records
        }
        assert links == {
            "https://us-east-1.console.aws.amazon.com/batch/home?region=us-east-1"
            f"#jobs/detail/{chain_job}"
        }
        assert indexing["chain"]["images"] == 60
        assert [s for s, e in indexing.items() if e["tasks"]] == ["chain"]
        ran = [r for r in aws.batch_runs if "workloads.chain" in r["command"]]
        assert sorted(p for r in ran for p in r["prefixes"]) == sorted(pack["prefixes"])
        counted = sum(
            m["lake_requests"].value
            for a in ("raw_images", "resized_images", "edge_maps", "image_tables")
            for m in {
                r.run_id: r.asset_materialization.metadata
                for r in inst.fetch_materializations(dg.AssetKey(a), limit=1000).records
            }.values()
        )
        assert abs(indexing["chain"]["requests_total"] - counted) <= 0.05 * counted, counted
        assert 60 * 4 < requests < 60 * 150  # at least the per-image puts; the rest is per prefix
        # this process (the orchestrator) read records only: no manifest, index, image or table object
        assert read_here and all(
            re.fullmatch(r"(_versions|_results)/.+\.json|packs/[^/]+/(pack|unreadable)\.json", k)
            for k in read_here
        ), sorted(set(read_here))[:10]
        assert sum(1 for _ in lake.list("resized/")) == sum(1 for _ in lake.list("edges/")) == 60
        assert len(inst.get_materialized_partitions(dg.AssetKey("image_tables"))) == 256

        counts = (
            res["catalog"]
            .query("SELECT label, count(*) AS n FROM images GROUP BY label ORDER BY label")
            .to_pylist()
        )
        assert counts == [
            {"label": "0", "n": 31},
            {"label": "1", "n": 29},
        ]  # the first 60 zeros and ones of the digits

        from partitions import model_partitions_def, subset_partitions_def

        runs.ensure_partition(inst, subset_partitions_def, "zeros_and_ones")
        runs.materialize(
            inst,
            [dg.AssetKey("frozen_subsets")],
            partition_key="zeros_and_ones",
            definitions=defs,
            run_config={
                "ops": {
                    "frozen_subsets": {
                        "config": {"sql": "SELECT * FROM images WHERE label IN ('0', '1')"}
                    }
                }
            },
        )
        assert any(
            "(\nSELECT * FROM images WHERE label IN ('0', '1')\n) AS q JOIN images AS i" in q
            for q in aws.athena_queries
        )
        subset = json.loads(lake.get("subsets/zeros_and_ones/subset.json"))
        assert subset["rows"] == 60 and subset["packs"] == ["digits"]

        runs.ensure_partition(inst, model_partitions_def, "zo-cnn")
        # 8 epochs: after 3, a held-out sample's top-1 margin can be below the int8 model's logit
        # error, and one flip fails the 4-sample parity check (seen on an AVX2-only CPU)
        runs.materialize(
            inst,
            [dg.AssetKey("trained_models")],
            partition_key="zo-cnn",
            definitions=defs,
            run_config={
                "ops": {
                    "trained_models": {
                        "config": {"subset": "zeros_and_ones", "epochs": 8, "batch_size": 16}
                    }
                }
            },
        )
        [job] = aws.training_runs
        assert (
            job["instance_type"] == "ml.m5.large"
            and job["spot"] is True
            and "epoch=8" in job["output"]
        )
        model = json.loads(lake.get("models/zo-cnn/model.json"))
        assert model["subset_manifest_sha256"] == subset["manifest_sha256"] and model[
            "classes"
        ] == ["0", "1"]

        result = runs.materialize(
            inst, [dg.AssetKey("exported_models")], partition_key="zo-cnn", definitions=defs
        )
        checks = [e for e in result.get_asset_check_evaluations()]
        assert [(c.check_name, c.passed) for c in checks] == [("parity", True)], [
            c.metadata for c in checks
        ]
        exports = json.loads(lake.get("exports/zo-cnn/exports.json"))
        assert exports["formats"]["onnx"]["max_abs_error"] < 1e-3
        assert parquet_table(lake.get("subsets/zeros_and_ones/manifest.parquet")).num_rows == 60

        # a sweep on the aws profile: a SageMaker hyperparameter tuning job, two trials at once
        runs.ensure_partition(inst, model_partitions_def, "zo-swept")
        runs.materialize(
            inst,
            [dg.AssetKey("trained_models")],
            partition_key="zo-swept",
            definitions=defs,
            run_config={
                "ops": {
                    "trained_models": {
                        "config": {
                            "subset": "zeros_and_ones",
                            "epochs": 2,
                            "batch_size": 16,
                            "trials": 2,
                            "parallel": 2,
                            "space": json.dumps({"lr": [0.001, 0.01]}),
                        }
                    }
                }
            },
        )
        swept = json.loads(lake.get("models/zo-swept/model.json"))
        trials = swept["sweep"]["trials"]
        [tuning] = aws.tuning_jobs
        assert tuning["config"]["ResourceLimits"] == {
            "MaxNumberOfTrainingJobs": 2,
            "MaxParallelTrainingJobs": 2,
        }
        jobs = {j["name"] for j in aws.training_runs[1:]}
        assert {t["training_job"] for t in trials} == jobs and len(jobs) == 2
        kept = trials[swept["sweep"]["best"]]
        assert kept["objective"] == max(t["objective"] for t in trials)
        assert swept["model_sha256"] == kept["model_sha256"]
        for t in trials:  # each trial's weights in the lake, under the sweep
            key = f"models/zo-swept/trials/{swept['sweep']['name']}/{t['number']:03d}/model.pt"
            assert hashlib.sha256(lake.get(key)).hexdigest() == t["model_sha256"]
        # each trial an MLflow run nested under the sweep's, named by its training job
        import mlflow

        from orchestration.settings import mlflow_tracking_uri

        client = mlflow.MlflowClient(mlflow_tracking_uri())
        nested = client.search_runs(
            [client.get_run(swept["sweep"]["mlflow_run_id"]).info.experiment_id],
            f"tags.`mlflow.parentRunId` = '{swept['sweep']['mlflow_run_id']}'",
        )
        assert sorted(
            (r.info.run_id, r.data.tags["cvgraph.training_job"], r.info.status) for r in nested
        ) == sorted((t["mlflow_run_id"], t["training_job"], "FINISHED") for t in trials)
