import json

import boto3
import dagster as dg
import pytest
from botocore.exceptions import EndpointConnectionError

from resources.catalog import AthenaCatalog, DuckDBCatalog, QueryFailed, QueryRefused
from resources.events import PackEvents, parse_s3_event
from resources.storage import LakeResource

LAKE_URL = "s3://cvgraph-lake/lake"


def athena(**kw) -> AthenaCatalog:
    return AthenaCatalog(
        lake=LakeResource(url=LAKE_URL),
        database="cvgraph",
        workgroup="primary",
        output_location="s3://cvgraph-lake/athena-results/",
        poll_seconds=0.05,
        **kw,
    )


def executions() -> list[dict]:
    athena_client = boto3.client("athena")
    return [
        athena_client.get_query_execution(QueryExecutionId=q)["QueryExecution"]["Status"]
        for q in athena_client.list_query_executions()["QueryExecutionIds"]
    ]


def test_glue_tables_use_partition_projection(aws):
    athena().register_tables()
    athena().register_tables()  # idempotent: updates in place
    table = boto3.client("glue").get_table(DatabaseName="cvgraph", Name="images")["Table"]
    assert table["PartitionKeys"] == [{"Name": "prefix", "Type": "string"}]
    params = table["Parameters"]
    assert params["projection.enabled"] == "true" and params["projection.prefix.type"] == "enum"
    assert (
        params["projection.prefix.values"].split(",")[:3] == ["00", "01", "02"]
        and len(params["projection.prefix.values"].split(",")) == 256
    )
    assert (
        params["storage.location.template"]
        == "s3://cvgraph-lake/lake/tables/images/prefix=${prefix}/"
    )
    assert table["StorageDescriptor"]["Location"] == "s3://cvgraph-lake/lake/tables/images/"
    assert {c["Name"]: c["Type"] for c in table["StorageDescriptor"]["Columns"]}[
        "packs"
    ] == "array<string>"
    objects = boto3.client("glue").get_table(DatabaseName="cvgraph", Name="objects")["Table"]
    columns = {c["Name"]: c["Type"] for c in objects["StorageDescriptor"]["Columns"]}
    assert (columns["iscrowd"], columns["w"], columns["box"]) == ("boolean", "double", "int")


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT label, count(*) AS n FROM images GROUP BY label ORDER BY label",
        "SELECT sha256, prefix, pack_id, label, split, width, height, packs FROM images ORDER BY sha256",
        "SELECT * FROM images WHERE label = '1' ORDER BY sha256",
    ],
)
def test_athena_and_duckdb_give_the_same_answers(subset_on_s3, aws, sql):
    athena().register_tables()
    duck = DuckDBCatalog(lake=LakeResource(url=LAKE_URL)).query(sql).to_pylist()
    ath = athena().query(sql).to_pylist()
    assert ath == duck and len(duck) > 0
    assert aws.athena_queries[-1] == sql
    with pytest.raises(QueryRefused):
        athena().query("DROP TABLE images")


@pytest.mark.parametrize(
    "error, cancelled",
    [
        (dg.DagsterExecutionInterruptedError(), True),  # the run was cancelled
        (EndpointConnectionError(endpoint_url="http://127.0.0.1"), False),  # past its retries
    ],
)
def test_only_a_cancel_stops_the_athena_query_not_a_failed_poll(aws, error, cancelled):
    athena_client = boto3.client("athena")

    def raise_error(**kwargs):
        raise error

    athena_client.meta.events.register(
        "provide-client-params.athena.GetQueryExecution", raise_error
    )
    with pytest.raises(type(error)):
        athena().with_client(athena_client).query("SELECT 1 AS one")
    [qid] = boto3.client("athena").list_query_executions()["QueryExecutionIds"]
    state = boto3.client("athena").get_query_execution(QueryExecutionId=qid)["QueryExecution"]
    assert (state["Status"]["State"] == "CANCELLED") is cancelled


