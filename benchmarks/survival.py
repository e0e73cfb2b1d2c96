"""Survival benchmark: does a run that the pre-flight lets through survive on a GPU whose
other memory is taken by another process?

    python benchmarks/survival.py benchmarks/grids/survival_cuda.jsonl \
        --out benchmarks/results/h200-survival.jsonl [--lora-reference]
    python benchmarks/survival.py report benchmarks/results/h200-survival.jsonl

For each grid line (a preset's architecture, a pinned config and an in-flight mode):

1. ``go``: the plugin's own estimate-only run gives the pre-flight's go threshold for that
   preset, ``estimated_conservative_gb`` + ``--yourai-safety-gb`` (the go rule). A second
   process (PyTorch) then holds the GPU's memory so that exactly that much stays free, as
   nvidia-smi (the plugin's source) reads it, and the plugin runs the preset: pre-flight,
   probe, watchdog. It must pass: no out-of-memory, no safety stop.
2. ``0.85``: the same with 0.85 x the footprint the ``go`` run measured left free, forced past
   the pre-flight (``--yourai-force``): it must fail (an out-of-memory or a safety kill),
   which shows that the footprint is really needed and the margin is not slack. The
   pre-flight's own verdict at that level, without force, is recorded too.
3. with ``--lora-reference`` and ``lora: true`` on the line: ``mlx_lm.lora`` itself, on
   saved synthetic weights of the same shapes, a small tokenizer and equal-length rows, at
   the ``go`` level: it must survive too.

Each attempt is one JSON line in ``--out`` (the level, the free memory before, the plugin's
verdict and figures, the probe's footprint); lines already there are skipped on a rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from results_io import (
    append_record,
    architecture,
    as_built,
    canonical,
    read_grid,
    read_jsonl,
    read_records,
)
from save_synthetic_model import lora_command

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # the package of this checkout, installed or not
TEST_FILE = HERE / "test_lora_memory.py"
PIN_FIELDS = ("batch_size", "lora_rank", "lora_layers", "seq_len", "bits", "grad_checkpoint")
SAFETY_GB = 2.0
TIMEOUT_S = 600.0
# Free memory is set within this of the target (the holder allocates in 2 MiB pages).
TOLERANCE_GB = 0.03

HOLDER = r"""
import sys, torch
torch.cuda.init()
chunks = []
print("READY", flush=True)
for line in sys.stdin:
    command, amount = line.split()
    if command == "release":
        chunks.clear()
        torch.cuda.empty_cache()
    elif command == "grow":  # take this many more bytes (negative: give some back)
        size = int(amount)
        if size > 0:
            chunks.append(torch.empty(size, dtype=torch.uint8, device="cuda"))
        elif size < 0 and chunks:
            last = chunks.pop()
            keep = max(0, last.numel() + size)
            del last
            torch.cuda.empty_cache()
            if keep:
                chunks.append(torch.empty(keep, dtype=torch.uint8, device="cuda"))
    torch.cuda.synchronize()
    print("DONE", flush=True)
"""

# The same on CPU, in RAM: what psutil reports as available (the pre-flight's source there)
# drops by what is held. Every page is written, so that the memory is really taken.
HOLDER_CPU = r"""
import sys
PIECE = 1 << 28
chunks = []
print("READY", flush=True)


def take(size):
    while size > 0:
        chunk = bytearray(min(size, PIECE))
        chunk[::4096] = b"\x01" * len(range(0, len(chunk), 4096))
        chunks.append(chunk)
        size -= len(chunk)


for line in sys.stdin:
    command, amount = line.split()
    if command == "release":
        chunks.clear()
    elif command == "grow":
        size = int(amount)  # negative: give some back
        while size < 0 and chunks:
            size += len(chunks.pop())
        take(size)
    print("DONE", flush=True)
