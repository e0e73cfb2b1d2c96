"""The ``yourai_benchmark`` fixture's object: runs one preset's probe and carries out the
verdict.

``run()``: reserve the conservative estimate on this host (admission.py), start the probe
under the supervisor (spawn.py) with the memory watchdog and a progress log, judge how it
ended (judge.py, pure), then log the judgement, record the figures as the test's
properties, check the preset's budget and baseline, and pass or fail the test.
"""

from __future__ import annotations

import statistics
from typing import Any, NoReturn

import pytest

from pytest_yourai import baseline
from pytest_yourai.admission import Admission, NeverFits, admit
from pytest_yourai.eventlog import (
    PROBE_PROGRESS,
    SUBPROCESS_FAILED,
    SUBPROCESS_SPAWNED,
    SUBPROCESS_START,
    SUBPROCESS_TIMEOUT,
)
from pytest_yourai.judge import (
    FOOTPRINT_FIELDS,
    PREVIEW_CHARS,
    STDERR_CHARS,
    Facts,
    Judgement,
    judge,
)
from pytest_yourai.memory import MemoryWatchdog
from pytest_yourai.preflight import Preflight
from pytest_yourai.presets import Preset
from pytest_yourai.protocol import is_progress, phase_of
from pytest_yourai.results import Verdict, properties
from pytest_yourai.session import YouraiSession
from pytest_yourai.spawn import probe_argv, start_probe
from pytest_yourai.supervisor import ProbeOutcome, ProbeProcess
from pytest_yourai.timelimits import probe_deadline

# Result fields copied into the test's properties (JUnit, the summary), when reported.
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
        if line != self.seen and is_progress(line):
            self.seen = line
            self.session.log.write_event(
                PROBE_PROGRESS,
                preset=self.preset,
                phase=phase_of(line),
                line=line,
                probe_rss_gb=round(self.watchdog.peak_rss_gb, 4),
                available_gb=round(self.watchdog.min_available_gb, 3),
            )
        return stop


