"""Peak RSS of ``python -m workloads.ingest`` on a large pack (≥ 2 GB by default).

The pack is stream-written (ZIP_STORED, one member in memory at a time) straight into a
scratch lake's ``incoming/``: 6 MP JPEG mosaics made distinct by a unique comment segment,
and noise PNGs (valid images, incompressible bytes). The ingest runs as a child process; its
peak RSS is ``ru_maxrss`` from ``wait4`` on that child (and /proc polling as a cross-check).
Everything is deleted afterwards.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

from bench.common import PY, REPO, env, log


def _poll_hwm(pid: int, peak: dict, stop: threading.Event) -> None:
    """Cross-check: the largest VmHWM (RSS high-water mark) seen in /proc while ``pid`` runs."""
    while not stop.is_set():
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak["hwm_kb"] = max(peak.get("hwm_kb", 0), int(line.split()[1]))
        except (FileNotFoundError, ProcessLookupError):
            return
        stop.wait(0.02)


def measure(
    cmd: list[str], work: Path, extra_env: dict | None = None, worker: bool = False
) -> dict:
    """Run ``cmd`` under ``bench.rss``: its own peak RSS (wait4), the /proc-polled VmHWM, wall time, stdout."""
    work.mkdir(parents=True, exist_ok=True)
    rec_path = work / f"rss-{time.time_ns()}.json"
    launcher = subprocess.Popen(
        [PY, "-m", "bench.rss", str(rec_path), "--", *cmd],
        cwd=REPO,
        env=env(extra_env, worker=worker),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    peak: dict = {}
    stop = threading.Event()

    def poll_child() -> None:  # the command is the launcher's only child
        deadline = time.time() + 30
        while time.time() < deadline and not stop.is_set():
            try:
                kids = (
                    Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
                )
            except FileNotFoundError:
                return
            if kids:
                _poll_hwm(int(kids[0]), peak, stop)
                return
            time.sleep(0.005)

    poller = threading.Thread(target=poll_child, daemon=True)
    poller.start()
    out, err = launcher.communicate()
    stop.set()
    poller.join()
    rec = json.loads(rec_path.read_text())
    rec_path.unlink()
    return {
        "returncode": rec["returncode"],
        "peak_rss_mb": round(rec["maxrss_kb"] / 1024, 1),
        "polled_hwm_mb": round(peak.get("hwm_kb", 0) / 1024, 1),
        "wall_s": round(rec["wall_s"], 2),
        "cpu_s": round(rec["user_s"] + rec["sys_s"], 2),
        "stdout": out.decode(errors="replace"),
        "stderr": err.decode(errors="replace")[-3000:],
    }


def bench(
    work: Path,
    target_bytes: int,
    png_side: tuple[int, int] = (3000, 2000),
    worker_env_too: bool = True,
) -> dict:
    from bench.inputs import big_pack_members, write_pack

    lake = work / "lake"
    key = "incoming/big.zip"
    t0 = time.perf_counter()
    pack = write_pack(lake / key, big_pack_members(target_bytes, png_side=png_side))
    gen_s = time.perf_counter() - t0
    log(
        f"ingest: wrote a {pack['zip_bytes'] / 1e9:.2f} GB pack of {pack['members']} members in {gen_s:.1f} s"
    )
    # The fixed part: the interpreter with the ingest's imports, no data.
    baseline = measure(
        [PY, "-c", "import workloads.ingest, workloads.kernels, PIL.Image, pyarrow.parquet"], work
    )
    cmd = [PY, "-m", "workloads.ingest", "--lake", str(lake), "--pack-id", "big", "--key", key]
    runs = {}
    try:
        plain = measure(cmd, work)
        runs["cli"] = plain
        if worker_env_too:
            # The local profile runs the same command with LocalProcessPool's environment
            # (glibc malloc thresholds raised for the image workers): measure that too.
            for sub in ("raw", "packs"):
                shutil.rmtree(lake / sub, ignore_errors=True)
            runs["local_pool_env"] = measure(cmd, work, worker=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for name, r in runs.items():
        if r["returncode"] != 0:
            raise RuntimeError(f"ingest ({name}) exited {r['returncode']}: {r['stderr']}")
        rec = json.loads(r["stdout"].strip().splitlines()[-1])
        assert rec["accepted"] == pack["members"], (
            f"ingest accepted {rec['accepted']} of {pack['members']}: {rec['rejected'][:3]}"
        )
        r["accepted"] = rec["accepted"]
        r["gb_per_s"] = round(pack["zip_bytes"] / 1e9 / r["wall_s"], 3)
        del r["stdout"], r["stderr"]
    return {
        "pack": {
            **pack,
            "zip_gb": round(pack["zip_bytes"] / 1e9, 3),
            "generate_s": round(gen_s, 1),
        },
        "import_only_rss_mb": baseline["peak_rss_mb"],
        **runs,
    }