def test_a_failed_athena_query_is_one_line_with_athenas_reason_and_the_gate_starts_none(
    subset_on_s3, aws
):
    athena().register_tables()
    with pytest.raises(QueryFailed) as e:
        athena().query("SELECT labelx FROM images")
    message = str(e.value)
    assert message.startswith("Athena query ") and "\n" not in message
    assert 'FAILED: Binder Error: Referenced column "labelx" not found' in message
    [state] = executions()
    assert state["State"] == "FAILED" and "labelx" in state["StateChangeReason"]
    for sql in ("SELECT 1; DROP TABLE images", "COPY images TO 's3://cvgraph-lake/x.csv'"):
        with pytest.raises(QueryRefused):
            athena().query(sql)
    assert len(executions()) == 1  # refused before Athena saw it


def test_fault_an_athena_query_past_its_timeout_is_stopped_and_fails_naming_the_setting(aws):
    from moto.moto_api import state_manager

    # Athena holds the query (no capacity, a huge scan): it never leaves QUEUED by itself.
    state_manager.set_transition("athena::execution", {"progression": "manual", "times": 10**9})
    try:
        with pytest.raises(QueryFailed) as e:
            athena(timeout_seconds=0.3).query("SELECT 1 AS one")
    finally:
        state_manager.unset_transition("athena::execution")
    [state] = executions()
    assert state["State"] == "CANCELLED"
    assert str(e.value).endswith(
        "still QUEUED after 0.3 s (CVGRAPH_ATHENA_TIMEOUT_SECONDS): stopped"
    )


def test_s3_event_parsing_decodes_keys_and_skips_test_events():
    assert parse_s3_event(json.dumps({"Service": "Amazon S3", "Event": "s3:TestEvent"})) == []
    body = {
        "Records": [
            {
                "eventName": "ObjectCreated:Put",
                "s3": {
                    "bucket": {"name": "b"},
                    "object": {"key": "lake%2Fincoming%2Fmy+pack%21.zip", "eTag": "e1"},
                },
            },
            {
                "eventName": "ObjectRemoved:Delete",
                "s3": {"bucket": {"name": "b"}, "object": {"key": "x.zip"}},
            },
        ]
    }
    assert parse_s3_event(json.dumps(body)) == [("b", "lake/incoming/my pack!.zip", "e1")]
    assert parse_s3_event("not json") == []


def test_sqs_sensor_turns_uploads_into_runs_and_deletes_messages_one_tick_later(
    aws, small_digits_pack
):
    from orchestration.sensors import incoming_packs_sqs_sensor
    from workloads.layout import pack_id_for

    s3 = boto3.client("s3")
    pack = small_digits_pack(4)
    s3.put_object(Bucket="cvgraph-lake", Key="lake/incoming/first pack.zip", Body=pack)
    s3.put_object(
        Bucket="cvgraph-lake", Key="lake/incoming/first pack.zip", Body=pack
    )  # same key again: one request
    s3.put_object(Bucket="cvgraph-lake", Key="lake/incoming/second.zip", Body=pack)
    s3.put_object(Bucket="cvgraph-lake", Key="lake/other/not-a-pack.zip", Body=b"x")
    resources = {
        "lake": LakeResource(url=LAKE_URL),
        "pack_events": PackEvents(queue_url=aws.queue_url, visibility_timeout=300),
    }
    sqs = boto3.client("sqs")

    def in_flight():
        attrs = sqs.get_queue_attributes(
            QueueUrl=aws.queue_url,
            AttributeNames=["ApproximateNumberOfMessagesNotVisible", "ApproximateNumberOfMessages"],
        )["Attributes"]
        return int(attrs["ApproximateNumberOfMessagesNotVisible"]) + int(
            attrs["ApproximateNumberOfMessages"]
        )

    with dg.instance_for_test() as instance:
        first = incoming_packs_sqs_sensor(
            dg.build_sensor_context(instance=instance, resources=resources)
        )
        first_id = pack_id_for("incoming/first pack.zip")
        assert first_id.startswith("first_pack-")
        assert [(r.partition_key, r.tags["cvgraph/pack_key"]) for r in first.run_requests] == [
            (first_id, "incoming/first pack.zip"),
            ("second", "incoming/second.zip"),
        ]
        assert first.dynamic_partitions_requests[0].partition_keys == [first_id, "second"]
        assert in_flight() >= 3  # received, not yet deleted: the run requests are not recorded yet
        instance.add_dynamic_partitions("packs", [first_id, "second"])
        second = incoming_packs_sqs_sensor(
            dg.build_sensor_context(instance=instance, resources=resources, cursor=first.cursor)
        )
        assert second.run_requests == [] and in_flight() == 0
        assert json.loads(second.cursor) == {"delete": []}