class YouraiBenchmark:
    """One preset, pre-flighted. ``run()`` spawns the probe and returns its result."""

    def __init__(self, item: pytest.Item, session: YouraiSession, preflight: Preflight) -> None:
        self.item = item
        self.session = session
        self.preflight = preflight
        self.result: dict[str, Any] | None = None

    @property
    def preset(self) -> Preset:
        return self.preflight.preset

    @property
    def spec(self) -> dict[str, Any]:
        return self.preflight.probe_spec()

    def prop(self, name: str, value: Any) -> None:
        self.item.user_properties.extend(properties({name: value}))

    def run(self) -> dict[str, Any]:
        """Run the probe; pass with its result, or fail with OOM / Timeout / error."""
        timeout_s, limited_by = probe_deadline(self.item, self.session.settings.timeout_s)
        # A model with no estimate (forced) runs alone: it reserves the whole budget.
        estimate = self.preflight.estimate.estimated_conservative_gb
        admission = self.admit(None if self.preflight.refused else estimate)
        try:
            outcome, watchdog, pid = self.spawn(self.spec, timeout_s)
        finally:
            self.session.ledger.release(admission.key)
        self.prop("probe_peak_rss_gb", round(watchdog.peak_rss_gb, 4))
        return self.carry_out(
            judge(outcome, self.facts(pid, watchdog, timeout_s, limited_by)), outcome
        )

    def facts(self, pid: int, watchdog: MemoryWatchdog, timeout_s: float, limited_by: str) -> Facts:
        return Facts(
            preset=self.preset.name, pid=pid, timeout_s=timeout_s, limited_by=limited_by,
            in_flight=self.preflight.shape.in_flight, probe_peak_rss_gb=watchdog.peak_rss_gb,
            threshold_gb=watchdog.threshold_gb, tripped_available_gb=watchdog.tripped_available_gb,
            rss_at_trip_gb=watchdog.rss_at_trip_gb,
        )  # fmt: skip

    # -- the steps -------------------------------------------------------------------------

    def budget_gb(self) -> float:
        """What probes on this host may reserve together: available at the start of the
        run, less the safety threshold."""
        return self.session.machine.start_available_gb() - self.session.settings.safety_gb

    def admit(self, needed_gb: float | None) -> Admission:
        """Reserve ``needed_gb`` (None: the whole budget); skip the test when it can never
        fit next to the budget. Forced, it runs, but alone if need be."""
        budget = self.budget_gb()
        needed = budget if needed_gb is None else needed_gb
        if self.session.settings.force:
            budget = max(budget, needed)
        key = f"{self.session.run_id}:{self.item.nodeid}"
        try:
            return admit(
                self.session.ledger, self.session.log, key, self.preset.name, needed, budget,
                self.session.worker_id,
            )  # fmt: skip
        except NeverFits as exc:
            raise pytest.skip.Exception(
                f"{self.preset.name}: {exc} (available "
                f"{self.session.machine.start_available_gb():.3g} GB minus the "
                f"{self.session.settings.safety_gb:g} GB safety threshold)",
                _use_item_location=True,
            ) from None

    def spawn(
        self, spec: dict[str, Any], timeout_s: float, **fields: Any
    ) -> tuple[ProbeOutcome, MemoryWatchdog, int]:
        """Every probe goes through here: logged, watched (memory, progress), timed out,
        and killed with its whole tree whatever happens."""
        log, name, command = self.session.log, self.preset.name, self.session.settings.probe_command
        log.write_event(SUBPROCESS_START, preset=name, command=probe_argv(command), **fields)
        with start_probe(spec, command) as proc:
            log.write_event(SUBPROCESS_SPAWNED, preset=name, pid=proc.pid)
            watchdog = MemoryWatchdog(
                self.session.machine.backend,
                self.watchdog_threshold(),
                self.session.machine.cap_gb,
                proc.tree_rss_bytes,
            )
            progress = ProgressLog(self.session, name, proc, watchdog)
            try:
                outcome = proc.wait(timeout_s, tick=progress.tick)
            except BaseException as exc:
                # pytest-timeout (signal method), KeyboardInterrupt: kill the tree now and
                # leave the log saying where the probe was.
                proc.kill_tree()
                self.interrupted(proc, exc)
                raise
        return outcome, watchdog, proc.pid

    def watchdog_threshold(self) -> float:
        """The safety threshold, or, for a run forced past the safety stop (it started
        below the threshold), half of what was available then: forcing accepts a small
        machine, not one that runs out of memory."""
        settings = self.session.settings
        available = self.session.machine.memory(fresh=True).available_gb
        if settings.force and available < settings.safety_gb:
            return available / 2
        return settings.safety_gb

    def interrupted(self, proc: ProbeProcess, exc: BaseException) -> None:
        """pytest-timeout or Ctrl-C ended the test while its probe ran."""
        log, stdout = self.session.log, proc.stdout_tail()
        phase, elapsed = phase_of(stdout), proc.elapsed_s()
        preview = stdout[-PREVIEW_CHARS:]
        if isinstance(exc, pytest.fail.Exception) and str(exc).startswith("Timeout"):
            log.write_event(
                SUBPROCESS_TIMEOUT, preset=self.preset.name, pid=proc.pid,
                timeout_s=round(elapsed, 3), phase=phase, stdout_preview=preview,
                source="pytest-timeout",
            )  # fmt: skip
            message = f"Timeout after {elapsed:.0f} s in phase {phase} (pytest-timeout: {exc})"
            self.fail(Verdict.TIMEOUT, message, stdout)
        log.write_event(
            SUBPROCESS_FAILED, preset=self.preset.name, exit_code=None, phase=phase,
            stderr=proc.stderr_tail()[-STDERR_CHARS:], stdout_preview=preview,
            reason=f"interrupted: {type(exc).__name__}",
        )  # fmt: skip

    # -- the verdict -----------------------------------------------------------------------

    def carry_out(self, judgement: Judgement, outcome: ProbeOutcome) -> dict[str, Any]:
        self.session.log.write_event(judgement.event, preset=self.preset.name, **judgement.fields)
        self.prop("elapsed_s", round(outcome.elapsed_s, 3))
        result = outcome.result
        if result is not None and judgement.verdict not in (Verdict.TIMEOUT, Verdict.KILLED):
            for key in RESULT_PROPERTIES:
                value = result.get(key)
                if isinstance(value, int | float | str | bool):
                    self.prop(key, value)
            self.result = result
        if not judgement.passed:
            self.fail_with(judgement)
        return self.passed(dict(result or {}), outcome, judgement.stdout)

    def fail_with(self, judgement: Judgement) -> NoReturn:
        """The test fails with the judgement; a watchdog kill also stops the run (the one
        safety stop), unless forced."""
        message = judgement.message
        if judgement.verdict is Verdict.KILLED and not self.session.settings.force:
            self.session.safety.stop(self.item.session, message)
            message += "; the run stops here (--yourai-force keeps going)"
        self.fail(judgement.verdict, message, judgement.stdout, judgement.stderr)

    def passed(self, result: dict[str, Any], outcome: ProbeOutcome, stdout: str) -> dict[str, Any]:
        self.prop("verdict", Verdict.PASS)
        self.session.learn(self.preflight, result, outcome.elapsed_s)
        self.session.timing.learn(
            self.preflight.shape.backend,
            self.preflight.flops_per_step(),
            self.preflight.weights_gb(),
            outcome.elapsed_s,
            [float(s) for s in result.get("step_seconds") or []],
        )
        steps = result.get("step_seconds") or []
        if steps:
            self.prop("step_seconds_median", round(statistics.median(steps), 4))
        peak = result.get("peak_memory_gb")
        self.check_limits(float(peak) if isinstance(peak, int | float) else None, stdout)
        if result.get("peak_growth"):
            self.item.warn(
                pytest.PytestWarning(
                    f"{self.preset.name}: the peak still rose at the last step; more steps "
                    "may show more"
                )
            )
        return result

    def check_limits(self, peak: float | None, stdout: str) -> None:
        """The preset's memory budget (marker or preset field) and the stored baseline."""
        if peak is None:
            return
        budget = self.max_peak_gb()
        if budget is not None and peak > budget:
            self.fail(
                Verdict.OVER_BUDGET,
                f"{self.preset.name}: peak {peak:.4g} GB exceeds its budget of {budget:g} GB",
                stdout,
            )
        if self.session.settings.baseline_compare:
            self.compare_baseline(peak, stdout)

    def compare_baseline(self, peak: float, stdout: str) -> None:
        settings, shape = self.session.settings, self.preflight.shape
        key = baseline.run_key(
            self.preset.name, *(getattr(shape, name) for name in baseline.KEY_FIELDS)
        )
        old = self.session.baselines().get(key)
        if not isinstance(old, dict) or not isinstance(old.get("peak_memory_gb"), int | float):
            self.prop("baseline", "missing")
            if settings.baseline_require:
                self.fail(
                    Verdict.NO_BASELINE,
                    f"{self.preset.name}: no baseline for this config and in-flight mode on "
                    f"this machine ({key}) in {settings.baseline_dir}; "
                    "--yourai-baseline-save stores one",
                    stdout,
                )
            return
        self.prop("baseline_peak_gb", old["peak_memory_gb"])
        failure = baseline.growth_failure(
            self.preset.name, float(old["peak_memory_gb"]), peak, settings.fail_on_growth
        )
        if failure is not None:
            self.fail(Verdict.REGRESSED, failure, stdout)

    def max_peak_gb(self) -> float | None:
        marker = self.item.get_closest_marker("yourai")
        if marker is not None and marker.kwargs.get("max_peak_gb") is not None:
            return float(marker.kwargs["max_peak_gb"])
        value = self.preset.pins.get("max_peak_gb")
        return float(value) if isinstance(value, int | float) else None

    def fail(self, verdict: Verdict, message: str, stdout: str, stderr: str = "") -> NoReturn:
        self.prop("verdict", verdict)
        parts = [message, "--- probe stdout (last lines) ---", stdout.rstrip()[-1500:] or "(empty)"]
        if stderr.strip():
            parts += ["--- probe stderr (last lines) ---", stderr.rstrip()[-800:]]
        pytest.fail("\n".join(parts), pytrace=False)
