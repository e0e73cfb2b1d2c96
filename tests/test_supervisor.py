"""The supervisor on real subprocesses: results, timeouts, floods, garbage, the process tree."""

from __future__ import annotations

import os
import sys
import time

import psutil

from pytest_yourai.supervisor import ProbeProcess, parse_result_line


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_result_line_is_the_last_one() -> None:
    code = (
        'print(\'BENCHMARK_RESULT: {"status": "early"}\');'
        "print('progress');"
        'print(\'BENCHMARK_RESULT: {"status": "ok", "peak_memory_gb": 1.5}\')'
    )
    with ProbeProcess(_python(code), os.environ) as proc:
        outcome = proc.wait(30)
    assert outcome.exit_code == 0 and not outcome.timed_out
    assert outcome.result == {"status": "ok", "peak_memory_gb": 1.5}


def test_garbage_and_missing_result() -> None:
    assert parse_result_line(None)[1] is not None
    assert "not valid JSON" in str(parse_result_line("BENCHMARK_RESULT: {oops")[1])
    assert "not a JSON object" in str(parse_result_line("BENCHMARK_RESULT: [1]")[1])


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_timeout_kills_the_whole_tree() -> None:
    # The probe starts a grandchild that ignores SIGTERM; both must be gone.
    code = (
        "import subprocess, sys, time;"
        "p = subprocess.Popen([sys.executable, '-c', "
        "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)']);"
        "print(p.pid, flush=True); time.sleep(600)"
    )
    started = time.monotonic()
    with ProbeProcess(_python(code), os.environ) as proc:
        outcome = proc.wait(1.5)
    assert outcome.timed_out and outcome.exit_code is None
    assert time.monotonic() - started < 1.5 + 3
    grandchild = int(outcome.stdout_tail.split()[0])
    assert not _alive(proc.pid)
    deadline = time.monotonic() + 2
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)


def test_flooded_output_does_not_deadlock() -> None:
    code = (
        "import sys; chunk = 'x' * 1023 + '\\n';"
        "[sys.stdout.write(chunk) or sys.stderr.write(chunk) for _ in range(8192)];"
        'print(\'BENCHMARK_RESULT: {"status": "ok"}\')'
    )
    with ProbeProcess(_python(code), os.environ) as proc:
        outcome = proc.wait(60)
    assert outcome.result == {"status": "ok"}
    assert len(outcome.stdout_tail) <= 64 * 1024


def test_signal_death_is_reported() -> None:
    with ProbeProcess(
        _python("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"), os.environ
    ) as proc:
        outcome = proc.wait(30)
    assert outcome.killed_by_signal == 11 and outcome.result is None
