"""Spawn the probe in its own process group, poll it every 100 ms, and kill its whole tree.

The probe's stdout and stderr are drained by reader threads into bounded tails, so a
probe that floods its output can never block on a full pipe, and memory stays bounded.
"""

from __future__ import annotations

import collections
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import IO, Any

RESULT_PREFIX = "BENCHMARK_RESULT:"
POLL_INTERVAL_S = 0.1
TERM_GRACE_S = 1.0
TAIL_BYTES = 64 * 1024
MAX_LINE_BYTES = 1024 * 1024


class _StreamTail:
    """Drains a pipe on a thread; keeps its last bytes and its last result line."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._tail: collections.deque[bytes] = collections.deque()
        self._tail_size = 0
        self._partial = b""
        self.result_line: str | None = None
        self.total_bytes = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        read = getattr(self._stream, "read1", self._stream.read)
        while True:
            try:
                chunk = read(65536)
            except (OSError, ValueError):
                break
            if not chunk:
                break
            self._feed(chunk)
        if self._partial:
            self._take_line(self._partial)
            self._partial = b""

    def _feed(self, chunk: bytes) -> None:
        with self._lock:
            self.total_bytes += len(chunk)
            self._tail.append(chunk)
            self._tail_size += len(chunk)
            while self._tail_size - len(self._tail[0]) >= TAIL_BYTES:
                self._tail_size -= len(self._tail.popleft())
        data = self._partial + chunk
        *lines, self._partial = data.split(b"\n")
        if len(self._partial) > MAX_LINE_BYTES:
            self._partial = b""  # an endless line is output, not a result
        for line in lines:
            self._take_line(line)

    def _take_line(self, line: bytes) -> None:
        if line.startswith(RESULT_PREFIX.encode()):
            self.result_line = line.decode("utf-8", errors="replace").rstrip("\r")

    def text(self, limit: int = TAIL_BYTES) -> str:
        with self._lock:
            data = b"".join(self._tail)
        return data[-limit:].decode("utf-8", errors="replace")

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


@dataclass(frozen=True)
class ProbeOutcome:
    """How the probe process ended, and what it said."""

    exit_code: int | None
    timed_out: bool
    elapsed_s: float
    stdout_tail: str
    stderr_tail: str
    result: dict[str, Any] | None
    result_problem: str | None  # why ``result`` is None, when a line was expected

    @property
    def killed_by_signal(self) -> int | None:
        if self.exit_code is not None and self.exit_code < 0:
            return -self.exit_code
        return None


def parse_result_line(line: str | None) -> tuple[dict[str, Any] | None, str | None]:
    """Parse ``BENCHMARK_RESULT: {json}``; returns (result, problem)."""
    if line is None:
        return None, f"the probe printed no {RESULT_PREFIX} line"
    payload = line[len(RESULT_PREFIX) :].strip()
    try:
        value = json.loads(payload)
    except json.JSONDecodeError as exc:
        return None, f"the {RESULT_PREFIX} line is not valid JSON ({exc.msg})"
    if not isinstance(value, dict):
        return None, f"the {RESULT_PREFIX} line is not a JSON object"
    return value, None


def _linux_parent_death_signal() -> Callable[[], None] | None:
    """A preexec hook that kills the probe if pytest dies without cleaning up (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    pr_set_pdeathsig = 1

    def set_pdeathsig() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)

    return set_pdeathsig


class ProbeProcess:
    """A running probe. Use as a context manager: leaving it always kills the tree."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], cwd: str | None = None) -> None:
        self.argv = list(argv)
        self._started = time.monotonic()
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_linux_parent_death_signal(),
        )
        self.pid = self.popen.pid
        assert self.popen.stdout is not None and self.popen.stderr is not None
        self._stdout = _StreamTail(self.popen.stdout)
        self._stderr = _StreamTail(self.popen.stderr)

    def __enter__(self) -> ProbeProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill_tree()

    def stdout_tail(self, limit: int = TAIL_BYTES) -> str:
        return self._stdout.text(limit)

    def stderr_tail(self, limit: int = TAIL_BYTES) -> str:
        return self._stderr.text(limit)

    def elapsed_s(self) -> float:
        return time.monotonic() - self._started

    def kill_tree(self) -> None:
        """SIGTERM the probe's process group, then SIGKILL whatever is left, then reap."""
        if self.popen.poll() is None:
            self._signal_group(signal.SIGTERM)
            deadline = time.monotonic() + TERM_GRACE_S
            while self.popen.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
        # Children of the probe may outlive it in the group even when it has exited.
        self._signal_group(signal.SIGKILL)
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._stdout.join(1.0)
        self._stderr.join(1.0)

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def wait(self, timeout_s: float, tick: Callable[[], None] | None = None) -> ProbeOutcome:
        """Poll every 100 ms until the probe exits or ``timeout_s`` passes."""
        timed_out = False
        while self.popen.poll() is None:
            if self.elapsed_s() >= timeout_s:
                timed_out = True
                break
            if tick is not None:
                tick()
            time.sleep(POLL_INTERVAL_S)
        elapsed = self.elapsed_s()
        self.kill_tree()
        result, problem = parse_result_line(self._stdout.result_line)
        return ProbeOutcome(
            exit_code=None if timed_out else self.popen.returncode,
            timed_out=timed_out,
            elapsed_s=elapsed,
            stdout_tail=self.stdout_tail(),
            stderr_tail=self.stderr_tail(),
            result=result,
            result_problem=problem,
        )
