"""Kill anything, run it again, on the aws profile (moto on 127.0.0.1; Batch jobs and SageMaker
training jobs run by the test harness as AWS would: they go on when the process that submitted
them dies).

One user's session — `sync`, `forget`, `ingest`, `freeze`, `train`, `export`, `tune` — in two fresh
accounts: in one, every command is SIGKILLed (the CLI and its process group) at seeded moments
and after its Nth progress line, then run again to its end; in the other no one interrupts it.
After each command the lakes are the same: rows, original and variant bytes, data versions of
every prefix, packs, frozen manifests; nothing owed, no run left unfinished; the model and
exports records are the same but for the ids of the runs that made them. The next command ends
a killed one's runs and terminates its Batch jobs; a re-run train waits for (or reuses) the
training job its killed run started, a re-run tune the tuning job."""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.lake_state import SEEDS, SQL, cvgraph, kill_points, killed_at, lake_state


def _user(home) -> dict:
    """The environment of a user of the aws fixture's account with their own home."""
    return {
        **os.environ,
        "CVGRAPH_HOME": str(home),
        "DAGSTER_HOME": str(home / "dagster"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db",
    }


def _quiet(harness, timeout: float = 120) -> None:
    """Wait until no Batch job the harness started is running (a killed run's jobs included)."""
    import boto3

    batch = boto3.client("batch")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = [
            j["jobId"]
            for status in ("SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING")
            for j in batch.list_jobs(jobQueue="cvgraph", jobStatus=status)["jobSummaryList"]
        ]
        # an array's own status in a listing lags its children: describe says what it is
        busy = [
            j
            for i in range(0, len(listed), 100)
            for j in batch.describe_jobs(jobs=listed[i : i + 100])["jobs"]
            if j["status"] not in ("SUCCEEDED", "FAILED")
        ]
        if not busy:
            return
        time.sleep(0.5)
    raise AssertionError(
        f"Batch jobs still running after {timeout} s: "
        f"{[(j['jobName'], j['status'], j.get('statusReason')) for j in busy]}"
    )


# A user's session: (command, kill sweep seed, span in seconds, progress lines); after each, the
# lake (and the train and export records) are compared with the uninterrupted account's.
SESSION = (
    (["sync"], 4, 20.0, 30),
    (["forget", "pack", "b"], 5, 8.0, 20),
    (["ingest", "{b}"], 6, 4.0, 4),
    (["sync"], 7, 10.0, 20),
    (["freeze", "s", SQL], 8, 4.0, 3),
    (["train", "m", "--subset", "s", "--epochs", "2", "--json"], 9, 20.0, 8),
    (["export", "m", "--json"], 10, 8.0, 3),
    # a sweep: one SageMaker tuning job, found again by its name when re-run
    (
        [
            "tune",
            "m2",
            "--subset",
            "s",
            "--trials",
            "2",
            "--parallel",
            "2",
            "--epochs",
            "2",
            "--json",
        ],
        11,
        20.0,
        6,
    ),
)
RUN_IDS = {"dagster_run_id", "mlflow_run_id"}


def _session(harness, env: dict, packs, kill: bool) -> list:
    """Run ``SESSION`` in ``env`` (each command killed first if ``kill``); what each left."""
    for p in packs:
        cvgraph(env, "upload", str(p))
    out, kills = [], 0
    for n, (command, seed, span, lines) in enumerate(SESSION):
        args = [a.format(b=packs[1]) for a in command]
        points = kill_points(seed, span, lines, seeds=max(1, SEEDS // 2))
        if SEEDS <= 2:  # the default suite: one point a command, seeded and named in turn
            points = points[n % 2 :: 2][:1]
        for point in points if kill else []:
            kills += killed_at(env, args, **point)
        done = cvgraph(env, *args, check=False)
        # a killed forget that got to its end leaves nothing for the re-run to forget
        assert done.returncode == 0 or "no ingested pack 'b'" in done.stderr, done.stderr[-3000:]
        _quiet(harness)
        if args[-1] == "--json":
            rec = json.loads(done.stdout)
            out.append({k: v for k, v in rec.items() if k not in RUN_IDS})
        else:
            out.append(lake_state(env))
    if kill:
        assert kills >= len(SESSION) // 2, f"only {kills} kills landed"
    return out


@pytest.fixture(scope="module")
def aws_packs(tmp_path_factory) -> list:
    """Two packs of digits, three classes each, smaller than the local kill tests' (each command
    is killed and run again in two accounts; a Batch child, a process in the harness, takes a
    group of the prefixes: one a workload for packs this small)."""
    from cvgraph.demo_packs import digit_members, zip_bytes

    root = tmp_path_factory.mktemp("aws_packs")
    out = []
    for name, classes in (("a", (0, 1, 2)), ("b", (3, 4, 5))):
        path = root / f"{name}.zip"
        path.write_bytes(zip_bytes(digit_members(size=32, limit=24, classes=classes)))
        out.append(path)
    return out


def test_kill_every_command_on_the_aws_profile_then_again_makes_the_uninterrupted_lake(
    fresh_aws, aws_packs, tmp_path
):
    killed = _session(
        fresh_aws(tmp_path / "killed"), _user(tmp_path / "killed" / "home"), aws_packs, True
    )
    clean = _session(
        fresh_aws(tmp_path / "clean"), _user(tmp_path / "clean" / "home"), aws_packs, False
    )
    for (args, *_), got, want in zip(SESSION, killed, clean, strict=True):
        if "owed" not in got:  # the train and export records
            assert got == want, f"cvgraph {args[0]}: records differ from the uninterrupted ones"
            continue
        if args[0] != "ingest":  # an ingest leaves its pack's prefixes to the next sync
            assert want["owed"] == {"packs": [], "prefixes": {}}, (args, want["owed"])
        assert got["unfinished"] == [], f"cvgraph {args[0]} left runs unfinished"
        for part in ("owed", "packs", "images", "objects", "bytes", "versions", "subsets"):
            assert got[part] == want[part], f"after cvgraph {args[0]}: {part} differ"
