"""Concurrent writers, as users start them: two `cvgraph freeze` of one key at once (the same
query, and different ones), two ingests of one zip at once, the sensor's run racing a manual
ingest of the zip it found, a freeze that finds another's claim.
Exactly one subset or pack comes out, whole; the loser of a race over different queries is
refused in one line; nothing is left half-written."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).with_name("cvgraph"))
SETUP = """
import sys
from pathlib import Path
from cvgraph import Datasets
from cvgraph.demo_packs import digit_members, zip_bytes
pack = Path(sys.argv[1])
pack.write_bytes(zip_bytes(digit_members(size=32, limit=40, classes=(0, 1, 2))))
ds = Datasets()
ds.ingest(pack)
ds.sync()
"""
CHECK = """
import json
import sys
from cvgraph import Datasets
ds = Datasets()
key = sys.argv[1]
out = {"subsets": ds.instance.get_dynamic_partitions("subsets"), "keys": ds.lake.keys(f"subsets/{key}/")}
if ds.lake.exists(f"subsets/{key}/subset.json"):
    out["record"] = ds.subset(key)  # verifies the manifest against the record
print(json.dumps(out))
"""
# What the daemon does with a sensor tick: evaluate it, record its partitions, launch its runs
# (here when the test says go, so that the manual ingest starts while the tick's run is due).
SENSOR_TICK = """
import json
import sys
import dagster as dg
from assets.packs import raw_packs
from cvgraph import Datasets
from orchestration.sensors import incoming_packs_sensor
from partitions import pack_partitions_def
ds = Datasets()
needs = incoming_packs_sensor.required_resource_keys  # the daemon builds only these
resources = {k: v for k, v in ds.definitions.resources.items() if k in needs}
context = dg.build_sensor_context(instance=ds.instance, resources=resources)
tick = incoming_packs_sensor(context)
for request in tick.dynamic_partitions_requests:
    for key in request.partition_keys:
        ds.ensure_partition(pack_partitions_def, key)
print(json.dumps([[r.partition_key, r.tags] for r in tick.run_requests]), flush=True)
sys.stdin.readline()
for r in tick.run_requests:
    ds.materialize([raw_packs.key], partition_key=r.partition_key, tags=r.tags)
"""
PACKS = """
import json
import dagster as dg
from cvgraph import Datasets
ds = Datasets()
print(json.dumps({
    "partitions": sorted(ds.instance.get_dynamic_partitions("packs")),
    "ingested": sorted(ds.instance.get_materialized_partitions(dg.AssetKey("raw_packs"))),
}))
"""
# Prints the ids of the runs of subset partition argv[1] once argv[2] of them have started.
STARTED = """
import sys
import time
import dagster as dg
from cvgraph import Datasets
ds = Datasets()
while True:
    runs = ds.instance.get_runs(
        filters=dg.RunsFilter(
            tags={"dagster/partition": sys.argv[1]}, statuses=[dg.DagsterRunStatus.STARTED]
        )
    )
    if len(runs) >= int(sys.argv[2]):
        print(" ".join(r.run_id for r in runs), flush=True)
        break
    time.sleep(0.05)
