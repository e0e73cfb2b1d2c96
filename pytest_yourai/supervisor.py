"""Spawn the probe under a supervisor, poll it every 100 ms, and kill its whole tree.

Process tree::

    pytest ── supervisor (python -m pytest_yourai.supervisor, its own session) ── probe ── …

The supervisor leads a new session and process group, and on Linux is a child
subreaper, so every descendant of the probe stays in reach. It kills the whole tree
(SIGTERM, then SIGKILL after a grace period) when it is told to stop, when its parent
dies (PR_SET_PDEATHSIG on Linux, a parent-pid check every 100 ms everywhere), or when
the probe exits and leaves children behind. So no probe outlives pytest, even when
pytest is SIGKILLed or pytest-timeout's thread method ends it with os._exit.

The probe's stdout and stderr are drained by reader threads into bounded tails, so a
probe that floods its output can never block on a full pipe, and memory stays bounded.
"""

from __future__ import annotations

import collections
import ctypes
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

import psutil

from pytest_yourai.protocol import RESULT_PREFIX, parse_result_line

POLL_INTERVAL_S = 0.1
TERM_GRACE_S = 1.0
SUPERVISOR_GRACE_S = 0.5  # shorter than TERM_GRACE_S: the supervisor finishes first
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
        self.last_line = ""
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
        self.last_line = line.decode("utf-8", errors="replace").rstrip("\r")[:500]
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
    stopped: bool  # killed because the caller's tick asked (the memory watchdog)
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


_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)
        except (OSError, AttributeError):
            pass


def _parent_death_signal(sig: int) -> Callable[[], None] | None:
    """A preexec hook: the child gets ``sig`` when the thread that spawned it dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return None

    def set_pdeathsig() -> None:
        _prctl(_PR_SET_PDEATHSIG, sig)

    return set_pdeathsig


class ProbeProcess:
    """A running probe. Use as a context manager: leaving it always kills the tree."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], cwd: str | None = None) -> None:
        self.argv = list(argv)
        self._started = time.monotonic()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "pytest_yourai.supervisor", "--", *self.argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_parent_death_signal(signal.SIGTERM),
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

    def last_stdout_line(self) -> str:
        return self._stdout.last_line

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

    def tree_rss_bytes(self) -> int:
        """Resident memory of the supervisor, the probe and all their descendants."""
        try:
            root = psutil.Process(self.pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0
        total = 0
        for process in processes:
            try:
                total += process.memory_info().rss
            except psutil.Error:
                pass
        return total

    def wait(self, timeout_s: float, tick: Callable[[], bool] | None = None) -> ProbeOutcome:
        """Poll every 100 ms until the probe exits, ``timeout_s`` passes, or ``tick``
        (called at each poll) returns True to stop it."""
        timed_out = stopped = False
        while self.popen.poll() is None:
            if self.elapsed_s() >= timeout_s:
                timed_out = True
                break
            if tick is not None and tick():
                stopped = True
                break
            time.sleep(POLL_INTERVAL_S)
        elapsed = self.elapsed_s()
        self.kill_tree()
        result, problem = parse_result_line(self._stdout.result_line)
        return ProbeOutcome(
            exit_code=None if timed_out or stopped else self.popen.returncode,
            timed_out=timed_out,
            stopped=stopped,
            elapsed_s=elapsed,
            stdout_tail=self.stdout_tail(),
            stderr_tail=self.stderr_tail(),
            result=result,
            result_problem=problem,
        )


# -- the supervisor: ``python -m pytest_yourai.supervisor -- ARGV`` ---------------------------


def _descendants() -> list[psutil.Process]:
    """Every process below us, plus any left in our process group."""
    me = os.getpid()
    found: dict[int, psutil.Process] = {}
    try:
        for child in psutil.Process(me).children(recursive=True):
            found[child.pid] = child
    except psutil.Error:
        pass
    group = os.getpgid(0)
    for pid in psutil.pids():
        if pid == me or pid in found:
            continue
        try:
            if os.getpgid(pid) == group:
                found[pid] = psutil.Process(pid)
        except (OSError, psutil.Error):
            pass
    return list(found.values())


def _kill_descendants(grace_s: float) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        processes = _descendants()
        if not processes:
            return
        for process in processes:
            try:
                process.send_signal(sig)
            except psutil.Error:
                pass
        if sig == signal.SIGTERM:
            psutil.wait_procs(processes, timeout=grace_s)
    psutil.wait_procs(_descendants(), timeout=1.0)


def supervise(argv: Sequence[str]) -> int:
    """Run ``argv`` and make sure nothing it starts outlives it, us, or our parent."""
    parent = os.getppid()
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    stop_requested: list[int] = []

    def request_stop(signum: int, _frame: object) -> None:
        stop_requested.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, request_stop)
    try:
        child = subprocess.Popen(list(argv), preexec_fn=_parent_death_signal(signal.SIGKILL))
    except OSError as exc:
        sys.stderr.write(f"pytest_yourai.supervisor: cannot run {argv[0]!r}: {exc.strerror}\n")
        return 127
    while child.poll() is None and not stop_requested and os.getppid() == parent:
        time.sleep(POLL_INTERVAL_S)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    _kill_descendants(SUPERVISOR_GRACE_S)
    code = child.wait()
    if code < 0:
        # Die of the same signal, so the runner sees how the probe died.
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        sys.stderr.write("usage: python -m pytest_yourai.supervisor -- COMMAND [ARG ...]\n")
        return 2
    return supervise(args)


if __name__ == "__main__":
    sys.exit(main())
