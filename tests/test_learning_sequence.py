"""benchmarks/learning_sequence.py, issue 29's held-out sequence, on this CPU with tiny models.

Real pytest runs of the plugin, real probes: each line's record keeps the pre-flight's
estimate made before its probe (today's and the learned one, from the plugin's own log) and
what the probe measured, and the report scores the lines after the first k probes. The
``go`` level (another process holding RAM down to the go threshold) is left out here: it
would starve the tests running beside this one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "learning_sequence.py"
LINES = [
    {"config": "configs/tiny/tiny-qwen3.json", "batch_size": 2, "seq_len": 64},
    {"config": "configs/tiny/tiny-olmoe.json", "batch_size": 2, "seq_len": 64},
    {"config": "configs/tiny/tiny-qwen3.json", "batch_size": 1, "seq_len": 128},
]


def test_each_line_keeps_the_estimate_made_before_its_probe_and_the_report_scores_them(
    tmp_path: Path,
) -> None:
    grid, out = tmp_path / "grid.jsonl", tmp_path / "sequence.jsonl"
    pins = {"lora_rank": 8, "lora_layers": 2, "bits": 16, "in_flight": "mlx"}
    grid.write_text("".join(json.dumps({**line, **pins}) + "\n" for line in LINES))
    argv = [sys.executable, str(SCRIPT), str(grid), "--out", str(out), "--levels", "learn"]
    argv += ["--work", str(tmp_path / "work"), "--backend", "cpu"]
    ran = subprocess.run(argv, capture_output=True, text=True, cwd=SCRIPT.parent, timeout=600)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["level"] for r in records] == ["learn"] * 3
    # The plugin learned as it went: each pre-flight saw the probes before it.
    checks = [r["preflight"] for r in records]
    assert [c["learned_from"] for c in checks] == [0, 1, 2]
    assert checks[0]["learned_correction"] is None
    for check in checks[1:]:
        learned = check["learned_correction"]
        assert learned["applied"] is False  # new runs: the pre-flight used today's figures
        assert learned["estimated_conservative_gb"] >= learned["estimated_base_gb"] > 0
    assert all(r["row"]["verdict"] == "Pass" for r in records)

    # A rerun with the same --out skips what it holds.
    again = subprocess.run(argv, capture_output=True, text=True, cwd=SCRIPT.parent, timeout=600)
    assert again.returncode == 0 and len(out.read_text().splitlines()) == 3

    report = subprocess.run(
        [sys.executable, str(SCRIPT), "report", str(out), "--k", "1"],
        capture_output=True, text=True, cwd=SCRIPT.parent, timeout=120, check=False,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr
    assert "after the first 1 probes, 2 runs (footprint)" in report.stdout
    assert "go runs at the learned threshold: 0" in report.stdout
    for record in records[1:]:
        assert record["name"] in report.stdout
