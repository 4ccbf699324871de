"""What killed steps leave is swept by the next run: a killed ingest's staging dir, a killed put's
temp file; what a live step holds stays, whatever its age; ingest stages in the lake, not /tmp."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from workloads.ingest import ingest_pack, main
from workloads.lake import LocalLake
from workloads.staging import GRACE_S, STAGING, staging

# Enter a step's staging, write a member, say where, then die as `kill -9` would.
KILLED = """
import os, sys
from workloads.lake import LocalLake
from workloads.staging import staging
with staging(LocalLake(sys.argv[1]), sys.argv[2]) as d:
    (d / "member").write_bytes(b"x" * 1000)
    print(d, flush=True)
    if sys.argv[3] == "kill":
        os.kill(os.getpid(), 9)
    sys.stdin.read()  # "hold": live until the test closes stdin
"""


def _start(root, step, how):
    return subprocess.Popen(
        [sys.executable, "-c", KILLED, str(root), step, how],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )


def _age(path, seconds):
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_faults_that_kill_an_ingest_and_a_put_leave_what_the_next_ingest_sweeps(
    lake, put_pack, tmp_path, monkeypatch
):
    from cvgraph.demo_packs import sample_image

    killed = _start(lake.root, "ingest", "kill")
    left = killed.stdout.readline().strip()
    assert killed.wait() == -9
    assert os.path.isfile(os.path.join(left, "member"))  # what the kill left behind
    held = _start(lake.root, "ingest", "hold")
    live = held.stdout.readline().strip()
    staging_root = lake.root / STAGING
    half_put = staging_root / ".tmp-killed-put"
    half_put.write_bytes(b"y" * 500)
    fresh_put = staging_root / ".tmp-in-flight"
    fresh_put.write_bytes(b"z")
    other_step = staging_root / "export-left"
    other_step.mkdir()
    for p in (left, live, half_put, other_step):
        _age(p, GRACE_S + 60)

    # ingest stages in the lake: the machine's temp dir is not touched
    machine_tmp = tmp_path / "machine-tmp"
    machine_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(machine_tmp))
    key = put_pack("cats", {"cat/chelsea.png": sample_image("chelsea.png")})
    swept = []
    try:
        result = ingest_pack(lake, "cats", key, on_sweep=swept.append)
    finally:
        held.stdin.close()
        held.wait()
    assert result.accepted == 1
    assert [(s.entries, s.bytes) for s in swept] == [(2, 1000 + 500)]
    assert not os.path.exists(left) and not half_put.exists()
    assert fresh_put.exists()  # younger than the grace period: maybe a put in flight
    assert other_step.exists()  # another step's: its own next run sweeps it
    assert not os.path.exists(live)  # the live holder removed its own dir when it ended
    assert list(machine_tmp.iterdir()) == []
    assert sorted(p.name for p in staging_root.iterdir()) == [".tmp-in-flight", "export-left"]


def test_a_live_steps_staging_is_kept_whatever_its_age(lake):
    held = _start(lake.root, "ingest", "hold")
    live = held.stdout.readline().strip()
    _age(live, GRACE_S * 10)
    try:
        with staging(lake, "ingest") as mine:
            assert os.path.isdir(live) and mine.parent == lake.root / STAGING
    finally:
        held.stdin.close()
        assert held.wait() == 0
    assert not mine.exists()


def test_the_ingest_task_record_says_what_it_swept(lake, put_pack):
    from cvgraph.demo_packs import sample_image
    from workloads.layout import result_key

    killed = _start(lake.root, "ingest", "kill")
    left = killed.stdout.readline().strip()
    killed.wait()
    _age(left, GRACE_S + 1)
    key = put_pack("cups", {"cup/coffee.png": sample_image("coffee.png")})
    assert (
        main(["--lake", str(lake.root), "--pack-id", "cups", "--key", key, "--run-id", "r1"]) == 0
    )
    record = json.loads(lake.get(result_key("r1", "ingest", "cups")))
    assert record["swept"] == {"entries": 1, "bytes": 1000}
    assert not os.path.exists(left)


def test_lake_writes_stage_beside_the_lake_and_leave_nothing(tmp_path):
    lake = LocalLake(tmp_path / "lake")
    lake.put("a/b.bin", b"1")
    lake.put_file("a/c.bin", __file__)
    assert lake.put_file_if_absent("a/d.bin", __file__) is True
    assert lake.put_if_match("a/e.json", b"{}", None) is True
    assert lake.keys("") == ["a/b.bin", "a/c.bin", "a/d.bin", "a/e.json"]
    assert list((lake.root / STAGING).iterdir()) == []
