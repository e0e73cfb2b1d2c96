"""Fit the estimator's per-backend coefficients to probe measurements.

    python benchmarks/calibrate_estimator.py --backend cuda \
        --graph benchmarks/results/h100-window-shut-grid.jsonl \
        --window benchmarks/results/h100-{seed-presets,accuracy-grid,validation-grid}.jsonl \
                 benchmarks/results/h100-{sweep-grid,lab-grid,lab-repeat}.jsonl

What is fitted is what the estimator cannot derive exactly (weights, LoRA parameters,
gradients and Adam state are exact). Two parts, two kinds of run:

- the graph terms (``--graph``): runs measured with the probe's default ``--in-flight
  bounded`` (or, in older results, ``MLX_MAX_OPS_PER_BUFFER=1 MLX_MAX_MB_PER_BUFFER=1`` set by
  hand: the same thing), where the peak is what the computation itself keeps. Non-negative
  least squares on relative error. Also printed: the least GRAPH_MARGIN under which the
  conservative estimate covers every graph run.
- the in-flight window (``--window``): runs with MLX's defaults (``--in-flight mlx``). With
  the graph terms fixed, the window's coefficients, the blocks it spans and its cap are
  fitted to minimise the mean plus half the max relative error of the whole estimate
  (Nelder-Mead from a grid of starts). The envelope (used by the conservative estimate) is
  the least window, by linear programming, that is at least every measured window.

Prints the CALIBRATION entry to paste into ``pytest_yourai/estimate.py`` and the errors.
``--holdout`` files are reported with the fitted coefficients but not fitted.
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
from scipy.optimize import linprog, minimize, nnls

from pytest_yourai.estimate import (
    BACKENDS,
    CALIBRATION,
    GB,
    GRAPH_TERMS,
    WINDOW_TERMS,
    calibration_features,
    estimate_training_memory,
    graph_bytes,
    lora_parameter_count,
    weight_bytes,
)


def load(
    paths: list[Path], backend: str, legacy_in_flight: str = "mlx", in_flight: str | None = None
) -> list[dict[str, Any]]:
    """Successful runs of ``backend``, one per (architecture, config): the last one wins.

    Results from before the probe's ``--in-flight`` get ``legacy_in_flight``; with
    ``in_flight`` set, runs of the other mode are left out."""
    records: dict[str, dict[str, Any]] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            record = json.loads(line)
            result = record.get("result", {})
            if result.get("status") == "ok" and result.get("backend") == backend:
                result["config"].setdefault("in_flight", legacy_in_flight)
                if in_flight is not None and result["config"]["in_flight"] != in_flight:
                    continue
                key = json.dumps([architecture(record["grid"]), result["config"]], sort_keys=True)
                records[key] = record
    return list(records.values())


def exact_bytes(record: dict[str, Any]) -> float:
    """Weights (from shapes) plus LoRA parameters, gradients and Adam: 16 bytes each."""
    arch, shape = architecture(record["grid"]), shape_of(record)
    weights = weight_bytes(arch, shape.bits, shape.group_size, shape.dtype)
    return weights + 16.0 * lora_parameter_count(arch, shape.lora_rank, shape.lora_layers)


def measured(record: dict[str, Any]) -> float:
    return float(record["result"]["train_peak_memory_gb"]) * GB


def features(record: dict[str, Any]) -> dict[str, float]:
    return calibration_features(architecture(record["grid"]), shape_of(record))


def fit_graph(records: list[dict[str, Any]]) -> dict[str, float]:
    x = np.array([[features(r)[t] for t in GRAPH_TERMS] for r in records])
    y = np.array([measured(r) for r in records])
    base = np.array([exact_bytes(r) for r in records])
    weight = 1.0 / y
    coef, _ = nnls(x * weight[:, None], (y - base) * weight)
    return dict(zip(GRAPH_TERMS, (float(c) for c in coef), strict=True))


def window_parts(
    records: list[dict[str, Any]], graph: dict[str, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(fixed bytes, per-block window features, blocks, measured) for each run."""
    fixed, per_block, blocks, y = [], [], [], []
    for r in records:
        f = features(r)
        fixed.append(exact_bytes(r) + graph_bytes(f, graph))
        per_block.append([f[t] for t in WINDOW_TERMS])
        blocks.append(f["blocks"])
        y.append(measured(r))
    return np.array(fixed), np.array(per_block), np.array(blocks), np.array(y)


