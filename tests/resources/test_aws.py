import dagster as dg
import pytest
from botocore.exceptions import ClientError

from resources.aws import poll, stopped_on_interrupt


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
