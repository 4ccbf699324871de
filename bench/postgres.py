"""A throwaway PostgreSQL cluster on 127.0.0.1 (Debian's server programs, `make install` installs
them): ``initdb`` + ``pg_ctl`` in a temp dir, a free port, trust auth for its one user, no
durability. For the tests (tests/conftest.py) and the bench's instance-storage comparison. As
root, the server runs as the ``postgres`` user Debian's package made (it refuses to run as root)."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def program(name: str) -> str:
    """A server program: on PATH, else Debian's /usr/lib/postgresql/<major>/bin."""
    found = shutil.which(name) or next(
        iter(
            sorted(
                glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                key=lambda p: int(p.split("/")[4]),
                reverse=True,
            )
        ),
        None,
    )
    if not found:
        raise FileNotFoundError(f"{name} not found: `make install` installs Debian's postgresql")
    return found


@contextmanager
def cluster() -> Iterator[dict]:
    """``{"host", "port", "user"}`` of a running throwaway server, stopped and removed after."""
    as_root = os.geteuid() == 0
    # As root, TMPDIR may sit under a dir only root can enter (pytest's tmp_path is 0700), so
    # the server's dir goes straight in /tmp, which every user can reach.
    base = Path(tempfile.mkdtemp(prefix="cvgraph-pg-", dir="/tmp" if as_root else None))
    base.chmod(0o755)
    if as_root:
        shutil.chown(base, "postgres", "postgres")
    as_server = ["runuser", "-u", "postgres", "--"] if as_root else []

    def run(*cmd) -> None:
        done = subprocess.run(
            [*as_server, *map(str, cmd)], check=False, capture_output=True, text=True
        )
        if done.returncode:
            said = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(
                f"{Path(str(cmd[0])).name} exited {done.returncode} in {base}: {said[0]}"
            )

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = base / "data"
    try:
        run(
            program("initdb"),
            "-D",
            data,
            "-U",
            "cvgraph",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        # The socket in its own dir, TCP on loopback only; no durability for a throwaway cluster.
        options = (
            f"-p {port} -h 127.0.0.1 -k {base} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        run(program("pg_ctl"), "-D", data, "-o", options, "-l", base / "server.log", "-w", "start")
        try:
            yield {"host": "127.0.0.1", "port": port, "user": "cvgraph"}
        finally:
            run(program("pg_ctl"), "-D", data, "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def new_database(server: dict, name: str) -> str:
    """The URL of a new, empty database ``name`` on ``server``."""
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