"""


def nvidia_smi_free_gb() -> float:
    """What the plugin's pre-flight reads (memory.py): nvidia-smi's free memory of GPU 0."""
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return float(out.strip().splitlines()[0]) * 1024 * 1024 / 1e9


def psutil_available_gb() -> float:
    """What the plugin's pre-flight reads on CPU (memory.py): psutil's available memory."""
    import psutil

    return float(psutil.virtual_memory().available) / 1e9


class Holder:
    """Another process that holds GPU memory (on CPU: RAM) so that a chosen amount stays
    free, as the plugin's pre-flight reads it."""

    def __init__(self, backend: str = "cuda") -> None:
        self.backend = backend
        self.free_gb = nvidia_smi_free_gb if backend == "cuda" else psutil_available_gb
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER if backend == "cuda" else HOLDER_CPU],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._read() == "READY"

    def _read(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def _send(self, command: str, amount: int = 0) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{command} {amount}\n")
        self.proc.stdin.flush()
        assert self._read() == "DONE"

    def release(self) -> None:
        """Hold nothing."""
        self._send("release")

    def leave_free(self, target_gb: float) -> float:
        """Hold memory until ``target_gb`` is free as the pre-flight reads it (within
        TOLERANCE_GB)."""
        self.release()
        for _ in range(6):
            excess = self.free_gb() - target_gb
            if abs(excess) <= TOLERANCE_GB:
                break
            self._send("grow", int(excess * 1e9))
        return self.free_gb()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


SHORT = {"batch_size": "b", "lora_rank": "r", "lora_layers": "L", "seq_len": "s", "bits": "q"}


def entry_name(entry: dict[str, Any]) -> str:
    base = str(entry.get("preset") or Path(entry["config"]).stem)
    pins = "".join(f"-{short}{entry[key]}" for key, short in SHORT.items() if key in entry)
    return f"{base}{pins}{'-gc' if entry.get('grad_checkpoint') else ''}"


def write_preset(entry: dict[str, Any], work: Path) -> tuple[Path, str]:
    """A presets file with this line's architecture and pinned config."""
    name = entry_name(entry)
    config = work / f"{name}.json"
    config.write_text(json.dumps(architecture(entry)))
    lines = [f'[presets."{name}"]', f'config = "{config.name}"']
    for key in PIN_FIELDS:
        if key in entry:
            value = entry[key]
            lines.append(f"{key} = {str(value).lower() if isinstance(value, bool) else value}")
    path = work / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path, name


def plugin_flag() -> list[str]:
    """``-p pytest_yourai.plugin`` where the package is importable but not installed (a
    checkout on PYTHONPATH), so pytest does not know its entry point."""
    from importlib.metadata import entry_points

    installed = any(e.name == "yourai" for e in entry_points(group="pytest11"))
    return [] if installed else ["-p", "pytest_yourai.plugin"]


def run_plugin(
    presets_file: Path, name: str, in_flight: str, work: Path, *extra: str
) -> dict[str, Any]:
    """One pytest run of the plugin on one preset; its results JSON row and exit code."""
    tag = f"{name}-{in_flight}-{int(time.time() * 1000)}"
    results, log = work / f"{tag}.json", work / f"{tag}.log.jsonl"
    argv = [
        sys.executable,
        "-m",
        "pytest",
        str(TEST_FILE),
        "-q",
        *plugin_flag(),
        f"--rootdir={work}",
        f"--yourai-presets-file={presets_file}",
        f"--yourai-presets={name}",
        f"--yourai-in-flight={in_flight}",
        f"--yourai-json={results}",
        f"--yourai-log={log}",
        f"--yourai-safety-gb={SAFETY_GB:g}",
        f"--yourai-timeout={TIMEOUT_S:g}",
        *extra,
    ]
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=work, check=False)
    rows = json.loads(results.read_text())["results"] if results.exists() else []
    events = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    checks = [e for e in events if e["event"] == "preflight_check"]
    return {
        "exit_code": proc.returncode,
        "wall_s": round(time.monotonic() - started, 1),
        "row": rows[0] if rows else None,
        "events": [e["event"] for e in events],
        "preflight": checks[0] if checks else None,
        "output_tail": (proc.stdout + proc.stderr)[-1500:],
    }


def preflight_estimate(presets_file: Path, name: str, in_flight: str) -> Any:
    """The pre-flight's own estimate for the preset (the plugin's plan(), as its pre-flight
    calls it; the config is pinned, so the available memory does not change it)."""
    from pytest_yourai.autoconfig import BenchmarkConfig
    from pytest_yourai.census import census_for
    from pytest_yourai.preflight import needs_census, plan, training_shape
    from pytest_yourai.presets import load_presets_file

    preset = load_presets_file(presets_file, "survival")[name]
    shape = training_shape(preset, BenchmarkConfig(1, 1, 1), "cuda")
    census = (
        census_for(preset.architecture, shape.bits, shape.group_size, shape.dtype)
        if needs_census(preset.architecture)
        else None
    )
    return plan(
        preset,
        1e6,
        "cuda",
        policy="seed",
        force=False,
        timeout_s=TIMEOUT_S,
        gflops=None,
        in_flight=in_flight,
        safety_gb=SAFETY_GB,
        census=census,
    ).estimate


