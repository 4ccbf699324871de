"""The import arrows of the project's own modules, read from the source (function-level imports
included): one way down the layers, no cycle, no underscore name taken from another module."""

from pathlib import Path

from tests.source_imports import absolute_imports

ROOT = Path(__file__).resolve().parent.parent
# cvgraph -> orchestration -> assets (and partitions) -> resources -> workloads
LAYER = {"cvgraph": 0, "orchestration": 1, "assets": 2, "partitions": 2, "resources": 3}
LAYER["workloads"] = 4


def imports_of(root: Path) -> dict[str, list[tuple[str, str]]]:
    """``{module: [(imported module, name or "")]}`` of every module of the project's packages."""
    found = {}
    for package in LAYER:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[module] = absolute_imports(path)
    return found


def graph_of(imports) -> dict[str, set[str]]:
    """Project module -> the project modules it imports (``from pkg import mod``: ``pkg.mod``)."""
    graph = {}
    for module, edges in imports.items():
        targets = {f"{t}.{n}" if f"{t}.{n}" in imports else t for t, n in edges}
        graph[module] = {t for t in targets if t in imports and t != module}
    return graph


def cycles_of(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state = [], {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                cycles.append([*path[path.index(t) :], t])
            elif t not in state:
                visit(t, [*path, t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return cycles


def underscore_imports(imports) -> list[tuple[str, str, str]]:
    return [
        (m, t, n)
        for m, edges in imports.items()
        for t, n in edges
        if n.startswith("_") and t in imports and t != m
    ]


def test_imports_go_down_the_layers_and_workloads_import_no_dagster():
    imports = imports_of(ROOT)
    graph = graph_of(imports)
    upward = [
        (m, t) for m in graph for t in graph[m] if LAYER[t.split(".")[0]] < LAYER[m.split(".")[0]]
    ]
    assert upward == []
    dagster = [
        m
        for m, edges in imports.items()
        if m.startswith("workloads") and any(t.split(".")[0] == "dagster" for t, _ in edges)
    ]
    assert dagster == []


def test_only_the_internals_module_imports_dagsters_internals():
    """Dagster's internals (``dagster._*``) come through ``resources.dagster_internals`` alone,
    whose test pins what the project relies on of them."""
    imports = imports_of(ROOT)
    internal = sorted(
        m
        for m, edges in imports.items()
        if any(
            t.startswith("dagster._") or (t == "dagster" and n.startswith("_")) for t, n in edges
        )
    )
    assert internal == ["resources.dagster_internals"]


def test_no_import_cycle_and_no_underscore_import():
    imports = imports_of(ROOT)
    assert cycles_of(graph_of(imports)) == []
    assert underscore_imports(imports) == []


def test_the_checks_see_a_function_level_cycle_and_an_underscore_import(tmp_path):
    (tmp_path / "workloads").mkdir()
    (tmp_path / "workloads" / "lake.py").write_text(
        "def open_lake():\n    from workloads.s3lake import S3Lake\n"
    )
    (tmp_path / "workloads" / "s3lake.py").write_text("from workloads.lake import _check\n")
    imports = imports_of(tmp_path)
    assert cycles_of(graph_of(imports)) == [
        ["workloads.lake", "workloads.s3lake", "workloads.lake"]
    ]
    assert underscore_imports(imports) == [("workloads.s3lake", "workloads.lake", "_check")]
