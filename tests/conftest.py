"""Shared fixtures. The whole suite runs against a temporary CVGRAPH_HOME (set before the
code location is imported, since resources are read from the environment at load)."""

import os
import shutil
import tempfile
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


@pytest.fixture(scope="session", autouse=True)
def _session_home():
    """The suite's CVGRAPH_HOME goes when the suite does (pytest's tmp_path dirs rotate themselves)."""
    yield SESSION_HOME
    shutil.rmtree(SESSION_HOME, ignore_errors=True)


LOCK = Path(__file__).resolve().parents[1] / "requirements.lock"


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


def _pg_program(name: str) -> str:
    """A PostgreSQL server program: on PATH, else Debian's /usr/lib/postgresql/<major>/bin."""
    import glob
    import shutil

    found = (
        shutil.which(name)
        or sorted(
            glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4])
        )[-1:]
    )
    assert found, f"{name} not found: `make install` installs Debian's postgresql"
    return found if isinstance(found, str) else found[0]


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL cluster (``initdb`` + ``pg_ctl`` in a temp dir, a free port on
    127.0.0.1, trust auth for its one user), stopped and removed with the session. As root, the
    server runs as the ``postgres`` user Debian's package made (it refuses to run as root)."""
    import shutil
    import socket
    import subprocess

    base = Path(tempfile.mkdtemp(prefix="cvgraph-pg-"))
    base.chmod(0o755)
    as_root = os.geteuid() == 0
    if as_root:
        shutil.chown(base, "postgres", "postgres")
    as_server = ["runuser", "-u", "postgres", "--"] if as_root else []

    def run(*cmd):
        return subprocess.run(
            [*as_server, *map(str, cmd)], check=True, capture_output=True, text=True
        )

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = base / "data"
    run(
        _pg_program("initdb"),
        "-D",
        data,
        "-U",
        "cvgraph",
        "--auth=trust",
        "-E",
        "UTF8",
        "--no-sync",
    )
    # No durability for a throwaway cluster: fsync off; the socket in its own dir, TCP on loopback.
    options = f"-p {port} -h 127.0.0.1 -k {base} -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    run(_pg_program("pg_ctl"), "-D", data, "-o", options, "-l", base / "server.log", "-w", "start")
    try:
        yield {"host": "127.0.0.1", "port": port, "user": "cvgraph"}
    finally:
        run(_pg_program("pg_ctl"), "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


def new_database(server: dict, name: str) -> str:
    """The URL of a new, empty database ``name`` on ``server`` (``postgres_server``)."""
    import psycopg2

    conn = psycopg2.connect(
        host=server["host"], port=server["port"], user=server["user"], dbname="postgres"
    )
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    return f"postgresql://{server['user']}@{server['host']}:{server['port']}/{name}"


@pytest.fixture(scope="session")
def postgres_database(postgres_server):
    """``postgres_database(name)``: the URL of a new, empty database on the session's server."""
    return lambda name: new_database(postgres_server, name)


@pytest.fixture
def postgres_url(postgres_server, request) -> str:
    """A new, empty database on the session's server, for one test."""
    import re

    return new_database(
        postgres_server, "t_" + re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:50]
    )
