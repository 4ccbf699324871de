import dagster as dg
import pytest
from botocore.exceptions import ClientError

from resources.aws import link_on_materializations, poll, stopped_on_interrupt


def test_poll_describes_until_done_and_shows_every_description():
    states = iter(["SUBMITTED", "RUNNING", "SUCCEEDED", "unreached"])
    seen = []
    assert poll(lambda: next(states), lambda s: s == "SUCCEEDED", 0, seen.append) == "SUCCEEDED"
    assert seen == ["SUBMITTED", "RUNNING", "SUCCEEDED"]


@pytest.mark.parametrize(
    "error, stops",
    [
        (dg.DagsterExecutionInterruptedError(), True),
        (KeyboardInterrupt(), True),
        (ClientError({"Error": {"Code": "ThrottlingException"}}, "DescribeJobs"), False),
        (RuntimeError("a bug in the caller"), False),
    ],
)
def test_only_a_cancel_stops_the_remote_work(error, stops):
    stopped = []
    with pytest.raises(type(error)), stopped_on_interrupt(lambda: stopped.append(True)):
        raise error
    assert stopped == ([True] if stops else [])


def test_a_stop_that_fails_does_not_hide_the_cancel():
    def stop():
        raise ClientError({"Error": {"Code": "ValidationException"}}, "StopTrainingJob")

    with pytest.raises(dg.DagsterExecutionInterruptedError), stopped_on_interrupt(stop):
        raise dg.DagsterExecutionInterruptedError()


LINK = {"batch_job_chain": "https://us-east-1.console.aws.amazon.com/batch/home#jobs/detail/j"}


def test_a_console_link_lands_on_every_asset_and_partition_the_step_materializes():
    """A multi-asset step over a range of partitions: each asset's materialization of each
    partition has the link (what the UI shows), beside what the asset yields itself."""
    parts = dg.StaticPartitionsDefinition(["00", "01", "02"])

    @dg.multi_asset(specs=[dg.AssetSpec("a"), dg.AssetSpec("b")], partitions_def=parts)
    def both(context: dg.AssetExecutionContext):
        link_on_materializations(context, LINK)
        yield dg.MaterializeResult(asset_key="a", metadata={"own": 1})
        yield dg.MaterializeResult(asset_key="b")

    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [both],
            instance=instance,
            tags={
                "dagster/asset_partition_range_start": "00",
                "dagster/asset_partition_range_end": "02",
            },
        )
    events = result.get_asset_materialization_events()
    assert len(events) == 6  # two assets, three partitions
    for e in events:
        metadata = e.materialization.metadata
        assert metadata["batch_job_chain"] == dg.MetadataValue.url(LINK["batch_job_chain"])
        if e.asset_key == dg.AssetKey("a"):
            assert metadata["own"].value == 1


def test_a_console_link_never_fails_a_step_whose_context_cannot_take_it():
    """No asset (a context built outside any invocation), an op's context, an asset invoked
    directly: the link is left out (with a warning where it was meant for an asset)."""
    link_on_materializations(dg.build_asset_context(), LINK)
    link_on_materializations(dg.build_op_context(), LINK)

    @dg.asset(partitions_def=dg.StaticPartitionsDefinition(["00"]))
    def direct(context: dg.AssetExecutionContext) -> int:
        link_on_materializations(context, LINK)
        return 1

    assert direct(dg.build_asset_context(partition_key="00")) == 1
