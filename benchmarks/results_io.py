"""The benchmarks' JSONL files: grids in, results out, shared by the scripts in benchmarks/.

A grid (``benchmarks/grids/*.jsonl``) holds one run to make a line: a preset or a config file
(relative to benchmarks/) and the run's fields. A results file (``benchmarks/results/*.jsonl``)
holds one JSON line a run, appended as each run ends, so that a grid interrupted half-way
keeps what it measured and resumes where it stopped. ``benchmarks/results/manifest.json`` says
which command and grid made each results file.

Standard library only at import time (the presets are imported when ``architecture`` needs
them), so that tests and reports can read grids without MLX.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
GRIDS = HERE / "grids"
RESULTS = HERE / "results"
MANIFEST = RESULTS / "manifest.json"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file, one a line; blank lines are passed over."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def read_grid(path: Path) -> list[dict[str, Any]]:
    """A grid's lines, in order: one run each."""
    return read_jsonl(path)


def read_records(paths: Iterable[Path]) -> Iterator[dict[str, Any]]:
    """Every record of the results files, file after file, line after line."""
    for path in paths:
        yield from read_jsonl(path)


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Add one run's record to a results file as one JSON line, on disk before this returns
    (flushed and fsynced), so that a crash or a kill later loses no finished run."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def canonical(value: Any) -> str:
    """A grid line (or any JSON value) as one string, the same whatever its keys' order."""
    return json.dumps(value, sort_keys=True)


def grid_of(record: dict[str, Any]) -> Any:
    """The resume key of a probe record: the grid line it ran."""
    return record.get("grid")


def done_keys(out: Path, key: Callable[[dict[str, Any]], Any] = grid_of) -> set[str]:
    """The keys (canonical JSON) of the records already in ``out``; none before it exists."""
    if not out.exists():
        return set()
    return {canonical(key(record)) for record in read_jsonl(out)}


def pending(entries: list[dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    """The grid lines that ``out`` holds no record of: on a rerun with the same ``--out``,
    what is left to do."""
    done = done_keys(out)
    return [entry for entry in entries if canonical(entry) not in done]


def architecture(entry: dict[str, Any]) -> dict[str, Any]:
    """The model a grid line names: a built-in preset's architecture or a config file."""
    if "preset" in entry:
        from pytest_yourai.presets import builtin_presets

        return dict(builtin_presets()[entry["preset"]].architecture)
    return dict(json.loads((HERE / entry["config"]).read_text()))
