"""Fit the estimator's per-backend coefficients to probe measurements.

    cd benchmarks && python calibrate_estimator.py --backend cuda \
        --graph results/h100-window-shut-grid.jsonl \
                results/h100-holdout-bounded-sequential.jsonl results/h100-gc-lab.jsonl
    cd benchmarks && python calibrate_estimator.py --backend cuda --footprint \
        results/h200-footprint-bounded.jsonl results/h200-footprint-alone.jsonl --write

What is fitted is what the estimator cannot derive exactly (weights, LoRA parameters,
gradients and Adam state are exact):

- the graph terms (``--graph``): runs measured with the probe's default ``--in-flight
  bounded`` (or, in older results, ``MLX_MAX_OPS_PER_BUFFER=1 MLX_MAX_MB_PER_BUFFER=1`` set by
  hand: the same thing), where the peak is what the computation itself keeps. Non-negative
  least squares on relative error. Also printed: the least GRAPH_MARGIN under which the
  conservative estimate covers every graph run.
- the in-flight window (``--window``): runs with MLX's defaults (``--in-flight mlx``). With
  the graph terms fixed, the window's scale and cap per kind of run and the power on the
  adapted blocks are fitted by least squares on the relative error of the whole MLX peak
  (from a grid of starts). The envelope (used by the conservative estimate) adds the least
  GB, and the least share of the window, that cover every measured run (fit_envelope).
- the backend overhead (``--footprint``, ``--footprint-mlx``): runs with the probe's
  footprint fields. The window's conservative cache share is fitted on the envelope
  (fit_window_cover), so a command with ``--window`` and ``--footprint`` fits both.

Prints the fitted coefficients and the errors; nothing is written unless ``--write`` is given,
which stores the fit in ``pytest_yourai/calibration.json``, the package data the estimator
loads (CALIBRATION, BACKEND_OVERHEAD, the envelope): no coefficient is pasted by hand.
``benchmarks/results/manifest.json`` ("calibration") lists the commands that made the
committed file, in order. ``--holdout`` files are reported with the fitted coefficients but
not fitted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
from estimate_accuracy import shape_of
from results_io import architecture, as_probe_record, canonical, read_records
from scipy.optimize import least_squares, nnls

from pytest_yourai.estimator import (
    BACKEND_OVERHEAD,
    CALIBRATION,
    CALIBRATION_FILE,
    CHECKPOINT_MARGIN,
    ENVELOPE_GB,
    ENVELOPE_SHARE,
    GB,
    GRAPH_MARGIN,
    GRAPH_TERMS,
    WINDOW_CLASSES,
    calibration_features,
    estimate_training_memory,
    graph_bytes,
    is_mixture_of_experts,
    lora_parameter_count,
    weight_bytes,
    window_bytes,
    window_class,
    window_envelope,
)
from pytest_yourai.fields import BACKENDS
from pytest_yourai.preflight import estimate_with_census


def load(
    paths: list[Path],
    backend: str,
    legacy_in_flight: str = "mlx",
    in_flight: str | None = None,
    moe: bool = False,
) -> list[dict[str, Any]]:
    """Successful runs of ``backend``, one per (architecture, config): the last one wins.

    Results from before the probe's ``--in-flight`` get ``legacy_in_flight``; with
    ``in_flight`` set, runs of the other mode are left out."""
    records: dict[str, dict[str, Any]] = {}
    for found in read_records(paths):
        record = as_probe_record(found)
        if record is None:
            continue
        result = record.get("result", {})
        if (
            result.get("status") == "ok"
            and result.get("backend") == backend
            and is_mixture_of_experts(architecture(record["grid"])) == moe
        ):
            result["config"].setdefault("in_flight", legacy_in_flight)
            if in_flight is not None and result["config"]["in_flight"] != in_flight:
                continue
            key = canonical([architecture(record["grid"]), result["config"]])
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


WINDOW_PARAMS = (
    *(f"window_{kind}_scale" for kind in WINDOW_CLASSES),
    *(f"window_{kind}_cap_gb" for kind in WINDOW_CLASSES),
    "window_layers_power",
)


def fit_window(records: list[dict[str, Any]], coefficients: dict[str, float]) -> dict[str, float]:
    """The window's parameters (estimate.window_bytes) that minimise the relative error of
    the whole MLX peak over runs with MLX's defaults, the graph terms held fixed. Kinds of
    run with no data keep their current values."""
    fixed = np.array([exact_bytes(r) + graph_bytes(features(r), coefficients) for r in records])
    y = np.array([measured(r) for r in records])
    kinds = sorted({window_class(shape_of(r)) for r in records})
    free = [f"window_{kind}_{part}" for kind in kinds for part in ("scale", "cap_gb")]
    free.append("window_layers_power")

    def predicted(values: np.ndarray) -> np.ndarray:
        trial = {**coefficients, **dict(zip(free, np.abs(values), strict=True))}
        return np.array(
            [window_bytes(architecture(r["grid"]), shape_of(r), trial) for r in records]
        )

    def residuals(values: np.ndarray) -> np.ndarray:
        return (fixed + predicted(values) - y) / y

    best = None
    for cap in (8.0, 11.0, 16.0):
        for scale in (2.0, 6.0, 10.0):
            start = np.array(
                [
                    cap if n.endswith("_cap_gb") else scale if n.endswith("_scale") else 0.3
                    for n in free
                ]
            )
            result = least_squares(residuals, start)
            if best is None or result.cost < best.cost:
                best = result
    assert best is not None
    fitted = {n: round(float(abs(v)), 4) for n, v in zip(free, best.x, strict=True)}
    for kind in WINDOW_CLASSES:
        plain = kind.removesuffix("_checkpoint")
        if kind != plain and kind not in kinds and plain in kinds:
            for part in ("scale", "cap_gb"):
                fitted[f"window_{kind}_{part}"] = fitted[f"window_{plain}_{part}"]
    return fitted


def fit_envelope(
    records: list[dict[str, Any]], coefficients: dict[str, float]
) -> tuple[dict[str, float], dict[str, float]]:
    """Per kind of run (window_class), what the window's envelope (estimator.window_envelope)
    adds to the window: the least GB, and the least share of the window, that, with the graph
    terms times their conservative margin, cover every run with MLX's defaults, plus 5% for
    shapes not measured. Kinds with no runs take the largest."""
    gb: dict[str, float] = {}
    share: dict[str, float] = {}
    for r in records:
        arch, shape = architecture(r["grid"]), shape_of(r)
        margin = CHECKPOINT_MARGIN if shape.grad_checkpoint else GRAPH_MARGIN[shape.backend]
        rest = measured(r) - exact_bytes(r) - graph_bytes(features(r), coefficients) * margin
        window = window_bytes(arch, shape, coefficients)
        if window <= 0:
            continue
        kind = window_class(shape)
        short = max(rest - window, 0.0)
        gb[kind] = max(gb.get(kind, 0.0), short / GB)
        share[kind] = max(share.get(kind, 0.0), short / window)

    def widen(needs: dict[str, float]) -> dict[str, float]:
        largest = max(needs.values(), default=0.0)
        return {kind: round(needs.get(kind, largest) * 1.05, 3) for kind in WINDOW_CLASSES}

    return widen(gb), widen(share)


def fit_window_cover(
    records: list[dict[str, Any]],
    coefficients: dict[str, float],
    envelope: tuple[dict[str, float], dict[str, float]],
    overhead: dict[str, float],
) -> float:
    """``cache_window_conservative``: the least share of the window's envelope that, with the
    rest of the conservative footprint estimate, covers the footprint of every run with MLX's
    defaults (10% to spare), and never less than the typical share."""
    share = overhead.get("cache_window", 0.0)
    for r in records:
        arch, shape = architecture(r["grid"]), shape_of(r)
        window = window_bytes(arch, shape, coefficients)
        if shape.in_flight != "mlx" or window <= 0:
            continue
        most = window_envelope(window, shape, *envelope)
        graph = graph_bytes(features(r), coefficients)
        margin = CHECKPOINT_MARGIN if shape.grad_checkpoint else GRAPH_MARGIN[shape.backend]
        cache = "cache_checkpoint" if shape.grad_checkpoint else "cache"
        rest = (
            exact_bytes(r)
            + graph * (margin + overhead[cache + "_conservative"])
            + overhead["process_conservative_gb"] * GB
            + most
        )
        footprint = float(r["result"]["train_footprint_gb"]) * GB
        share = max(share, (footprint - rest) / most * 1.1)
    return round(share, 4)


def overhead_parts(record: dict[str, Any]) -> dict[str, float | None]:
    """Of one run, in bytes: the footprint beyond MLX's peak, the step's graph memory and
    in-flight window (the window as measured: MLX's peak above the exact state and the
    estimated graph), and what the process held outside the allocator's pool (CUDA only)."""
    result = record["result"]
    graph = graph_bytes(features(record), CALIBRATION[result["backend"]])
    window = 0.0
    shape = shape_of(record)
    coefficients = CALIBRATION[result["backend"]]
    if shape.in_flight == "mlx" and window_bytes(architecture(record["grid"]), shape, coefficients):
        window = max(measured(record) - exact_bytes(record) - graph, 0.0)
    outside = (result.get("footprint_parts_gb") or {}).get("train", {}).get("outside_pool")
    return {
        "beyond": float(result["train_footprint_gb"]) * GB - measured(record),
        "graph": max(measured(record) - exact_bytes(record) - window, 0.0),
        "window": window,
        "outside": None if outside is None else float(outside) * GB,
        "checkpoint": float(bool(result["config"].get("grad_checkpoint"))),
    }


