"""Replay the committed H100 and H200 results as probes, with the estimate learning as it goes.

    python benchmarks/replay_learning.py [--write benchmarks/results/replay-learning.json]

Every line of the committed GPU results files that measured a run (a probe record, or a
survival go run that passed) is taken, machine by machine, in the order it ran, as a probe on
its machine (pytest_yourai/learning.py; key: the device and MLX 0.32.4). Before a line joins
its machine's record, its estimate is made from the record so far, learning on
(learning.correct, learning.predict_time) and off (today's estimator, and today's time model,
throughput.fit, over the same earlier probes). A line is scored once its machine has seen K
(2) probes in its in-flight mode. Printed, and with --write stored, per machine and mode
(MLX's defaults: runs alone; side by side apart, as a busy device queues more; they do not
teach the window): the error of the typical figure (median, largest) and the conservative
figure over what was measured (least, most, how many under), for all scored lines, new runs
and repeats; the footprint where the probe measured it (the H200), MLX's peak everywhere
(the only measure on the H100); the measured probe time over the predicted (runs alone),
how many within 1.5x, how many over-predicted beyond it. Then every survival attempt
(h200-survival*.jsonl, go runs and 0.85 levels) against the learned go rule, learned
conservative + 2 GB within the memory it had free: how many it lets go that did not survive,
and of the go runs how many had the learned conservative figure under their footprint.

Order: the H200 lines by their own time stamps (a probe's phase_started_at, a survival run's
log name). The H100 records carry none: they are taken in the order of the commits that
added their files, and within a commit as the manifest describes them (seed presets,
accuracy, validation; sweep; lab, lab repeat, window shut; held-out bounded, its sequential
repeat, the gradient-checkpointing lab, the final hold-out), each file line by line (a file
made by several probes at once: the order they finished).
Sessions (the caller's id of a boot: MLX compiles its kernels afresh on a fresh machine): on
the H200 a new one after a gap of more than SESSION_GAP_S between one line's end and the next
line's start (the lent machine is given back when idle); on the H100, whose records carry no
time, one per commit.

Not replayed: ``h100-bfs-width1.jsonl`` (MLX_BFS_MAX_WIDTH=1, a scheduler setting the plugin
never uses), the plugin's event log, and the mlx_lm.lora references.

``censuses`` in the output keeps the models' censuses (census.py, mlx-lm's own shapes), so
that a replay (the test's) need not build them again.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from results_io import RESULTS, architecture, as_built, as_probe_record, read_jsonl

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the package of this checkout, installed or not

from pytest_yourai import learning  # noqa: E402
from pytest_yourai.census import Census, census_for  # noqa: E402
from pytest_yourai.estimator import (  # noqa: E402
    Estimate,
    TrainingShape,
    estimate_training_memory,
    training_flops,
)
from pytest_yourai.machine_record import learned_estimate  # noqa: E402
from pytest_yourai.preflight import needs_census  # noqa: E402
from pytest_yourai.throughput import TimingObservation, fit, observe  # noqa: E402

OUT = RESULTS / "replay-learning.json"
K = 2
SAFETY_GB = 2.0
SESSION_GAP_S = 180.0
STEPS = 4  # the plugin's probe steps (fields.DEFAULT_STEPS): survival rows keep no count
TARGETS = {
    "footprint_median_pct": 5.0,
    "footprint_max_pct": 12.0,
    "conservative_most": 1.25,
    "time_factor": 1.5,
}
# (commit that added them, files in the order they ran)
H100_ORDER = (
    ("38754c8", ("h100-seed-presets", "h100-accuracy-grid", "h100-validation-grid")),
    ("7a024a9", ("h100-sweep-grid",)),
    ("56087d2", ("h100-lab-grid", "h100-lab-repeat", "h100-window-shut-grid")),
    (
        "9d3cefd",
        (
            "h100-holdout-bounded",
            "h100-holdout-bounded-sequential",
            "h100-gc-lab",
            "h100-final-holdout",
        ),
    ),
)
H200_FILES = (
    "h200-footprint-bounded-repeat",
    "h200-footprint-bounded",
    "h200-footprint-alone",
    "h200-survival-earlier-calibration",
    "h200-survival",
    "h200-survival-holdout",
    "h200-survival-holdout2",
    "h200-survival-holdout3",
    "h200-window-repeat",
)
# Made with MLX's window shut through the environment: their records carry no mode.
SHUT_BY_ENVIRONMENT = {"h100-window-shut-grid"}


class CensusCache(dict[str, Any]):
    """pytest's cache interface (census.census_for) over a dict."""

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(key, default)

    def set(self, key: str, value: Any) -> None:
        self[key] = value


