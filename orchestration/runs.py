"""Runs on the Dagster instance from the SDK and CLI: what the daemon does, on demand.

Runs execute in this process against the same instance ``make ui`` shows, so every
materialisation the SDK or CLI makes is in the asset lineage. ``tick_incoming`` evaluates
the real sensor; ``sync`` evaluates the real automation conditions and launches what they
request, grouped into ranged single runs as the automation daemon does.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence

import dagster as dg
from dagster._serdes import deserialize_value, serialize_value

from assets.images import raw_images
from assets.packs import raw_packs
from orchestration.definitions import ASSETS, defs
from orchestration.sensors import incoming_packs_sensor
from partitions import hash_prefix_partitions_def
from workloads.layout import PENDING_RAW, marker_pack, pending_raw_prefix
from workloads.versions import HASH_PREFIXES

RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"
SENSOR_CURSOR = "cvgraph/sensor_cursor"
AUTOMATION_CURSOR = "cvgraph/automation/cursor"
# In-process runs log to the instance (the UI shows every event); the terminal gets only what the
# caller prints, and a failed run reaches it as one line (RunFailed, failure_message), not as
# Dagster's console log of the step's stack trace.
QUIET = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
RUN_JOB = "__ephemeral_asset_job__"  # dg.materialize's name for the job it builds
LIBRARY_NOTES = ("[pipes]", "Starting a new mlflow run")  # the libraries' own INFO notes


def log_lines(on_log: Callable[[str], None]) -> Callable:
    """An event listener passing each user log line of INFO or above (``context.log``, and a
    Pipes process's log, as the run goes) to ``on_log`` as ``"<step>: <message>"``."""

    def listen(entry) -> None:
        if entry.dagster_event is None and entry.level >= logging.INFO:
            # The libraries' own notes (Pipes opened, dagster-mlflow started its run) say nothing
            # about the work; their warnings do
            if entry.level == logging.INFO and entry.user_message.startswith(LIBRARY_NOTES):
                return
            on_log(f"{entry.step_key or 'run'}: {entry.user_message}")

    return listen


class RunFailed(Exception):
    def __init__(self, message: str, result: dg.ExecuteInProcessResult | None = None):
        super().__init__(message)
        self.result = result


def step_failures(result: dg.ExecuteInProcessResult) -> list[str]:
    """``"<step>: <message>"`` of each failed step of the run."""
    msgs = []
    for ev in result.all_events:
        if ev.is_step_failure and ev.step_failure_data and ev.step_failure_data.error:
            err = ev.step_failure_data.error
            while err.cause is not None and err.cls_name in ("DagsterExecutionStepExecutionError",):
                err = err.cause
            message = err.message.strip()
            if err.cls_name == "Failure":  # a description written for the user: no class name
                message = message.split(": ", 1)[-1]
            msgs.append(f"{ev.step_key}: {message}")
    return msgs


def failure_message(result: dg.ExecuteInProcessResult, first_lines: bool = False) -> str:
    """The run's step failures, one per line; ``first_lines``: only each one's first line
    (what a terminal shows; the run in the Dagster UI has the rest)."""
    msgs = step_failures(result)
    if first_lines:
        return "; ".join(m.splitlines()[0] for m in msgs) or "run failed"
    return "\n".join(msgs) or "run failed"


def materialize(
    inst: dg.DagsterInstance,
    keys: Sequence[dg.AssetKey],
    *,
    partition_key: str | None = None,
    partition_range: tuple[str, str] | None = None,
    run_config: dict | None = None,
    tags: dict | None = None,
    raise_on_error: bool = True,
    definitions: dg.Definitions | None = None,
    on_log: Callable[[str], None] | None = None,
) -> dg.ExecuteInProcessResult:
    """``dg.materialize`` of ``keys``, with the run's id known before it starts so that
    ``on_log`` hears its log lines live (``log_lines``)."""
    tags = dict(tags or {})
    if partition_range:
        tags[RANGE_START], tags[RANGE_END] = partition_range
    config = {**QUIET, **(run_config or {})}
    definitions = definitions or defs
    job = dg.Definitions(
        jobs=[dg.define_asset_job(RUN_JOB, selection=list(keys))],
        assets=ASSETS,
        resources=definitions.resources,
    ).resolve_job_def(RUN_JOB)
    run_id = str(uuid.uuid4())
    if on_log:
        inst.add_event_listener(run_id, log_lines(on_log))
    result = job.execute_in_process(
        run_config=config,
        instance=inst,
        partition_key=partition_key,
        raise_on_error=False,
        tags=tags,
        run_id=run_id,
    )
    if raise_on_error and not result.success:
        raise RunFailed(failure_message(result), result)
    return result


def _kv_get(inst: dg.DagsterInstance, key: str) -> str | None:
    return inst.run_storage.get_cursor_values({key}).get(key)


def _kv_set(inst: dg.DagsterInstance, key: str, value: str) -> None:
    inst.run_storage.set_cursor_values({key: value})


def _automation_baseline(inst: dg.DagsterInstance, definitions: dg.Definitions) -> None:
    """Declarative automation ignores everything before its first evaluation; the daemon
    evaluates continuously, so make sure the on-demand path has evaluated once before
    packs land."""
    if _kv_get(inst, AUTOMATION_CURSOR) is None:
        result = dg.evaluate_automation_conditions(defs=definitions, instance=inst)
        _kv_set(inst, AUTOMATION_CURSOR, serialize_value(result.cursor))


def tick_incoming(
    inst: dg.DagsterInstance,
    on_run: Callable[[str, dg.ExecuteInProcessResult], None] | None = None,
    definitions: dg.Definitions | None = None,
    sensor: dg.SensorDefinition = incoming_packs_sensor,
    on_log: Callable[[str], None] | None = None,
) -> list[str]:
    """Evaluate an incoming-packs sensor once and run what it requests; returns pack ids."""
    definitions = definitions or defs
    _automation_baseline(inst, definitions)
    cursor_key = f"{SENSOR_CURSOR}/{sensor.name}"
    resources = {k: definitions.resources[k] for k in sensor.required_resource_keys}
    ctx = dg.build_sensor_context(
        instance=inst, cursor=_kv_get(inst, cursor_key), resources=resources
    )
    result = sensor(ctx)
    for req in result.dynamic_partitions_requests or []:
        inst.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
    pack_ids = []
    for rr in result.run_requests or []:
        run = materialize(
            inst,
            [raw_packs.key],
            partition_key=rr.partition_key,
            tags=dict(rr.tags),
            raise_on_error=False,
            definitions=definitions,
            on_log=on_log,
        )
        pack_ids.append(rr.partition_key)
        if on_run:
            on_run(rr.partition_key, run)
    if result.cursor is not None:
        _kv_set(inst, cursor_key, result.cursor)
    return pack_ids


def forgotten_prefixes(lake) -> set[str]:
    """Prefixes whose index has a pack to drop (``cvgraph forget pack``): one listing."""
    return {pending_raw_prefix(k) for k in lake.keys(PENDING_RAW) if (m := marker_pack(k)) and m[1]}


def contiguous_ranges(keys: set[str]) -> list[tuple[str, str]]:
    """Sorted runs of consecutive hash prefixes: one single-run backfill range each."""
    ranges, start, prev = [], None, None
    for i, p in enumerate(HASH_PREFIXES):
        if p in keys:
            start = p if start is None else start
            prev = p
        elif start is not None:
            ranges.append((start, prev))
            start = None
    if start is not None:
        ranges.append((start, prev))
    return ranges


def sync(
    inst: dg.DagsterInstance,
    on_run: Callable[[list[str], tuple[str, str], dg.ExecuteInProcessResult], None] | None = None,
    max_rounds: int = 6,
    definitions: dg.Definitions | None = None,
    on_log: Callable[[str], None] | None = None,
) -> list[dict]:
    """Evaluate the automation conditions and run what they request until nothing is requested."""
    definitions = definitions or defs
    raw = _kv_get(inst, AUTOMATION_CURSOR)
    cursor = deserialize_value(raw) if raw else None
    launched = []
    prefix_keys = [
        k
        for k in definitions.resolve_asset_graph().get_all_asset_keys()
        if definitions.resolve_assets_def(k).partitions_def == hash_prefix_partitions_def
    ]
    for _ in range(max_rounds):
        result = dg.evaluate_automation_conditions(defs=definitions, instance=inst, cursor=cursor)
        cursor = result.cursor
        _kv_set(inst, AUTOMATION_CURSOR, serialize_value(cursor))
        requested = {
            k: set(result.get_requested_partitions(k))
            for k in prefix_keys
            if result.get_num_requested(k)
        }
        # Prefixes with a pack to forget: no materialisation tells automation of those.
        dropping = forgotten_prefixes(definitions.resources["lake"].lake())
        if dropping:
            requested.setdefault(raw_images.key, set()).update(dropping)
        if any(inst.get_materialized_partitions(raw_packs.key)):
            # Never-materialised prefixes too: automation only reacts to changes it has seen.
            for k in prefix_keys:
                missing = set(HASH_PREFIXES) - set(inst.get_materialized_partitions(k))
                if missing:
                    requested.setdefault(k, set()).update(missing)
        if not requested:
            break
        union = set().union(*requested.values())
        keys = sorted(requested, key=lambda k: k.to_user_string())
        for rng in contiguous_ranges(union):
            run = materialize(
                inst, keys, partition_range=rng, definitions=definitions, on_log=on_log
            )
            launched.append(
                {"assets": [k.to_user_string() for k in keys], "range": rng, "run_id": run.run_id}
            )
            if on_run:
                on_run([k.to_user_string() for k in keys], rng, run)
    return launched


def ensure_partition(
    inst: dg.DagsterInstance, partitions_def: dg.DynamicPartitionsDefinition, key: str
) -> None:
    """Add partition ``key`` unless it is there. Dagster checks, then inserts: two processes
    adding one key at once can both pass the check, and the second insert breaks the storage's
    unique constraint; that loser finds the key there, which is all it wanted."""
    from sqlalchemy.exc import IntegrityError  # what both storages, SQLite and PostgreSQL, raise

    if inst.has_dynamic_partition(partitions_def.name, key):
        return
    try:
        inst.add_dynamic_partitions(partitions_def.name, [key])
    except IntegrityError:
        if not inst.has_dynamic_partition(partitions_def.name, key):
            raise


def running(inst: dg.DagsterInstance, asset: dg.AssetsDefinition, partition_key: str) -> list[str]:
    """Ids of the runs not finished yet whose plan executes ``asset``'s step for ``partition_key``
    (a run of a selection job records no asset selection: its plan names the steps)."""
    statuses = [s for s in dg.DagsterRunStatus if s.value not in ("SUCCESS", "FAILURE", "CANCELED")]
    runs = inst.get_runs(
        filters=dg.RunsFilter(tags={"dagster/partition": partition_key}, statuses=statuses)
    )

    def steps(run: dg.DagsterRun):
        plan = run.execution_plan_snapshot_id
        return (inst.get_execution_plan_snapshot(plan).step_keys_to_execute or ()) if plan else ()

    return [r.run_id for r in runs if asset.node_def.name in steps(r)]
