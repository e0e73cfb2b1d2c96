"""Hooks for a team's own conftest.py or plugin: presets, machine memory, results.

Registered through ``pytest_addhooks``. Example (conftest.py)::

    def pytest_yourai_presets(config):
        return [{"name": "team-3b", "config": "models/team-3b/config.json", "batch_size": 2}]

    def pytest_yourai_machine_memory(config):
        return float(os.environ["SLURM_MEM_GB"])  # the scheduler's allocation

    def pytest_yourai_result(config, result):
        dashboard.send(result["preset"], result["verdict"], result.get("peak_memory_gb"))
"""

from __future__ import annotations

from typing import Any

import pytest


@pytest.hookspec
def pytest_yourai_presets(config: pytest.Config) -> Any:
    """Extra presets: a list of dicts with the fields of a presets file's ``[presets.NAME]``
    table plus ``name`` (a relative ``config`` path is taken from the rootdir), or
    ``Preset`` objects. Called once per process; every implementation's presets are added
    (a name already taken replaces the earlier preset, as a presets file does)."""


@pytest.hookspec(firstresult=True)
def pytest_yourai_machine_memory(config: pytest.Config) -> float | None:
    """The GB available to probes on this machine, used instead of measuring it (e.g. a
    scheduler's allocation); None to measure. It also caps what the memory watchdog counts
    as available while a probe runs, and ``--yourai-max-memory`` still caps it."""


@pytest.hookspec
def pytest_yourai_result(config: pytest.Config, result: dict[str, Any]) -> None:
    """Called once per finished benchmark, on the controller, with its result record as
    the results JSON has it (``nodeid``, ``verdict``, ``preset``, the estimate, the
    measurements)."""