def window_prediction(params: np.ndarray, per_block: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    coef = np.abs(params[: len(WINDOW_TERMS)])
    span, cap = abs(params[-2]), abs(params[-1]) * GB
    return np.minimum(np.minimum(blocks, span) * (per_block @ coef), cap)


def fit_window(
    records: list[dict[str, Any]], graph: dict[str, float]
) -> tuple[dict[str, float], np.ndarray]:
    fixed, per_block, blocks, y = window_parts(records, graph)

    def loss(params: np.ndarray) -> float:
        error = np.abs(fixed + window_prediction(params, per_block, blocks) - y) / y
        return float(error.mean() + 0.5 * error.max())

    best = None
    for span in (8.0, 16.0, 32.0, 64.0):
        for cap in (8.0, 12.0, 16.0):
            for scale in (2.0, 8.0):
                start = np.array([scale, scale / 2, scale * 2, scale / 2, 100.0, span, cap])
                result = minimize(loss, start, method="Nelder-Mead", options={"maxiter": 6000})
                if best is None or result.fun < best.fun:
                    best = result
    assert best is not None
    params = np.abs(best.x)
    fitted = {f"window_{t}": float(c) for t, c in zip(WINDOW_TERMS, params, strict=False)}
    fitted["window_blocks"] = float(params[-2])
    fitted["window_cap_gb"] = float(params[-1])
    return fitted, params


def fit_envelope(
    records: list[dict[str, Any]], graph: dict[str, float], span: float, margin: float
) -> dict[str, float]:
    """The least (summed) window that is at least every measured one."""
    fixed, per_block, blocks, y = window_parts(records, graph)
    spanned = np.minimum(blocks, span)[:, None] * per_block
    # Each run's window beyond its graph terms (with the conservative margin on those).
    graph_only = fixed - np.array([exact_bytes(r) for r in records])
    need = y - fixed - graph_only * (margin - 1.0)
    result = linprog(
        spanned.sum(axis=0) / y.mean(),
        A_ub=-spanned,
        b_ub=-np.maximum(need, 0.0),
        bounds=[(0, None)] * len(WINDOW_TERMS),
        method="highs",
    )
    if not result.success:
        raise SystemExit(f"envelope fit failed: {result.message}")
    envelope = {f"envelope_{t}": float(c) for t, c in zip(WINDOW_TERMS, result.x, strict=True)}
    envelope["envelope_cap_gb"] = float(np.ceil(max(need) / GB + 1.0))
    return envelope


def report(
    name: str, records: list[dict[str, Any]], backend: str, coefficients: dict[str, float]
) -> None:
    saved = CALIBRATION[backend]
    CALIBRATION[backend] = coefficients
    try:
        errors, under = [], 0
        for r in records:
            est = estimate_training_memory(architecture(r["grid"]), shape_of(r))
            m = measured(r) / GB
            errors.append((est.estimated_base_gb - m) / m * 100)
            under += est.estimated_conservative_gb < m
    finally:
        CALIBRATION[backend] = saved
    print(
        f"{name}: {len(records)} runs, median |e| {statistics.median(map(abs, errors)):.1f}%, "
        f"max |e| {max(map(abs, errors)):.1f}%, conservative below measured {under}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", required=True, choices=BACKENDS)
    parser.add_argument("--graph", type=Path, nargs="+", required=True)
    parser.add_argument("--window", type=Path, nargs="*", default=[])
    parser.add_argument("--holdout", type=Path, nargs="*", default=[])
    parser.add_argument("--margin", type=float, default=1.1, help="GRAPH_MARGIN of the backend")
    args = parser.parse_args()
    graph_runs = load(args.graph, args.backend, "bounded", "bounded")
    if len(graph_runs) < len(GRAPH_TERMS):
        parser.error(f"need at least {len(GRAPH_TERMS)} graph runs, found {len(graph_runs)}")
    coefficients = dict(CALIBRATION[args.backend])
    coefficients.update(fit_graph(graph_runs))
    window_runs = load(args.window, args.backend, "mlx", "mlx")
    if window_runs:
        fitted, params = fit_window(window_runs, coefficients)
        coefficients.update(fitted)
        coefficients.update(fit_envelope(window_runs, coefficients, params[-2], args.margin))
    else:  # no window on this backend's runs: none in the estimate either
        for t in WINDOW_TERMS:
            coefficients[f"window_{t}"] = coefficients[f"envelope_{t}"] = 0.0
    print(f"CALIBRATION[{args.backend!r}] = {{")
    for key, value in coefficients.items():
        print(f'    "{key}": {value:.4g},')
    print("}")
    shut = {f"{p}_{t}": 0.0 for p in ("window", "envelope") for t in WINDOW_TERMS}
    report("graph runs (in flight: bounded)", graph_runs, args.backend, {**coefficients, **shut})
    least = max(
        (measured(r) - exact_bytes(r)) / graph_bytes(features(r), coefficients) for r in graph_runs
    )
    print(f"least GRAPH_MARGIN covering every graph run: {least:.3f}")
    if window_runs:
        report("window runs (MLX defaults)", window_runs, args.backend, coefficients)
    held = load(args.holdout, args.backend, "bounded")
    if held:
        report("held out", held, args.backend, coefficients)
    return 0


if __name__ == "__main__":
    sys.exit(main())