def fit_backend_overhead(records: list[dict[str, Any]]) -> dict[str, float]:
    """BACKEND_OVERHEAD from footprint runs.

    ``process_gb``: the median of what runs held outside MLX's arrays where the backend
    says so (CUDA: outside the memory pool), else the intercept of a least-squares fit.
    The graph shares (``cache``, ``cache_checkpoint``): medians of (beyond - process) /
    graph over runs with one op in flight; the window share: the median of what is left
    over the window in runs with MLX's defaults. The conservative terms cover every run,
    with 10% to spare (the window's: fit_window_cover)."""
    parts = [overhead_parts(r) for r in records]
    outside = [float(p["outside"]) for p in parts if p["outside"] is not None]
    if outside:
        process = statistics.median(outside)
    else:
        x = np.array([[1.0, float(p["graph"])] for p in parts if not p["window"]])
        y = np.array([float(p["beyond"]) for p in parts if not p["window"]])
        process = float(max(nnls(x, y)[0][0], 0.0)) if len(y) else 0.0
    cover = (max(outside) if outside else process) + 0.05 * GB
    fitted: dict[str, float] = {
        "process_gb": round(process / GB, 4),
        "process_conservative_gb": round(cover / GB, 4),
    }
    for kind, checkpoint in (("cache", 0.0), ("cache_checkpoint", 1.0)):
        runs = [p for p in parts if p["checkpoint"] == checkpoint and not p["window"]]
        runs = [p for p in runs if float(p["graph"] or 0) > 0]
        if runs:
            shares = [max(float(p["beyond"]) - process, 0.0) / float(p["graph"]) for p in runs]
            covers = [max(float(p["beyond"]) - cover, 0.0) / float(p["graph"]) for p in runs]
            fitted[kind] = round(statistics.median(shares), 4)
            fitted[kind + "_conservative"] = round(max(max(covers), fitted[kind]) * 1.1, 4)
    window_runs = [p for p in parts if float(p["window"] or 0) > 0]
    if window_runs:
        shares = []
        for p in window_runs:
            kind = "cache_checkpoint" if p["checkpoint"] else "cache"
            rest = float(p["beyond"]) - process - fitted.get(kind, 0.0) * float(p["graph"])
            shares.append(max(rest, 0.0) / float(p["window"]))
        fitted["cache_window"] = round(statistics.median(shares), 4)
    return fitted


