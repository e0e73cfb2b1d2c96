"""The ``yourai_benchmark`` fixture's object: runs one preset's probe and judges it."""

from __future__ import annotations

import json
import re
import statistics
import sys
from dataclasses import replace
from typing import Any, NoReturn

import pytest

from pytest_yourai import baseline
from pytest_yourai.autoconfig import BenchmarkConfig
from pytest_yourai.estimate import estimate_training_memory
from pytest_yourai.eventlog import (
    PROBE_PROGRESS,
    SAFETY_KILL,
    SUBPROCESS_COMPLETED,
    SUBPROCESS_FAILED,
    SUBPROCESS_SPAWNED,
    SUBPROCESS_START,
    SUBPROCESS_TIMEOUT,
)
from pytest_yourai.memory import MemoryWatchdog
from pytest_yourai.preflight import Preflight, training_shape
from pytest_yourai.runner import ProbeOutcome, ProbeProcess
from pytest_yourai.search import RANKS as SEARCH_RANKS
from pytest_yourai.search import search as run_search
from pytest_yourai.session import PROP_PREFIX, YouraiSession, probe_environment

PREVIEW_CHARS = 2000
# What the probe measured of the process's footprint on its device (see footprint.py).
FOOTPRINT_FIELDS = (
    "build_footprint_gb",
    "train_footprint_gb",
    "footprint_peak_gb",
    "footprint_source",
)
STDERR_CHARS = 2000