@dataclass
class Line:
    """One result line as a probe on its machine."""

    machine: str
    file: str
    index: int
    when: float
    record: dict[str, Any]  # as_probe_record's form, or the survival attempt itself
    raw: dict[str, Any]
    session: str = ""
    alone: bool = True
    arch: dict[str, Any] = field(default_factory=dict)
    shape: TrainingShape = field(default_factory=TrainingShape)
    census: Census | None = None

    @property
    def name(self) -> str:
        return str(self.raw.get("name", "?"))

    @property
    def result(self) -> dict[str, Any]:
        return dict(self.record.get("result") or {})

    def is_attempt(self) -> bool:
        return "level" in self.raw


def time_stamp(raw: dict[str, Any]) -> float | None:
    result = raw.get("result") or {}
    if "phase_started_at" in result:
        return float(result["phase_started_at"]["build"])
    found = re.findall(r"-(\d{13})\.(?:log\.jsonl|json)", raw.get("output_tail", ""))
    return int(found[0]) / 1000 if found else None


def concurrent(name: str) -> bool:
    """Whether the file's probes ran side by side (its command's --jobs above 1)."""
    manifest = json.loads((RESULTS / "manifest.json").read_text(encoding="utf-8"))
    command = next(e["command"] for e in manifest["files"] if e["file"] == f"{name}.jsonl")
    jobs = re.search(r"--jobs (\d+)", command)
    return bool(jobs and int(jobs.group(1)) > 1)


def h100_lines() -> Iterator[Line]:
    for commit, names in H100_ORDER:
        for name in names:
            alone = not concurrent(name)
            for index, raw in enumerate(read_jsonl(RESULTS / f"{name}.jsonl")):
                record = as_probe_record(raw)
                if record is None or record["result"].get("status") != "ok":
                    continue
                if name in SHUT_BY_ENVIRONMENT:
                    record["result"]["config"].setdefault("in_flight", "bounded")
                yield Line("H100", name, index, 0.0, record, raw, f"H100 {commit}", alone)


def h200_lines() -> list[Line]:
    """Probe lines and survival attempts, by time."""
    lines = []
    for name in H200_FILES:
        alone = not concurrent(name)
        for index, raw in enumerate(read_jsonl(RESULTS / f"{name}.jsonl")):
            when = time_stamp(raw)
            if when is None:
                raise SystemExit(f"{name} line {index + 1}: no time stamp")
            record = as_probe_record(raw) or raw
            if "level" not in raw and record["result"].get("status") != "ok":
                continue
            lines.append(Line("H200", name, index, when, record, raw, "", alone))
    lines.sort(key=lambda line: line.when)
    session, end = 0, None
    for line in lines:
        if end is not None and line.when - end > SESSION_GAP_S:
            session += 1
        line.session = f"H200 {session}"
        took = float(line.raw.get("elapsed_s") or line.raw.get("wall_s") or 0.0)
        end = max(end or 0.0, line.when + took)
    return lines


def shape_of(line: Line) -> TrainingShape:
    config = line.result["config"] if "result" in line.record else line.raw["grid"]
    return TrainingShape(
        bits=int(config["bits"]),
        group_size=int(config.get("group_size", 64)),
        dtype=str(config.get("dtype") or (line.raw.get("row") or {}).get("dtype", "bfloat16")),
        batch_size=int(config["batch_size"]),
        seq_len=int(config["seq_len"]),
        lora_rank=int(config["lora_rank"]),
        lora_layers=int(config["lora_layers"]),
        grad_checkpoint=bool(config.get("grad_checkpoint", False)),
        backend="cuda",
        in_flight=str(config.get("in_flight", "mlx")),
    )


def prepare(line: Line, cache: CensusCache) -> Line:
    grid = line.record["grid"] if "result" in line.record else as_built(line.raw, line.raw["grid"])
    line.arch = architecture(grid)
    line.shape = shape_of(line)
    if needs_census(line.arch):
        s = line.shape
        line.census = census_for(line.arch, s.bits, s.group_size, s.dtype, cache)
    return line


