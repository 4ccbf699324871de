"""The ``cvgraph`` command as a user starts it."""

import json
import os
import subprocess
import sys
import zipfile

HEAVY = ("dagster", "torch", "onnx", "onnxruntime", "mlflow", "duckdb")
# Run the CLI as its console script does, then name the heavy modules it imported.
SCRIPT = """
import json, sys
from cvgraph.cli import main
try:
    main(sys.argv[1:], prog_name="cvgraph")
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "heavy": sorted(m for m in HEAVY if m in sys.modules)}))
""".replace("HEAVY", repr(HEAVY))


def _env(home) -> dict:
    """The environment of a user with their own CVGRAPH_HOME (no instance of the suite's)."""
    keep = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "CVGRAPH_LAKE_URL")}
    return {**keep, "CVGRAPH_HOME": str(home), "CVGRAPH_PROFILE": "local"}


def _cli(home, *args) -> tuple[dict, str]:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, *args],
        env=_env(home),
        capture_output=True,
        text=True,
        check=True,
    )
    *printed, last = out.stdout.strip().splitlines()
    return json.loads(last), "\n".join(printed)


def test_help_and_upload_import_neither_dagster_nor_torch(tmp_path):
    pack = tmp_path / "cats.zip"
    with zipfile.ZipFile(pack, "w") as zf:
        zf.writestr("cats/a.png", b"not decoded by an upload")
    home = tmp_path / "home"

    status, text = _cli(home, "--help")
    assert status == {"code": 0, "heavy": []}
    assert "upload" in text and "freeze" in text
    status, text = _cli(home, "query", "--help")  # the tables a query sees, the labeller's too
    assert status == {"code": 0, "heavy": []}
    assert all(f"\n  {table}  " in text for table in ("images ", "objects", "predictions"))

    status, text = _cli(home, "upload", str(pack))
    assert status == {"code": 0, "heavy": []}
    assert text == "uploaded: incoming/cats.zip (pack cats)"
    assert (home / "lake" / "incoming" / "cats.zip").read_bytes() == pack.read_bytes()

    status, text = _cli(home, "upload", str(pack))
    assert status == {"code": 0, "heavy": []}
    assert text == "already there: incoming/cats.zip (pack cats)"
    status, text = _cli(home, "upload", str(pack), "--name", "more cats", "--json")
    assert status == {"code": 0, "heavy": []}
    got = json.loads(text)
    assert got["key"] == "incoming/more cats.zip" and got["uploaded"] is True
    assert got["pack_id"].startswith("more_cats-")


SDK_REFUSAL = """
from cvgraph import Datasets, FreezeRefused
ds = Datasets()
try:
    ds.freeze_dataset("first_v1", "SELECT * FROM images")
except FreezeRefused as e:
    print(e)
print(ds.instance.get_dynamic_partitions("subsets"), ds.lake.keys("subsets/"))
"""


def test_the_sdk_refuses_quietly_and_keeps_no_key(tmp_path):
    """A freeze on an empty lake (nothing ingested yet): the exception's one line, nothing on
    stderr (no Dagster warnings or log blocks), and no subset partition or object left."""
    out = subprocess.run(
        [sys.executable, "-c", SDK_REFUSAL],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stderr == ""
    assert out.stdout == (
        "freeze of 'first_v1' failed: frozen_subsets: subset first_v1: the query matched no "
        "images; nothing was frozen\n[] []\n"
    )


def test_usage_mistakes_are_one_line_naming_the_help_to_read(tmp_path):
    """Click's own errors (missing argument, bad choice or number, unknown command, missing
    file): one line on stderr, exit 2, and no Dagster loaded to say it."""
    cases = {
        ("freeze", "x_v1"): "Missing argument 'SQL'. (see `cvgraph freeze --help`)",
        ("train", "x", "--variant", "foo"): "Invalid value for '--variant': 'foo' is not one "
        "of 'resized', 'edges', 'original'. (see `cvgraph train --help`)",
        ("train", "x", "--epochs", "two"): "Invalid value for '--epochs': 'two' is not a valid "
        "integer. (see `cvgraph train --help`)",
        ("trian",): "No such command 'trian'. Did you mean 'train'? (see `cvgraph --help`)",
        ("predict", "m", str(tmp_path / "no.png")): "Invalid value for 'IMAGES...': Path "
        f"'{tmp_path / 'no.png'}' does not exist. (see `cvgraph predict --help`)",
    }
    for args, line in cases.items():
        out = subprocess.run(
            [sys.executable, "-c", SCRIPT, *args],
            env=_env(tmp_path),
            capture_output=True,
            text=True,
            check=False,  # exit 2 is what is tested
        )
        assert out.stderr == f"Error: {line}\n", args
        assert json.loads(out.stdout) == {"code": 2, "heavy": []}, args
    # bare `cvgraph`: the help, as click gives it
    got, printed = _cli(tmp_path)
    assert got["code"] == 2 and printed == ""


# Each command in one process, as the console script runs it: its exit code and its stderr.
COMMANDS = """
import contextlib, io, json, sys
from cvgraph.cli import main
out = []
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(args, prog_name="cvgraph")
            code = 0
        except SystemExit as e:
            code = e.code
    out.append({"code": code, "stderr": err.getvalue()})
print(json.dumps(out))
"""

BAD_SQL = {
    "SELECT 1; DROP TABLE images": "expected exactly one SELECT statement, got 2",
    "COPY images TO '/tmp/x.csv'": "only read-only SELECT queries are allowed, got COPY",
    "SELECT * FROM read_csv('/etc/passwd')": "refused by the sandbox: Permission Error: Cannot "
    'access file "/etc/passwd" - file system operations are disabled by configuration',
    "SELECT labelx FROM images": 'query failed: Binder Error: Referenced column "labelx" not '
    'found in FROM clause! Candidate bindings: "label", "boxes", "bytes", "prefix", '
    '"original_key"',
}


def test_injected_or_mistaken_sql_in_query_and_freeze_is_one_line_and_exit_1(tmp_path):
    """`cvgraph query` and `cvgraph freeze` (which runs the query in a Dagster run): the
    engine's reason on one line, exit 1, no traceback, and no subset kept."""
    commands = [["query", sql] for sql in BAD_SQL] + [["freeze", "bad_v1", sql] for sql in BAD_SQL]
    out = subprocess.run(
        [sys.executable, "-c", COMMANDS, json.dumps(commands)],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        check=True,
    )
    got = json.loads(out.stdout)
    refused_before_running = list(BAD_SQL)[:2]  # the gate: no run is started
    for (cmd, *args), result in zip(commands, got):
        sql = args[-1]
        said = BAD_SQL[sql]
        if cmd == "freeze" and sql not in refused_before_running:
            said = f"freeze of 'bad_v1' failed: frozen_subsets: subset bad_v1: {said}"
        assert result == {"code": 1, "stderr": f"Error: {said}\n"}, (cmd, sql)
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "lake" / "subsets").exists()
