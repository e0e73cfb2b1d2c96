"""The estimator's Metal figure against public ``mlx_lm`` "Peak mem" reports from Apple Silicon.

    python benchmarks/metal_reports.py

No Mac was available to this project: these reports are the only Metal measurements it
compares with. Each is a training run whose model, quantization, batch, sequence length,
LoRA layers, rank and gradient checkpointing are known, with MLX >= 0.25 (the attention path
that training on Metal has used since). mlx-lm printed "Peak mem" in GiB from March to
November 2024 and in GB (1e9 bytes) since (mlx-examples #1094); a report given in GiB is
converted. Prints each report, the estimate (``mlx_peak_gb``, what "Peak mem" measures) and
the error, then the median and largest error.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from pytest_yourai.estimator import TrainingShape, estimate_training_memory

HERE = Path(__file__).resolve().parent
GIB = 1024**3 / 1e9

# IonDen/mlx-train-perf (README.md and docs/papers/when-the-bottleneck-moved.md, 2026-07):
# mlx_lm.tuner.trainer.train() with mlx-lm's default loss on mlx-community/Qwen3-8B-4bit,
# batch 1, fixed-length rows, LoRA rank 8 on all 36 blocks, gradient checkpointing, AdamW,
# M1 Max 32 GB, MLX 0.31.2 / mlx-lm 0.31.3 (8192 tokens again on MLX 0.32.0); total peak in GiB.
SOURCE = "IonDen/mlx-train-perf, docs/papers/when-the-bottleneck-moved.md"
REPORTS = [
    {"tokens": 1024, "peak_gib": 6.41, "note": ""},
    {"tokens": 2048, "peak_gib": 8.04, "note": ""},
    {"tokens": 4096, "peak_gib": 11.77, "note": ""},
    {"tokens": 8192, "peak_gib": 25.68, "note": "also on MLX 0.32.0"},
    {"tokens": 7936, "peak_gib": 24.5, "note": "rounded: the longest that fit in 32 GB"},
]


def main() -> int:
    arch = json.loads((HERE / "configs" / "qwen3-8b.json").read_text())
    errors = []
    print(f"source: {SOURCE}")
    print(f"{'tokens':>6} {'reported GB':>12} {'estimate GB':>12} {'error':>7}  note")
    for report in REPORTS:
        shape = TrainingShape(
            bits=4,
            group_size=64,
            dtype="bfloat16",
            batch_size=1,
            seq_len=int(report["tokens"]),
            lora_rank=8,
            lora_layers=36,
            grad_checkpoint=True,
            backend="metal",
            in_flight="mlx",
        )
        estimate = estimate_training_memory(arch, shape).mlx_peak_gb
        reported = float(report["peak_gib"]) * GIB
        errors.append((estimate - reported) / reported * 100)
        print(
            f"{report['tokens']:>6} {reported:>12.2f} {estimate:>12.2f} {errors[-1]:>+6.1f}%  "
            f"{report['note']}"
        )
    print(
        f"{len(errors)} reports: median |error| {statistics.median(map(abs, errors)):.1f}%, "
        f"largest {max(map(abs, errors)):.1f}%"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
