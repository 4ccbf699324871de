"""A SQLite tracking store is made whole or not at all: a process killed while MLflow migrates a
new store's schema (a killed `cvgraph train`) must not leave a store every later open fails on."""

import os
import signal
import subprocess
import sys
import time

MAKE = """
import sys
from pathlib import Path
from resources.tracking import ensure_sqlite_store
ensure_sqlite_store(Path(sys.argv[1]))
"""


def test_a_store_killed_while_it_is_made_is_absent_and_made_again_whole(tmp_path):
    import mlflow

    path = tmp_path / "mlflow" / "mlflow.db"
    for delay in (0.3, 0.8, 1.5, 2.5):  # into the import, the migrations, the rename
        proc = subprocess.Popen([sys.executable, "-c", MAKE, str(path)], start_new_session=True)
        time.sleep(delay)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if path.exists():  # the rename is the last step: what is there is whole
            break
    subprocess.run([sys.executable, "-c", MAKE, str(path)], check=True)
    client = mlflow.MlflowClient(f"sqlite:///{path}")
    exp = client.create_experiment("e")
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "m", 1.0)
    assert client.get_run(run.info.run_id).data.metrics == {"m": 1.0}