def footprint_report(name: str, records: list[dict[str, Any]]) -> None:
    """The estimate (footprint) and MLX's peak against what the runs measured."""
    base_errors, peak_errors, under, ratios = [], [], 0, []
    for r in records:
        est = estimate_with_census(architecture(r["grid"]), shape_of(r))
        footprint = float(r["result"]["train_footprint_gb"])
        base_errors.append((est.estimated_base_gb - footprint) / footprint * 100)
        peak_errors.append((est.mlx_peak_gb - measured(r) / GB) / (measured(r) / GB) * 100)
        under += est.estimated_conservative_gb < footprint
        ratios.append(est.estimated_conservative_gb / footprint)
    print(
        f"{name}: {len(records)} runs | footprint: median |e| "
        f"{statistics.median(map(abs, base_errors)):.1f}%, max {max(map(abs, base_errors)):.1f}%, "
        f"conservative below {under}, conservative/measured {min(ratios):.2f}-{max(ratios):.2f} | "
        f"MLX peak: median |e| {statistics.median(map(abs, peak_errors)):.1f}%, "
        f"max {max(map(abs, peak_errors)):.1f}%"
    )


_CENSUS: dict[str, Any] = {}


def census_of(record: dict[str, Any]) -> Any:
    """The record's model census (census.py), taken once per model and quantization."""
    from pytest_yourai.census import census_for, census_key

    arch, shape = architecture(record["grid"]), shape_of(record)
    key = census_key(arch, shape.bits, shape.group_size, shape.dtype)
    if key not in _CENSUS:
        _CENSUS[key] = census_for(arch, shape.bits, shape.group_size, shape.dtype)
    return _CENSUS[key]


