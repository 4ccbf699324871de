"""Shared helpers: subprocess environment, CPU-load accounting, medians, results."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")


def env(
    extra: dict | None = None, worker: bool = False, drop: tuple[str, ...] = ()
) -> dict[str, str]:
    """A subprocess environment: the repo importable, quiet, optionally the worker's malloc settings."""
    e = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("MALLOC_")}
    e["PYTHONPATH"] = str(REPO) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e["PYTHONUNBUFFERED"] = "1"
    from orchestration.instance import DAGSTER_ENV  # the settings the CLI gives Dagster

    for name, value in DAGSTER_ENV.items():
        e.setdefault(name, value)
    if worker:
        from resources.compute import WORKER_MALLOC  # what LocalProcessPool gives its workers

        e.update(WORKER_MALLOC)
    e.update(extra or {})
    return e


def run_json(
    args: list[str],
    extra_env: dict | None = None,
    worker: bool = False,
    drop: tuple[str, ...] = (),
    timeout: float = 1800,
) -> dict:
    """Run ``python -m <args>`` and parse the last stdout line as JSON."""
    proc = subprocess.run(
        [PY, "-m", *args],
        cwd=REPO,
        env=env(extra_env, worker=worker, drop=drop),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    return json.loads(lines[-1])


def median(xs) -> float:
    return float(statistics.median(xs))


def system_cpu_seconds() -> float:
    """CPU seconds all cores have been busy since boot (user+nice+system+irq+softirq+steal)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


class LoadMeter:
    """How many cores *other* processes kept busy during a measurement.

    Everything busy on the machine in the interval, minus the CPU time of the measured work
    (this process, plus ``ours_extra``: what its workers report, or the children it waited
    for inside the interval with ``children=True``), is someone else's load.
    """

    def __init__(self, children: bool = False):
        self.children = children
        self.t0 = time.perf_counter()
        self.busy0 = system_cpu_seconds()
        self.self0 = _own_cpu(children)

    def external_cores(self, ours_extra: float = 0.0) -> float:
        wall = time.perf_counter() - self.t0
        busy = system_cpu_seconds() - self.busy0
        ours = (_own_cpu(self.children) - self.self0) + ours_extra
        return round(max(0.0, busy - ours) / max(wall, 1e-9), 3)


def _own_cpu(children: bool) -> float:
    t = os.times()
    return t.user + t.system + ((t.children_user + t.children_system) if children else 0.0)


def wait_for_quiet(max_wait_s: float, threshold_cores: float = 0.2, sample_s: float = 1.0) -> dict:
    """Wait (at most ``max_wait_s``) until other processes use less than ``threshold_cores``."""
    t0 = time.perf_counter()
    load = None
    while True:
        meter = LoadMeter()
        time.sleep(sample_s)
        load = meter.external_cores()
        waited = time.perf_counter() - t0
        if load < threshold_cores or waited >= max_wait_s:
            return {
                "external_load_cores": load,
                "waited_s": round(waited, 1),
                "quiet": load < threshold_cores,
            }


def result(value: float, target: float, op: str, unit: str, **measured) -> dict:
    """One benchmark's record: the measured numbers, the value, the target and pass/fail."""
    ok = value >= target if op == ">=" else value <= target if op == "<=" else value < target
    return {
        "value": round(float(value), 4),
        "unit": unit,
        "target": target,
        "target_op": op,
        "pass": bool(ok),
        **measured,
    }


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
