"""The declared version floors are the tested ones: every `>=` floor in pyproject.toml (dependencies and extras) is
exactly the release that scripts/floor-constraints.txt pins, and the floor venv (scripts/setup_floor.sh, run by
.ci/run) installs with those pins. docs/versions.md lists them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python>=3.11's tomllib")

ROOT = Path(__file__).resolve().parents[1]
NOT_FLOOR_TESTED = {"reasoning-gym"}  # benchmark data only (assets extra); its releases clash with the floor pins


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def _declared() -> dict[str, str]:
    """name -> the `>=` floor of every requirement in pyproject.toml (core and extras)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    floors = {}
    for requirement in requirements:
        match = re.search(r">=\s*([0-9][0-9a-zA-Z.]*)", requirement)
        assert match, f"{requirement!r} has no `>=` floor"
        floors[_name(requirement)] = match.group(1)
    return floors


def _pinned() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "scripts" / "floor-constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{line!r} in floor-constraints.txt is not an exact pin"
            pins[_name(name)] = version.strip()
    return pins


def test_every_declared_floor_is_the_pinned_tested_release():
    """Property: pyproject's floors and the floor env's pins are the same releases, name for name."""
    declared, pinned = _declared(), _pinned()
    assert {k: v for k, v in declared.items() if k not in NOT_FLOOR_TESTED} == pinned


def test_ci_builds_and_tests_the_floor_env():
    """Property: CI runs the suite in the floor venv built from the pins (not only in the newest-release venv)."""
    ci = (ROOT / ".ci" / "run").read_text()
    setup = (ROOT / "scripts" / "setup_floor.sh").read_text()
    assert "scripts/setup_floor.sh" in ci and ".venv-floor/bin/python -m pytest" in ci
    assert "floor-constraints.txt" in setup
