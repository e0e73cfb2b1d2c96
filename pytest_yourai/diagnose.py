"""After a crash: ``python -m pytest_yourai.log [benchmark_log.jsonl]`` (the crash diagnosis).

Automates the Rust CLI's "Check Log After Crash": summarises every run in the log (a
``benchmark_start`` begins a run) and, for a run with no ``benchmark_complete``, says what
was in flight when it died: the last event, the preset and phase, the probe's last lines
of output, and the memory situation at that moment. A torn last line (the machine died
mid-write) is reported, not fatal.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_yourai.eventlog import (
    BENCHMARK_COMPLETE,
    BENCHMARK_START,
    PREFLIGHT_CHECK,
    PROBE_PROGRESS,
    SAFETY_KILL,
    SUBPROCESS_COMPLETED,
    SUBPROCESS_FAILED,
    SUBPROCESS_SPAWNED,
    SUBPROCESS_TIMEOUT,
    TEST_VERDICT,
    WORKER_CRASHED,
)
from pytest_yourai.fields import DEFAULT_LOG
from pytest_yourai.protocol import START, phase_of

# Events after which a preset is no longer in flight.
OUTPUT_EVENTS = (
    SUBPROCESS_COMPLETED,
    SUBPROCESS_TIMEOUT,
    SUBPROCESS_FAILED,
    SAFETY_KILL,
    WORKER_CRASHED,
    TEST_VERDICT,
)


@dataclass
class Run:
    start: dict[str, Any] | None
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def complete(self) -> dict[str, Any] | None:
        return next((e for e in self.events if e.get("event") == BENCHMARK_COMPLETE), None)


def read(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Parsed events, and a note per line that did not parse (a torn write)."""
    records: list[dict[str, Any]] = []
    problems: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                problems.append(f"line {number} is not whole JSON (torn write?): {line[:80]!r}")
                continue
            if isinstance(record, dict) and "event" in record:
                records.append(record)
    return records, problems


def split_runs(records: list[dict[str, Any]]) -> list[Run]:
    runs: list[Run] = []
    for record in records:
        if record.get("event") == BENCHMARK_START:
            runs.append(Run(start=record))
        elif not runs:
            runs.append(Run(start=None))
        if record.get("event") != BENCHMARK_START:
            runs[-1].events.append(record)
    return runs


def _when(timestamp: Any) -> str:
    if not isinstance(timestamp, int | float):
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _in_flight(run: Run) -> dict[str, Any] | None:
    """The preset whose last event is not a terminal one."""
    state: dict[str, dict[str, Any]] = {}
    for event in run.events:
        preset = event.get("preset")
        if preset:
            state[str(preset)] = event
    open_presets = [e for e in state.values() if e.get("event") not in OUTPUT_EVENTS]
    return open_presets[-1] if open_presets else None


def _events(run: Run, preset: str, event: str | None = None) -> list[dict[str, Any]]:
    return [
        e
        for e in run.events
        if e.get("preset") == preset and (event is None or e.get("event") == event)
    ]


def _phase(run: Run, preset: str) -> str:
    last_output = ""
    for event in _events(run, preset):
        if event.get("stdout_preview"):
            last_output = str(event["stdout_preview"])
    for event in _events(run, preset, PROBE_PROGRESS):
        last_output = str(event.get("line", ""))
    phase = phase_of(last_output)
    if phase != START:
        return phase
    kinds = {e.get("event") for e in _events(run, preset)}
    if SUBPROCESS_SPAWNED in kinds:
        return "probe running (no output recorded yet)"
    if PREFLIGHT_CHECK in kinds:
        return "pre-flight"
    return START


def outcome_of(event: dict[str, Any], earlier: str) -> str | None:
    """What an event says of its preset's outcome (None: nothing new)."""
    kind = event.get("event")
    if kind == SUBPROCESS_COMPLETED:
        return f"pass, peak {event.get('peak_memory_gb')} GB"
    if kind == SUBPROCESS_TIMEOUT:
        return f"timeout after {event.get('timeout_s')} s"
    if kind == SUBPROCESS_FAILED:
        return f"failed ({event.get('status', 'error')})"
    if kind == SAFETY_KILL:
        return "killed by the memory watchdog"
    if kind == WORKER_CRASHED:
        return f"its worker crashed ({where(event)})"
    if kind == TEST_VERDICT and event.get("outcome") == "failed":
        probe = f"; probe: {earlier}" if earlier.startswith("pass") else ""
        return f"test failed ({event.get('verdict')}){probe}"
    if kind == PREFLIGHT_CHECK and event.get("decision", "run") != "run":
        return f"skipped: {event.get('reason', '')}"
    return None


def where(event: dict[str, Any]) -> str:
    """The host and xdist worker an event came from."""
    return f"{event.get('worker', '?')} on host {event.get('host', '?')}"