def moe_report(name: str, records: list[dict[str, Any]]) -> None:
    """MLX's peak and the footprint of mixture-of-experts runs against the estimate."""
    for r in records:
        est = estimate_training_memory(architecture(r["grid"]), shape_of(r), census_of(r))
        peak = measured(r) / GB
        footprint = float(r["result"]["train_footprint_gb"])
        print(
            f"  {r['name']:<20} {r['result']['config']['in_flight']:<7} MLX peak {peak:6.2f} "
            f"est {est.mlx_peak_gb:6.2f} ({(est.mlx_peak_gb - peak) / peak * 100:+5.1f}%) "
            f"footprint {footprint:6.2f} est {est.estimated_base_gb:6.2f} "
            f"({(est.estimated_base_gb - footprint) / footprint * 100:+5.1f}%), conservative "
            f"{est.estimated_conservative_gb:6.2f}"
        )
    print(name)


def fit_moe(records: list[dict[str, Any]], coefficients: dict[str, float]) -> dict[str, float]:
    """``moe_gather``: what the graph keeps beyond the other terms per token, expert and
    hidden width in mixture-of-experts blocks (the tokens gathered to their experts and
    scattered back), least squares on the runs' residuals."""
    xs, ys = [], []
    for r in records:
        census = census_of(r)
        arch, shape = architecture(r["grid"]), shape_of(r)
        feats = calibration_features(arch, shape, census)
        est = estimate_training_memory(arch, shape, census)
        fixed = est.mlx_peak_gb * GB - coefficients.get("moe_gather", 0.0) * feats["moe_gather"]
        xs.append(feats["moe_gather"])
        ys.append(measured(r) - fixed)
    x, y = np.array(xs), np.array(ys)
    return {"moe_gather": round(max(float(x @ y / (x @ x)), 0.0), 4)}


