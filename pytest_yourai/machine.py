"""This host as the run sees it: whether MLX imports, its backend, and the memory available,
capped by ``--yourai-max-memory`` or given by a ``pytest_yourai_machine_memory`` hook.

One ``Machine`` per pytest process; readings of memory are fresh when asked to be (before a
probe), cached otherwise. Readers of the hardware are in memory.py.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any

import pytest

from pytest_yourai import baseline
from pytest_yourai.memory import (
    MachineMemory,
    MlxStatus,
    detect_backend,
    mlx_record,
    mlx_status,
    read_machine_memory,
)


class Machine:
    def __init__(
        self,
        config: pytest.Config,
        host: str,
        max_memory_gb: float | None,
        custom_probe: bool,
        start_available_gb: float | None = None,
        known_mlx: dict[str, Any] | None = None,
    ) -> None:
        self.config, self.host = config, host
        self.max_memory_gb, self.custom_probe = max_memory_gb, custom_probe
        self._mlx: MlxStatus | None = None
        self._memory: MachineMemory | None = None
        # The controller's reading at start, when this worker shares its host: the budget
        # must not shrink because other workers' probes are already running.
        self._start_available = start_available_gb
        self._known_mlx = known_mlx  # the controller's finding, for a worker on its host

    @property
    def mlx(self) -> MlxStatus:
        """Whether MLX imports here (asked of a child Python once per installation). A
        custom probe command needs no MLX: then the backend is inferred."""
        if self._mlx is None:
            if self.custom_probe:
                self._mlx = MlxStatus(True, backend=detect_backend())
            else:
                cache = getattr(self.config, "cache", None)
                self._mlx = mlx_status(cache, self.host, self._known_mlx)
        return self._mlx

    def mlx_record(self) -> dict[str, Any] | None:
        """What a worker on this host may take instead of asking (None: a custom probe)."""
        return None if self.custom_probe else mlx_record(self.mlx)

    @property
    def backend(self) -> str:
        return self.mlx.backend or detect_backend()

    def memory(self, fresh: bool = False) -> MachineMemory:
        """The memory available to probes: measured, or what a ``pytest_yourai_machine_memory``
        hook says (e.g. a scheduler's allocation, which then also caps the watchdog's view);
        at most ``--yourai-max-memory``."""
        if fresh or self._memory is None:
            measured = read_machine_memory(self.backend)
            given = self.config.hook.pytest_yourai_machine_memory(config=self.config)
            if given is not None:
                measured = replace(
                    measured,
                    available_gb=float(given),
                    source="pytest_yourai_machine_memory hook",
                ).capped(float(given))
            self._memory = measured.capped(self.max_memory_gb)
        return self._memory

    @property
    def cap_gb(self) -> float | None:
        """The most a probe may count on, whatever the hardware says (None: no cap)."""
        return self.memory().cap_gb

    def start_available_gb(self) -> float:
        if self._start_available is None:
            self._start_available = self.memory().available_gb
        return self._start_available

    def machine_id(self) -> str:
        m = self.memory()
        return baseline.machine_id(m.backend, m.device_name, m.total_gb)

    def info(self, run_id: str) -> dict[str, Any]:
        m = self.memory()
        return {
            "backend": m.backend,
            "device_name": m.device_name,
            "total_gb": round(m.total_gb, 3),
            "available_gb": round(m.available_gb, 3),
            "memory_cap_gb": m.cap_gb,
            "host": self.host,
            "machine_id": self.machine_id(),
            "run_id": run_id,
            "python": sys.version.split()[0],
        }