def machine_key(line: Line) -> str:
    """The record's key: backend, device and MLX version (all lines of a machine share them:
    the manifest's machines)."""
    return f"cuda|{line.machine}|mlx 0.32.4"


def measured(line: Line) -> tuple[float | None, float, str]:
    """(footprint, MLX peak, the phase where the footprint peaked)."""
    result = line.result
    footprint = result.get("footprint_peak_gb") or (line.raw.get("row") or {}).get(
        "footprint_peak_gb"
    )
    build = float(result.get("build_footprint_gb") or 0.0)
    train = float(result.get("train_footprint_gb") or 0.0)
    phase = "build" if build > train else "train"
    return (
        None if footprint is None else float(footprint),
        float(result["train_peak_memory_gb"]),
        phase,
    )


def timing(line: Line) -> tuple[float, list[float]]:
    """(the probe's seconds, its step times); a survival row keeps only the median step."""
    steps = line.result.get("step_seconds")
    if steps:
        return float(line.raw["elapsed_s"]), [float(s) for s in steps]
    row = line.raw.get("row") or {}
    return float(row["elapsed_s"]), [float(row["step_seconds_median"])] * STEPS


def probe(line: Line) -> learning.Probe:
    footprint, peak, phase = measured(line)
    elapsed, steps = timing(line)
    steady = statistics.median(steps[1:] or steps)
    return learning.probe_of(
        line.arch,
        line.shape,
        footprint,
        peak,
        line.census,
        phase=phase,
        session=line.session,
        alone=line.alone,
        elapsed_s=elapsed,
        step_s=steady,
        steps=len(steps),
    )


@dataclass
class Scored:
    """One scored line: today's and the learned figures, and what was measured."""

    line: Line
    today: Estimate
    learned: learning.Learned
    footprint: float | None
    peak: float
    took_s: float
    today_s: float | None
    learned_s: learning.TimePrediction | None
    repeat: bool = False  # its run was probed before on this machine, in this mode
    # what the pre-flight uses (machine_record.learned_estimate: the learned figures for a
    # run probed here before, today's for any other)
    used: Estimate | None = None

    def estimate(self, which: str) -> Estimate:
        if which == "today":
            return self.today
        if which == "preflight" and self.used is not None:
            return self.used
        return self.learned.estimate

    def row(self) -> dict[str, Any]:
        s, t, est = self.line.shape, self.today, self.learned.estimate
        return {
            "machine": self.line.machine,
            "file": self.line.file,
            "line": self.line.index + 1,
            "name": self.line.name,
            "shape": f"{s.batch_size}x{s.seq_len} r{s.lora_rank} L{s.lora_layers} "
            f"q{s.bits}{' gc' if s.grad_checkpoint else ''}",
            "in_flight": s.in_flight,
            "alone": self.line.alone,
            "repeat": self.repeat,
            "session": self.line.session,
            "footprint_gb": self.footprint,
            "mlx_peak_gb": self.peak,
            "today_gb": [round(t.estimated_base_gb, 3), round(t.estimated_conservative_gb, 3)],
            "learned_gb": [
                round(est.estimated_base_gb, 3),
                round(est.estimated_conservative_gb, 3),
            ],
            "today_peak_gb": [round(t.mlx_peak_gb, 3), round(t.mlx_peak_conservative_gb, 3)],
            "learned_peak_gb": [round(est.mlx_peak_gb, 3), round(est.mlx_peak_conservative_gb, 3)],
            "learning": self.learned.to_json(),
            "preflight_uses_learned": self.used is not self.today,
            "took_s": self.took_s,
            "today_s": None if self.today_s is None else round(self.today_s, 1),
            "learned_s": None if self.learned_s is None else round(self.learned_s.seconds, 1),
            "cold_start_predicted": bool(self.learned_s and self.learned_s.includes_cold_start),
        }


Seen = list[tuple[Line, learning.Probe]]


