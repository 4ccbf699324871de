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


def _defaults_column() -> dict[str, tuple[str, str]]:
    """``{variable: (its default, the whole cell)}`` from the README's settings table: a row
    naming several variables gives each the backticked default at its place; a default given in
    words (CPU count, unset) is the cell's text."""
    readme = (REPO / "README.md").read_text()
    out = {}
    for line in readme.splitlines():
        if not line.startswith("| `CVGRAPH_"):
            continue
        names, cell = NAME.findall(line.split("|")[1]), line.split("|")[2].strip()
        values = re.findall(r"`([^`]*)`", cell)
        for i, name in enumerate(names):
            out[name] = (values[i] if len(values) == len(names) else cell, cell)
    return out


def _shown(value) -> str:
    """A field's default as the table writes it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, list):
        return ",".join(value)
    return str(value)


def test_the_settings_table_shows_each_resources_own_defaults():
    """The profiles pass only what the environment sets (``orchestration.profiles.SETTINGS``):
    every other field keeps its resource's default, which the table shows."""
    from orchestration.profiles import SETTINGS

    table = _defaults_column()
    wrong = {}
    for resource, settings in SETTINGS:
        for field, name in settings.items():
            default = resource.model_fields[field].default
            shown, cell = table[name]
            if default in (None, "", []):  # unset (the aws profile's sweeps: in memory)
                ok = "(unset)" in cell or "in memory (aws)" in cell
            elif name == "CVGRAPH_WORKERS":  # the local profile gives its CPU count
                ok = shown == "CPU count"
            else:
                ok = shown == _shown(default) or shown == str(default)
            if not ok:
                wrong[name] = (shown, default)
    assert not wrong, f"README's default differs from the resource's: {wrong}"
