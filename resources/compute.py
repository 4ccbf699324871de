"""Image compute role: run the ``workloads`` CLIs over a range of prefixes or one pack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from abc import ABC, abstractmethod

import dagster as dg
from tqdm import tqdm

from workloads.images import ImageParams


class WorkloadFailed(Exception):
    pass


class ImageCompute(dg.ConfigurableResource, ABC):
    @abstractmethod
    def run_image_stages(self, context: dg.AssetExecutionContext, lake_url: str, run_id: str, stages: list[str], prefixes: list[str], params: ImageParams) -> None:
        """Run ``stages`` for every prefix; each prefix task leaves its result record in the lake."""

    @abstractmethod
    def run_ingest(self, context: dg.AssetExecutionContext, lake_url: str, pack_id: str, key: str) -> dict:
        """Ingest one pack; returns the workload's JSON result (``error`` set if unreadable)."""


def _shard(items: list[str], n: int) -> list[list[str]]:
    n = max(1, min(n, len(items)))
    return [items[i::n] for i in range(n)]


class LocalProcessPool(ImageCompute):
    """Runs the workload CLI in local processes: the same command a Batch child runs."""

    max_workers: int = 2
    threads_per_worker: int = 4

    def _env(self) -> dict[str, str]:
        # Large decode buffers: keep glibc from trimming and faulting pages back in (TESTING.md).
        return {**os.environ, "MALLOC_MMAP_THRESHOLD_": "67108864", "MALLOC_TRIM_THRESHOLD_": "268435456", "PYTHONUNBUFFERED": "1"}

    def _run_all(self, context, commands: list[list[str]], on_line) -> list[tuple[int, str]]:
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self._env()) for cmd in commands]
        errs: list[list[str]] = [[] for _ in procs]

        def pump(i: int, p: subprocess.Popen) -> None:
            for line in p.stdout:
                on_line(line.strip())

        def drain(i: int, p: subprocess.Popen) -> None:
            for line in p.stderr:
                errs[i].append(line)

        threads = [threading.Thread(target=f, args=(i, p), daemon=True) for i, p in enumerate(procs) for f in (pump, drain)]
        for t in threads:
            t.start()
        try:
            for p in procs:
                p.wait()
        except BaseException:  # run cancelled (DagsterExecutionInterruptedError) or killed
            for p in procs:
                p.kill()
            raise
        for t in threads:
            t.join()
        return [(p.returncode, "".join(errs[i][-30:])) for i, p in enumerate(procs)]

    def run_image_stages(self, context, lake_url, run_id, stages, prefixes, params):
        base = [sys.executable, "-m", "workloads.images", "--lake", lake_url, "--run-id", run_id, "--stages", ",".join(stages), "--threads", str(self.threads_per_worker), *params.cli_args()]
        commands = [[*base, "--prefixes", ",".join(shard)] for shard in _shard(prefixes, self.max_workers)]
        done = {"n": 0}
        total = len(prefixes) * len(stages)
        lock = threading.Lock()
        # A terminal gets a bar (disable=None turns it off when stderr is not a TTY).
        bar = tqdm(total=total, desc="/".join(stages), unit="prefix", disable=None, leave=False)

        def on_line(line: str) -> None:
            try:
                rec = json.loads(line)
            except ValueError:
                context.log.debug(line)
                return
            with lock:
                done["n"] += 1
                n = done["n"]
                bar.update(1)
            if rec["processed"] or n % 32 == 0 or n == total:
                context.log.info(f"[{n}/{total}] {rec['stage']} {rec['prefix']}: {rec['processed']} new, {rec['skipped']} already done ({rec['seconds']}s)")

        context.log.info(f"{len(commands)} local worker(s) for {len(prefixes)} prefix(es), stages {stages}")
        try:
            outcomes = self._run_all(context, commands, on_line)
        finally:
            bar.close()
        for code, err in outcomes:
            if code != 0:
                raise WorkloadFailed(f"workloads.images exited {code}:\n{err}")

    def run_ingest(self, context, lake_url, pack_id, key):
        cmd = [sys.executable, "-m", "workloads.ingest", "--lake", lake_url, "--pack-id", pack_id, "--key", key]
        lines: list[str] = []
        [(code, err)] = self._run_all(context, [cmd], lines.append)
        if code not in (0, 3) or not lines:
            raise WorkloadFailed(f"ingest of pack {pack_id} ({key}) exited {code}:\n{err}")
        return json.loads(lines[-1])