def replay(cache: CensusCache, k: int = K) -> tuple[list[Scored], list[dict[str, Any]], Seen]:
    """Every line, machine by machine in order; the scored ones, the survival check and
    every probe."""
    scored: list[Scored] = []
    attempts: list[dict[str, Any]] = []
    seen_all: Seen = []
    for lines in (list(h100_lines()), h200_lines()):
        record = learning.MachineRecord(machine_key(lines[0]))
        timings: list[TimingObservation] = []
        seen: dict[str, int] = {}
        runs: set[tuple[str, str, bool]] = set()
        for line in lines:
            prepare(line, cache)
            key = machine_key(line)
            today = estimate_training_memory(line.arch, line.shape, line.census)
            learned = learning.correct(record, key, today, line.shape, line.arch, line.census)
            used = learned_estimate(record, key, today, line.shape, line.arch, line.census).estimate
            if line.is_attempt():
                attempts.append(attempt(line, today, learned, used))
                if "result" not in line.record:
                    continue  # not a probe: a 0.85 level, or a go run that failed
            mode = line.shape.in_flight
            new = probe(line)
            run = (new.run.run, mode, line.alone or mode != "mlx")
            if seen.get(mode, 0) >= k:
                scored.append(score(line, today, learned, record, timings))
                scored[-1].repeat = run in runs
                scored[-1].used = used
            seen[mode] = seen.get(mode, 0) + 1
            runs.add(run)
            record = record.add(new)
            seen_all.append((line, new))
            elapsed, steps = timing(line)
            observed = observe(new.flops_per_step, new.weights_gb, elapsed, steps)
            if observed is not None:
                timings.append(observed)
    return scored, attempts, seen_all


def indistinct(seen: Seen) -> list[dict[str, Any]]:
    """The floor under issue 29's targets with MLX's defaults: runs of one machine that ran
    alone and that the window's inputs do not tell apart (the same model, window kind,
    tokens x hidden x MLP width and adapted blocks; they may differ in LoRA rank, bit width
    within the kind, or be repeats). The estimate of each is its one-op-in-flight figure
    (today's) plus a window that the inputs make the same for all of them; whether any one
    window puts every run within FLOOR_ERROR_PCT of what it measured (``typical_possible``),
    and whether any one puts the conservative figure at or above each and within
    TARGETS["conservative_most"] of it (``conservative_possible``)."""
    groups: dict[tuple[str, str, str, int, int], list[tuple[Line, learning.Probe]]] = {}
    for line, probe in seen:
        f = probe.run
        if f.in_flight != "mlx" or not line.alone:
            continue
        key = (line.machine, f.model, f.window_class, round(f.work), f.adapted)
        groups.setdefault(key, []).append((line, probe))
    out = []
    for (machine, *_), members in groups.items():
        peak = machine == "H100"  # the footprint was measured on the H200 only
        rows = []
        for line, probe in members:
            measured = learning.measured_of(probe, peak)
            if measured is not None:
                bounded = learning.Figures.of(probe.run, peak).bounded
                rows.append((line, measured, bounded))
        if len(rows) < 2:
            continue
        share, most = TARGETS["footprint_max_pct"] / 100, TARGETS["conservative_most"]
        low = max(m * (1 - share) - b for _, m, b in rows)
        high = min(m * (1 + share) - b for _, m, b in rows)
        c_low = max(m - b for _, m, b in rows)
        c_high = min(m * most - b for _, m, b in rows)
        out.append(
            {
                "machine": machine,
                "measure": "mlx_peak" if peak else "footprint",
                "runs": [
                    f"{line.file}:{line.index + 1} {line.name} {line.shape.batch_size}x"
                    f"{line.shape.seq_len} r{line.shape.lora_rank} q{line.shape.bits}"
                    for line, _, _ in rows
                ],
                "measured_gb": [round(m, 2) for _, m, _ in rows],
                "window_gb": [round(m - b, 2) for _, m, b in rows],
                "most_over_least": round(
                    max(m for _, m, _ in rows) / min(m for _, m, _ in rows), 3
                ),
                "typical_possible": low <= high,
                "conservative_possible": c_low <= c_high,
            }
        )
    return out