"""
# DuckDB cannot fold this away: a second or more of work per evaluation, before any row
SLOW = "(SELECT sum(hash(range)) FROM range(1000000000)) <> 0"
ZEROS = "SELECT * FROM images WHERE label IN ('0', '1')"
TWOS = "SELECT * FROM images WHERE label IN ('1', '2')"


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def env(home, user_env):
    """The environment of a user whose home has 40 digits ingested and queryable."""
    env = user_env(home)
    _python(env, SETUP, home / "digits.zip")
    return env


def _python(env, script, *args) -> str:
    out = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _start(env, argv, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw
    )


def _finished(procs) -> list[subprocess.CompletedProcess]:
    return [
        subprocess.CompletedProcess(p.args, p.wait(timeout=600), p.stdout.read(), p.stderr.read())
        for p in procs
    ]


def _together(env, *commands) -> list[subprocess.CompletedProcess]:
    """Start every ``cvgraph`` command at once; wait for all."""
    return _finished([_start(env, [CLI, *cmd]) for cmd in commands])


def _state(env, key: str = "race_v1") -> dict:
    return json.loads(_python(env, CHECK, key).strip().splitlines()[-1])


def test_a_race_of_two_freezes_with_different_queries_gives_one_whole_subset(env):
    a, b = _together(env, ["freeze", "race_v1", ZEROS], ["freeze", "race_v1", TWOS])
    assert sorted([a.returncode, b.returncode]) == [0, 1], (a.stderr, b.stderr)
    winner, loser = (a, b) if a.returncode == 0 else (b, a)
    sql = ZEROS if winner is a else TWOS
    assert loser.stderr.count("\n") == 1 and "Traceback" not in loser.stderr
    assert (
        "subset race_v1 is being frozen with a different query" in loser.stderr
        or "subset race_v1 is frozen with a different query" in loser.stderr
    ), loser.stderr
    state = _state(env)
    assert state["subsets"] == ["race_v1"]  # the loser's failure did not take the winner's key
    assert state["record"]["sql"] == sql  # verified: manifest and record are one freeze's
    assert sorted(state["keys"]) == [
        "subsets/race_v1/claim.json",
        "subsets/race_v1/labels.png",
        "subsets/race_v1/manifest.parquet",
        "subsets/race_v1/subset.json",
    ]
    # the race over, the same query is the same subset, and the other is refused
    again = _together(env, ["freeze", "race_v1", sql], ["freeze", "race_v1", sql])
    assert [p.returncode for p in again] == [0, 0]
    assert _state(env)["record"]["manifest_sha256"] == state["record"]["manifest_sha256"]


def test_a_race_of_two_freezes_of_one_key_with_the_same_query_gives_one_subset(env):
    runs = _together(
        env, ["freeze", "same_v1", ZEROS, "--json"], ["freeze", "same_v1", ZEROS, "--json"]
    )
    assert [p.returncode for p in runs] == [0, 0], [p.stderr for p in runs]
    shas = {json.loads(p.stdout)["manifest_sha256"] for p in runs}
    assert len(shas) == 1


def test_a_race_lost_by_a_failing_freeze_keeps_the_partition_of_the_freeze_still_running(env):
    """The first freeze of a key adds its partition; a second starts while the first still
    queries; the first's query then matches nothing. Its undo must not take the partition: the
    second, which has no claim yet (it claims once its query is done), goes on to freeze it.
    Each process is paused (SIGSTOP) at its run's start, so the order is certain."""
    failing = _start(
        env, [CLI, "freeze", "slow_v1", f"SELECT * FROM images WHERE label = 'x' AND {SLOW}"]
    )
    _python(env, STARTED, "slow_v1", 1)
    failing.send_signal(signal.SIGSTOP)
    going = _start(env, [CLI, "freeze", "slow_v1", f"{ZEROS} AND {SLOW}", "--json"])
    _python(env, STARTED, "slow_v1", 2)
    going.send_signal(signal.SIGSTOP)
    failing.send_signal(signal.SIGCONT)
    [failed] = _finished([failing])
    going.send_signal(signal.SIGCONT)
    [frozen] = _finished([going])
    assert failed.returncode == 1 and "the query matched no images" in failed.stderr, failed.stderr
    assert frozen.returncode == 0, frozen.stderr
    state = _state(env, "slow_v1")
    assert "slow_v1" in state["subsets"]  # the failing freeze's undo left the running one's key
    assert state["record"]["manifest_sha256"] == json.loads(frozen.stdout)["manifest_sha256"]


def test_a_freeze_that_loses_the_race_to_another_queries_claim_is_refused_and_writes_nothing(
    env, home
):
    """The loser's side of the race, made certain: a claim for another query is there (as a
    freeze still running holds it); the freeze is refused before it writes; the claim is kept."""
    from resources.catalog import normalised_sql

    held = normalised_sql(TWOS)
    claim = home / "lake" / "subsets" / "held_v1" / "claim.json"
    claim.parent.mkdir(parents=True)
    claim.write_text(json.dumps({"sql": held}))
    [refused] = _together(env, ["freeze", "held_v1", ZEROS])
    assert refused.returncode == 1
    assert refused.stderr == (
        "Error: freeze of 'held_v1' failed: frozen_subsets: subset held_v1 is being frozen with "
        f"a different query ({held!r}): freeze under a new key (a killed freeze's claim: "
        "`cvgraph forget subset held_v1`)\n"
    )
    objects = [p.name for p in claim.parent.iterdir() if not p.name.startswith(".tmp-")]
    assert objects == ["claim.json"]  # (the local lake's lock files are no objects)
    assert json.loads(claim.read_text()) == {"sql": held}
    # the query it was claimed for goes on, as the claimer's own re-run would
    [done] = _together(env, ["freeze", "held_v1", TWOS])
    assert done.returncode == 0, done.stderr


