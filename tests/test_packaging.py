"""What the package claims to need is what CI installs: each pin of the lowest-versions
environment (.ci/lowest-constraints.txt) is the lower bound pyproject.toml states."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def lower_bounds() -> dict[str, set[Version]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *project["optional-dependencies"]["cpu"]]
    bounds: dict[str, set[Version]] = {}
    for text in requirements:
        requirement = Requirement(text)
        names = [requirement.name, *(f"{requirement.name}-{e}" for e in requirement.extras)]
        for spec in requirement.specifier:
            if spec.operator == ">=":
                for name in names:
                    bounds.setdefault(canonicalize_name(name), set()).add(Version(spec.version))
    return bounds


def pins() -> dict[str, Version]:
    found = {}
    for line in (ROOT / ".ci" / "lowest-constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            found[canonicalize_name(name)] = Version(version)
    return found


def test_every_lower_bound_is_pinned_in_the_lowest_environment() -> None:
    bounds, pinned = lower_bounds(), pins()
    for name, versions in bounds.items():
        assert name in pinned, f"{name} has a lower bound {versions} but no pin"
        assert versions == {pinned[name]}, (
            f"{name}: pyproject says >={versions}, pinned {pinned[name]}"
        )


def test_every_pin_is_a_lower_bound() -> None:
    bounds, pinned = lower_bounds(), pins()
    for name, version in pinned.items():
        claimed = bounds.get(name)
        assert claimed == {version}, f"{name}=={version} pinned, pyproject says >={claimed}"
