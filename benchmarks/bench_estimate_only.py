"""How much wall time --yourai-estimate-only adds beyond pytest's own start-up.

    python benchmarks/bench_estimate_only.py [--runs 5]

Prints the median wall time of three commands, run from the repository root:
  baseline   pytest on an empty test file with the plugin disabled (-p no:yourai)
  collect    pytest benchmarks/ --collect-only (the plugin loaded, no pre-flight)
  estimate   pytest benchmarks/ --yourai-estimate-only (every preset pre-flighted), with a
             warm cache (MLX's import check and the censuses of models that need one are
             cached in pytest's cache; one run before the timed ones fills it)
The targets: estimate - baseline < 2 s (plugin core), estimate <= 1.5 x collect (census).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def wall(argv: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    pytest = [sys.executable, "-m", "pytest", "-q"]
    with tempfile.TemporaryDirectory() as scratch:
        empty = Path(scratch)
        (empty / "test_empty.py").write_text("def test_nothing():\n    pass\n")
        log = empty / "log.jsonl"
        commands = {
            "baseline": ([*pytest, "-p", "no:yourai", "test_empty.py"], empty),
            "collect": ([*pytest, str(ROOT / "benchmarks"), "--collect-only"], empty),
            "estimate": (
                [
                    *pytest,
                    str(ROOT / "benchmarks"),
                    "--yourai-estimate-only",
                    f"--yourai-log={log}",
                ],
                empty,
            ),
        }
        medians = {}
        wall(commands["estimate"][0], empty)  # fills the cache: the timed runs are warm
        for name, (argv, cwd) in commands.items():
            times = [wall(argv, cwd) for _ in range(args.runs)]
            medians[name] = statistics.median(times)
            print(f"{name:<9} median {medians[name]:.3f} s over {args.runs} runs")
    added = medians["estimate"] - medians["baseline"]
    print(f"estimate-only adds {added:.3f} s beyond pytest's start-up (target < 2 s)")
    ratio = medians["estimate"] / medians["collect"]
    print(f"estimate-only (warm) / collect-only: {ratio:.2f} (target <= 1.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
