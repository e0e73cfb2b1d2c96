"""The ``yourai_benchmark`` fixture's object: runs one preset's probe and judges it."""

from __future__ import annotations

import re
import sys
from typing import Any, NoReturn

import pytest

from pytest_yourai.eventlog import (
    SAFETY_KILL,
    SUBPROCESS_COMPLETED,
    SUBPROCESS_FAILED,
    SUBPROCESS_SPAWNED,
    SUBPROCESS_START,
    SUBPROCESS_TIMEOUT,
)
from pytest_yourai.memory import MemoryWatchdog
from pytest_yourai.preflight import Preflight
from pytest_yourai.runner import ProbeOutcome, ProbeProcess
from pytest_yourai.session import PROP_PREFIX, YouraiSession, probe_environment

PREVIEW_CHARS = 2000
STDERR_CHARS = 2000

# Result fields copied into JUnit properties / the summary, when the probe reports them.
RESULT_PROPERTIES = (
    "peak_memory_gb",
    "train_peak_memory_gb",
    "load_peak_memory_gb",
    "resident_memory_gb",
    "process_peak_rss_gb",
    "tokens_per_second",
    "trainable_parameters",
    "total_parameters",
    "device_name",
    "peak_growth",
)


def phase_from_output(stdout: str) -> str:
    """Where a probe was, judged from its progress lines (for probes that died silently)."""
    phase = "start"
    for line in stdout.splitlines():
        if line.startswith(("building block", "loading weights", "built model")):
            phase = "build"
        elif re.match(r"step \d+/\d+", line):
            phase = "train"
    return phase


def _preview(text: str, limit: int) -> str:
    return text[-limit:]


