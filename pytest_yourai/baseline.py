"""Baselines: measured peaks stored per machine, compared on later runs (like
pytest-benchmark's storage). One JSON file per machine id under the baseline directory."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pytest_yourai.files import write_atomically
from pytest_yourai.results import ResultRow, Verdict


def machine_id(backend: str, device_name: str, total_gb: float) -> str:
    """Chip, memory and backend: runs on the same kind of machine share a baseline."""
    raw = f"{backend}-{device_name}-{total_gb:.0f}GB"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", raw).strip("_")


# The run's fields a baseline is keyed by, in run_key's order (after the preset).
KEY_FIELDS = (
    "batch_size",
    "seq_len",
    "lora_rank",
    "lora_layers",
    "bits",
    "dtype",
    "grad_checkpoint",
    "in_flight",
)


def run_key(
    preset: str,
    batch_size: object,
    seq_len: object,
    lora_rank: object,
    lora_layers: object,
    bits: object,
    dtype: object,
    grad_checkpoint: object,
    in_flight: object,
) -> str:
    """What a baseline belongs to: the preset at one config, in one in-flight mode. A run at
    another batch size, rank, bits or mode is never compared with it."""
    checkpoint = "-gc" if grad_checkpoint else ""
    return (
        f"{preset}|b{batch_size}-s{seq_len}-r{lora_rank}-L{lora_layers}-q{bits}-{dtype}"
        f"{checkpoint}|{in_flight}"
    )


def baseline_path(directory: Path, machine: str) -> Path:
    return directory / f"{machine}.json"


def load(directory: Path, machine: str) -> dict[str, Any]:
    try:
        data = json.loads(baseline_path(directory, machine).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    presets = data.get("presets", {}) if isinstance(data, dict) else {}
    return presets if isinstance(presets, dict) else {}


def load_all(directory: Path) -> dict[str, dict[str, Any]]:
    """Every machine's baselines in the directory (machine id -> presets): what the xdist
    controller sends its workers, so that no worker reads the controller's files."""
    if not directory.is_dir():
        return {}
    return {path.stem: load(directory, path.stem) for path in sorted(directory.glob("*.json"))}


def save(directory: Path, machine: str, peaks: Mapping[str, Mapping[str, Any]]) -> Path:
    """Merge ``peaks`` (preset -> {peak_memory_gb, config...}) into the machine's file."""
    directory.mkdir(parents=True, exist_ok=True)
    merged = {**load(directory, machine), **peaks}
    path = baseline_path(directory, machine)
    document = {"machine": machine, "saved": time.time(), "presets": merged}
    write_atomically(path, json.dumps(document, indent=1))
    return path


def growth_failure(preset: str, old_gb: float, new_gb: float, threshold: float) -> str | None:
    """A message when the peak grew by more than ``threshold`` (a fraction), else None."""
    if old_gb <= 0:
        return None
    growth = (new_gb - old_gb) / old_gb
    if growth <= threshold:
        return None
    return (
        f"{preset}: peak grew {growth * 100:.1f}% over the baseline "
        f"({old_gb:.4g} GB -> {new_gb:.4g} GB), more than the allowed {threshold * 100:g}%"
    )


def save_passes(
    directory: Path, machine: str, rows: Iterable[ResultRow]
) -> tuple[Path, int] | None:
    """Store the MLX peak of every passed benchmark, keyed by preset, config and in-flight
    mode, in the file of the machine that ran it (``machine`` for a row that does not say;
    across hosts, one file per kind of machine); the last file written and how many
    peaks were stored, or None when nothing passed with a peak."""
    per_machine: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        if r.verdict != Verdict.PASS or not isinstance(r.get("peak_memory_gb"), int | float):
            continue
        key = run_key(str(r.get("preset")), *(r.get(name) for name in KEY_FIELDS))
        per_machine.setdefault(str(r.get("machine_id") or machine), {})[key] = {
            "preset": r.get("preset"),
            "peak_memory_gb": r.get("peak_memory_gb"),
            "footprint_peak_gb": r.get("footprint_peak_gb"),
            **{name: r.get(name) for name in KEY_FIELDS},
        }
    if not per_machine:
        return None
    paths = [save(directory, name, peaks) for name, peaks in per_machine.items()]
    return paths[-1], sum(len(peaks) for peaks in per_machine.values())
