"""The fault suite: real processes, real signals. Nothing may outlive a run, and the log
must parse line by line whatever happened."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import events, orphans_of, record_fault, write_fake_probe

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestWarning")

# A probe that starts a grandchild (which ignores SIGTERM) before doing its fault.
WITH_GRANDCHILD = """
import subprocess
kid = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)",
    sys.argv[0]])
print(f"grandchild {kid.pid}", flush=True)
"""


def check_aftermath(bench: pytest.Pytester, timeout_s: float = 2.0) -> list[dict[str, object]]:
    """Every log line parses; within ``timeout_s`` no process of this test remains."""
    log = bench.path / "benchmark_log.jsonl"
    lines = log.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    deadline = time.monotonic() + timeout_s
    left = orphans_of(str(bench.path))
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = orphans_of(str(bench.path))
    record_fault(len(lines), len(left))
    assert left == [], f"orphans: {left}"
    return records


def wait_for_event(log: Path, name: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if log.exists() and f'"event": "{name}"' in log.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"no {name} in the log after {timeout_s} s")


def _spawn_pytest(bench: pytest.Pytester, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=bench.path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_sigkill_pytest_mid_probe(bench: pytest.Pytester) -> None:
    probe = write_fake_probe(
        bench.path, WITH_GRANDCHILD + "print('step 1/4', flush=True)\ntime.sleep(300)\n"
    )
    pytest_proc = _spawn_pytest(bench, "-k", "tiny-llama", "--yourai-probe-command", probe)
    log = bench.path / "benchmark_log.jsonl"
    wait_for_event(log, "subprocess_spawned")
    time.sleep(0.5)  # let the probe start its grandchild
    pytest_proc.kill()
    pytest_proc.wait()
    records = check_aftermath(bench)
    # The log ends where the probe was: its last progress line.
    assert records[-1]["event"] == "probe_progress" and records[-1]["line"] == "step 1/4"
    assert not events(records, "benchmark_complete")


def test_keyboard_interrupt_mid_probe(bench: pytest.Pytester) -> None:
    probe = write_fake_probe(bench.path, WITH_GRANDCHILD + "time.sleep(300)\n")
    pytest_proc = _spawn_pytest(bench, "-k", "tiny-llama", "--yourai-probe-command", probe)
    wait_for_event(bench.path / "benchmark_log.jsonl", "subprocess_spawned")
    time.sleep(0.5)
    pytest_proc.send_signal(signal.SIGINT)
    assert pytest_proc.wait(timeout=20) == pytest.ExitCode.INTERRUPTED
    records = check_aftermath(bench)
    (failed,) = events(records, "subprocess_failed")
    assert failed["reason"] == "interrupted: KeyboardInterrupt"
    assert len(events(records, "benchmark_complete")) == 1


def test_hanging_probe(bench: pytest.Pytester) -> None:
    probe = write_fake_probe(bench.path, WITH_GRANDCHILD + "time.sleep(300)\n")
    result = bench.runpytest(
        "-k", "tiny-llama", "--yourai-probe-command", probe, "--yourai-timeout", "2"
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*Timeout after 2 s in phase start*"])
    records = check_aftermath(bench)
    assert len(events(records, "subprocess_timeout")) == 1


def test_probe_that_ignores_sigterm(bench: pytest.Pytester) -> None:
    probe = write_fake_probe(
        bench.path,
        WITH_GRANDCHILD + "signal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(300)\n",
    )
    started = time.monotonic()
    result = bench.runpytest(
        "-k", "tiny-llama", "--yourai-probe-command", probe, "--yourai-timeout", "2"
    )
    assert time.monotonic() - started < 2 + 2 + 5  # timeout, kill grace, pytest overhead
    result.assert_outcomes(failed=1)
    check_aftermath(bench)


def test_probe_crashing_with_sigsegv(bench: pytest.Pytester) -> None:
    probe = write_fake_probe(
        bench.path,
        WITH_GRANDCHILD + "print('step 1/4', flush=True)\nos.kill(os.getpid(), signal.SIGSEGV)\n",
    )
    result = bench.runpytest("-k", "tiny-llama", "--yourai-probe-command", probe)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*probe killed by signal 11*", "*step 1/4*"])
    records = check_aftermath(bench)
    (failed,) = events(records, "subprocess_failed")
    assert failed["exit_code"] == -11


def test_probe_flooding_its_output(bench: pytest.Pytester) -> None:
    probe = write_fake_probe(
        bench.path,
        """
