"""Who runs a run, and whether that process still exists: the test every command, the SDK's
partition rule and the local run launcher share (orchestration/liveness.py)."""

import socket
import subprocess
import sys

import dagster as dg

from orchestration.instance import instance_yaml
from orchestration.liveness import Runner, start_ticks


def test_a_runner_is_alive_while_its_process_is_and_a_reused_pid_is_not_it():
    me = Runner.this_process()
    assert Runner.from_tag(me.to_tag()) == me and me.alive() is True
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        runner = Runner(socket.gethostname(), child.pid, start_ticks(child.pid))
        assert runner.alive() is True
        # the same pid with another start time: a process that reused the pid, not the runner
        assert Runner(runner.host, runner.pid, str(int(runner.started) - 1)).alive() is False
    finally:
        child.kill()
        child.wait()
    assert runner.alive() is False  # gone (and reaped)
    assert (
        Runner("another-host", child.pid, runner.started).alive() is None
    )  # nothing here can tell


def test_a_zombie_counts_as_gone():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    started = start_ticks(child.pid)
    import time

    for _ in range(100):  # exited, not yet reaped by this parent
        if start_ticks(child.pid) is None:
            break
        time.sleep(0.05)
    assert started is not None and start_ticks(child.pid) is None
    child.wait()


def test_the_local_instance_monitors_runs_with_the_launcher_that_checks_their_process(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    (tmp_path / "dagster.yaml").write_text(instance_yaml())
    with dg.DagsterInstance.from_config(str(tmp_path)) as inst:
        assert inst.run_monitoring_enabled
        assert type(inst.run_launcher).__name__ == "LocalRunLauncher"
        assert inst.run_launcher.supports_check_run_worker_health
        assert inst.run_monitoring_max_resume_run_attempts == 0
