"""Run the probe on a grid of configs and compare the estimator with what it measures.

    python benchmarks/estimate_accuracy.py run benchmarks/grids/accuracy_cpu.jsonl \
        --out benchmarks/results/accuracy-cpu.jsonl
    python benchmarks/estimate_accuracy.py report benchmarks/results/*.jsonl
    python benchmarks/estimate_accuracy.py repeat FIRST.jsonl SECOND.jsonl

``run`` spawns ``python -m pytest_yourai.probe`` once per grid line (each in its own process,
under the plugin's supervisor and timeout) and appends one JSON line per run to ``--out``:
the grid entry, the probe's exact command line, its BENCHMARK_RESULT and the machine. Lines
already in ``--out`` are skipped, so an interrupted grid resumes (results_io.py). ``--jobs N``
runs N probes at once while their conservative estimates fit ``--budget-gb``. Which command and
grid made each committed results file: benchmarks/results/manifest.json.

``report`` recomputes the estimate of every measured run with the current estimator and
prints, per backend: the median and max absolute % error of estimated_base_gb against the
measured train_peak_memory_gb, how often estimated_conservative_gb falls below the measured
peak, and the seed formula's (2 + 1.8·P, 2 + 2.2·P GB) figures on the same runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from results_io import (
    append_record,
    architecture,
    canonical,
    pending,
    read_grid,
    read_records,
)

from pytest_yourai.estimator import TrainingShape, seed_estimate_gb
from pytest_yourai.fields import BACKENDS, IN_FLIGHT_MODES
from pytest_yourai.preflight import estimate_with_census
from pytest_yourai.presets import count_parameters
from pytest_yourai.supervisor import ProbeProcess

HERE = Path(__file__).resolve().parent
RUN_FIELDS = (
    "bits",
    "group_size",
    "dtype",
    "batch_size",
    "seq_len",
    "lora_rank",
    "lora_layers",
    "steps",
    "in_flight",
)


def entry_name(entry: dict[str, Any]) -> str:
    return str(entry.get("preset") or Path(entry["config"]).stem)


def probe_argv(entry: dict[str, Any]) -> list[str]:
    argv = [sys.executable, "-m", "pytest_yourai.probe"]
    if "preset" in entry:
        argv += ["--preset", entry["preset"]]
    else:
        argv += ["--config", str(HERE / entry["config"])]
    for key in RUN_FIELDS:
        if key in entry:
            argv += ["--" + key.replace("_", "-"), str(entry[key])]
    if entry.get("grad_checkpoint"):
        argv.append("--grad-checkpoint")
    return argv


def grid_shape(entry: dict[str, Any], backend: str) -> TrainingShape:
    fields = {k: entry[k] for k in RUN_FIELDS if k in entry and k != "steps"}
    return TrainingShape(
        grad_checkpoint=bool(entry.get("grad_checkpoint")), backend=backend, **fields
    )


class DeviceSampler:
    """``nvidia-smi`` sampling the GPU's used memory every 50 ms for the whole run, so each
    probe's footprint can be checked against what the device itself reports. Each sample
    carries nvidia-smi's own timestamp, so pipe buffering cannot shift it in time."""

    def __init__(self) -> None:
        import subprocess

        self.samples: list[tuple[float, float]] = []  # (wall clock, GB used)
        self._proc = subprocess.Popen(
            [
                "nvidia-smi",
                "--query-gpu=timestamp,memory.used",
                "--format=csv,noheader,nounits",
                "-lms",
                "50",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        from datetime import datetime

        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                stamp, used = (part.strip() for part in line.split(",")[:2])
                when = datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").timestamp()
                self.samples.append((when, float(used) * 1024 * 1024 / 1e9))
            except ValueError:
                continue

    def now(self) -> float | None:
        return self.samples[-1][1] if self.samples else None

    def peak(self, start: float, end: float) -> float | None:
        inside = [gb for t, gb in list(self.samples) if start <= t <= end]
        return max(inside) if inside else None

    def stop(self) -> None:
        self._proc.terminate()


def device_check(
    sampler: DeviceSampler, result: dict[str, Any], idle_gb: float | None, alone: bool
) -> dict[str, Any]:
    """nvidia-smi's view of the probe: the device's used memory above the idle reading
    taken just before it started, at its peak during the build and during the steps."""
    started = result.get("phase_started_at") or {}
    check: dict[str, Any] = {"idle_gb": idle_gb, "alone": alone, "interval_ms": 50}
    bounds = {"build": ("build", "train"), "train": ("train", "done")}
    for phase, (first, last) in bounds.items():
        if first in started and last in started and idle_gb is not None:
            peak = sampler.peak(float(started[first]), float(started[last]))
            check[f"{phase}_peak_gb"] = None if peak is None else round(peak - idle_gb, 4)
    return check


class MemoryBudget:
    """Admits concurrent probes while the sum of their conservative estimates fits."""

    def __init__(self, budget_gb: float) -> None:
        self.budget_gb = budget_gb
        self.used_gb = 0.0
        self.condition = threading.Condition()

    def acquire(self, need_gb: float) -> float:
        need_gb = min(need_gb, self.budget_gb)  # one too big for the budget runs alone
        with self.condition:
            self.condition.wait_for(lambda: self.used_gb + need_gb <= self.budget_gb)
            self.used_gb += need_gb
        return need_gb

    def release(self, held_gb: float) -> None:
        with self.condition:
            self.used_gb -= held_gb
            self.condition.notify_all()


def run(
    grid: Path,
    out: Path,
    timeout_s: float,
    jobs: int = 1,
    budget_gb: float = 0.0,
    backend: str = "cuda",
    nvidia_smi: bool = False,
) -> int:
    """Probe every grid line; with ``jobs`` > 1, several at once within ``budget_gb``.

    Each probe is its own process and MLX's peak counter is per process. With the probe's
    default ``--in-flight bounded`` running probes side by side does not change what each one
    measures; with ``in_flight: mlx`` it does (a busy GPU lets more work queue up)."""
    entries = pending(read_grid(grid), out)  # resume: skip what --out already holds
    budget = MemoryBudget(budget_gb) if jobs > 1 else None
    write_lock = threading.Lock()
    sampler = DeviceSampler() if nvidia_smi else None
    running = [0]

    def probe(index: int, entry: dict[str, Any]) -> bool:
        argv = probe_argv(entry)
        shown = " ".join(shlex.quote(a) for a in ["python", *argv[1:]]).replace(
            str(HERE) + "/", "benchmarks/"
        )
        held = 0.0
        if budget is not None:
            # A grid line may say what to reserve where the estimator does not know the
            # model yet (a mixture of experts, say).
            need = entry.get("reserve_gb") or (
                estimate_with_census(
                    architecture(entry), grid_shape(entry, backend)
                ).estimated_conservative_gb
            )
            held = budget.acquire(float(need))
        print(f"[{index}/{len(entries)}] {shown}", flush=True)
        env = {k: v for k, v in os.environ.items() if k != "YOURAI_PROBE_SPEC"}
        with write_lock:
            running[0] += 1
            alone = running[0] == 1
            idle = sampler.now() if sampler is not None else None
        try:
            with ProbeProcess(argv, env) as proc:
                outcome = proc.wait(timeout_s)
        finally:
            with write_lock:
                alone = alone and running[0] == 1
                running[0] -= 1
            if budget is not None:
                budget.release(held)
        result = outcome.result or {
            "status": "timeout" if outcome.timed_out else "error",
            "error": outcome.result_problem,
            "stdout_tail": outcome.stdout_tail[-1500:],
            "stderr_tail": outcome.stderr_tail[-1500:],
        }
        record = {
            "name": entry_name(entry),
            "grid": entry,
            "command": shown,
            "elapsed_s": round(outcome.elapsed_s, 1),
            "result": result,
            "machine": {"platform": platform.platform(), "python": platform.python_version()},
        }
        if sampler is not None:
            record["nvidia_smi"] = device_check(sampler, result, idle, alone)
        with write_lock:
            append_record(out, record)
        peak = result.get("train_peak_memory_gb")
        print(
            f"    [{index}] -> {result.get('status')} train_peak={peak} GB "
            f"in {outcome.elapsed_s:.0f} s",
            flush=True,
        )
        return result.get("status") == "ok"

    try:
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            oks = list(pool.map(lambda item: probe(*item), enumerate(entries, start=1)))
    finally:
        if sampler is not None:
            sampler.stop()
    return 0 if all(oks) else 1


def shape_of(record: dict[str, Any], legacy_in_flight: str = "mlx") -> TrainingShape:
    """The estimator's input for a measured run. Results from before the probe had
    ``--in-flight`` carry no mode; they ran with MLX's defaults unless the command that
    produced them set the buffer limits (``legacy_in_flight``)."""
    config = record["result"]["config"]
    return TrainingShape(
        bits=int(config["bits"]),
        group_size=int(config.get("group_size", 64)),
        dtype=str(config["dtype"]),
        batch_size=int(config["batch_size"]),
        seq_len=int(config["seq_len"]),
        lora_rank=int(config["lora_rank"]),
        lora_layers=int(config["lora_layers"]),
        grad_checkpoint=bool(config.get("grad_checkpoint", False)),
        backend=str(record["result"]["backend"]),
        in_flight=str(config.get("in_flight", legacy_in_flight)),
    )


def report(paths: list[Path], legacy_in_flight: str = "mlx") -> int:
    records = [
        record
        for record in read_records(paths)
        # "result" is missing from what is not a grid result (an event log, say)
        if record.get("result", {}).get("status") == "ok"
    ]
    by_backend: dict[str, list[tuple[float, float, float, float, float, str]]] = {}
    print(
        f"{'run':<44} {'backend':<7} {'measured':>9} {'base':>8} {'err%':>7} "
        f"{'cons':>8} {'seed':>13}"
    )
    for record in records:
        arch = architecture(record["grid"])
        shape = shape_of(record, legacy_in_flight)
        estimate = estimate_with_census(arch, shape)
        measured = float(record["result"]["train_peak_memory_gb"])
        seed_low, seed_high = seed_estimate_gb(count_parameters(arch) / 1e9)
        error = (estimate.estimated_base_gb - measured) / measured * 100
        label = (
            f"{record['name']} b{shape.batch_size} s{shape.seq_len} r{shape.lora_rank} "
            f"l{shape.lora_layers} {shape.bits}bit{' gc' if shape.grad_checkpoint else ''}"
        )
        print(
            f"{label:<44} {shape.backend:<7} {measured:>9.3f} {estimate.estimated_base_gb:>8.3f} "
            f"{error:>+7.1f} {estimate.estimated_conservative_gb:>8.3f} "
            f"{seed_low:>6.1f}-{seed_high:<6.1f}"
        )
        by_backend.setdefault(f"{shape.backend}, in flight: {shape.in_flight}", []).append(
            (
                measured,
                estimate.estimated_base_gb,
                estimate.estimated_conservative_gb,
                seed_low,
                seed_high,
                label,
            )
        )
    for backend, rows in sorted(by_backend.items()):
        errors = [abs(b - m) / m * 100 for m, b, *_ in rows]
        under = sum(1 for m, _, c, *_ in rows if c < m)
        seed_errors = [abs(lo - m) / m * 100 for m, _, _, lo, _, _ in rows]
        seed_under = sum(1 for m, *_, hi, _ in rows if hi < m)
        print(
            f"\n{backend}: {len(rows)} runs | estimator: "
            f"median |err| {statistics.median(errors):.1f}%, "
            f"max {max(errors):.1f}%, conservative below measured {under}/{len(rows)} | "
            f"seed formula: median |err| {statistics.median(seed_errors):.1f}%, "
            f"max {max(seed_errors):.1f}%, conservative below measured {seed_under}/{len(rows)}"
        )
    return 0


def repeat(first: Path, second: Path) -> int:
    """How the same grid lines measured in two result files (say, alone and side by side)."""

    def peaks(path: Path) -> dict[str, tuple[str, float]]:
        out = {}
        for record in read_records([path]):
            result = record.get("result", {})
            if result.get("status") == "ok":
                mode = str(result["config"].get("in_flight", "mlx"))
                key = canonical(record["grid"])
                out[key] = (mode, float(result["train_peak_memory_gb"]))
        return out

    a, b = peaks(first), peaks(second)
    for mode in sorted({m for m, _ in a.values()}):
        pairs = [(a[k][1], b[k][1]) for k in a if k in b and a[k][0] == mode]
        diffs = sorted(abs(x - y) / y * 100 for x, y in pairs if x != y)
        worst = f", the others within {max(diffs):.2f}%" if diffs else ""
        print(
            f"in flight {mode}: {len(pairs)} configs in both, "
            f"{len(pairs) - len(diffs)} identical{worst}"
        )
    return 0


def timing(paths: list[Path]) -> int:
    """Replay the plugin's time model (throughput.py) over probes run one after another: each
    probe's time as predicted from the ones before it, against what it took."""
    from pytest_yourai.estimator import training_flops, weight_bytes
    from pytest_yourai.throughput import fit, observe

    seen = []
    ratios = []
    for record in read_records(paths):
        result = record.get("result", {})
        if result.get("status") != "ok":
            continue
        arch, shape = architecture(record["grid"]), shape_of(record)
        flops = training_flops(arch, shape)
        weights = weight_bytes(arch, shape.bits, shape.group_size, shape.dtype) / 1e9
        model = fit(seen)
        steps = len(result["step_seconds"])
        predicted = model.predict(flops, weights, steps) if model else None
        took = float(record["elapsed_s"])
        if predicted:
            ratios.append(took / predicted)
        shown = "first probe" if predicted is None else f"predicted {predicted:6.1f} s"
        print(f"{record['name']:<28} {shape.in_flight:<8} took {took:6.1f} s, {shown}")
        observation = observe(flops, weights, took, result["step_seconds"])
        if observation is not None:
            seen.append(observation)
    if ratios:
        print(f"actual / predicted after the first probe: {min(ratios):.2f}-{max(ratios):.2f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="probe every grid line, append results")
    run_p.add_argument("grid", type=Path)
    run_p.add_argument("--out", type=Path, required=True)
    run_p.add_argument("--timeout", type=float, default=900.0)
    run_p.add_argument("--jobs", type=int, default=1, help="probes at once (default 1)")
    run_p.add_argument(
        "--budget-gb",
        type=float,
        default=60.0,
        help="with --jobs > 1: the most GB the running probes' conservative estimates may sum to",
    )
    run_p.add_argument("--backend", default="cuda", choices=BACKENDS)
    run_p.add_argument(
        "--nvidia-smi",
        action="store_true",
        help="sample the GPU's used memory every 50 ms and record each probe's build and "
        "train peak above the idle reading (meaningful for probes that ran alone)",
    )
    report_p = sub.add_parser("report", help="estimator vs measured, per backend")
    report_p.add_argument("results", type=Path, nargs="+")
    report_p.add_argument(
        "--legacy-in-flight",
        choices=IN_FLIGHT_MODES,
        default="mlx",
        help="the mode of results that record none (older probe): mlx unless they were "
        "measured with MLX_MAX_OPS_PER_BUFFER=1 MLX_MAX_MB_PER_BUFFER=1",
    )
    timing_p = sub.add_parser("timing", help="replay the time model over sequential probes")
    timing_p.add_argument("results", type=Path, nargs="+")
    repeat_p = sub.add_parser("repeat", help="the same grid measured twice: how alike")
    repeat_p.add_argument("first", type=Path)
    repeat_p.add_argument("second", type=Path)
    args = parser.parse_args()
    if args.command == "timing":
        return timing(args.results)
    if args.command == "repeat":
        return repeat(args.first, args.second)
    if args.command == "run":
        return run(
            args.grid,
            args.out,
            args.timeout,
            args.jobs,
            args.budget_gb,
            args.backend,
            args.nvidia_smi,
        )
    return report(args.results, args.legacy_in_flight)


if __name__ == "__main__":
    sys.exit(main())
