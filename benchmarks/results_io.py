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
    return {**json.loads((HERE / entry["config"]).read_text()), **entry.get("overrides", {})}


def as_probe_record(record: dict[str, Any]) -> dict[str, Any] | None:
    """A record in the probe's form (``grid`` and ``result``), whichever script wrote it.

    Probe records (estimate_accuracy.py) are returned as they are. A survival run's record
    (survival.py) becomes one when it ran at the go threshold and passed: its row holds what
    the probe measured; its config is the grid line's. Anything else gives None."""
    if "result" in record:
        return record
    row = record.get("row")
    if record.get("level") != "go" or not row or row.get("verdict") != "Pass":
        return None
    entry = record["grid"]
    config = {
        "bits": entry["bits"],
        "group_size": entry.get("group_size", 64),
        "dtype": row["dtype"],
        "batch_size": entry["batch_size"],
        "seq_len": entry["seq_len"],
        "lora_rank": entry["lora_rank"],
        "lora_layers": entry["lora_layers"],
        "grad_checkpoint": bool(entry.get("grad_checkpoint", False)),
        "in_flight": entry["in_flight"],
    }
    fields = ("train_peak_memory_gb", "train_footprint_gb", "build_footprint_gb", "backend")
    result = {key: row[key] for key in fields if key in row}
    result.update(status="ok", config=config, survival=True)
    grid = {key: entry[key] for key in ("preset", "config") if key in entry}
    return {"grid": as_built(record, grid), "result": result}


def as_built(record: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """A survival record's grid line (``entry``), naming the model its run built.

    Survival runs made before the plugin derived a missing head_dim (presets.with_defaults)
    built the model with transformers' default-sized one (128 for Llama, not SmolLM2's 64):
    for those, the line gets that head_dim as an override."""
    if "config" not in entry or record.get("head_dim_derived"):
        return entry
    from pytest_yourai.presets import transformers_defaults

    arch = architecture(entry)
    filled = transformers_defaults(str(arch.get("model_type"))).get("head_dim")
    if "head_dim" in arch or filled is None:
        return entry
    return {**entry, "overrides": {"head_dim": filled}}
