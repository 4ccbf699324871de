"""End to end through ``dagster dev``: sensor → ingest run, a GraphQL launched run, a 256-prefix backfill.

One ``dagster dev`` (webserver + daemon + code server) serves the whole module, with a
temporary CVGRAPH_HOME (the lake) and DAGSTER_HOME. Everything is driven the way a user
or a CI job would drive it: files dropped into ``incoming/`` and GraphQL over HTTP.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import requests

from cvgraph.demo_packs import zip_bytes
from orchestration.instance import DAGSTER_ENV

REPO = Path(__file__).resolve().parents[2]
DAGSTER = REPO / ".venv" / "bin" / "dagster"
LOCATION = "orchestration.definitions"
REPOSITORY = "__repository__"
HOST = "127.0.0.1"

PACK = "pets"
IMAGE_STAGE_ASSETS = ["raw_images", "resized_images", "edge_maps", "image_tables"]
TERMINAL_RUN = {"SUCCESS", "FAILURE", "CANCELED"}
TERMINAL_BACKFILL = {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}


def _skimage_file(name: str) -> bytes:
    import skimage.data

    return (Path(skimage.data.__file__).parent / name).read_bytes()


# member name (the top folder is the label) → bytes of a real bundled photo
PACK_MEMBERS = {
    "cat/chelsea.png": _skimage_file("chelsea.png"),
    "cup/coffee.png": _skimage_file("coffee.png"),
    "person/astronaut.png": _skimage_file("astronaut.png"),
}
SHAS = {name: hashlib.sha256(data).hexdigest() for name, data in PACK_MEMBERS.items()}


# -- GraphQL documents (field names checked against dagster_graphql 1.13.27's schema) ---------

WORKSPACE_QUERY = """
query {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError {
          __typename
          ... on RepositoryLocation { repositories { name } }
          ... on PythonError { message stack }
        }
      }
    }
    ... on PythonError { message }
  }
}
"""

RUN_FIELDS = "runId status jobName tags { key value } assetSelection { path }"

RUNS_QUERY = f"""
query Runs($filter: RunsFilter) {{
  runsOrError(filter: $filter) {{
    __typename
    ... on Runs {{ results {{ {RUN_FIELDS} }} }}
    ... on Error {{ message }}
  }}
}}
"""

RUN_QUERY = f"""
query Run($runId: ID!) {{
  runOrError(runId: $runId) {{
    __typename
    ... on Run {{ {RUN_FIELDS} }}
    ... on Error {{ message }}
  }}
}}
"""

LOGS_QUERY = """
query Logs($runId: ID!, $afterCursor: String) {
  logsForRun(runId: $runId, afterCursor: $afterCursor) {
    __typename
    ... on EventConnection {
      cursor
      hasMore
      events {
        __typename
        ... on MessageEvent { message level stepKey }
        ... on ErrorEvent { error { message cause { className message stack } } }
        ... on MaterializationEvent { assetKey { path } partition }
      }
    }
    ... on Error { message }
  }
}
"""

LAUNCH_RUN = """
mutation Launch($executionParams: ExecutionParams!) {
  launchRun(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on Error { message }
  }
}
"""

LAUNCH_BACKFILL = """
mutation Backfill($backfillParams: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $backfillParams) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on Error { message }
  }
}
"""

BACKFILL_QUERY = f"""
query Backfill($backfillId: String!) {{
  partitionBackfillOrError(backfillId: $backfillId) {{
    __typename
    ... on PartitionBackfill {{
      id
      status
      numPartitions
      isAssetBackfill
      error {{ message }}
      runs {{ {RUN_FIELDS} }}
    }}
    ... on Error {{ message }}
  }}
}}
"""


# -- the dagster dev process -------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _processes_with_env(var: str, value: str) -> list[int]:
    """Pids of live (non-zombie) processes whose environment has ``var=value``."""
    needle = f"{var}={value}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # gone, or not ours
            continue
        if state != "Z":
            pids.append(int(entry.name))
    return pids


@dataclass
class DagsterDev:
    port: int
    home: Path
    dagster_home: Path
    log: Path
    proc: subprocess.Popen

    @property
    def lake(self) -> Path:
        return self.home / "lake"

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no dagster dev log)"
        return "\n".join(text.splitlines()[-lines:])

    def fail(self, message: str, last: Any = None) -> None:
        pytest.fail(
            f"{message}\n--- last GraphQL response ---\n{last!r}\n--- dagster dev log (tail) ---\n{self.log_tail()}",
            pytrace=False,
        )

    def graphql(self, query: str, **variables: Any) -> dict:
        """POST one GraphQL document; returns ``data``. Transport/schema errors fail the test."""
        if self.proc.poll() is not None:
            self.fail(f"dagster dev exited with {self.proc.returncode}")
        resp = requests.post(
            f"http://{HOST}:{self.port}/graphql",
            json={"query": query, "variables": variables},
            timeout=30,
        )
        try:
            body = resp.json()
        except ValueError:
            self.fail(f"GraphQL answered HTTP {resp.status_code} with non-JSON", resp.text[:2000])
        if resp.status_code != 200 or body.get("errors"):
            self.fail(f"GraphQL error (HTTP {resp.status_code})", body)
        return body["data"]

    def wait_for(
        self, what: str, probe: Callable[[], tuple[Any, Any]], timeout: float, interval: float = 2.0
    ) -> Any:
        """Call ``probe`` until its first value is truthy; fail after ``timeout`` s with its last response."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            value, last = probe()
            if value:
                return value
            if time.monotonic() > deadline:
                self.fail(f"timed out after {timeout:.0f}s waiting for {what}", last)
            time.sleep(interval)

    # -- runs --------------------------------------------------------------------------------

    def runs(self, tags: dict[str, str]) -> tuple[list[dict], dict]:
        data = self.graphql(
            RUNS_QUERY, filter={"tags": [{"key": k, "value": v} for k, v in tags.items()]}
        )
        result = data["runsOrError"]
        if result["__typename"] != "Runs":
            self.fail("runsOrError did not return Runs", data)
        return result["results"], data

    def run(self, run_id: str) -> tuple[dict, dict]:
        data = self.graphql(RUN_QUERY, runId=run_id)
        if data["runOrError"]["__typename"] != "Run":
            self.fail(f"run {run_id} not found", data)
        return data["runOrError"], data

    def events(self, run_id: str) -> list[dict]:
        events: list[dict] = []
        cursor = None
        while True:
            data = self.graphql(LOGS_QUERY, runId=run_id, afterCursor=cursor)
            conn = data["logsForRun"]
            if conn["__typename"] != "EventConnection":
                self.fail(f"logsForRun {run_id} failed", data)
            events += conn["events"]
            if not conn["hasMore"]:
                return events
            cursor = conn["cursor"]

    def failure_summary(self, run_id: str) -> str:
        lines = []
        for e in self.events(run_id):
            if e.get("level") in ("ERROR", "CRITICAL") or e.get("error"):
                lines.append(f"[{e['__typename']} {e.get('stepKey')}] {e.get('message')}")
                if e.get("error"):
                    lines.append(f"    {e['error']['message'].strip()}")
                    cause = e["error"].get("cause")
                    if cause:
                        lines.append(
                            f"    caused by {cause['className']}: {cause['message'].strip()}"
                        )
                        lines += [f"      {frame.rstrip()}" for frame in cause["stack"][-4:]]
        return "\n".join(lines[-20:]) or "(no error events)"

    def wait_for_run(self, run_id: str, timeout: float) -> dict:
        def probe():
            run, data = self.run(run_id)
            return (run if run["status"] in TERMINAL_RUN else None), data

        run = self.wait_for(f"run {run_id} to finish", probe, timeout)
        if run["status"] != "SUCCESS":
            self.fail(f"run {run_id} ended {run['status']}:\n{self.failure_summary(run_id)}", run)
        return run


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def dagster_dev(tmp_path_factory, request) -> Iterator[DagsterDev]:
    """``dagster dev`` on each storage: the default SQLite instance, and one on a real PostgreSQL
    server (``CVGRAPH_DAGSTER_PG_URL``), as a team's shared instance would be."""
    base = tmp_path_factory.mktemp(f"dagster_dev_{request.param}")
    env = _dev_env(base)
    if request.param == "postgres":
        env["CVGRAPH_DAGSTER_PG_URL"] = request.getfixturevalue("postgres_database")("dagster_dev")
    dev = _start_dev(base, env)
    try:
        _wait_until_loaded(dev)
        yield dev
    finally:
        _stop_all(dev)