def score(
    line: Line,
    today: Estimate,
    learned: learning.Learned,
    record: learning.MachineRecord,
    timings: list[TimingObservation],
) -> Scored:
    footprint, peak, _ = measured(line)
    took, steps = timing(line)
    flops = training_flops(line.arch, line.shape, line.census)
    weights = learning.probe_of(line.arch, line.shape, None, 0.0, line.census).weights_gb
    model = fit(timings)
    return Scored(
        line=line,
        today=today,
        learned=learned,
        footprint=footprint,
        peak=peak,
        took_s=took,
        today_s=model.predict(flops, weights, len(steps)) if model else None,
        learned_s=learning.predict_time(
            record,
            machine_key(line),
            "cuda",
            flops,
            weights,
            len(steps),
            line.session,
            learning.kernel_keys(line.arch, line.shape),
            learning.run_id(line.arch, line.shape),
        ),
    )


def attempt(
    line: Line, today: Estimate, learned: learning.Learned, used: Estimate
) -> dict[str, Any]:
    """A survival attempt against the learned go rule: would it have gone, and did it fit."""
    free = float(line.raw["free_before_gb"])
    conservative = learned.estimate.estimated_conservative_gb
    footprint = (line.raw.get("row") or {}).get("footprint_peak_gb")
    return {
        "file": line.file,
        "line": line.index + 1,
        "name": line.name,
        "in_flight": line.shape.in_flight,
        "level": line.raw["level"],
        "free_before_gb": free,
        "survived": bool(line.raw.get("survived")),
        "footprint_gb": footprint,
        "today_conservative_gb": round(today.estimated_conservative_gb, 3),
        "learned_conservative_gb": round(conservative, 3),
        "learned_from": learned.learned_from,
        "learned_go": conservative + SAFETY_GB <= free,
        "today_go": today.estimated_conservative_gb + SAFETY_GB <= free,
        "preflight_conservative_gb": round(used.estimated_conservative_gb, 3),
        "preflight_go": used.estimated_conservative_gb + SAFETY_GB <= free,
    }


def errors(pairs: list[tuple[float, float]]) -> dict[str, Any]:
    """Estimate against measured: |error| median and max (%)."""
    size = [abs(e - m) / m * 100 for e, m in pairs]
    return {
        "median_abs_error_pct": round(statistics.median(size), 1),
        "max_abs_error_pct": round(max(size), 1),
    }


def ratios(pairs: list[tuple[float, float]]) -> dict[str, Any]:
    """Conservative over measured: least, most, how many under."""
    values = [c / m for c, m in pairs]
    return {
        "conservative_least": round(min(values), 3),
        "conservative_most": round(max(values), 3),
        "conservative_under": sum(v < 1 for v in values),
    }


def time_figures(pairs: list[tuple[float, float | None]]) -> dict[str, Any]:
    """Measured over predicted seconds: least, most, how many within the target's factor."""
    values = [took / p for took, p in pairs if p]
    if not values:
        return {}
    factor = TARGETS["time_factor"]
    return {
        "time_lines": len(values),
        "time_ratio_least": round(min(values), 2),
        "time_ratio_most": round(max(values), 2),
        "time_within": sum(1 / factor <= v <= factor for v in values),
        "time_over_predicted": sum(v < 1 / factor for v in values),
    }


def measure(rows: list[Scored], which: str, footprint: bool) -> dict[str, Any]:
    """One measure's figures over rows (the footprint or MLX's peak): all, new runs, repeats;
    ``which`` estimate: "learning", "today" or "preflight" (Scored.estimate)."""

    def pairs(chosen: list[Scored]) -> list[tuple[float, float, float]]:
        out = []
        for s in chosen:
            est = s.estimate(which)
            if footprint and s.footprint:
                out.append((est.estimated_base_gb, est.estimated_conservative_gb, s.footprint))
            elif not footprint:
                out.append((est.mlx_peak_gb, est.mlx_peak_conservative_gb, s.peak))
        return out

    parts: dict[str, Any] = {}
    for name, chosen in (
        ("all", rows),
        ("new_runs", [s for s in rows if not s.repeat]),
        ("repeats", [s for s in rows if s.repeat]),
    ):
        found = pairs(chosen)
        if found:
            parts[name] = {
                "lines": len(found),
                **errors([(t, m) for t, _, m in found]),
                **ratios([(c, m) for _, c, m in found]),
            }
    return parts


def summary(rows: list[Scored], which: str) -> dict[str, Any]:
    out: dict[str, Any] = {"lines": len(rows)}
    learned = which != "today"  # the pre-flight's time is the learned one
    if any(s.footprint for s in rows):
        out["footprint"] = measure(rows, which, True)
    out["mlx_peak"] = measure(rows, which, False)
    for part, chosen in (("time", rows), ("time_alone", [s for s in rows if s.line.alone])):
        pairs = [
            (s.took_s, (s.learned_s.seconds if s.learned_s else None) if learned else s.today_s)
            for s in chosen
        ]
        out[part] = time_figures(pairs)
    return out


