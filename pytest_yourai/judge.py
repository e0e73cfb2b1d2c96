"""The verdict on one probe, from how it ended: a pure function, table-tested.

Inputs: the supervisor's ``ProbeOutcome`` (exit status, result line, output tails, whether
it timed out or the watchdog stopped it) and the facts around it (the deadline and what set
it, the watchdog's reading). Output: a ``Judgement``: the verdict, the message a failed test
shows, and the one event the log gets, with its fields. ``benchmark.py`` carries it out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pytest_yourai.eventlog import (
    SAFETY_KILL,
    SUBPROCESS_COMPLETED,
    SUBPROCESS_FAILED,
    SUBPROCESS_TIMEOUT,
)
from pytest_yourai.protocol import phase_of
from pytest_yourai.results import Verdict
from pytest_yourai.supervisor import ProbeOutcome

PREVIEW_CHARS = 2000
STDERR_CHARS = 2000
# What the probe measured of the process's footprint on its device (see footprint.py).
FOOTPRINT_FIELDS = (
    "build_footprint_gb",
    "train_footprint_gb",
    "footprint_peak_gb",
    "footprint_source",
)
SIGKILL = 9


@dataclass(frozen=True)
class Facts:
    """What the benchmark knew around the probe."""

    preset: str
    pid: int
    timeout_s: float
    limited_by: str  # "yourai", or pytest-timeout's limit
    in_flight: str
    probe_peak_rss_gb: float = 0.0
    # The watchdog's reading when it stopped the probe.
    threshold_gb: float = 0.0
    tripped_available_gb: float | None = None
    rss_at_trip_gb: float = 0.0


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    message: str  # what a failed test shows ("" on a pass)
    event: str  # the log event, and its fields
    fields: dict[str, Any] = field(default_factory=dict)
    stdout: str = ""  # the output tails a failure shows
    stderr: str = ""

    @property
    def passed(self) -> bool:
        return self.verdict is Verdict.PASS


def judge(outcome: ProbeOutcome, facts: Facts) -> Judgement:
    """Safety kill, timeout, pass, out of memory, or error: the first that applies."""
    if outcome.stopped:
        return _safety_kill(outcome, facts)
    if outcome.timed_out:
        return _timeout(outcome, facts)
    if (outcome.result or {}).get("status") == "ok":
        return _passed(outcome, facts)
    if _out_of_memory(outcome):
        return _oom(outcome, facts)
    return _error(outcome, facts)


def _tails(outcome: ProbeOutcome) -> tuple[str, str]:
    return outcome.stdout_tail[-PREVIEW_CHARS:], outcome.stderr_tail[-STDERR_CHARS:]


def _safety_kill(outcome: ProbeOutcome, facts: Facts) -> Judgement:
    stdout, _ = _tails(outcome)
    phase = phase_of(outcome.stdout_tail)
    available = facts.tripped_available_gb or 0.0
    message = (
        f"Safety kill in phase {phase}: available memory fell to {available:.2f} GB, below "
        f"the {facts.threshold_gb:.3g} GB threshold, while the probe used "
        f"{facts.rss_at_trip_gb:.2f} GB"
    )
    fields = {
        "available_gb": round(available, 3),
        "threshold_gb": round(facts.threshold_gb, 3),
        "probe_rss_gb": round(facts.rss_at_trip_gb, 3),
        "phase": phase,
        "stdout_preview": stdout,
    }
    return Judgement(Verdict.KILLED, message, SAFETY_KILL, fields, stdout)


def _timeout(outcome: ProbeOutcome, facts: Facts) -> Judgement:
    stdout, _ = _tails(outcome)
    phase = phase_of(outcome.stdout_tail)
    note = "" if facts.limited_by == "yourai" else f" (to stay inside {facts.limited_by})"
    fields = {
        "pid": facts.pid,
        "timeout_s": round(facts.timeout_s, 3),
        "phase": phase,
        "stdout_preview": stdout,
        "source": facts.limited_by,
    }
    message = f"Timeout after {facts.timeout_s:.3g} s in phase {phase}{note}"
    return Judgement(Verdict.TIMEOUT, message, SUBPROCESS_TIMEOUT, fields, stdout)


def _passed(outcome: ProbeOutcome, facts: Facts) -> Judgement:
    result = outcome.result or {}
    stdout, _ = _tails(outcome)
    fields = {
        "exit_code": outcome.exit_code,
        "peak_memory_gb": result.get("peak_memory_gb"),
        "train_peak_memory_gb": result.get("train_peak_memory_gb"),
        **{key: result.get(key) for key in FOOTPRINT_FIELDS},
        "in_flight": facts.in_flight,
        "elapsed_s": round(outcome.elapsed_s, 3),
        "probe_peak_rss_gb": round(facts.probe_peak_rss_gb, 4),
        "stdout_preview": stdout,
    }
    return Judgement(Verdict.PASS, "", SUBPROCESS_COMPLETED, fields, stdout)


def _out_of_memory(outcome: ProbeOutcome) -> bool:
    """The probe said so, or died of SIGKILL without a word (the OS's OOM killer?)."""
    if outcome.result is not None:
        return outcome.result.get("status") == "oom"
    return outcome.killed_by_signal == SIGKILL


def _oom(outcome: ProbeOutcome, facts: Facts) -> Judgement:
    result = outcome.result or {}
    stdout, stderr = _tails(outcome)
    phase = result.get("phase") or phase_of(outcome.stdout_tail)
    detail = result.get("error") or "killed by SIGKILL (the OS out-of-memory killer?)"
    fields = {
        "exit_code": outcome.exit_code,
        "status": "oom",
        "phase": phase,
        "stderr": stderr,
        "stdout_preview": stdout,
    }
    return Judgement(Verdict.OOM, f"OOM at {phase}: {detail}", SUBPROCESS_FAILED, fields, stdout)


def _error(outcome: ProbeOutcome, facts: Facts) -> Judgement:
    result = outcome.result
    stdout, stderr = _tails(outcome)
    if result is not None:
        phase = result.get("phase", "?")
        problem = f"probe error in phase {phase}: {result.get('error', 'no error message')}"
    elif outcome.killed_by_signal is not None:
        problem = f"probe killed by signal {outcome.killed_by_signal}; {outcome.result_problem}"
    else:
        problem = f"probe exited with code {outcome.exit_code}; {outcome.result_problem}"
    fields = {
        "exit_code": outcome.exit_code,
        "status": (result or {}).get("status") or "error",
        "stderr": stderr,
        "stdout_preview": stdout,
        "reason": problem,
    }
    return Judgement(Verdict.ERROR, problem, SUBPROCESS_FAILED, fields, stdout, stderr)