class YouraiBenchmark:
    """One preset, pre-flighted. ``run()`` spawns the probe and returns its result."""

    def __init__(self, item: pytest.Item, session: YouraiSession, preflight: Preflight) -> None:
        self.item = item
        self.session = session
        self.preflight = preflight
        self.result: dict[str, Any] | None = None

    @property
    def preset(self) -> Any:
        return self.preflight.preset

    @property
    def spec(self) -> dict[str, Any]:
        return self.preflight.probe_spec()

    def _prop(self, name: str, value: Any) -> None:
        self.item.user_properties.append((PROP_PREFIX + name, value))

    def _argv(self) -> list[str]:
        command = self.session.settings.probe_command
        if command is not None:
            return list(command)
        return [sys.executable, "-m", "pytest_yourai.probe"]

    def run(self) -> dict[str, Any]:
        """Run the probe; pass with its result, or fail with OOM / Timeout / error."""
        name = self.preset.name
        timeout_s, limited_by = self.session.probe_deadline(self.item)
        admission = self.session.admit(self.preflight, f"{self.session.run_id}:{self.item.nodeid}")
        try:
            return self._run_admitted(name, timeout_s, limited_by)
        finally:
            self.session.ledger.release(admission.key)

    def _run_admitted(self, name: str, timeout_s: float, limited_by: str) -> dict[str, Any]:
        log = self.session.log
        log.write_event(SUBPROCESS_START, preset=name, command=self._argv())
        with ProbeProcess(self._argv(), probe_environment(self.spec)) as proc:
            log.write_event(SUBPROCESS_SPAWNED, preset=name, pid=proc.pid)
            watchdog = MemoryWatchdog(
                self.session.backend,
                self._watchdog_threshold(),
                self.session.settings.max_memory_gb,
                proc.tree_rss_bytes,
            )
            try:
                outcome = proc.wait(timeout_s, tick=watchdog)
            except BaseException as exc:
                # pytest-timeout (signal method), KeyboardInterrupt: kill the tree now and
                # leave the log saying where the probe was.
                proc.kill_tree()
                self._interrupted(proc, exc)
                raise
        self._prop("probe_peak_rss_gb", round(watchdog.peak_rss_gb, 4))
        if outcome.stopped:
            self._safety_kill(watchdog, outcome)
        return self._judge(proc.pid, outcome, timeout_s, limited_by, watchdog)

    def _watchdog_threshold(self) -> float:
        """The safety threshold, or, for a run forced past the safety stop (it started
        below the threshold), half of what was available then: forcing accepts a small
        machine, not one that runs out of memory."""
        settings = self.session.settings
        available = self.session.machine(fresh=True).available_gb
        if settings.force and available < settings.safety_gb:
            return available / 2
        return settings.safety_gb

    def _interrupted(self, proc: ProbeProcess, exc: BaseException) -> None:
        log = self.session.log
        stdout = proc.stdout_tail()
        phase = phase_from_output(stdout)
        elapsed = proc.elapsed_s()
        if isinstance(exc, pytest.fail.Exception) and str(exc).startswith("Timeout"):
            log.write_event(
                SUBPROCESS_TIMEOUT,
                preset=self.preset.name,
                pid=proc.pid,
                timeout_s=round(elapsed, 3),
                phase=phase,
                stdout_preview=_preview(stdout, PREVIEW_CHARS),
                source="pytest-timeout",
            )
            self._fail(
                "Timeout",
                f"Timeout after {elapsed:.0f} s in phase {phase} (pytest-timeout: {exc})",
                stdout,
            )
        log.write_event(
            SUBPROCESS_FAILED,
            preset=self.preset.name,
            exit_code=None,
            phase=phase,
            stderr=_preview(proc.stderr_tail(), STDERR_CHARS),
            stdout_preview=_preview(stdout, PREVIEW_CHARS),
            reason=f"interrupted: {type(exc).__name__}",
        )

    def _safety_kill(self, watchdog: MemoryWatchdog, outcome: ProbeOutcome) -> None:
        settings = self.session.settings
        available = watchdog.tripped_available_gb or 0.0
        stdout = _preview(outcome.stdout_tail, PREVIEW_CHARS)
        phase = phase_from_output(outcome.stdout_tail)
        self.session.log.write_event(
            SAFETY_KILL,
            preset=self.preset.name,
            available_gb=round(available, 3),
            threshold_gb=round(watchdog.threshold_gb, 3),
            probe_rss_gb=round(watchdog.rss_at_trip_gb, 3),
            phase=phase,
            stdout_preview=stdout,
        )
        message = (
            f"Safety kill in phase {phase}: available memory fell to {available:.2f} GB, below "
            f"the {watchdog.threshold_gb:.3g} GB threshold, while the probe used "
            f"{watchdog.rss_at_trip_gb:.2f} GB"
        )
        if not settings.force:
            self.session.safety_stopped = message
            self.item.session.shouldstop = message
            message += "; the run stops here (--yourai-force keeps going)"
        self._fail("Killed", message, stdout)

    def _judge(
        self,
        pid: int,
        outcome: ProbeOutcome,
        timeout_s: float,
        limited_by: str,
        watchdog: MemoryWatchdog,
    ) -> dict[str, Any]:
        log = self.session.log
        name = self.preset.name
        stdout = _preview(outcome.stdout_tail, PREVIEW_CHARS)
        stderr = _preview(outcome.stderr_tail, STDERR_CHARS)
        result = outcome.result
        self._prop("elapsed_s", round(outcome.elapsed_s, 3))
        if outcome.timed_out:
            phase = phase_from_output(outcome.stdout_tail)
            log.write_event(
                SUBPROCESS_TIMEOUT,
                preset=name,
                pid=pid,
                timeout_s=round(timeout_s, 3),
                phase=phase,
                stdout_preview=stdout,
                source=limited_by,
            )
            note = "" if limited_by == "yourai" else f" (to stay inside {limited_by})"
            self._fail("Timeout", f"Timeout after {timeout_s:.3g} s in phase {phase}{note}", stdout)
        if result is not None:
            for key in RESULT_PROPERTIES:
                value = result.get(key)
                if isinstance(value, int | float | str | bool):
                    self._prop(key, value)
            self.result = result
        status = (result or {}).get("status")
        if status == "ok":
            peak = result.get("peak_memory_gb") if result else None
            log.write_event(
                SUBPROCESS_COMPLETED,
                preset=name,
                exit_code=outcome.exit_code,
                peak_memory_gb=peak,
                train_peak_memory_gb=(result or {}).get("train_peak_memory_gb"),
                elapsed_s=round(outcome.elapsed_s, 3),
                probe_peak_rss_gb=round(watchdog.peak_rss_gb, 4),
                stdout_preview=stdout,
            )
            self._prop("verdict", "Pass")
            if result and result.get("peak_growth"):
                self.item.warn(
                    pytest.PytestWarning(
                        f"{name}: the peak still rose at the last step; more steps may show more"
                    )
                )
            return dict(result or {})
        signal_number = outcome.killed_by_signal
        if status == "oom" or (result is None and signal_number == 9):
            phase = (result or {}).get("phase") or phase_from_output(outcome.stdout_tail)
            detail = (result or {}).get(
                "error"
            ) or "killed by SIGKILL (the OS out-of-memory killer?)"
            log.write_event(
                SUBPROCESS_FAILED,
                preset=name,
                exit_code=outcome.exit_code,
                status="oom",
                phase=phase,
                stderr=stderr,
                stdout_preview=stdout,
            )
            self._fail("OOM", f"OOM at {phase}: {detail}", stdout)
        if result is not None:
            phase = result.get("phase", "?")
            problem = f"probe error in phase {phase}: {result.get('error', 'no error message')}"
        elif signal_number is not None:
            problem = f"probe killed by signal {signal_number}; {outcome.result_problem}"
        else:
            problem = f"probe exited with code {outcome.exit_code}; {outcome.result_problem}"
        log.write_event(
            SUBPROCESS_FAILED,
            preset=name,
            exit_code=outcome.exit_code,
            status=status or "error",
            stderr=stderr,
            stdout_preview=stdout,
            reason=problem,
        )
        self._fail("Error", problem, stdout, stderr)

    def _fail(self, verdict: str, message: str, stdout: str, stderr: str = "") -> NoReturn:
        self._prop("verdict", verdict)
        parts = [message, "--- probe stdout (last lines) ---", stdout.rstrip()[-1500:] or "(empty)"]
        if stderr.strip():
            parts += ["--- probe stderr (last lines) ---", stderr.rstrip()[-800:]]
        pytest.fail("\n".join(parts), pytrace=False)