def test_sqs_sensor_sends_a_replaced_zip_of_an_ingested_pack_to_a_run_once_per_upload(
    aws, small_digits_pack
):
    """An event for an ingested pack's key: an ingest run keyed by key@ETag (which refuses other
    bytes and records why), no new partition; the same upload redelivered is the same run key."""
    from orchestration.sensors import incoming_packs_sqs_sensor

    s3 = boto3.client("s3")
    resources = {
        "lake": LakeResource(url=LAKE_URL),
        "pack_events": PackEvents(queue_url=aws.queue_url, visibility_timeout=300),
    }
    with dg.instance_for_test() as instance:
        # an ingested pack: its record, the commit marker the sensor reads
        s3.put_object(Bucket="cvgraph-lake", Key="lake/packs/second/pack.json", Body=b"{}")
        etag = s3.put_object(
            Bucket="cvgraph-lake", Key="lake/incoming/second.zip", Body=small_digits_pack(3)
        )["ETag"].strip('"')
        tick = incoming_packs_sqs_sensor(
            dg.build_sensor_context(instance=instance, resources=resources)
        )
        assert [(r.run_key, r.partition_key) for r in tick.run_requests] == [
            (f"incoming/second.zip@{etag}", "second")
        ]
        assert tick.dynamic_partitions_requests == []
        # the same bytes uploaded again: another event, the same run key (Dagster runs it once)
        s3.put_object(
            Bucket="cvgraph-lake", Key="lake/incoming/second.zip", Body=small_digits_pack(3)
        )
        again = incoming_packs_sqs_sensor(
            dg.build_sensor_context(instance=instance, resources=resources, cursor=tick.cursor)
        )
        assert [r.run_key for r in again.run_requests] == [f"incoming/second.zip@{etag}"]


def test_a_freeze_on_athena_never_freezes_a_row_a_table_commit_shows_twice(
    subset_on_s3, aws, monkeypatch
):
    """Athena reads every object under `prefix=<pp>/`: between a table commit's new part and its
    clean-up, a replaced row is read twice. The freeze sees its manifest repeat an image the
    `images` table itself holds twice, asks again, and refuses in one line if it stays; once the
    commit is clean, the same freeze has one row per image."""
    from assets import subsets
    from assets.subsets import query_manifest, query_subset, rows_read_twice
    from workloads.image_params import ImageParams
    from workloads.layout import part_key

    lake, manifest = subset_on_s3
    catalog = athena()
    catalog.register_tables()
    sql = "SELECT * FROM images"
    assert rows_read_twice(catalog, query_manifest(catalog, sql)) == {}
    # a commit halfway: a new part written under the prefix, the old one not yet deleted
    prefix = manifest["prefix"][0].as_py()
    live = [k for k in lake.keys(f"tables/images/prefix={prefix}/") if k.endswith(".parquet")]
    stray = part_key("images", prefix, "halfway")
    lake.put(stray, lake.get(live[0]))
    seen = query_manifest(catalog, sql)
    twice = rows_read_twice(catalog, seen)
    assert twice and set(twice.values()) == {2} and {s[:2] for s in twice} == {prefix}
    assert seen.num_rows > manifest.num_rows  # the repeated image, once per copy and join

    monkeypatch.setattr(subsets, "RECHECK_S", (0.0,))
    context = dg.build_asset_context()
    with pytest.raises(dg.Failure) as refused:
        query_subset(
            context,
            lake,
            catalog,
            key="all",
            sql=sql,
            params=ImageParams(),
            allow_pending=True,
        )
    assert f"reads {len(twice)} image(s) twice (prefix(es) {prefix})" in refused.value.description
    lake.delete(stray)  # the commit's clean-up
    again = query_manifest(catalog, sql)
    assert rows_read_twice(catalog, again) == {} and again.num_rows == manifest.num_rows
