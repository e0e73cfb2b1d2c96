"""How long ``yourai fit`` takes to print the default map for the built-in presets.

    python benchmarks/bench_fit.py [--runs 7]

Times the whole command as a user runs it (a fresh Python each time, start-up included):
  metal   yourai fit --backend metal            (11 Mac sizes x every built-in preset)
  cuda    yourai fit --backend cuda             (14 Mac and GPU sizes)
  json    yourai fit --backend cuda --json
The target: each median under 1 s on the 2-core CPU machine.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

TARGET_S = 1.0
COMMANDS = {
    "metal": ["--backend", "metal"],
    "cuda": ["--backend", "cuda"],
    "json": ["--backend", "cuda", "--json"],
}


def wall(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    fit = [sys.executable, "-m", "pytest_yourai.fit"]
    wall([*fit, "--backend", "metal"])  # a first run warms the OS's file cache
    worst = 0.0
    for name, extra in COMMANDS.items():
        times = [wall([*fit, *extra]) for _ in range(args.runs)]
        median = statistics.median(times)
        worst = max(worst, median)
        print(
            f"{name:<6} median {median:.3f} s, min {min(times):.3f}, max {max(times):.3f} "
            f"over {args.runs} runs"
        )
    print(
        f"slowest median {worst:.3f} s (target < {TARGET_S:g} s): "
        f"{'met' if worst < TARGET_S else 'MISSED'}"
    )
    return 0 if worst < TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
