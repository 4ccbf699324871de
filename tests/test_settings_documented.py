"""Every ``CVGRAPH_*`` variable the project reads is a row of the README's settings table."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NAME = re.compile(r"CVGRAPH_[A-Z0-9_]*[A-Z0-9]")
# where the project's own code lives (tests and benches set variables, they do not read them)
CODE = ("assets", "cvgraph", "orchestration", "partitions", "resources", "workloads", "deploy")


def _read() -> set[str]:
    names: set[str] = set()
    for top in CODE:
        for path in (REPO / top).rglob("*"):
            if path.suffix in (".py", ".yaml", ".yml") and ".venv" not in path.parts:
                names |= set(NAME.findall(path.read_text(errors="replace")))
    return names


def _table() -> set[str]:
    readme = (REPO / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| `CVGRAPH_")]
    return {n for line in rows for n in NAME.findall(line.split("|")[1])}


def test_every_setting_read_is_in_the_readme_settings_table():
    table = _table()
    # a name that is a family's prefix (``CVGRAPH_INGEST_`` passed to Batch, ``CVGRAPH_PRICE_*``)
    # is documented by its members
    missing = sorted(
        n for n in _read() if n not in table and not any(t.startswith(f"{n}_") for t in table)
    )
    assert not missing, f"settings read but not in README's settings table: {missing}"
    assert len(table) > 40