line = "x" * 1023 + "\\n"
for _ in range(20 * 1024):
    sys.stdout.write(line)
    sys.stderr.write(line)
result(status="ok", peak_memory_gb=0.1)
""",
    )
    result = bench.runpytest(
        "-k", "tiny-llama", "--yourai-probe-command", probe, "--yourai-timeout", "60"
    )
    result.assert_outcomes(passed=1)
    records = check_aftermath(bench)
    (done,) = events(records, "subprocess_completed")
    assert len(done["stdout_preview"]) <= 4000


def test_rehearsed_oom_in_the_real_probe(bench: pytest.Pytester) -> None:
    command = f"{sys.executable} -m pytest_yourai.probe --memory-limit-gb 0.02"
    result = bench.runpytest("-k", "tiny-llama", "--yourai-probe-command", command)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*OOM at *: ProbeOOM: memory limit exceeded*"])
    records = check_aftermath(bench)
    (failed,) = events(records, "subprocess_failed")
    assert failed["status"] == "oom" and failed["phase"] in ("build", "train")


@pytest.mark.parametrize("method", ["signal", "thread"])
def test_pytest_timeout_moves_the_deadline(bench: pytest.Pytester, method: str) -> None:
    """pytest-timeout at 4 s, ours at 300 s: ours fires a second earlier, logs, kills."""
    probe = write_fake_probe(
        bench.path, WITH_GRANDCHILD + "print('step 1/4', flush=True)\ntime.sleep(300)\n"
    )
    result = bench.runpytest_subprocess(
        "-k",
        "tiny-llama",
        "--yourai-probe-command",
        probe,
        "--timeout",
        "4",
        "--timeout-method",
        method,
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*Timeout after * s in phase train (to stay inside pytest-timeout's 4 s)*"]
    )
    records = check_aftermath(bench)
    (timeout,) = events(records, "subprocess_timeout")
    assert timeout["source"] == "pytest-timeout's 4 s" and timeout["timeout_s"] < 4


def test_pytest_timeout_firing_first_still_cleans_up(bench: pytest.Pytester) -> None:
    """If pytest-timeout's signal fires while the probe runs, the tree still dies and the
    log says so."""
    probe = write_fake_probe(bench.path, WITH_GRANDCHILD + "time.sleep(300)\n")
    bench.makeconftest(
        """
import pytest_yourai.timelimits as s
s.PYTEST_TIMEOUT_MARGIN_S = -10.0  # let pytest-timeout win the race
"""
    )
    result = bench.runpytest_subprocess(
        "-k",
        "tiny-llama",
        "--yourai-probe-command",
        probe,
        "--timeout",
        "3",
        "--timeout-method",
        "signal",
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*Timeout after * s in phase start (pytest-timeout: Timeout*"])
    records = check_aftermath(bench)
    (timeout,) = events(records, "subprocess_timeout")
    assert timeout["source"] == "pytest-timeout"


def test_watchdog_kills_a_probe_eating_memory(bench: pytest.Pytester) -> None:
    """A 2.6 GB machine (rehearsed), a 2 GB threshold, a probe that takes 800 MB."""
    probe = write_fake_probe(
        bench.path,
        "print('step 1/4', flush=True)\nhog = bytearray(800 * 1024 * 1024)\ntime.sleep(60)\n",
    )
    result = bench.runpytest(
        "-k",
        "tiny",
        "--yourai-probe-command",
        probe,
        "--yourai-max-memory",
        "2.6",
        "--yourai-safety-gb",
        "2.0",
    )
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*Safety kill in phase train: available memory fell to * GB*"])
    records = check_aftermath(bench)
    (kill,) = events(records, "safety_kill")
    assert kill["available_gb"] < 2.0 and kill["probe_rss_gb"] > 0.5
    # The run stopped: only the first tiny preset was probed.
    assert len(events(records, "subprocess_spawned")) == 1


def test_log_parses_after_every_fault_above() -> None:
    # The ledger is filled by the tests above; this only guards against a silent no-op.
    from tests.helpers import FAULT_LEDGER

    if FAULT_LEDGER["faults"] == 0:
        pytest.skip("run with the rest of the fault suite")
    assert FAULT_LEDGER["orphans"] == 0


def test_environment_is_linux_or_mac() -> None:
    assert os.name == "posix"
