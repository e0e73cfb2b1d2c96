"""Memory admission: probes on one host reserve their conservative estimate before starting.

pytest-xdist schedules by CPU; memory is the scarce resource. Every worker on a host
shares one ledger file in pytest's cache directory (``yourai/admission.ledger``, guarded by
``admission.ledger.lock`` through filelock); the run removes both when it ends. A probe
starts only when its reservation plus the live reservations fit the budget (available
memory minus the safety threshold); otherwise it waits. A
reservation belongs to a process id: when that process is gone (a crashed worker), the
reservation expires, so a dead worker never deadlocks the others.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from filelock import FileLock

from pytest_yourai.eventlog import PROBE_ADMITTED, PROBE_WAITING, EventLog
from pytest_yourai.files import write_atomically

POLL_S = 0.25


class NeverFits(Exception):
    """The reservation is larger than the whole budget."""


@dataclass(frozen=True)
class Admission:
    key: str
    reserved_gb: float
    total_reserved_gb: float  # this reservation plus the others live when admitted
    budget_gb: float
    waited_s: float


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class Ledger:
    def __init__(self, directory: Path) -> None:
        self.path = directory / "admission.ledger"
        self.lock = FileLock(str(self.path) + ".lock")

    def remove(self) -> None:
        """Leave nothing behind (the controller, once every worker is done)."""
        for path in (self.path, Path(str(self.path) + ".lock")):
            path.unlink(missing_ok=True)

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {}
        reservations = data.get("reservations", {}) if isinstance(data, dict) else {}
        return {
            key: value
            for key, value in reservations.items()
            if isinstance(value, dict) and _alive(int(value.get("pid", -1)))
        }

    def _write(self, reservations: dict[str, dict[str, Any]]) -> None:
        write_atomically(self.path, json.dumps({"reservations": reservations}))

    def reserved_gb(self) -> float:
        with self.lock:
            return sum(float(v["gb"]) for v in self._read().values())

    def reserve(
        self,
        key: str,
        gb: float,
        budget_gb: float,
        details: dict[str, Any],
        on_wait: Callable[[float, float], None],
    ) -> Admission:
        """Block until ``gb`` fits next to the live reservations; ``on_wait(others, budget)``
        is called once, when waiting starts."""
        if gb > budget_gb:
            raise NeverFits(f"needs {gb:.3g} GB, more than the whole budget of {budget_gb:.3g} GB")
        started = time.monotonic()
        told = False
        while True:
            with self.lock:
                live = self._read()
                others = sum(float(v["gb"]) for k, v in live.items() if k != key)
                if others + gb <= budget_gb:
                    live[key] = {"gb": gb, "pid": os.getpid(), "since": time.time(), **details}
                    self._write(live)
                    return Admission(key, gb, others + gb, budget_gb, time.monotonic() - started)
            if not told:
                on_wait(others, budget_gb)
                told = True
            time.sleep(POLL_S)

    def release(self, key: str) -> None:
        with self.lock:
            live = self._read()
            if live.pop(key, None) is not None or self.path.exists():
                self._write(live)


def admit(
    ledger: Ledger,
    log: EventLog,
    key: str,
    preset: str,
    needed_gb: float,
    budget_gb: float,
    worker: str,
) -> Admission:
    """Reserve ``needed_gb`` for the preset's probe on this host, waiting (logged
    ``probe_waiting``) while it does not fit next to the probes already running; logged
    ``probe_admitted``. NeverFits when it exceeds the whole budget."""

    def waiting(others: float, budget: float) -> None:
        log.write_event(
            PROBE_WAITING,
            preset=preset,
            needed_gb=round(needed_gb, 4),
            reserved_gb=round(others, 4),
            budget_gb=round(budget, 4),
        )

    admission = ledger.reserve(
        key, needed_gb, budget_gb, {"preset": preset, "worker": worker}, waiting
    )
    log.write_event(
        PROBE_ADMITTED,
        preset=preset,
        reserved_gb=round(admission.reserved_gb, 4),
        total_reserved_gb=round(admission.total_reserved_gb, 4),
        budget_gb=round(admission.budget_gb, 4),
        waited_s=round(admission.waited_s, 3),
    )
    return admission
