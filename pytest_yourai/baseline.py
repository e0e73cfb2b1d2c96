"""Baselines: measured peaks stored per machine, compared on later runs (like
pytest-benchmark's storage). One JSON file per machine id under the baseline directory."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def machine_id(backend: str, device_name: str, total_gb: float) -> str:
    """Chip, memory and backend: runs on the same kind of machine share a baseline."""
    raw = f"{backend}-{device_name}-{total_gb:.0f}GB"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", raw).strip("_")


def baseline_path(directory: Path, machine: str) -> Path:
    return directory / f"{machine}.json"


def load(directory: Path, machine: str) -> dict[str, Any]:
    try:
        data = json.loads(baseline_path(directory, machine).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    presets = data.get("presets", {}) if isinstance(data, dict) else {}
    return presets if isinstance(presets, dict) else {}


def save(directory: Path, machine: str, peaks: Mapping[str, Mapping[str, Any]]) -> Path:
    """Merge ``peaks`` (preset -> {peak_memory_gb, config...}) into the machine's file."""
    directory.mkdir(parents=True, exist_ok=True)
    merged = {**load(directory, machine), **peaks}
    path = baseline_path(directory, machine)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(
        json.dumps({"machine": machine, "saved": time.time(), "presets": merged}, indent=1),
        encoding="utf-8",
    )
    os.replace(tmp, path)
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
