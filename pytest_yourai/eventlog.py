"""The crash-safe JSONL event log (``benchmark_log.jsonl``): the one writer of every event.

Each event is one JSON object on one line, written with a single ``write()`` on a file
descriptor opened with ``O_APPEND`` and fsync'd before ``write_event`` returns. So the line
is on disk before the step it describes goes on, concurrent writers (xdist workers,
several pytest runs) never interleave bytes, and an existing file is only appended to.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from pytest_yourai.files import prepare_output

BENCHMARK_START: Final = "benchmark_start"
MODEL_START: Final = "model_start"
PREFLIGHT_CHECK: Final = "preflight_check"
SUBPROCESS_START: Final = "subprocess_start"
SUBPROCESS_SPAWNED: Final = "subprocess_spawned"
SUBPROCESS_COMPLETED: Final = "subprocess_completed"
SUBPROCESS_TIMEOUT: Final = "subprocess_timeout"
SUBPROCESS_FAILED: Final = "subprocess_failed"
SAFETY_STOP: Final = "safety_stop"
SAFETY_KILL: Final = "safety_kill"
WORKER_CRASHED: Final = "worker_crashed"
PROBE_WAITING: Final = "probe_waiting"
PROBE_ADMITTED: Final = "probe_admitted"
PROBE_PROGRESS: Final = "probe_progress"
TEST_VERDICT: Final = "test_verdict"
BENCHMARK_COMPLETE: Final = "benchmark_complete"

EVENTS: Final = (
    BENCHMARK_START,
    MODEL_START,
    PREFLIGHT_CHECK,
    PROBE_WAITING,
    PROBE_ADMITTED,
    SUBPROCESS_START,
    SUBPROCESS_SPAWNED,
    PROBE_PROGRESS,
    SUBPROCESS_COMPLETED,
    SUBPROCESS_TIMEOUT,
    SUBPROCESS_FAILED,
    SAFETY_STOP,
    SAFETY_KILL,
    WORKER_CRASHED,
    TEST_VERDICT,
    BENCHMARK_COMPLETE,
)

# The fields each event carries at least (beyond timestamp and event).
REQUIRED_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    BENCHMARK_START: ("max_memory_gb", "force_mode", "backend", "total_gb", "available_gb"),
    MODEL_START: ("preset", "model_name", "params"),
    PREFLIGHT_CHECK: (
        "preset",
        "available_gb",
        "estimated_base_gb",
        "estimated_conservative_gb",
        "batch_size",
        "lora_rank",
        "lora_layers",
    ),
    PROBE_WAITING: ("preset", "needed_gb", "reserved_gb", "budget_gb"),
    PROBE_ADMITTED: ("preset", "reserved_gb", "total_reserved_gb", "budget_gb", "waited_s"),
    PROBE_PROGRESS: ("preset", "phase", "line", "probe_rss_gb", "available_gb"),
    SUBPROCESS_START: ("preset",),
    SUBPROCESS_SPAWNED: ("preset", "pid"),
    SUBPROCESS_COMPLETED: ("preset", "exit_code", "peak_memory_gb", "stdout_preview"),
    SUBPROCESS_TIMEOUT: ("preset", "pid", "timeout_s", "stdout_preview"),
    SUBPROCESS_FAILED: ("preset", "exit_code", "stderr", "stdout_preview"),
    SAFETY_STOP: ("reason", "available_gb", "threshold_gb"),
    SAFETY_KILL: ("preset", "available_gb", "threshold_gb", "probe_rss_gb"),
    WORKER_CRASHED: ("host", "worker", "preset", "nodeid", "last_event"),
    TEST_VERDICT: ("preset", "nodeid", "outcome", "verdict"),
    BENCHMARK_COMPLETE: ("total_tested", "passed", "failed", "skipped"),
}


def check_log_path(path: Path, source: str) -> None:
    """Fail at start-up, not mid-run, when the log cannot be appended to."""
    prepare_output(path, source)


class EventLog:
    """Appends events to one JSONL file; ``context`` fields go on every line.

    ``sink``, when given, also gets every record this process writes, once it is on disk
    (an xdist worker's relay to the controller: relay.py)."""

    def __init__(
        self, path: Path, sink: Callable[[dict[str, Any]], None] | None = None, **context: Any
    ) -> None:
        self.path = path
        self.sink = sink
        self.context = {"host": socket.gethostname(), **context}

    def write_event(self, event: str, **fields: Any) -> dict[str, Any]:
        missing = [name for name in REQUIRED_FIELDS.get(event, ()) if name not in fields]
        if missing:
            raise ValueError(f"event {event!r} is missing field(s) {', '.join(missing)}")
        record: dict[str, Any] = {"timestamp": time.time(), "event": event}
        record.update(fields)
        for key, value in self.context.items():
            record.setdefault(key, value)
        self.append(record)
        if self.sink is not None:
            self.sink(record)
        return record

    def append(self, record: dict[str, Any]) -> None:
        """One line, one ``write()``, fsync'd: also for a record another process wrote
        first (a worker's event, relayed to the controller's log)."""
        line = (json.dumps(record, default=str, ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, line)
            if written != len(line):
                # A short write on a regular file means the disk is full; finish the line
                # so the next event starts on a fresh one.
                os.write(fd, line[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
