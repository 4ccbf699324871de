"""Shared fixtures. The whole suite runs against a temporary CVGRAPH_HOME (set before the
code location is imported, since resources are read from the environment at load)."""

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

SESSION_HOME = Path(tempfile.mkdtemp(prefix="cvgraph-test-"))
os.environ["CVGRAPH_HOME"] = str(SESSION_HOME)
os.environ.pop("DAGSTER_HOME", None)
os.environ.pop("CVGRAPH_LAKE_URL", None)
os.environ.setdefault("CVGRAPH_WORKERS", "2")
# Small shards, so the demo's busier prefixes (digits: ~7 images a prefix) run as (prefix, shard)
# tasks and a merge: the end-to-end assertions then hold for the sharded path too.
os.environ.setdefault("CVGRAPH_SHARD_IMAGES", "8")
# `make test` runs two workers on this 2-core machine: OpenMP's threads (torch's, OpenCV's) wait
# passively, not spinning, so two trainings side by side share the cores instead of burning
# them (side by side, spinning, a detector's default training passed its 900 s bound).
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session", autouse=True)
def _session_home():
    """The suite's CVGRAPH_HOME goes when the suite does (pytest's tmp_path dirs rotate themselves)."""
    yield SESSION_HOME
    shutil.rmtree(SESSION_HOME, ignore_errors=True)


# `make test` runs the suite on two workers, a test file at a time each (pytest-xdist,
# --dist loadfile), in collection order: the longest files go first, so no long one starts last
# and leaves the other worker idle.
LONGEST_FIRST = (
    "tests/test_end_to_end.py",
    "tests/orchestration/test_dagster_dev.py",
    "tests/aws/test_kill_aws.py",
    "tests/cvgraph/test_kill.py",
    "tests/cvgraph/test_tune_cli.py",
    "tests/cvgraph/test_pack_predictions.py",
    "tests/cvgraph/test_byo_trainer.py",
    "tests/cvgraph/test_detection_cli.py",
    "tests/bench/test_bench_smoke.py",
    "tests/aws/test_mlflow_server.py",
    "tests/aws/test_injected_faults.py",
    "tests/aws/test_sagemaker_tuning.py",
    "tests/aws/test_sagemaker.py",
    "tests/aws/test_batch.py",
    "tests/workloads/training/test_sweep.py",
    "tests/workloads/training/test_detection.py",
    "tests/workloads/training/test_models.py",
    "tests/cvgraph/test_concurrency.py",
)


def pytest_collection_modifyitems(config, items: list) -> None:
    rank_of = {config.rootpath / f: n for n, f in enumerate(LONGEST_FIRST)}

    def rank(item) -> int:
        return rank_of.get(item.path, len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: each file's tests keep their order


LOCK = Path(__file__).resolve().parents[1] / "requirements.lock"


@pytest.fixture(scope="session")
def user_env():
    """``user_env(home)``: the environment of a user with their own CVGRAPH_HOME, on the local
    profile (none of the suite's instance or lake), for the processes a test starts."""

    def env(home) -> dict:
        # a user's home has its own MLflow store (under it) unless the test names a server
        mine = ("DAGSTER_HOME", "CVGRAPH_LAKE_URL", *MLFLOW_CLIENT_VARIABLES)
        keep = {k: v for k, v in os.environ.items() if k not in mine}
        return {**keep, "CVGRAPH_HOME": str(home), "CVGRAPH_PROFILE": "local"}

    return env


MLFLOW_CLIENT_VARIABLES = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
)


@pytest.fixture(autouse=True)
def _mlflow_client_variables_restored():
    """``mlflow.set_tracking_uri`` (dagster-mlflow's resource calls it) exports
    MLFLOW_TRACKING_URI so that subprocesses inherit it: a test that ran MLflow in-process would
    hand its store to every later test's processes. Each test ends with the variables it began
    with, and MLflow's own tracking URI with them."""
    import sys

    before = {k: os.environ.get(k) for k in MLFLOW_CLIENT_VARIABLES}
    yield
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    if "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(before["MLFLOW_TRACKING_URI"])


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """``{canonical name: version}`` of a pip requirements lock (``name==version`` lines)."""
    from packaging.utils import canonicalize_name

    pins: dict[str, str] = {}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and version and not any(c in version for c in " ;,<>"), (
            f"{path.name}:{n}: not a `name==version` pin: {line!r}"
        )
        name = canonicalize_name(name)
        assert name not in pins, f"{path.name}:{n}: {name} pinned twice"
        pins[name] = version
    return pins


@pytest.fixture(scope="session")
def lock() -> dict[str, str]:
    return read_lock()


@pytest.fixture
def lake(tmp_path):
    from workloads.lake import LocalLake

    return LocalLake(tmp_path / "lake")


@pytest.fixture
def put_pack(lake):
    """Store a zip (built from ``{member: bytes}``) at incoming/<name>.zip; returns the key."""
    from cvgraph.demo_packs import zip_bytes

    def _put(name: str, members: dict[str, bytes] | bytes) -> str:
        key = f"incoming/{name}.zip"
        lake.put(key, members if isinstance(members, bytes) else zip_bytes(members))
        return key

    return _put


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL server for the session (``bench.postgres.cluster``)."""
    from bench.postgres import cluster

    with cluster() as server:
        yield server


@pytest.fixture(scope="session")
def postgres_database(postgres_server):
    """``postgres_database(name)``: the URL of a new, empty database on the session's server."""
    from bench.postgres import new_database

    return lambda name: new_database(postgres_server, name)


@pytest.fixture
def postgres_url(postgres_database, request) -> str:
    """A new, empty database on the session's server, for one test."""
    import re

    return postgres_database("t_" + re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:50])


@pytest.fixture(scope="session")
def kill_packs(tmp_path_factory) -> list[Path]:
    """Two small packs of digits (three classes each)."""
    from cvgraph.demo_packs import digit_members, zip_bytes

    root = tmp_path_factory.mktemp("kill_packs")
    out = []
    for name, classes in (("a", (0, 1, 2)), ("b", (3, 4, 5))):
        path = root / f"{name}.zip"
        path.write_bytes(zip_bytes(digit_members(size=32, limit=60, classes=classes)))
        out.append(path)
    return out


@pytest.fixture(scope="session")
def clean_lake(tmp_path_factory, kill_packs, user_env) -> dict:
    """The uninterrupted lake of ``kill_packs``: upload both, sync, freeze ``s``."""
    from tests.lake_state import SQL, cvgraph, lake_state

    env = user_env(tmp_path_factory.mktemp("clean_lake"))
    for p in kill_packs:
        cvgraph(env, "upload", str(p))
    t0 = time.perf_counter()
    cvgraph(env, "sync")
    took = time.perf_counter() - t0
    cvgraph(env, "freeze", "s", SQL)
    return {"sync_s": took, **lake_state(env)}
