"""The install is the lock: .venv holds exactly requirements.lock, and the lock satisfies
pyproject.toml (a dependency added without `make lock` shows up here, by name)."""

import importlib.metadata
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
NOT_LOCKED = {"pip", "cvgraph"}  # pip is pinned by the Makefile; the project is installed editable


def installed() -> dict[str, str]:
    return {
        canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()
    }


def drift(lock: dict[str, str], have: dict[str, str]) -> list[str]:
    """One line per distribution that is missing, at another version, or not in the lock."""
    lines = [f"{n}: locked {v}, not installed" for n, v in sorted(lock.items()) if n not in have]
    lines += [
        f"{n}: locked {v}, installed {have[n]}"
        for n, v in sorted(lock.items())
        if n in have and have[n] != v
    ]
    lines += [
        f"{n}: installed {have[n]}, not in the lock"
        for n in sorted(set(have) - set(lock) - NOT_LOCKED)
    ]
    return lines


def test_venv_equals_the_lock(lock):
    problems = drift(lock, installed())
    assert not problems, (
        "the venv drifted from requirements.lock (make install re-syncs it; make lock takes upgrades):\n"
        + "\n".join(problems)
    )


def test_drift_names_each_distribution():
    lock = {"boto3": "1.44.5", "numpy": "2.4.6", "torch": "2.13.0+cpu"}
    have = {
        "boto3": "1.44.8",
        "torch": "2.13.0+cpu",
        "requests": "2.33.0",
        "pip": "26.3",
        "cvgraph": "0.1.0",
    }
    assert drift(lock, have) == [
        "numpy: locked 2.4.6, not installed",
        "boto3: locked 1.44.5, installed 1.44.8",
        "requests: installed 2.33.0, not in the lock",
    ]


def test_lock_satisfies_pyproject_and_pins_the_cpu_torch(lock):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [
        Requirement(r)
        for r in project["dependencies"]
        + [r for rs in project["optional-dependencies"].values() for r in rs]
    ]
    unmet = []
    for req in wanted:
        name = canonicalize_name(req.name)
        if name not in lock:
            unmet.append(f"{req}: not in the lock")
        elif not req.specifier.contains(lock[name], prereleases=True):
            unmet.append(f"{req}: the lock has {lock[name]}")
        unmet += [
            f"{req}: extra {e!r} of {name} — {dep}: not in the lock"
            for e in req.extras
            for dep in extra_requirements(name, e)
            if canonicalize_name(dep.name) not in lock
        ]
    assert not unmet, (
        "pyproject.toml asks for what requirements.lock lacks: run `make lock`\n" + "\n".join(unmet)
    )
    assert lock["torch"] == "2.13.0+cpu"  # any other torch pulls several GB of CUDA wheels
    assert "pip" not in lock and "cvgraph" not in lock


def extra_requirements(dist: str, extra: str) -> list[Requirement]:
    reqs = [Requirement(r) for r in importlib.metadata.requires(dist) or []]
    return [
        r
        for r in reqs
        if r.marker is not None
        and r.marker.evaluate({"extra": extra})
        and not r.marker.evaluate({"extra": ""})
    ]