def write_calibration(
    backend: str,
    graph: dict[str, float] | None,
    overhead: dict[str, float],
    envelope: tuple[dict[str, float], dict[str, float]] | None,
) -> None:
    """Store the fitted coefficients in the estimator's package data."""
    data = json.loads(CALIBRATION_FILE.read_text(encoding="utf-8"))
    data.pop("envelope_margin", None)  # the envelope of earlier fits: a factor only
    if envelope is not None:
        data["envelope_gb"], data["envelope_share"] = envelope
    if graph is not None:
        data["graph"][backend] = {k: round(v, 6) for k, v in graph.items()}
    data["backend_overhead"][backend] = {**data["backend_overhead"].get(backend, {}), **overhead}
    CALIBRATION_FILE.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    print(f"written: {CALIBRATION_FILE}")


def report(
    name: str, records: list[dict[str, Any]], backend: str, coefficients: dict[str, float]
) -> None:
    saved = CALIBRATION[backend]
    CALIBRATION[backend] = coefficients
    try:
        errors, under = [], 0
        for r in records:
            est = estimate_with_census(architecture(r["grid"]), shape_of(r))
            m = measured(r) / GB
            errors.append((est.mlx_peak_gb - m) / m * 100)
            under += est.mlx_peak_conservative_gb < m
    finally:
        CALIBRATION[backend] = saved
    print(
        f"{name}: {len(records)} runs, median |e| {statistics.median(map(abs, errors)):.1f}%, "
        f"max |e| {max(map(abs, errors)):.1f}%, conservative below measured {under}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", required=True, choices=BACKENDS)
    parser.add_argument("--graph", type=Path, nargs="*", default=[])
    parser.add_argument("--window", type=Path, nargs="*", default=[])
    parser.add_argument(
        "--footprint",
        type=Path,
        nargs="*",
        default=[],
        help="runs with the probe's footprint fields: fit the backend overhead",
    )
    parser.add_argument(
        "--footprint-mlx",
        type=Path,
        nargs="*",
        default=[],
        help="as --footprint, but only the runs with MLX's defaults (the window's cache share); "
        "their other runs stay held out",
    )
    parser.add_argument("--holdout", type=Path, nargs="*", default=[])
    parser.add_argument(
        "--moe",
        type=Path,
        nargs="*",
        default=[],
        help="runs of mixture-of-experts models: fit moe_gather (one op in flight)",
    )
    parser.add_argument(
        "--moe-holdout",
        nargs="*",
        default=[],
        help="model types of --moe runs left out of the fit and reported as held out",
    )
    parser.add_argument("--margin", type=float, default=1.1, help="GRAPH_MARGIN of the backend")
    parser.add_argument(
        "--write", action="store_true", help="store the fit in pytest_yourai/calibration.json"
    )
    args = parser.parse_args()
    coefficients = dict(CALIBRATION[args.backend])
    graph_runs = load(args.graph, args.backend, "bounded", "bounded")
    fitted_graph = bool(graph_runs)
    if graph_runs:
        if len(graph_runs) < len(GRAPH_TERMS):
            parser.error(f"need at least {len(GRAPH_TERMS)} graph runs, found {len(graph_runs)}")
        coefficients.update(fit_graph(graph_runs))
    window_runs = load(args.window, args.backend, "mlx", "mlx")
    envelope = None
    if window_runs:
        coefficients.update(fit_window(window_runs, coefficients))
        envelope = fit_envelope(window_runs, coefficients)
        print(f"envelope above the window, GB and share: {envelope[0]} {envelope[1]}")
        fitted_graph = True
    moe_runs = [
        r
        for r in load(args.moe, args.backend, "bounded", moe=True)
        if "train_footprint_gb" in r["result"]
    ]
    if moe_runs:
        fit_runs = [
            r for r in moe_runs if architecture(r["grid"])["model_type"] not in args.moe_holdout
        ]
        CALIBRATION[args.backend].update(coefficients)
        coefficients.update(
            fit_moe([r for r in fit_runs if shape_of(r).in_flight == "bounded"], coefficients)
        )
        print(f"moe_gather: {coefficients['moe_gather']}")
        fitted_graph = True
    print(f"graph terms ({args.backend}): {json.dumps(coefficients)}")
    shut = {f"window_{kind}_cap_gb": 0.0 for kind in WINDOW_CLASSES}
    if graph_runs:
        report(
            "graph runs (in flight: bounded)", graph_runs, args.backend, {**coefficients, **shut}
        )
        least = max(
            (measured(r) - exact_bytes(r)) / graph_bytes(features(r), coefficients)
            for r in graph_runs
        )
        print(f"least GRAPH_MARGIN covering every graph run: {least:.3f}")
    footprint_runs = [
        r
        for r in load(args.footprint, args.backend, "mlx")
        + load(args.footprint_mlx, args.backend, "mlx", "mlx")
        if "train_footprint_gb" in r["result"]
    ]
    overhead = dict(BACKEND_OVERHEAD[args.backend])
    if footprint_runs:
        overhead.update(fit_backend_overhead(footprint_runs))
        overhead["cache_window_conservative"] = fit_window_cover(
            footprint_runs, coefficients, envelope or (ENVELOPE_GB, ENVELOPE_SHARE), overhead
        )
        print(f"backend overhead ({args.backend}): {json.dumps(overhead)}")
    saved = dict(CALIBRATION[args.backend]), dict(BACKEND_OVERHEAD[args.backend])
    saved_envelope = dict(ENVELOPE_GB), dict(ENVELOPE_SHARE)
    CALIBRATION[args.backend].update(coefficients)
    BACKEND_OVERHEAD[args.backend].update(overhead)
    if envelope is not None:
        ENVELOPE_GB.update(envelope[0])
        ENVELOPE_SHARE.update(envelope[1])
    try:
        if window_runs:
            report("window runs (MLX defaults)", window_runs, args.backend, coefficients)
        if footprint_runs:
            for mode in ("bounded", "mlx"):
                runs = [r for r in footprint_runs if r["result"]["config"]["in_flight"] == mode]
                if runs:
                    footprint_report(f"footprint runs, in flight {mode}", runs)
        held = [r for r in load(args.holdout, args.backend, "bounded")]
        for mode in ("bounded", "mlx"):
            runs = [r for r in held if r["result"]["config"]["in_flight"] == mode]
            with_footprint = [r for r in runs if "train_footprint_gb" in r["result"]]
            if with_footprint:
                footprint_report(f"held out, in flight {mode}", with_footprint)
            elif runs:
                report(f"held out, in flight {mode}", runs, args.backend, coefficients)
        if moe_runs:
            held_types = set(args.moe_holdout)
            moe_report(
                "mixture-of-experts runs, fitted",
                [r for r in moe_runs if architecture(r["grid"])["model_type"] not in held_types],
            )
            moe_report(
                f"mixture-of-experts runs, held out ({', '.join(sorted(held_types))})",
                [r for r in moe_runs if architecture(r["grid"])["model_type"] in held_types],
            )
    finally:
        CALIBRATION[args.backend].clear()
        CALIBRATION[args.backend].update(saved[0])
        BACKEND_OVERHEAD[args.backend].clear()
        BACKEND_OVERHEAD[args.backend].update(saved[1])
        for table, kept in zip((ENVELOPE_GB, ENVELOPE_SHARE), saved_envelope, strict=True):
            table.clear()
            table.update(kept)
    if args.write:
        write_calibration(args.backend, coefficients if fitted_graph else None, overhead, envelope)
    return 0


if __name__ == "__main__":
    sys.exit(main())