def crash_lines(run: Run) -> list[str]:
    """Each ``worker_crashed``: the host, the preset in flight, the last event received,
    and where that preset was when its worker died."""
    lines = []
    for crash in (e for e in run.events if e.get("event") == WORKER_CRASHED):
        preset = crash.get("preset")
        last = crash.get("last_event") or {}
        lines.append(
            f"  CRASHED: worker {where(crash)}"
            + (f", running {preset}" if preset else ", between tests")
            + (f"; last event from it: {last.get('event')} at {_when(last.get('timestamp'))}"
               if last else "; no event received from it")
        )  # fmt: skip
        if preset:
            lines += in_flight_lines(run, str(preset))
    return lines


def outcomes(run: Run) -> dict[str, str]:
    per_preset: dict[str, str] = {}
    for event in run.events:
        preset = event.get("preset")
        if preset:
            said = outcome_of(event, per_preset.get(preset, ""))
            per_preset[preset] = said or per_preset.get(preset, "started")
    return per_preset


def describe(run: Run, index: int) -> list[str]:
    start = run.start or {}
    lines = [
        f"run {index}: started {_when(start.get('timestamp'))}"
        f" | run_id {start.get('run_id', '?')} | backend {start.get('backend', '?')}"
        f" | available {start.get('available_gb', '?')} of {start.get('total_gb', '?')} GB"
        f" | force {'on' if start.get('force_mode') else 'off'}"
    ]
    lines += [f"  {preset}: {outcome}" for preset, outcome in outcomes(run).items()]
    lines += crash_lines(run)
    complete = run.complete
    if complete is not None:
        lines.append(
            f"  complete: {complete.get('passed')} passed, {complete.get('failed')} failed, "
            f"{complete.get('skipped')} skipped in {complete.get('duration_s', '?')} s"
        )
        return lines
    last = run.events[-1] if run.events else start
    lines.append("  INCOMPLETE: no benchmark_complete — the run died or was killed")
    lines.append(
        f"  last event: {last.get('event')} at {_when(last.get('timestamp'))}"
        + (f" (preset {last['preset']})" if last.get("preset") else "")
    )
    flying = _in_flight(run)
    if flying is not None:
        lines += in_flight_lines(run, str(flying["preset"]))
    return lines


def in_flight_lines(run: Run, preset: str) -> list[str]:
    """Where the preset in flight was when the run died: phase, pid, memory, output."""
    lines = [f"  in flight: {preset}, phase: {_phase(run, preset)}"]
    pid = next((e.get("pid") for e in reversed(_events(run, preset)) if e.get("pid")), None)
    if pid:
        lines.append(f"  probe pid (process group): {pid}")
    checks = _events(run, preset, PREFLIGHT_CHECK)
    if checks:
        check = checks[-1]
        lines.append(
            f"  memory then: {check.get('available_gb')} GB available, estimate "
            f"{check.get('estimated_base_gb')}-{check.get('estimated_conservative_gb')} GB "
            f"(batch {check.get('batch_size')}, rank {check.get('lora_rank')}, "
            f"layers {check.get('lora_layers')})"
        )
    previews = [str(e["stdout_preview"]) for e in _events(run, preset) if e.get("stdout_preview")]
    output = previews[-1] if previews else ""
    progress = _events(run, preset, PROBE_PROGRESS)
    if progress and not output:
        output = "\n".join(str(e.get("line", "")) for e in progress)
        lines.append(
            f"  at its last progress line: probe RSS {progress[-1].get('probe_rss_gb')} GB, "
            f"available {progress[-1].get('available_gb')} GB"
        )
    if output:
        lines.append("  last probe output:")
        lines += [f"    {line}" for line in output.strip().splitlines()[-5:]]
    else:
        lines.append("  last probe output: none recorded (it died before reporting)")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pytest_yourai.log",
        description="Summarise a pytest-yourai benchmark log; explain runs that did not finish.",
    )
    parser.add_argument("log", nargs="?", type=Path, default=Path(DEFAULT_LOG))
    parser.add_argument("--last", action="store_true", help="only the most recent run")
    args = parser.parse_args(argv)
    try:
        records, problems = read(args.log)
    except FileNotFoundError:
        parser.exit(4, f"{parser.prog}: error: no log at {args.log}\n")
    except OSError as exc:
        parser.exit(4, f"{parser.prog}: error: cannot read {args.log}: {exc.strerror}\n")
    runs = split_runs(records)
    if not runs:
        print(f"{args.log}: no events")
        return 0
    chosen = list(enumerate(runs, start=1))
    if args.last:
        chosen = chosen[-1:]
    for index, run in chosen:
        print("\n".join(describe(run, index)))
    for problem in problems:
        print(f"note: {problem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