def attempt(
    entry: dict[str, Any],
    level: str,
    holder: Holder,
    work: Path,
    footprint_gb: float | None,
    sampler: Any = None,
) -> dict[str, Any]:
    presets_file, name = write_preset(entry, work)
    mode = str(entry["in_flight"])
    estimate = preflight_estimate(presets_file, name, mode)
    conservative = estimate.estimated_conservative_gb
    go = conservative + SAFETY_GB
    target = go + 0.5 * TOLERANCE_GB if level == "go" else 0.85 * float(footprint_gb or 0)
    free_before = holder.leave_free(target)
    record: dict[str, Any] = {
        "name": name,
        "grid": entry,
        "level": level,
        "go_threshold_gb": round(go, 3),
        "estimated_base_gb": round(estimate.estimated_base_gb, 3),
        "estimated_conservative_gb": round(conservative, 3),
        "target_free_gb": round(target, 3),
        "head_dim_derived": True,
        "free_before_gb": round(free_before, 3),
    }
    if level == "go":
        time.sleep(0.3)
        idle = sampler.now() if sampler is not None else None
        started = time.time()
        outcome = run_plugin(presets_file, name, mode, work)
        if sampler is not None and idle is not None:
            # nvidia-smi's view: the device's used memory above what it was before the run
            # (the holder's memory included there), at its peak during the run.
            peak = sampler.peak(started, time.time())
            record["nvidia_smi_peak_above_start_gb"] = (
                None if peak is None else round(peak - idle, 4)
            )
    else:
        record["preflight_without_force"] = run_plugin(presets_file, name, mode, work)
        outcome = run_plugin(presets_file, name, mode, work, "--yourai-force")
    record.update(outcome)
    result = outcome["row"] or {}
    record["verdict"] = result.get("verdict")
    record["survived"] = result.get("verdict") == "Pass"
    return record