def _dev_env(base: Path) -> dict:
    """The environment ``make ui`` gives ``dagster dev``, with the homes under ``base``."""
    home, dagster_home = base / "cvgraph", base / "dagster"
    (home / "lake" / "incoming").mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "CVGRAPH_HOME": str(home),
        "DAGSTER_HOME": str(dagster_home),
        **DAGSTER_ENV,  # as the Makefile exports it for `make ui`
        "CVGRAPH_WORKERS": "2",
        "PYTHONUNBUFFERED": "1",
    }
    for var in (
        "CVGRAPH_LAKE_URL",
        "CVGRAPH_PROFILE",
        "MLFLOW_TRACKING_URI",
        "CVGRAPH_MLFLOW_ARTIFACTS",
        "CVGRAPH_DAGSTER_PG_URL",
    ):
        env.pop(var, None)
    return env


def _start_dev(base: Path, env: dict) -> DagsterDev:
    """``dagster dev`` (webserver, daemon, code server) in a process group of its own."""
    # The instance as `make ui` sets it up (orchestration.instance writes its dagster.yaml).
    subprocess.run(
        [
            str(REPO / ".venv" / "bin" / "python"),
            "-c",
            "from orchestration.instance import dagster_home; dagster_home()",
        ],
        cwd=REPO,
        env=env,
        check=True,
    )
    port = _free_port()
    log = base / "dagster_dev.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [str(DAGSTER), "dev", "-w", "workspace.yaml", "-p", str(port), "-h", HOST],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # dagster dev ignores SIGTERM alone; stop the whole group
        )
    home, dagster_home = Path(env["CVGRAPH_HOME"]), Path(env["DAGSTER_HOME"])
    return DagsterDev(port=port, home=home, dagster_home=dagster_home, log=log, proc=proc)


