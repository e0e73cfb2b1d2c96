"""Serial vs ``-n 2``: wall time of N tiny probes, and how much memory was reserved at once.

    python benchmarks/bench_xdist.py [--presets 6] [--workers 2] [--runs 1] [--fake]

Writes N CPU-sized presets (alternating llama and qwen2 shapes) to a presets file, runs the
benchmark suite on them serially and with pytest-xdist, and prints the wall-time ratio and,
from the parallel run's log, the largest sum of reservations against the admission budget.
``--fake`` swaps the MLX probe for a 2-second stand-in (to test the script itself).
``--runs N`` repeats the pair N times and gives each ratio and the median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_io import read_jsonl

from pytest_yourai.presets import builtin_presets

TEST = "def test_lora_memory(yourai_benchmark):\n    yourai_benchmark.run()\n"
FAKE = (
    "import json, os, time\n"
    "spec = json.loads(os.environ['YOURAI_PROBE_SPEC'])\n"
    "time.sleep(2)\n"
    "print('BENCHMARK_RESULT: ' + json.dumps({'status': 'ok', 'peak_memory_gb': 0.05}))\n"
)


def write_presets(path: Path, count: int) -> list[str]:
    sources = [builtin_presets()["tiny-llama"], builtin_presets()["tiny-qwen2"]]
    names, lines = [], []
    for index in range(count):
        preset = sources[index % 2]
        name = f"bench-{preset.model_type}-{index}"
        names.append(name)
        lines.append(f"[presets.{name}]")
        for key, value in {**preset.architecture, **preset.pins}.items():
            lines.append(f"{key} = {json.dumps(value)}")
        lines.append("")
    path.write_text("\n".join(lines))
    return names


def timed(argv: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stdout.write(proc.stdout[-3000:])
        raise SystemExit(f"pytest exited {proc.returncode}: {' '.join(argv)}")
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--fake", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="yourai-bench-xdist-") as scratch:
        work = Path(scratch)
        (work / "test_lora_memory.py").write_text(TEST)
        names = write_presets(work / "presets.toml", args.presets)
        base = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--yourai-presets-file",
            "presets.toml",
            "--yourai-presets",
            ",".join(names),
        ]
        if args.fake:
            (work / "fake_probe.py").write_text(FAKE)
            base += ["--yourai-probe-command", f"{sys.executable} fake_probe.py"]
        ratios = []
        for run in range(1, args.runs + 1):
            serial = timed([*base, "--yourai-log", "serial.jsonl"], work)
            parallel = timed(
                [*base, "-n", str(args.workers), "--yourai-log", "parallel.jsonl"], work
            )
            ratios.append(serial / parallel)
            if args.runs > 1:
                print(f"run {run}: serial {serial:.1f} s, -n {args.workers} {parallel:.1f} s, "
                      f"ratio {serial / parallel:.2f}", flush=True)  # fmt: skip
        records = read_jsonl(work / "parallel.jsonl")
    admitted = [r for r in records if r["event"] == "probe_admitted"]
    waits = sum(1 for r in records if r["event"] == "probe_waiting")
    largest = max((r["total_reserved_gb"] for r in admitted), default=0.0)
    budget = admitted[0]["budget_gb"] if admitted else float("nan")
    probe = "stand-in probe (2 s)" if args.fake else "MLX probe"
    print(f"{args.presets} tiny presets, {probe}, {args.workers} workers")
    print(f"serial   {serial:.1f} s")
    print(f"-n {args.workers}    {parallel:.1f} s")
    median = f" (median of {args.runs} runs)" if args.runs > 1 else ""
    print(f"wall-time ratio (serial / parallel): {statistics.median(ratios):.2f}{median}")
    print(
        f"largest sum of reservations: {largest:.4f} GB of a {budget:.2f} GB budget ({waits} waits)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
