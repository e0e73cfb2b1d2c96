"""On CPU, the estimate against ``mlx_lm.lora`` itself: its peak resident set size.

    python benchmarks/cpu_lora_rss.py run benchmarks/grids/cpu_lora_rss.jsonl \
        --out benchmarks/results/cpu-lora-rss.jsonl
    python benchmarks/cpu_lora_rss.py report benchmarks/results/cpu-lora-rss.jsonl

For each grid line: save synthetic weights of the line's shapes with a small tokenizer and
equal-length rows (benchmarks/save_synthetic_model.py), run ``python -m mlx_lm lora`` on
them as a child process, and read its peak RSS (``getrusage(RUSAGE_CHILDREN)``; each child
is measured alone, one at a time). The line records that beside the probe's footprint of
the same config and the estimate. ``report`` prints how the estimate compares: its base
against mlx_lm.lora's RSS, and whether the conservative figure covers it.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from estimate_accuracy import grid_shape, probe_argv  # noqa: E402
from results_io import append_record, architecture, read_grid, read_records  # noqa: E402
from save_synthetic_model import lora_command  # noqa: E402

from pytest_yourai.preflight import estimate_with_census  # noqa: E402


def child_peak_rss_gb(argv: list[str]) -> tuple[int, float, str]:
    """Run ``argv`` to completion; its exit code, peak RSS and output tail."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if after <= before:
        raise RuntimeError("a child's peak RSS is hidden by an earlier, larger child")
    scale = 1 if sys.platform == "darwin" else 1024
    return proc.returncode, after * scale / 1e9, (proc.stdout + proc.stderr)[-800:]


def run(grid: Path, out: Path) -> int:
    for entry in read_grid(grid):
        with tempfile.TemporaryDirectory(prefix="yourai-lora-rss-") as scratch:
            model = Path(scratch) / "model"
            save = [sys.executable, str(HERE / "save_synthetic_model.py"), json.dumps(entry)]
            subprocess.run([*save, str(model)], check=True, capture_output=True)
            lora = [
                sys.executable,
                str(Path(__file__)),
                "child",
                json.dumps(entry),
                str(model),
            ]
            child_run = subprocess.run(lora, check=True, capture_output=True, text=True)
            measured = json.loads(child_run.stdout.strip().splitlines()[-1])
        probe = subprocess.run(probe_argv(entry), capture_output=True, text=True, check=False)
        line = [x for x in probe.stdout.splitlines() if x.startswith("BENCHMARK_RESULT:")][-1]
        result = json.loads(line.split(":", 1)[1])
        record = {"grid": entry, "mlx_lm_lora": measured, "probe": result}
        append_record(out, record)
        print(
            f"{entry.get('preset') or entry.get('config')}: mlx_lm.lora RSS "
            f"{measured['peak_rss_gb']:.3f} GB, probe footprint {result.get('train_footprint_gb')}",
            flush=True,
        )
    return 0


def child(entry: dict[str, Any], model: Path) -> int:
    """In its own process, so that RUSAGE_CHILDREN holds only mlx_lm.lora's peak."""
    code, peak, tail = child_peak_rss_gb(lora_command(entry, model))
    print(json.dumps({"exit_code": code, "peak_rss_gb": round(peak, 6), "tail": tail}))
    return 0


def report(paths: list[Path]) -> int:
    errors, covered, rows = [], 0, 0
    for record in read_records(paths):
        entry, lora = record["grid"], record["mlx_lm_lora"]
        if lora["exit_code"] != 0:
            continue
        est = estimate_with_census(architecture(entry), grid_shape(entry, "cpu"))
        rss = float(lora["peak_rss_gb"])
        errors.append((est.estimated_base_gb - rss) / rss * 100)
        covered += est.estimated_conservative_gb >= rss
        rows += 1
        print(
            f"{entry.get('preset') or entry.get('config')} b{entry['batch_size']} "
            f"s{entry['seq_len']}: mlx_lm.lora {rss:.3f} GB, probe "
            f"{record['probe'].get('train_footprint_gb')}, estimate "
            f"{est.estimated_base_gb:.3f}-{est.estimated_conservative_gb:.3f}"
        )
    print(
        f"{rows} runs: base vs mlx_lm.lora's peak RSS median |e| "
        f"{statistics.median(map(abs, errors)):.1f}%, max {max(map(abs, errors)):.1f}%; "
        f"conservative >= it on {covered}/{rows}"
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run")
    run_p.add_argument("grid", type=Path)
    run_p.add_argument("--out", type=Path, required=True)
    child_p = sub.add_parser("child")
    child_p.add_argument("entry")
    child_p.add_argument("model", type=Path)
    report_p = sub.add_parser("report")
    report_p.add_argument("results", type=Path, nargs="+")
    args = parser.parse_args()
    if args.command == "run":
        return run(args.grid, args.out)
    if args.command == "child":
        return child(json.loads(args.entry), args.model)
    return report(args.results)


if __name__ == "__main__":
    sys.exit(main())
