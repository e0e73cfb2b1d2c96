"""benchmarks/results/manifest.json: every results file, the command and grid that made it.

Fast and without MLX: it reads the manifest, the grids and the results files only.
"""

from __future__ import annotations

import itertools
import json
import shlex
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
RESULTS = BENCHMARKS / "results"
GRIDS = BENCHMARKS / "grids"
MANIFEST = RESULTS / "manifest.json"
NOT_RESULTS = {"manifest.json", "README.md"}


def manifest() -> dict[str, Any]:
    return json.loads(MANIFEST.read_text(encoding="utf-8"))


def entries() -> list[dict[str, Any]]:
    return list(manifest()["files"])


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def grid_rows(grid: str) -> list[str]:
    """A grid's lines as canonical JSON, in order."""
    return [canonical(row) for row in jsonl(ROOT / grid)]


def commands(entry: dict[str, Any]) -> list[str]:
    return [entry["command"], *([entry["reproduce"]] if "reproduce" in entry else [])]


def paths_in(command: str) -> list[Path]:
    """The files of benchmarks/ a command line names, resolved from where it runs (the
    repository root, or benchmarks/ after ``cd benchmarks &&``)."""
    words = shlex.split(command)
    cwd = ROOT
    if words[:3] == ["cd", "benchmarks", "&&"]:
        cwd, words = BENCHMARKS, words[3:]
    named = []
    for word in words:
        value = word.split("=", 1)[1] if word.startswith("--") and "=" in word else word
        path = (cwd / value).resolve()
        if value.endswith((".py", ".jsonl", ".json", ".xml")) and path.is_relative_to(BENCHMARKS):
            named.append(path)
    return named


def test_every_results_file_has_one_entry_and_every_entry_a_file() -> None:
    listed = [entry["file"] for entry in entries()]
    present = sorted(p.name for p in RESULTS.iterdir() if p.name not in NOT_RESULTS)
    assert sorted(set(listed)) == sorted(listed), "a file is listed twice"
    assert sorted(listed) == present, (
        f"not in the manifest: {sorted(set(present) - set(listed))}; "
        f"listed but missing: {sorted(set(listed) - set(present))}"
    )


def test_entries_have_the_fields() -> None:
    data = manifest()
    files = {entry["file"] for entry in data["files"]}
    for entry in data["files"]:
        for field in ("file", "command", "grid", "machine", "what"):
            assert field in entry, f"{entry.get('file')}: no {field}"
        assert entry["machine"] in data["machines"], entry["file"]
        assert entry["what"].strip() and "\n" not in entry["what"], entry["file"]
        if "repeat_of" in entry:
            assert entry["repeat_of"] in files - {entry["file"]}, entry["file"]


def test_every_grid_named_exists_and_every_grid_is_used() -> None:
    data = manifest()
    named = set()
    for entry in data["files"]:
        named.update([entry["grid"]] if entry["grid"] else [])
        named.update(extra["grid"] for extra in entry.get("extra_rows", []))
    for grid, about in data["grids"].items():
        named.add(grid)
        named.update(item["grid"] for item in about["repeats"])
    for grid in named:
        assert grid.startswith("benchmarks/grids/") and (ROOT / grid).is_file(), grid
    used = {entry["grid"] for entry in data["files"] if entry["grid"]}
    unused = sorted(
        p.name for p in GRIDS.glob("*.jsonl") if f"benchmarks/grids/{p.name}" not in used
    )
    assert unused == [], f"grids that made no results file: {unused}"


@pytest.mark.parametrize("entry", entries(), ids=lambda entry: entry["file"])
def test_every_command_names_a_benchmarks_script_and_files_that_exist(
    entry: dict[str, Any],
) -> None:
    for command in commands(entry):
        named = paths_in(command)
        scripts = [p for p in named if p.suffix == ".py"]
        assert scripts, f"{command!r} names no script of benchmarks/"
        for path in named:
            assert path.is_file(), f"{command!r}: {path.relative_to(ROOT)} does not exist"
    if entry["grid"]:
        assert ROOT / entry["grid"] in paths_in(entry["command"]), "the command runs another grid"


def test_calibration_commands_name_scripts_and_results_that_exist() -> None:
    calibration = manifest()["calibration"]
    assert (ROOT / calibration["file"]).is_file()
    for step in calibration["steps"]:
        named = paths_in(step["command"])
        assert any(p.name == "calibrate_estimator.py" for p in named), step["command"]
        assert all(p.is_file() for p in named), step["command"]


@pytest.mark.parametrize(
    "entry", [e for e in entries() if e["grid"]], ids=lambda entry: entry["file"]
)
def test_a_results_file_holds_the_runs_of_its_grid(entry: dict[str, Any]) -> None:
    """Its records' grid lines are the grid's (``grid_lines`` of it) and ``extra_rows``."""
    rows = grid_rows(entry["grid"])
    lines = entry.get("grid_lines") or range(1, len(rows) + 1)
    expected = {rows[n - 1] for n in lines}
    for extra in entry.get("extra_rows", []):
        other = grid_rows(extra["grid"])
        expected.update(other[n - 1] for n in extra["lines"])
    measured = {canonical(r["grid"]) for r in jsonl(RESULTS / entry["file"]) if "grid" in r}
    assert measured == expected, (
        f"{len(measured - expected)} runs not from the grid, "
        f"{len(expected - measured)} grid lines not run"
    )


def test_no_grid_row_twice_unless_the_manifest_records_the_repeat() -> None:
    """A row in two grids (or twice in one) is a repeat the manifest names, with how many
    rows the two grids share; a recorded repeat that is no longer there fails too."""
    recorded: dict[frozenset[str], int] = {}
    for grid, about in manifest()["grids"].items():
        for item in about["repeats"]:
            pair = frozenset({grid, item["grid"]})
            assert pair not in recorded, f"repeat recorded twice: {sorted(pair)}"
            assert item["why"].strip(), f"repeat without a why: {sorted(pair)}"
            recorded[pair] = int(item["rows"])
    grids = {f"benchmarks/grids/{p.name}": grid_rows(str(p)) for p in sorted(GRIDS.glob("*"))}
    shared: dict[frozenset[str], int] = {}
    for grid, rows in grids.items():
        if len(set(rows)) < len(rows):
            shared[frozenset({grid})] = len(rows) - len(set(rows))
    for (a, rows_a), (b, rows_b) in itertools.combinations(grids.items(), 2):
        common = len(set(rows_a) & set(rows_b))
        if common:
            shared[frozenset({a, b})] = common
    unrecorded = {tuple(sorted(p)): n for p, n in shared.items() if recorded.get(p) != n}
    stale = {tuple(sorted(p)): n for p, n in recorded.items() if shared.get(p) != n}
    assert unrecorded == {}, f"rows repeated without (or unlike) a record: {unrecorded}"
    assert stale == {}, f"recorded repeats that the grids do not hold: {stale}"