def test_a_killed_freezes_claim_is_forgotten_once_its_process_is_gone_not_while_it_runs(env, home):
    """A freeze's claim holds its key: `cvgraph forget subset` refuses while the freeze's run is
    unfinished and its process alive, naming it. Killed (SIGKILL: its run stays STARTED in the
    instance), the next forget finds its process gone, ends the run (one line) and frees the key."""
    from resources.catalog import normalised_sql

    freeze = _start(env, [CLI, "freeze", "killed_v1", f"{TWOS} AND {SLOW}"])
    [run_id] = _python(env, STARTED, "killed_v1", 1).split()
    claim = home / "lake" / "subsets" / "killed_v1" / "claim.json"
    claim.parent.mkdir(parents=True, exist_ok=True)
    claim.write_text(json.dumps({"sql": normalised_sql(f"{TWOS} AND {SLOW}")}))  # its claim
    [refused] = _together(env, ["forget", "subset", "killed_v1"])
    assert refused.returncode == 1
    assert refused.stderr == (
        f"Error: subset 'killed_v1' is being frozen (run {run_id}): wait for it to end (a run "
        "whose process is gone is ended by the next command, this one included)\n"
    )
    assert claim.exists()
    freeze.kill()
    freeze.wait(timeout=60)
    [forgot] = _together(env, ["forget", "subset", "killed_v1"])
    assert forgot.returncode == 0, forgot.stderr
    assert f"run {run_id[:8]} (partition killed_v1) was left STARTED" in forgot.stderr
    assert "marked failed" in forgot.stderr
    state = _state(env, "killed_v1")
    assert "killed_v1" not in state["subsets"] and state["keys"] == []
    [frozen] = _together(env, ["freeze", "killed_v1", ZEROS])  # any query may take the key now
    assert frozen.returncode == 0, frozen.stderr


def test_a_race_of_two_ingests_of_one_zip_gives_one_pack(env, home, tmp_path):
    from cvgraph.demo_packs import sample_image, zip_bytes

    pack = tmp_path / "photos.zip"
    pack.write_bytes(
        zip_bytes({f"{n}/{n}.png": sample_image(f"{n}.png") for n in ("chelsea", "coffee")})
    )
    runs = _together(env, ["ingest", str(pack), "--json"], ["ingest", str(pack), "--json"])
    assert [p.returncode for p in runs] == [0, 0], [p.stderr for p in runs]
    reports = [json.loads(p.stdout) for p in runs]
    assert {r["pack_id"] for r in reports} == {"photos"}
    assert all(r["accepted"] + r["duplicates"] == 2 for r in reports)
    lake = home / "lake"
    record = json.loads((lake / "packs" / "photos" / "pack.json").read_text())
    assert (record["accepted"], record["duplicates"]) == (2, 0)
    assert not list((lake / ".tmp-staging").glob(".tmp-*"))  # no write left half-done


def test_the_sensors_run_racing_a_manual_ingest_of_its_zip_gives_one_pack(env, home, tmp_path):
    from cvgraph.demo_packs import sample_image, zip_bytes

    pack = tmp_path / "sensed.zip"
    members = ("astronaut.png", "camera.png", "rocket.jpg")
    pack.write_bytes(zip_bytes({f"space/{n}": sample_image(n) for n in members}))
    [uploaded] = _together(env, ["upload", str(pack)])
    assert uploaded.returncode == 0, uploaded.stderr
    daemon = _start(env, [sys.executable, "-c", SENSOR_TICK], stdin=subprocess.PIPE)
    requested = json.loads(daemon.stdout.readline() or "null")
    assert requested == [["sensed", {"cvgraph/pack_key": "incoming/sensed.zip"}]], (
        daemon.stderr.read() if requested is None else requested
    )
    manual = _start(env, [CLI, "ingest", str(pack), "--json"])
    daemon.stdin.write("go\n")
    daemon.stdin.close()
    ran, ingested = _finished([daemon, manual])
    assert (ran.returncode, ingested.returncode) == (0, 0), (ran.stderr[-2000:], ingested.stderr)
    report = json.loads(ingested.stdout)
    assert report["pack_id"] == "sensed" and report["accepted"] + report["duplicates"] == 3
    lake = home / "lake"
    record = json.loads((lake / "packs" / "sensed" / "pack.json").read_text())
    assert (record["accepted"], record["duplicates"], record["rejected"]) == (3, 0, [])
    state = json.loads(_python(env, PACKS).strip().splitlines()[-1])
    assert state["partitions"].count("sensed") == 1 and "sensed" in state["ingested"]
    assert not list((lake / ".tmp-staging").glob(".tmp-*"))  # no write left half-done
