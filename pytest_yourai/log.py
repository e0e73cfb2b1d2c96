"""After a crash: ``python -m pytest_yourai.log [benchmark_log.jsonl]``.

Automates the seed's "Check Log After Crash": summarises every run in the log (a
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
    SAFETY_KILL,
    SUBPROCESS_COMPLETED,
    SUBPROCESS_FAILED,
    SUBPROCESS_TIMEOUT,
    TEST_VERDICT,
)

# Events after which a preset is no longer in flight.
OUTPUT_EVENTS = (
    SUBPROCESS_COMPLETED,
    SUBPROCESS_TIMEOUT,
    SUBPROCESS_FAILED,
    SAFETY_KILL,
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


def _phase(run: Run, preset: str) -> str:
    last_output = ""
    for event in run.events:
        if event.get("preset") == preset and event.get("stdout_preview"):
            last_output = str(event["stdout_preview"])
    for event in run.events:
        if event.get("preset") == preset and event.get("event") == "probe_progress":
            last_output = str(event.get("line", ""))
    if "step " in last_output:
        return "train"
    if "building block" in last_output:
        return "build"
    kinds = [e.get("event") for e in run.events if e.get("preset") == preset]
    if "subprocess_spawned" in kinds:
        return "probe running (no output recorded yet)"
    if "preflight_check" in kinds:
        return "pre-flight"
    return "start"


def describe(run: Run, index: int) -> list[str]:
    start = run.start or {}
    complete = run.complete
    lines = [
        f"run {index}: started {_when(start.get('timestamp'))}"
        f" | run_id {start.get('run_id', '?')} | backend {start.get('backend', '?')}"
        f" | available {start.get('available_gb', '?')} of {start.get('total_gb', '?')} GB"
        f" | force {'on' if start.get('force_mode') else 'off'}"
    ]
    per_preset: dict[str, str] = {}
    for event in run.events:
        preset, kind = event.get("preset"), event.get("event")
        if not preset:
            continue
        if kind == "subprocess_completed":
            per_preset[preset] = f"pass, peak {event.get('peak_memory_gb')} GB"
        elif kind == "subprocess_timeout":
            per_preset[preset] = f"timeout after {event.get('timeout_s')} s"
        elif kind == "subprocess_failed":
            per_preset[preset] = f"failed ({event.get('status', 'error')})"
        elif kind == "safety_kill":
            per_preset[preset] = "killed by the memory watchdog"
        elif kind == "test_verdict" and event.get("outcome") == "failed":
            earlier = per_preset.get(preset, "")
            per_preset[preset] = f"test failed ({event.get('verdict')})" + (
                f"; probe: {earlier}" if earlier.startswith("pass") else ""
            )
        elif kind == "preflight_check" and event.get("decision", "run") != "run":
            per_preset[preset] = f"skipped: {event.get('reason', '')}"
        else:
            per_preset.setdefault(preset, "started")
    for preset, outcome in per_preset.items():
        lines.append(f"  {preset}: {outcome}")
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
        preset = str(flying["preset"])
        lines.append(f"  in flight: {preset}, phase: {_phase(run, preset)}")
        pid = next(
            (
                e.get("pid")
                for e in reversed(run.events)
                if e.get("preset") == preset and e.get("pid")
            ),
            None,
        )
        if pid:
            lines.append(f"  probe pid (process group): {pid}")
        check = next(
            (
                e
                for e in reversed(run.events)
                if e.get("preset") == preset and e.get("event") == "preflight_check"
            ),
            None,
        )
        if check is not None:
            lines.append(
                f"  memory then: {check.get('available_gb')} GB available, estimate "
                f"{check.get('estimated_base_gb')}-{check.get('estimated_conservative_gb')} GB "
                f"(batch {check.get('batch_size')}, rank {check.get('lora_rank')}, "
                f"layers {check.get('lora_layers')})"
            )
        output = next(
            (
                str(e["stdout_preview"])
                for e in reversed(run.events)
                if e.get("preset") == preset and e.get("stdout_preview")
            ),
            "",
        )
        progress = [
            e
            for e in run.events
            if e.get("preset") == preset and e.get("event") == "probe_progress"
        ]
        if progress and not output:
            output = "\n".join(str(e.get("line", "")) for e in progress)
            last = progress[-1]
            lines.append(
                f"  at its last progress line: probe RSS {last.get('probe_rss_gb')} GB, "
                f"available {last.get('available_gb')} GB"
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
    parser.add_argument("log", nargs="?", type=Path, default=Path("benchmark_log.jsonl"))
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
