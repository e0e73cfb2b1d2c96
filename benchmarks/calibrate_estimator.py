"""Fit the estimator's per-backend coefficients to probe measurements.

    python benchmarks/calibrate_estimator.py benchmarks/results/h100-seed-presets.jsonl \
        benchmarks/results/h100-accuracy-grid.jsonl --backend cuda
    python benchmarks/calibrate_estimator.py benchmarks/results/cpu-accuracy-grid.jsonl \
        --backend cpu

What is fitted is what the estimator cannot derive: the memory above the resident model and
the LoRA state. Its terms, all in bytes (T = batch·seq tokens, L = adapted blocks):

- ``activation``: T·L·hidden·4 — mlx-lm's LoRA layers are float32, so the adapted span
  computes in float32 whatever the model dtype (one block when gradient checkpointing);
- ``checkpoint``: T·L·hidden·4 — the block inputs gradient checkpointing keeps;
- ``logits``: T·vocab·4 — the float32 cross-entropy over the vocabulary;
- ``constant``: 1 GB units of fixed overhead.

Non-negative least squares; prints the coefficients to paste into
``pytest_yourai/estimate.py`` (CALIBRATION) and the fit's errors. Held-out files
(``--validate``) are reported but not fitted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
from estimate_accuracy import architecture, shape_of
from scipy.optimize import nnls

from pytest_yourai.estimate import calibration_features, lora_parameter_count

TERMS = ("activation", "checkpoint", "logits", "constant")


def load(paths: list[Path], backend: str) -> list[dict[str, Any]]:
    records = []
    for path in paths:
        for line in path.read_text().splitlines():
            record = json.loads(line)
            result = record["result"]
            if result.get("status") == "ok" and result.get("backend") == backend:
                records.append(record)
    return records


def target_bytes(record: dict[str, Any]) -> float:
    """Measured train peak minus what the estimator derives exactly: the resident model
    (measured after LoRA is attached, so it holds the adapters) plus gradients and Adam."""
    arch, shape, result = architecture(record["grid"]), shape_of(record), record["result"]
    trainable = lora_parameter_count(arch, shape.lora_rank, shape.lora_layers)
    return float(
        result["train_peak_memory_gb"] * 1e9 - result["resident_memory_gb"] * 1e9 - trainable * 12
    )


def row(record: dict[str, Any]) -> list[float]:
    features = calibration_features(architecture(record["grid"]), shape_of(record))
    return [features[t] for t in TERMS]


def errors(records: list[dict[str, Any]], coef: np.ndarray) -> list[float]:
    out = []
    for record in records:
        predicted = float(np.dot(row(record), coef))
        measured = record["result"]["train_peak_memory_gb"] * 1e9
        out.append((predicted - target_bytes(record)) / measured * 100)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--validate", type=Path, nargs="*", default=[])
    parser.add_argument("--backend", required=True, choices=("cpu", "cuda", "metal"))
    args = parser.parse_args()
    fit = load(args.results, args.backend)
    if len(fit) < len(TERMS):
        parser.error(f"need at least {len(TERMS)} {args.backend} runs, found {len(fit)}")
    coef, _ = nnls(np.array([row(r) for r in fit]), np.array([target_bytes(r) for r in fit]))
    print(f"{args.backend}: fitted on {len(fit)} runs")
    terms = ", ".join(f'"{t}": {c:.4g}' for t, c in zip(TERMS, coef, strict=True))
    print(f"    CALIBRATION[{args.backend!r}] = {{{terms}}}")
    fitted = errors(fit, coef)
    worst_under = min(fitted)
    print(
        f"fit errors (% of measured peak): median |e| {statistics.median(map(abs, fitted)):.1f}, "
        f"max |e| {max(map(abs, fitted)):.1f}, most under {worst_under:.1f}"
    )
    print(f"conservative factor that covers every fitted run: {1 / (1 + worst_under / 100):.3f}")
    held = load(args.validate, args.backend)
    if held:
        e = errors(held, coef)
        print(
            f"held out ({len(held)} runs): median |e| {statistics.median(map(abs, e)):.1f}, "
            f"max |e| {max(map(abs, e)):.1f}, most under {min(e):.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