# Result fields copied into JUnit properties / the summary, when the probe reports them.
RESULT_PROPERTIES = (
    "peak_memory_gb",
    *FOOTPRINT_FIELDS,
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


class ProgressLog:
    """Each poll: the watchdog's sample, and a probe_progress event whenever the probe
    reports a new build block or training step, so a hard crash leaves its place in the
    log together with the memory situation at that moment."""

    def __init__(
        self, session: YouraiSession, preset: str, proc: ProbeProcess, watchdog: MemoryWatchdog
    ) -> None:
        self.session, self.preset, self.proc, self.watchdog = session, preset, proc, watchdog
        self.seen = ""

    def tick(self) -> bool:
        stop = self.watchdog()
        line = self.proc.last_stdout_line()
        if line != self.seen and PROGRESS_LINE.match(line):
            self.seen = line
            self.session.log.write_event(
                PROBE_PROGRESS,
                preset=self.preset,
                phase=phase_from_output(line),
                line=line,
                probe_rss_gb=round(self.watchdog.peak_rss_gb, 4),
                available_gb=round(self.watchdog.min_available_gb, 3),
            )
        return stop


PROGRESS_LINE = re.compile(r"(building block \d+/\d+|step \d+/\d+|loading weights|built model)")


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
        """Run the probe; pass with its result, or fail with OOM / Timeout / error.
        With --yourai-search, find the largest config that fits instead."""
        if self.session.settings.search:
            return self.search()
        name = self.preset.name
        timeout_s, limited_by = self.session.probe_deadline(self.item)
        admission = self.session.admit(self.preflight, f"{self.session.run_id}:{self.item.nodeid}")
        try:
            return self._run_admitted(name, timeout_s, limited_by)
        finally:
            self.session.ledger.release(admission.key)

    def _run_admitted(self, name: str, timeout_s: float, limited_by: str) -> dict[str, Any]:
        pid, outcome, watchdog = self._spawn(self.spec, timeout_s)
        self._prop("probe_peak_rss_gb", round(watchdog.peak_rss_gb, 4))
        if outcome.stopped:
            self._safety_kill(watchdog, outcome)
        return self._judge(pid, outcome, timeout_s, limited_by, watchdog)

    def _spawn(
        self, spec: dict[str, Any], timeout_s: float, **fields: Any
    ) -> tuple[int, ProbeOutcome, MemoryWatchdog]:
        """Every probe goes through here: logged, watched (memory, progress), timed out,
        and killed with its whole tree whatever happens."""
        log, name = self.session.log, self.preset.name
        log.write_event(SUBPROCESS_START, preset=name, command=self._argv(), **fields)
        with ProbeProcess(self._argv(), probe_environment(spec)) as proc:
            log.write_event(SUBPROCESS_SPAWNED, preset=name, pid=proc.pid)
            watchdog = MemoryWatchdog(
                self.session.backend,
                self._watchdog_threshold(),
                self.session.settings.max_memory_gb,
                proc.tree_rss_bytes,
            )
            progress = ProgressLog(self.session, name, proc, watchdog)
            try:
                outcome = proc.wait(timeout_s, tick=progress.tick)
            except BaseException as exc:
                # pytest-timeout (signal method), KeyboardInterrupt: kill the tree now and
                # leave the log saying where the probe was.
                proc.kill_tree()
                self._interrupted(proc, exc)
                raise
        return proc.pid, outcome, watchdog

    def _watchdog_threshold(self) -> float:
        """The safety threshold, or, for a run forced past the safety stop (it started
        below the threshold), half of what was available then: forcing accepts a small
        machine, not one that runs out of memory."""
        settings = self.session.settings
        available = self.session.machine(fresh=True).available_gb
        if settings.force and available < settings.safety_gb:
            return available / 2
        return settings.safety_gb

    def search(self) -> dict[str, Any]:
        """Largest batch, then rank, then layers that fit: estimator proposes, probe confirms.

        Every probe runs with --memory-limit-gb at the budget (available minus the safety
        threshold), so a candidate that does not fit fails as a rehearsed OOM, never by
        exhausting the machine. The whole budget is reserved for the search."""
        session, preflight = self.session, self.preflight
        budget = session.start_available_gb() - session.settings.safety_gb
        whole = replace(
            preflight, estimate=replace(preflight.estimate, estimated_conservative_gb=budget)
        )
        admission = session.admit(whole, f"{session.run_id}:{self.item.nodeid}")
        timeout_s, _ = session.probe_deadline(self.item)

        def estimate(config: BenchmarkConfig) -> tuple[float, float]:
            shape = training_shape(
                self.preset, config, preflight.shape.backend, preflight.shape.in_flight
            )
            e = estimate_training_memory(self.preset.architecture, shape, preflight.census)
            return e.estimated_base_gb, e.estimated_conservative_gb

        def probe(config: BenchmarkConfig) -> tuple[bool, float | None]:
            spec = {
                **self.spec,
                "batch_size": config.batch_size,
                "lora_rank": config.lora_rank,
                "lora_layers": config.lora_layers,
                "memory_limit_gb": round(budget, 4),
            }
            result = self._probe_quietly(spec, timeout_s)
            peak = (result or {}).get("peak_memory_gb")
            fits = bool(
                result
                and result.get("status") == "ok"
                and isinstance(peak, int | float)
                and peak <= budget
            )
            return fits, float(peak) if isinstance(peak, int | float) else None

        try:
            found = run_search(
                preflight.config,
                int(self.preset.architecture["num_hidden_layers"]),
                budget,
                estimate,
                probe,
            )
        finally:
            session.ledger.release(admission.key)
        summary = {
            "batch_size": found.config.batch_size if found.config else None,
            "lora_rank": found.config.lora_rank if found.config else None,
            "lora_layers": found.config.lora_layers if found.config else None,
            "peak_memory_gb": found.peak_gb,
            "budget_gb": round(budget, 4),
            "probes": found.probes,
        }
        self._prop("search", json.dumps(summary))
        if found.config is None:
            self._fail(
                "OOM",
                f"search: nothing fits in {budget:.3g} GB, even batch 1, rank "
                f"{min(SEARCH_RANKS)}, 1 layer ({found.probes} probes)",
                "",
            )
        self._prop("batch_size", found.config.batch_size)
        self._prop("lora_rank", found.config.lora_rank)
        self._prop("lora_layers", found.config.lora_layers)
        if found.peak_gb is not None:
            self._prop("peak_memory_gb", found.peak_gb)
        self._prop("verdict", "Pass")
        return {"status": "ok", **summary}

    def _probe_quietly(self, spec: dict[str, Any], timeout_s: float) -> dict[str, Any] | None:
        """One search probe, logged like any other; its failure is data, not a test failure.
        A watchdog kill still stops the search (and the run, unless forced)."""
        log, name = self.session.log, self.preset.name
        config = {k: spec[k] for k in ("batch_size", "lora_rank", "lora_layers")}
        _, outcome, watchdog = self._spawn(spec, timeout_s, search=config)
        if outcome.stopped:
            self._safety_kill(watchdog, outcome)
        stdout = _preview(outcome.stdout_tail, PREVIEW_CHARS)
        result = outcome.result
        if result is not None and result.get("status") == "ok":
            log.write_event(
                SUBPROCESS_COMPLETED,
                preset=name,
                exit_code=outcome.exit_code,
                peak_memory_gb=result.get("peak_memory_gb"),
                stdout_preview=stdout,
                search=config,
            )
        else:
            log.write_event(
                SUBPROCESS_FAILED,
                preset=name,
                exit_code=outcome.exit_code,
                status=(result or {}).get("status", "error"),
                search=config,
                stderr=_preview(outcome.stderr_tail, STDERR_CHARS),
                stdout_preview=stdout,
            )
        return result

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
                **{key: (result or {}).get(key) for key in FOOTPRINT_FIELDS},
                in_flight=self.preflight.shape.in_flight,
                elapsed_s=round(outcome.elapsed_s, 3),
                probe_peak_rss_gb=round(watchdog.peak_rss_gb, 4),
                stdout_preview=stdout,
            )
            self._prop("verdict", "Pass")
            self.session.record_timing(self.preflight, dict(result or {}), outcome.elapsed_s)
            steps = (result or {}).get("step_seconds") or []
            if steps:
                self._prop("step_seconds_median", round(statistics.median(steps), 4))
            self._check_limits(float(peak) if isinstance(peak, int | float) else None, stdout)
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

    def _check_limits(self, peak: float | None, stdout: str) -> None:
        """The preset's memory budget (marker or preset field) and the stored baseline."""
        if peak is None:
            return
        budget = self.max_peak_gb()
        if budget is not None and peak > budget:
            self._fail(
                "Over budget",
                f"{self.preset.name}: peak {peak:.4g} GB exceeds its budget of {budget:g} GB",
                stdout,
            )
        settings = self.session.settings
        if not settings.baseline_compare:
            return
        shape = self.preflight.shape
        key = baseline.run_key(
            self.preset.name,
            *(getattr(shape, name) for name in baseline.KEY_FIELDS),
        )
        old = baseline.load(settings.baseline_dir, self.session.machine_id()).get(key)
        if not isinstance(old, dict) or not isinstance(old.get("peak_memory_gb"), int | float):
            self._prop("baseline", "missing")
            if settings.baseline_require:
                self._fail(
                    "No baseline",
                    f"{self.preset.name}: no baseline for this config and in-flight mode on "
                    f"this machine ({key}) in {settings.baseline_dir}; "
                    "--yourai-baseline-save stores one",
                    stdout,
                )
            return
        self._prop("baseline_peak_gb", old["peak_memory_gb"])
        failure = baseline.growth_failure(
            self.preset.name, float(old["peak_memory_gb"]), peak, settings.fail_on_growth
        )
        if failure is not None:
            self._fail("Regressed", failure, stdout)

    def max_peak_gb(self) -> float | None:
        marker = self.item.get_closest_marker("yourai")
        if marker is not None and marker.kwargs.get("max_peak_gb") is not None:
            return float(marker.kwargs["max_peak_gb"])
        value = self.preset.pins.get("max_peak_gb")
        return float(value) if isinstance(value, int | float) else None

    def _fail(self, verdict: str, message: str, stdout: str, stderr: str = "") -> NoReturn:
        self._prop("verdict", verdict)
        parts = [message, "--- probe stdout (last lines) ---", stdout.rstrip()[-1500:] or "(empty)"]
        if stderr.strip():
            parts += ["--- probe stderr (last lines) ---", stderr.rstrip()[-800:]]
        pytest.fail("\n".join(parts), pytrace=False)