def lora_reference(entry: dict[str, Any], holder: Holder, work: Path, go_gb: float) -> dict:
    """mlx_lm.lora itself, on saved synthetic weights of the same shapes, at ``go_gb`` free."""
    model_dir = work / f"{entry_name(entry)}-model"
    build = subprocess.run(
        [sys.executable, str(HERE / "save_synthetic_model.py"), json.dumps(entry), str(model_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    if build.returncode != 0:
        return {"error": "could not save the model", "tail": build.stderr[-1500:]}
    free_before = holder.leave_free(go_gb)
    argv = lora_command(entry, model_dir)
    env = dict(os.environ)
    if entry["in_flight"] == "bounded":
        env.update(MLX_MAX_OPS_PER_BUFFER="1", MLX_MAX_MB_PER_BUFFER="1")
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    output = proc.stdout + proc.stderr
    peaks = [line for line in output.splitlines() if "Peak mem" in line]
    return {
        "free_before_gb": round(free_before, 3),
        "exit_code": proc.returncode,
        "survived": proc.returncode == 0 and "out of memory" not in output.lower(),
        "wall_s": round(time.monotonic() - started, 1),
        "peak_mem_lines": peaks[-2:],
        "output_tail": output[-1200:],
    }


def report(paths: list[Path]) -> int:
    """Each attempt's verdict, and the estimates against what the go runs measured: the
    pre-flight's own estimate when it ran (the record keeps it: the held-out figure, for an
    estimator fitted before the run), and today's estimator (which may have been fitted to
    these runs since)."""
    then: list[tuple[float, float]] = []
    today: list[tuple[float, float, float]] = []
    smi = []
    for record in read_records(paths):
        row = record.get("row") or {}
        lora = record.get("mlx_lm_lora") or {}
        print(
            f"{record['name']:<38} {record['grid']['in_flight']:<7} {record['level']:<4} "
            f"free {record['free_before_gb']:>7.3f} (go {record['go_threshold_gb']:.3f}) -> "
            f"{record['verdict']:<7} footprint {row.get('footprint_peak_gb')} "
            f"estimate {record['estimated_base_gb']}-{record['estimated_conservative_gb']}"
            + (f" | mlx_lm.lora survived: {lora.get('survived')}" if lora else "")
        )
        footprint = row.get("footprint_peak_gb")
        if record["level"] != "go" or not isinstance(footprint, int | float):
            continue
        then.append(
            (
                (record["estimated_base_gb"] - footprint) / footprint * 100,
                record["estimated_conservative_gb"] / footprint,
            )
        )
        entry = as_built(record, record["grid"])
        presets_file, name = write_preset(entry, Path(tempfile.mkdtemp()))
        estimate = preflight_estimate(presets_file, name, str(entry["in_flight"]))
        peak = float(row["train_peak_memory_gb"])
        today.append(
            (
                (estimate.estimated_base_gb - footprint) / footprint * 100,
                estimate.estimated_conservative_gb / footprint,
                (estimate.mlx_peak_gb - peak) / peak * 100,
            )
        )
        if record.get("nvidia_smi_peak_above_start_gb"):
            seen = float(record["nvidia_smi_peak_above_start_gb"])
            smi.append((footprint - seen) / seen * 100)
    if then:
        print(f"\n{len(then)} go runs")
        print("  estimate when run:  " + accuracy_line([e for e, _ in then], [r for _, r in then]))
        print(
            "  today's estimator:  "
            + accuracy_line([t[0] for t in today], [t[1] for t in today])
            + f" | MLX peak: {error_summary([t[2] for t in today])}"
        )
    if smi:
        print(
            f"footprint vs nvidia-smi's device peak above the start: "
            f"{min(smi):+.1f}% to {max(smi):+.1f}% ({len(smi)} runs)"
        )
    return 0


def error_summary(errors: list[float]) -> str:
    """Median and largest absolute error, in percent."""
    import statistics

    size = [abs(e) for e in errors]
    return f"median |e| {statistics.median(size):.1f}%, max {max(size):.1f}%"


def accuracy_line(errors: list[float], ratios: list[float]) -> str:
    """The footprint base's error and the conservative figure over the measured footprint."""
    under = sum(r < 1 for r in ratios)
    return (
        f"footprint {error_summary(errors)}; conservative/measured "
        f"{min(ratios):.2f}-{max(ratios):.2f}, under {under}"
    )


def main() -> int:
    if sys.argv[1:2] == ["report"]:
        return report([Path(p) for p in sys.argv[2:]])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--levels", default="go,0.85", help="comma-separated: go, 0.85")
    parser.add_argument("--lora-reference", action="store_true")
    parser.add_argument(
        "--work",
        type=Path,
        help="scratch directory, kept between reruns (its pytest cache holds the timings)",
    )
    args = parser.parse_args()
    entries = read_grid(args.grid)
    earlier = read_jsonl(args.out) if args.out.exists() else []
    done = {canonical([record["grid"], record["level"]]) for record in earlier}
    # A rerun's 0.85 levels need the footprints its go runs measured before.
    measured = {
        canonical(record["grid"]): (record.get("row") or {}).get("footprint_peak_gb")
        for record in earlier
        if record["level"] == "go"
    }
    levels = [level.strip() for level in args.levels.split(",")]
    holder = Holder()
    sys.path.insert(0, str(HERE))
    from estimate_accuracy import DeviceSampler

    sampler = DeviceSampler()
    work = args.work or Path(tempfile.mkdtemp(prefix="yourai-survival-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        for entry in entries:
            footprint = measured.get(canonical(entry))
            for level in levels:
                if level != "go" and (not entry.get(f"level_{level}", True) or not footprint):
                    continue
                if canonical([entry, level]) in done:
                    continue
                record = attempt(entry, level, holder, work, footprint, sampler)
                row = record.get("row") or {}
                if level == "go":
                    footprint = row.get("footprint_peak_gb") or footprint
                    if args.lora_reference and entry.get("lora"):
                        record["mlx_lm_lora"] = lora_reference(
                            entry, holder, work, record["go_threshold_gb"]
                        )
                append_record(args.out, record)
                print(
                    f"{record['name']} {entry['in_flight']} {level}: free "
                    f"{record['free_before_gb']} GB (go {record['go_threshold_gb']}) -> "
                    f"{record['verdict']} footprint {row.get('footprint_peak_gb')} "
                    f"est {record['estimated_base_gb']}-{record['estimated_conservative_gb']} "
                    f"in {record['wall_s']} s"
                    + (
                        f" | mlx_lm.lora survived={record['mlx_lm_lora'].get('survived')}"
                        if "mlx_lm_lora" in record
                        else ""
                    ),
                    flush=True,
                )
    finally:
        holder.close()
        sampler.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