def _stop_all(dev: DagsterDev, sig: signal.Signals = signal.SIGTERM) -> None:
    """Stop ``dagster dev``'s group (``SIGKILL``: all at once, as a reclaimed host would); the
    webserver, daemon, code server and run workers all share it and none may survive it."""
    if sig == signal.SIGKILL:
        try:
            os.killpg(dev.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        dev.proc.wait(timeout=30)
    else:
        _stop(dev.proc)
    deadline = time.monotonic() + 30
    while (
        left := _processes_with_env("DAGSTER_HOME", str(dev.dagster_home))
    ) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes outlived dagster dev: {left}"


def _stop(proc: subprocess.Popen) -> None:
    pgid = proc.pid  # start_new_session: the leader's pid is the group id
    try:
        os.killpg(pgid, signal.SIGTERM)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    try:
        os.killpg(pgid, signal.SIGKILL)  # stragglers of the group, even if the leader is gone
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _wait_until_loaded(dev: DagsterDev, timeout: float = 120) -> None:
    def probe():
        try:
            data = dev.graphql(WORKSPACE_QUERY)
        except requests.ConnectionError as e:
            return None, f"not answering yet: {e}"
        ws = data["workspaceOrError"]
        if ws["__typename"] != "Workspace":
            dev.fail("workspaceOrError failed", data)
        for entry in ws["locationEntries"]:
            if entry["name"] != LOCATION or entry["loadStatus"] != "LOADED":
                continue
            loc = entry["locationOrLoadError"]
            if loc and loc["__typename"] == "PythonError":
                dev.fail(f"code location {LOCATION} failed to load", loc)
            if loc and REPOSITORY in {r["name"] for r in loc["repositories"]}:
                return True, data
        return None, data

    dev.wait_for(f"the webserver to answer and {LOCATION} to load", probe, timeout)


# -- the pack ------------------------------------------------------------------------------------


def _upload(lake: Path, name: str, data: bytes) -> None:
    """Drop ``incoming/<name>`` into the lake atomically (the listing skips ``.tmp-`` names)."""
    incoming = lake / "incoming"
    tmp = incoming / f".tmp-{name}"
    tmp.write_bytes(data)
    os.replace(tmp, incoming / name)


def _asset_paths(run: dict) -> set[str]:
    return {"/".join(a["path"]) for a in run["assetSelection"] or []}


@pytest.fixture(scope="module")
def ingested(dagster_dev: DagsterDev) -> dict:
    """Upload ``pets.zip`` and wait for the run the ``incoming_packs`` sensor launches for it."""
    dev = dagster_dev
    _upload(dev.lake, f"{PACK}.zip", zip_bytes(PACK_MEMBERS))

    def probe():
        runs, data = dev.runs({"dagster/partition": PACK})
        runs = [r for r in runs if "raw_packs" in _asset_paths(r)]
        finished = [r for r in runs if r["status"] in TERMINAL_RUN]
        return (finished[0] if finished else None), data

    run = dev.wait_for(f"a finished raw_packs run for partition {PACK!r}", probe, timeout=180)
    if run["status"] != "SUCCESS":
        dev.fail(
            f"ingest run {run['runId']} ended {run['status']}:\n{dev.failure_summary(run['runId'])}",
            run,
        )
    return run


# -- tests ---------------------------------------------------------------------------------------


@pytest.mark.timeout(900)
def test_sensor_turns_uploaded_pack_into_a_run(dagster_dev: DagsterDev, ingested: dict):
    tags = {t["key"]: t["value"] for t in ingested["tags"]}
    assert tags.get("dagster/partition") == PACK
    assert tags.get("dagster/sensor_name") == "incoming_packs"
    assert tags.get("cvgraph/pack_key") == f"incoming/{PACK}.zip"
    assert _asset_paths(ingested) == {"raw_packs"}

    record = json.loads((dagster_dev.lake / "packs" / PACK / "pack.json").read_text())
    assert record["accepted"] == len(PACK_MEMBERS), record
    for sha in SHAS.values():
        assert list((dagster_dev.lake / "raw" / sha[:2]).glob(f"{sha}.*")), (
            f"original {sha} not stored"
        )


@pytest.mark.timeout(900)
def test_launch_run_materialises_one_prefix(dagster_dev: DagsterDev, ingested: dict):
    dev = dagster_dev
    sha = SHAS["cat/chelsea.png"]
    prefix = sha[:2]
    data = dev.graphql(
        LAUNCH_RUN,
        executionParams={
            "selector": {
                "repositoryLocationName": LOCATION,
                "repositoryName": REPOSITORY,
                "jobName": "__ASSET_JOB",
                "assetSelection": [{"path": ["raw_images"]}],
            },
            "executionMetadata": {"tags": [{"key": "dagster/partition", "value": prefix}]},
        },
    )
    launched = data["launchRun"]
    if launched["__typename"] != "LaunchRunSuccess":
        dev.fail("launchRun failed", data)
    run_id = launched["run"]["runId"]

    run = dev.wait_for_run(run_id, timeout=180)
    assert _asset_paths(run) == {"raw_images"}
    materialised = {
        ("/".join(e["assetKey"]["path"]), e["partition"])
        for e in dev.events(run_id)
        if e["__typename"] == "MaterializationEvent"
    }
    assert materialised == {("raw_images", prefix)}

    index = dev.lake / "index" / "raw" / f"{prefix}.parquet"
    assert index.is_file(), f"{index} missing after run {run_id}"
    assert sha in pq.read_table(index, columns=["sha256"]).column("sha256").to_pylist()


@pytest.mark.timeout(900)
def test_backfill_of_all_prefixes_is_one_run(dagster_dev: DagsterDev, ingested: dict):
    dev = dagster_dev
    data = dev.graphql(
        LAUNCH_BACKFILL,
        backfillParams={
            "assetSelection": [{"path": [a]} for a in IMAGE_STAGE_ASSETS],
            "allPartitions": True,
            "title": "all prefixes",
        },
    )
    launched = data["launchPartitionBackfill"]
    if launched["__typename"] != "LaunchBackfillSuccess":
        dev.fail("launchPartitionBackfill failed", data)
    backfill_id = launched["backfillId"]

    def probe():
        d = dev.graphql(BACKFILL_QUERY, backfillId=backfill_id)
        bf = d["partitionBackfillOrError"]
        if bf["__typename"] != "PartitionBackfill":
            dev.fail(f"backfill {backfill_id} not found", d)
        return (bf if bf["status"] in TERMINAL_BACKFILL else None), d

    backfill = dev.wait_for(f"backfill {backfill_id} to finish", probe, timeout=300, interval=3)
    assert backfill["isAssetBackfill"]
    if backfill["status"] != "COMPLETED_SUCCESS":
        summaries = "\n".join(
            f"{r['runId']} {r['status']}:\n{dev.failure_summary(r['runId'])}"
            for r in backfill["runs"]
        )
        dev.fail(f"backfill {backfill_id} ended {backfill['status']}\n{summaries}", backfill)

    # Only the backfill's own runs: the automation sensor may have launched others for these assets.
    runs, data = dev.runs({"dagster/backfill": backfill_id})
    assert len(runs) == 1, (
        f"expected the 256-prefix backfill to be one run, got {[(r['runId'], r['status']) for r in runs]}"
    )
    [run] = runs
    assert run["status"] == "SUCCESS", run
    assert {r["runId"] for r in backfill["runs"]} == {run["runId"]}
    assert _asset_paths(run) == set(IMAGE_STAGE_ASSETS)
    tags = {t["key"]: t["value"] for t in run["tags"]}
    assert (
        tags.get("dagster/asset_partition_range_start"),
        tags.get("dagster/asset_partition_range_end"),
    ) == ("00", "ff"), tags

    lake = dev.lake
    for name, sha in SHAS.items():
        prefix = sha[:2]
        tables = list((lake / "tables" / "images" / f"prefix={prefix}").glob("part-*.parquet"))
        assert tables, f"no images part in prefix {prefix} ({name})"
        resized = list(lake.glob(f"resized/*/{prefix}/{sha}.jpg"))
        assert len(resized) == 1, f"resized JPEG of {name} ({sha}): {resized}"
        assert resized[0].read_bytes()[:3] == b"\xff\xd8\xff", f"{resized[0]} is not a JPEG"
        assert list(lake.glob(f"edges/*/{prefix}/{sha}.png")), f"edge map of {name} ({sha}) missing"


# -- the daemon killed -----------------------------------------------------------------------


@pytest.mark.timeout(1200)
def test_kill_the_daemon_mid_tick_and_mid_run_then_restart_converges(
    tmp_path, kill_packs, clean_lake
):
    """`dagster dev` (webserver, daemon, code server, run workers) SIGKILLed as a whole as soon
    as the incoming sensor's tick has launched an ingest run, then again once a prefix run has
    started; restarted, the daemon alone (run monitoring failing the dead runs, the sensors
    asking the lake what is owed) brings the lake to the uninterrupted one."""
    from tests.lake_state import SQL, assert_same_lake, cvgraph, lake_state

    env = _dev_env(tmp_path)
    for p in kill_packs:
        _upload(Path(env["CVGRAPH_HOME"]) / "lake", p.name, p.read_bytes())

    def started(dev: DagsterDev, assets: set[str]) -> Callable[[], tuple[Any, Any]]:
        def probe():
            runs, data = dev.runs({})
            return [r for r in runs if _asset_paths(r) & assets and r["status"] == "STARTED"], data

        return probe

    # mid-run (its worker executing a step), then mid-tick of the next sensor's runs
    for assets, delay in (({"raw_packs"}, 1.0), ({"raw_images", "image_tables"}, 2.0)):
        dev = _start_dev(tmp_path, env)
        try:
            _wait_until_loaded(dev)
            dev.wait_for(f"a started run of {assets}", started(dev, assets), 300, interval=0.3)
            time.sleep(delay)
        finally:
            _stop_all(dev, signal.SIGKILL)
    killed = lake_state(env)
    assert killed["unfinished"], "no run was left unfinished: the kills landed after the work"
    assert killed["owed"] != {"packs": [], "prefixes": {}}

    dev = _start_dev(tmp_path, env)
    try:
        _wait_until_loaded(dev)

        def converged():
            state = lake_state(env)
            done = state["owed"] == {"packs": [], "prefixes": {}} and not state["unfinished"]
            return done, {k: state[k] for k in ("owed", "unfinished")}

        dev.wait_for("the lake to owe nothing", converged, timeout=600, interval=5)
    finally:
        _stop_all(dev)
    cvgraph(env, "freeze", "s", SQL)
    assert_same_lake(env, clean_lake)