def mode_of(scored: Scored) -> str:
    """The in-flight mode, and for MLX's defaults whether the probe ran alone."""
    mode = scored.line.shape.in_flight
    return f"{mode} side by side" if mode == "mlx" and not scored.line.alone else mode


def report(scored: list[Scored], attempts: list[dict[str, Any]]) -> dict[str, Any]:
    machines: dict[str, Any] = {}
    for machine in ("H100", "H200"):
        for mode in ("mlx", "bounded", "mlx side by side"):
            rows = [s for s in scored if s.line.machine == machine and mode_of(s) == mode]
            if rows:
                machines.setdefault(machine, {})[mode] = {
                    "learning": summary(rows, "learning"),
                    "today": summary(rows, "today"),
                    "preflight": summary(rows, "preflight"),
                }
    go_runs = [a for a in attempts if a["level"] == "go" and a["survived"] and a["footprint_gb"]]
    survival = {
        "attempts": len(attempts),
        "learned_go_that_did_not_survive": sum(
            a["learned_go"] and not a["survived"] for a in attempts
        ),
        "learned_go": sum(a["learned_go"] for a in attempts),
        "today_go": sum(a["today_go"] for a in attempts),
        "today_go_that_did_not_survive": sum(a["today_go"] and not a["survived"] for a in attempts),
        "survived_but_learned_would_not_go": sum(
            a["survived"] and not a["learned_go"] for a in attempts
        ),
        "preflight_go": sum(a["preflight_go"] for a in attempts),
        "preflight_go_that_did_not_survive": sum(
            a["preflight_go"] and not a["survived"] for a in attempts
        ),
        "survived_but_preflight_would_not_go": sum(
            a["survived"] and not a["preflight_go"] for a in attempts
        ),
        "survived_but_today_would_not_go": sum(
            a["survived"] and not a["today_go"] for a in attempts
        ),
        "go_runs_with_learned_conservative_under_footprint": sum(
            a["learned_conservative_gb"] < a["footprint_gb"] for a in go_runs if a["learned_from"]
        ),
        "rows": attempts,
    }
    return {"machines": machines, "targets_met": targets(machines), "survival": survival}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="store the figures (JSON) there")
    parser.add_argument("--k", type=int, default=K)
    args = parser.parse_args()
    cache = CensusCache(json.loads(OUT.read_text()).get("censuses", {}) if OUT.exists() else {})
    scored, attempts, seen = replay(cache, args.k)
    figures = {**report(scored, attempts), "indistinct": indistinct(seen)}
    print_table(figures)
    if args.write:
        head = json.dumps({"k": args.k, "targets": TARGETS, **figures}, indent=1)
        rows = ",\n".join("  " + json.dumps(s.row()) for s in scored)
        censuses = json.dumps(dict(sorted(cache.items())), sort_keys=True)
        text = f'{head[:-2]},\n "lines": [\n{rows}\n ],\n "censuses": {censuses}\n}}\n'
        args.write.write_text(text, encoding="utf-8")
        print(f"written: {args.write}")
    return 0


