"""What the AWS clients (Batch, SageMaker, Athena) share: boto3 clients, polling, cancellation.

Shaped like dagster-aws's Pipes clients: the boto3 client is created once and can be injected,
remote work is polled until it finishes, and stopped when the Dagster run is cancelled.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Self, TypeVar

import dagster as dg
from pydantic import PrivateAttr

from workloads.objects import RETRIES

T = TypeVar("T")


# What a cancelled run raises in its step: Dagster's interrupt, or a bare KeyboardInterrupt
# where the resource is driven outside a step.
INTERRUPTS = (dg.DagsterExecutionInterruptedError, KeyboardInterrupt)

# boto3's default session is not safe to create clients from in several threads at once.
_CREATING = threading.RLock()


def aws_client(service: str, region_name: str | None = None):
    """A boto3 client for ``service`` with the shared retries. The endpoint is boto3's own
    resolution (AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_<SERVICE>), as for every client before."""
    import boto3
    from botocore.config import Config

    with _CREATING:
        return boto3.client(service, region_name=region_name, config=Config(retries=dict(RETRIES)))


class AwsResource(dg.ConfigurableResource):
    """A resource that calls AWS: one boto3 client per service, created on first use, or injected
    with ``with_client``."""

    region_name: str | None = None

    _clients: dict[str, Any] = PrivateAttr(default_factory=dict)

    def with_client(self, client) -> Self:
        """Use ``client`` (a boto3 client) for its service instead of creating one; returns self.

        An injected client lives in this object only: a Dagster run builds its resources again
        from their config, so a run creates its own clients."""
        self._clients[client.meta.service_model.service_name] = client
        return self

    def _client(self, service: str):
        with _CREATING:
            if service not in self._clients:
                self._clients[service] = aws_client(service, self.region_name)
            return self._clients[service]


class PollTimedOut(TimeoutError):
    """The remote work was still not done when the poll's time ran out; ``state`` is the last
    description."""

    def __init__(self, state, seconds: float):
        super().__init__(f"not done after {seconds:g} s")
        self.state = state


def poll(
    describe: Callable[[], T],
    done: Callable[[T], bool],
    interval: float,
    on_tick: Callable[[T], None] | None = None,
    timeout: float | None = None,
) -> T:
    """``describe()`` every ``interval`` seconds until ``done`` is true of it; returns that
    description. Each description goes to ``on_tick`` first (to log a change of state). Past
    ``timeout`` seconds (None: never) raises ``PollTimedOut``: what to stop is the caller's call."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        state = describe()
        if on_tick is not None:
            on_tick(state)
        if done(state):
            return state
        if deadline is not None and time.monotonic() >= deadline:
            raise PollTimedOut(state, timeout)
        time.sleep(interval)


@contextmanager
def stopped_on_interrupt(stop: Callable[[], None]) -> Iterator[None]:
    """Run the block; if the run is cancelled meanwhile, ``stop()`` the remote work and re-raise.

    Only a cancel stops it: any other error (a describe that failed past its retries) says
    nothing about the remote work, which goes on and leaves its results in the lake. A stop that
    fails is logged, so the cancel still ends the step."""
    try:
        yield
    except INTERRUPTS:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            stop()
        except (BotoCoreError, ClientError) as e:
            dg.get_dagster_logger().warning(f"run cancelled, but stopping its AWS work failed: {e}")
        raise


def batch_console_url(region: str, job_id: str) -> str:
    """The AWS console's page of Batch job ``job_id`` (an array child's too)."""
    return (
        f"https://{region}.console.aws.amazon.com/batch/home?region={region}#jobs/detail/{job_id}"
    )


def sagemaker_console_url(region: str, kind: str, name: str) -> str:
    """The AWS console's page of SageMaker job ``name`` (``kind``: jobs, hyper-tuning-jobs)."""
    return f"https://{region}.console.aws.amazon.com/sagemaker/home?region={region}#/{kind}/{name}"


# A step's metadata is read, extended and put back: a sweep's trials link theirs from threads.
_LINKING = threading.Lock()


def link_on_materializations(context, links: dict[str, str]) -> None:
    """``{name: url}`` (a remote job's console page) on what the step materializes: each of its
    assets' materializations (every partition of a ranged run) shows the link in the Dagster UI.
    Only an asset step's context can take it (not an op's, nor one built outside a run's step);
    a link that cannot be added is a warning, never the step's failure."""
    if not (links and isinstance(context, dg.AssetExecutionContext)):
        return
    try:
        if not context.has_assets_def:
            return
    except dg.DagsterError:  # built outside any asset's invocation: no asset to link on
        return
    metadata = {name: dg.MetadataValue.url(url) for name, url in links.items()}
    try:
        with _LINKING:
            for key in context.selected_asset_keys:
                context.add_asset_metadata(metadata, asset_key=key)
    except (dg.DagsterError, AttributeError) as e:  # e.g. an asset invoked directly
        context.log.warning(f"console links not added to the materializations ({e}): {links}")
