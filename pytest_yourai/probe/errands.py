"""The probe's short jobs, each one result line: the device (``--device-info``), the matmul
throughput (``--measure-throughput``), a census (``--census``, ``--census-batch``), a
parameter count (``--count-only``) and the data's batch shapes (``--data-batches``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import mlx.core as mx

from pytest_yourai.fields import DEFAULT_BITS, DEFAULT_GROUP_SIZE
from pytest_yourai.probe.build import build_model, count_parameters
from pytest_yourai.probe.shared import EXIT_ERROR, EXIT_OK, MemoryCap, emit_result
from pytest_yourai.probe.spec import spec_or_exit


def backend_name(core: Any = mx) -> str:
    device = core.default_device()
    if device.type == core.cpu:
        return "cpu"
    if sys.platform == "darwin":
        return "metal"
    return "cuda"


def device_info(core: Any = mx) -> dict[str, Any]:
    """What MLX says about the device: ``mx.device_info()`` on mlx >= 0.30, else
    ``mx.metal.device_info()`` (Metal only, deprecated since), else nothing."""
    info: dict[str, Any] = {}
    if hasattr(core, "device_info"):
        info = dict(core.device_info())
    elif hasattr(core, "metal") and core.metal.is_available():
        info = dict(core.metal.device_info())
    info["backend"] = backend_name(core)
    return {k: (v if isinstance(v, int | float | str | bool) else str(v)) for k, v in info.items()}


def measure_throughput(spec: dict[str, Any]) -> dict[str, Any]:
    """GFLOP/s of this backend's (quantized) matmul at the run's dtype and bits."""
    dtype = getattr(mx, spec.get("dtype", "float32"))
    bits = int(spec.get("bits", 16))
    dim, tokens = 512, 256
    x = mx.random.normal((tokens, dim)).astype(dtype)
    w = mx.random.normal((dim, dim)).astype(dtype)
    if bits < 16:
        wq, scales, biases = mx.quantize(w, group_size=64, bits=bits)
        mx.eval(x, wq, scales, biases)

        def op() -> mx.array:
            return mx.quantized_matmul(
                x, wq, scales, biases, transpose=True, group_size=64, bits=bits
            )
    else:
        mx.eval(x, w)

        def op() -> mx.array:
            return x @ w.T

    mx.eval(op())
    runs, started = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - started < 0.3:
        mx.eval(op())
        runs += 1
    seconds = (time.perf_counter() - started) / runs
    return {"gflops": round(2.0 * tokens * dim * dim / seconds / 1e9, 3)}


def errand(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int | None:
    """The short jobs: device info, a census, a parameter count, the matmul throughput, the
    data's batch shapes; None when asked for none of them (then: a training run)."""
    if args.device_info:
        emit_result({"status": "ok", **device_info()})
        return EXIT_OK
    if args.data_batches is not None:
        from pytest_yourai.probe.data import data_batches_line

        return data_batches_line(args.data_batches)
    if args.census_batch is not None:
        for spec in json.loads(args.census_batch.read_text()):
            spec = {"group_size": DEFAULT_GROUP_SIZE, "bits": DEFAULT_BITS, "dtype": "bfloat16",
                    **spec}  # fmt: skip
            census_line(spec)
        return EXIT_OK
    if args.census:
        return census_line(spec_or_exit(args, parser))
    if args.count_only:
        spec = spec_or_exit(args, parser)
        model, _ = build_model({**spec, "weights": "synthetic"}, MemoryCap(None), evaluate=False)
        count = count_parameters(model)
        emit_result({"status": "ok", "preset": spec.get("preset"), "total_parameters": count})
        return EXIT_OK
    if args.measure_throughput:
        # Needs no model: a matmul at the run's dtype and bits.
        spec = {"dtype": args.dtype or "float32", "bits": args.bits or 16}
        emit_result({"status": "ok", "backend": backend_name(), **measure_throughput(spec)})
        return EXIT_OK
    return None


def census_line(spec: dict[str, Any]) -> int:
    from pytest_yourai.probe.census import model_census

    try:
        emit_result({"status": "ok", "census": model_census(spec)})
    except (Exception, SystemExit) as exc:  # mlx-lm cannot build it (some modules exit)
        emit_result({"status": "error", "error": f"{type(exc).__name__}: {exc}"})
        return EXIT_ERROR
    return EXIT_OK
