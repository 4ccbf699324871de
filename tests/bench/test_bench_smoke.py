"""Smoke test of the benchmark: ``python -m bench.run --quick`` runs every benchmark end to
end on small inputs and writes the twenty results. No timing thresholds here: speed is what
``make bench`` reports, on a quiet machine, not what the test suite asserts."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NAMES = (
    "kernel_vs_naive",
    "kernel_vs_decode_bound",
    "scaling_2_workers",
    "orchestrated_vs_bare",
    "ingest_peak_rss_mb",
    "freeze_1m_rows_s",
    "dataset_vs_direct",
    "incremental_time_ratio",
    "incremental_requests_ratio",
    "incremental_bytes_ratio",
    "new_pack_latency_s",
    "cli_help_s",
    "cli_query_s",
    "cli_sync_noop_s",
    "default_accuracy_digits",
    "default_accuracy_photos",
    "training_peak_rss_mb",
    "training_rss_ratio",
    "training_first_step_ratio",
    "training_input_vs_per_object",
    "default_map50_shapes",
)


@pytest.mark.timeout(1200)
def test_quick_bench_writes_every_result(tmp_path):
    out = tmp_path / "results.json"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("CVGRAPH_HOME", "DAGSTER_HOME", "CVGRAPH_LAKE_URL")
    }
    env["TMPDIR"] = str(tmp_path)  # the bench's scratch space lands in the test's tmp dir
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1180,
        check=False,
    )
    assert proc.returncode == 0, (
        f"bench exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    results = json.loads(out.read_text())
    assert set(results) == set(NAMES)
    for name in NAMES:
        r = results[name]
        assert isinstance(r, dict) and not r.get("error"), (name, r)
        for field in ("value", "target"):
            assert (
                isinstance(r[field], (int, float))
                and not isinstance(r[field], bool)
                and math.isfinite(r[field])
            ), (name, field, r[field])
        assert isinstance(r["pass"], bool), (name, r)
    assert "kernel_vs_naive" in proc.stdout  # the table was printed
    assert not list(tmp_path.glob("cvgraph-bench-*")), "the bench left its scratch directory behind"
