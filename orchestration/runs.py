"""Runs on the Dagster instance from the SDK and CLI: what the daemon does, on demand.

Runs execute in this process against the same instance ``make ui`` shows, so every
materialisation the SDK or CLI makes is in the asset lineage; each run carries who runs it
(``orchestration.liveness``), so a killed command's run is found and ended, never trusted.
``tick_incoming`` evaluates the real sensor; ``sync`` does what the lake is owed
(``assets.owed``, the definition ``cvgraph plan`` shows), grouped into ranged single runs.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence

import dagster as dg

from assets.owed import PREFIX_STEPS, Owed, owed, owed_ranges, run_keys
from assets.packs import PACK_KEY_TAG, raw_packs
from orchestration.definitions import ASSETS, defs
from orchestration.liveness import (
    RANGE_TAGS,
    RUNNER_TAG,
    Runner,
    end_dead_runs,
    held,
    held_prefixes,
    run_alive,
    steps,
    unfinished_runs,
)
from orchestration.sensors import incoming_packs_sensor
from orchestration.settings import mlflow_tracking_uri
from partitions import pack_partitions_def
from resources.tracking import end_runs_of

SENSOR_CURSOR = "cvgraph/sensor_cursor"
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
    tags = {**(tags or {}), RUNNER_TAG: Runner.this_process().to_tag()}  # who runs it
    if partition_range:
        tags.update(zip(RANGE_TAGS, partition_range))
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


def tick_incoming(
    inst: dg.DagsterInstance,
    on_run: Callable[[str, dg.ExecuteInProcessResult], None] | None = None,
    definitions: dg.Definitions | None = None,
    sensor: dg.SensorDefinition = incoming_packs_sensor,
    on_log: Callable[[str], None] | None = None,
) -> list[str]:
    """Evaluate an incoming-packs sensor once and run what it requests; returns pack ids. Its
    partitions are added one by one just before each pack's run (``ingest_owed`` finds a pack
    whose run never came, whatever partitions exist)."""
    definitions = definitions or defs
    cursor_key = f"{SENSOR_CURSOR}/{sensor.name}"
    resources = {k: definitions.resources[k] for k in sensor.required_resource_keys}
    ctx = dg.build_sensor_context(
        instance=inst, cursor=_kv_get(inst, cursor_key), resources=resources
    )
    result = sensor(ctx)
    pack_ids = []
    for rr in result.run_requests or []:
        _ingest(
            inst,
            rr.partition_key,
            tags=dict(rr.tags),
            definitions=definitions,
            on_log=on_log,
            on_run=on_run,
        )
        pack_ids.append(rr.partition_key)
    if result.cursor is not None:
        _kv_set(inst, cursor_key, result.cursor)
    return pack_ids


def _kv_get(inst: dg.DagsterInstance, key: str) -> str | None:
    return inst.run_storage.get_cursor_values({key}).get(key)


def _kv_set(inst: dg.DagsterInstance, key: str, value: str) -> None:
    inst.run_storage.set_cursor_values({key: value})


# the steps of the assets that log to MLflow: a run of them killed leaves its MLflow run RUNNING
TRACKED = {a.node_def.name for a in ASSETS if "mlflow" in a.required_resource_keys}


def end_dead(
    inst: dg.DagsterInstance, definitions: dg.Definitions, on_log: Callable | None = None
) -> list[str]:
    """``end_dead_runs``, stopping each dead run's remote work through the profile's compute and
    ending as KILLED the MLflow runs a dead run of a tracked asset left RUNNING."""
    compute = definitions.resources["image_compute"]

    def stop(run_id: str, why: str) -> list[str]:
        stopped = compute.stop_run(run_id, why)
        run = inst.get_run_by_id(run_id)
        if run is not None and set(steps(inst, run)) & TRACKED:
            try:
                ended = end_runs_of(mlflow_tracking_uri(), run_id, why)
            except Exception as e:  # best effort: the run is ended all the same, and says this
                stopped.append(f"its MLflow runs not ended: {type(e).__name__}: {str(e)[:120]}")
            else:
                stopped += [f"MLflow run {r[:8]} ended as KILLED" for r in ended]
        return stopped

    return end_dead_runs(inst, on_log, stop)


def lake_owed(definitions: dg.Definitions) -> Owed:
    """What the lake of ``definitions`` is owed (``assets.owed``)."""
    res = definitions.resources
    return owed(res["lake"].lake(), res["image_settings"].params())


def ingest_owed(
    inst: dg.DagsterInstance,
    on_run: Callable[[str, dg.ExecuteInProcessResult], None] | None = None,
    definitions: dg.Definitions | None = None,
    on_log: Callable[[str], None] | None = None,
    owes: Owed | None = None,
) -> list[str]:
    """Ingest every zip the lake is owed an ingest for (no committed pack record), whatever
    partitions or runs exist, except those a live run is ingesting now; returns pack ids.
    ``owes``: what the lake is owed, if just read (after the dead runs were ended)."""
    definitions = definitions or defs
    if owes is None:
        end_dead(inst, definitions, on_log)
        owes = lake_owed(definitions)
    busy = held(inst).get(raw_packs.node_def.name, set())
    pack_ids = []
    for z in owes.packs:
        if z.pack_id in busy:
            if on_log:
                on_log(f"pack {z.pack_id}: a live run is ingesting it; left to that run")
            continue
        _ingest(
            inst,
            z.pack_id,
            tags={PACK_KEY_TAG: z.key},
            definitions=definitions,
            on_log=on_log,
            on_run=on_run,
        )
        pack_ids.append(z.pack_id)
    return pack_ids


def _ingest(inst, pack_id: str, *, tags: dict, definitions, on_log, on_run) -> None:
    """The ingest run of ``pack_id`` (its partition added first), heard by ``on_run``."""
    ensure_partition(inst, pack_partitions_def, pack_id)
    run = materialize(
        inst,
        [raw_packs.key],
        partition_key=pack_id,
        tags=tags,
        raise_on_error=False,
        definitions=definitions,
        on_log=on_log,
    )
    if on_run:
        on_run(pack_id, run)


def sync(
    inst: dg.DagsterInstance,
    on_run: Callable[[list[str], tuple[str, str], dg.ExecuteInProcessResult], None] | None = None,
    max_rounds: int = 6,
    definitions: dg.Definitions | None = None,
    on_log: Callable[[str], None] | None = None,
    on_ingest: Callable[[str, dg.ExecuteInProcessResult], None] | None = None,
    packs: bool = True,
    on_owed: Callable[[Owed], None] | None = None,
) -> list[dict]:
    """Bring the lake to what it is owed (``assets.owed``, what ``cvgraph plan`` shows):
    end the runs whose process is gone, ingest the owed zips, then run each prefix asset over the
    owed prefixes (one ranged run, first to last owed prefix) until nothing is owed, or a round changes
    nothing (failed images: said on one line). Prefixes a live run holds are left to it.
    ``on_ingest(pack id, result)`` after each ingest, ``on_run(assets, range, result)`` after
    each prefix run, ``on_owed(owed)`` with what is owed when it stops; returns the prefix runs."""
    definitions = definitions or defs
    end_dead(inst, definitions, on_log)
    owes = lake_owed(definitions)
    if packs and owes.packs:
        ingest_owed(inst, on_run=on_ingest, definitions=definitions, on_log=on_log, owes=owes)
        owes = None
    launched, last = [], None
    for _ in range(max_rounds):
        owes = lake_owed(definitions) if owes is None else owes
        busy = held_prefixes(held(inst), PREFIX_STEPS)
        todo = owes.todo(busy)
        if busy & owes.all_prefixes and on_log:
            on_log(
                f"{len(busy & owes.all_prefixes)} owed prefix(es) are held by live runs; left to them"
            )
        if not todo:
            break
        if todo == last:  # a round changed nothing: what stays owed needs the user
            if on_log:
                on_log(f"still owed after a run: {owes.why(todo)}")
            break
        last, owes = todo, None
        keys = run_keys(todo)
        for rng in owed_ranges(set().union(*todo.values())):
            run = materialize(
                inst, keys, partition_range=rng, definitions=definitions, on_log=on_log
            )
            launched.append(
                {"assets": [k.to_user_string() for k in keys], "range": rng, "run_id": run.run_id}
            )
            if on_run:
                on_run([k.to_user_string() for k in keys], rng, run)
    if on_owed:
        on_owed(lake_owed(definitions) if owes is None else owes)
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
    """Ids of the runs not finished yet, and whose process is not known to be gone, whose plan
    executes ``asset``'s step for ``partition_key``."""
    return [
        r.run_id
        for r in unfinished_runs(inst, {"dagster/partition": partition_key})
        if asset.node_def.name in steps(inst, r) and run_alive(inst, r) is not False
    ]