def decision_measure(figures: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The footprint where it was measured (the decision's figure), else MLX's peak."""
    if "footprint" in figures:
        return "footprint", figures["footprint"]
    return "mlx_peak", figures["mlx_peak"]


def targets(machines: dict[str, Any]) -> dict[str, Any]:
    """Issue 29's targets, with MLX's defaults (runs alone), learning on: met or not."""
    met: dict[str, Any] = {}
    for machine, modes in machines.items():
        if "mlx" not in modes:
            continue
        learned = modes["mlx"]["learning"]
        name, parts = decision_measure(learned)
        fig, tm = parts["all"], learned["time_alone"]
        met[machine] = {
            "measure": name,
            "median": fig["median_abs_error_pct"] <= TARGETS["footprint_median_pct"],
            "max": fig["max_abs_error_pct"] <= TARGETS["footprint_max_pct"],
            "never_under": fig["conservative_under"] == 0,
            "conservative_most": fig["conservative_most"] <= TARGETS["conservative_most"],
            "time": bool(tm) and tm["time_within"] == tm["time_lines"],
        }
    return met


def figure_cells(fig: dict[str, Any]) -> str:
    """Median and largest error, conservative over measured, how many under."""
    return (
        f"{fig['median_abs_error_pct']:>5.1f}% {fig['max_abs_error_pct']:>5.1f}% "
        f"{fig['conservative_least']:>6.2f}-{fig['conservative_most']:<6.2f} "
        f"{fig['conservative_under']:>5}"
    )


def print_table(figures: dict[str, Any]) -> None:
    print(
        f"{'machine':<7} {'mode':<16} {'measure':<9} {'runs':<8} {'lines':>5} | "
        f"{'learning: median':>16} {'max':>6} {'cons/measured':>13} {'under':>5} | "
        f"{'today: median':>13} {'max':>6} {'cons/measured':>13} {'under':>5} | "
        f"{'time, measured/predicted, within 1.5x: learning':>44} {'today':>24}"
    )
    for machine, modes in figures["machines"].items():
        for mode, both in modes.items():
            name, learned = decision_measure(both["learning"])
            today = decision_measure(both["today"])[1]
            for part in ("all", "new_runs", "repeats"):
                if part not in learned:
                    continue
                cells = [figure_cells(fig) for fig in (learned[part], today[part])]
                times = ""
                if part == "all":
                    for which in ("learning", "today"):
                        tm = both[which]["time_alone"] or both[which]["time"]
                        times += (
                            f" {tm['time_ratio_least']:>5.2f}-{tm['time_ratio_most']:<5.2f} "
                            f"{tm['time_within']:>3}/{tm['time_lines']:<3}"
                            f"({tm['time_over_predicted']} over)"
                            if tm
                            else ""
                        )
                print(
                    f"{machine:<7} {mode:<16} {name:<9} {part:<8} {learned[part]['lines']:>5} | "
                    f"{'':>9}{cells[0]} | {'':>6}{cells[1]} |{times}"
                )
    s = figures["survival"]
    print(
        f"survival attempts: {s['attempts']}; the learned go rule lets {s['learned_go']} go, of "
        f"which did not survive: {s['learned_go_that_did_not_survive']} (today's estimator: "
        f"{s['today_go']}, {s['today_go_that_did_not_survive']}); survived but the learned rule "
        f"would not let go: {s['survived_but_learned_would_not_go']}; go runs with the learned "
        f"conservative figure under their footprint: "
        f"{s['go_runs_with_learned_conservative_under_footprint']}"
    )
    print(
        f"the pre-flight's rule (learned figures for runs probed before, today's otherwise) lets "
        f"{s['preflight_go']} go, of which did not survive: "
        f"{s['preflight_go_that_did_not_survive']}; survived but it would not let go: "
        f"{s['survived_but_preflight_would_not_go']} (today's: "
        f"{s['survived_but_today_would_not_go']})"
    )
    for machine, modes in figures["machines"].items():
        for mode, arms in modes.items():
            name, used = decision_measure(arms["preflight"])
            fig = used["all"]
            print(
                f"pre-flight, {machine:<7} {mode:<16} {name:<9} {fig['lines']:>5} lines "
                f"(median, max, cons/measured, under): {figure_cells(fig)}"
            )
    for group in figures["indistinct"]:
        if not (group["typical_possible"] and group["conservative_possible"]):
            shown = ", ".join(
                f"{run} {m} GB" for run, m in zip(group["runs"], group["measured_gb"], strict=True)
            )
            print(
                f"indistinct to the window's inputs, {group['machine']} ({group['measure']}): "
                f"{shown}; one window within {TARGETS['footprint_max_pct']:g}% of each: "
                f"{'possible' if group['typical_possible'] else 'impossible'}; a conservative "
                f"one never under and within {TARGETS['conservative_most']}x: "
                f"{'possible' if group['conservative_possible'] else 'impossible'}"
            )
    for machine, met in figures["targets_met"].items():
        shown = ", ".join(
            f"{k} {'met' if v else 'NOT met'}" for k, v in met.items() if k != "measure"
        )
        print(f"targets, {machine} with MLX's defaults ({met['measure']}): {shown}")


if __name__ == "__main__":
    sys.exit(main())
