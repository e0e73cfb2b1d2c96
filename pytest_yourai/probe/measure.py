"""A training run, measured: the phases (setup, build, lora, train, done), MLX's peaks per
phase, the steps' times, the footprint, and the one result line whatever happens."""

from __future__ import annotations

import platform
import statistics
import sys
import time
import traceback
from typing import Any

import mlx.core as mx

from pytest_yourai.footprint import FootprintMeter, source_for
from pytest_yourai.probe.build import build_model, count_parameters
from pytest_yourai.probe.errands import backend_name, device_info
from pytest_yourai.probe.meter import CUDA_METER
from pytest_yourai.probe.shared import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_OOM,
    MemoryCap,
    SetupError,
    classify_failure,
    emit_result,
    gb,
    one_line,
    process_peak_rss_gb,
    say,
)
from pytest_yourai.probe.spec import ECHOED_SPEC, apply_in_flight, setup_problem
from pytest_yourai.probe.train import Trained, make_trainable, train_steps
from pytest_yourai.protocol import built_line


class Phase:
    """Where the probe is: reported with every failure, and the footprint meter's phase
    (the build and LoRA attachment are "build", the steps "train")."""

    def __init__(self, meter: FootprintMeter | None = None) -> None:
        self.name = "start"
        self.meter = meter
        self.started_at: dict[str, float] = {}  # wall clock, to line up outside samplers

    def enter(self, name: str) -> None:
        self.name = name
        self.started_at[name] = round(time.time(), 3)
        if self.meter is not None:
            if name == "build":
                self.meter.start("build")
            elif name == "train":
                self.meter.phase("train")

    def footprint(self) -> dict[str, Any]:
        """The footprint fields so far (the meter stops)."""
        return self.meter.stop() if self.meter is not None and self.meter.started else {}


def run_probe(spec: dict[str, Any], phase: Phase) -> dict[str, Any]:
    """Refuse what cannot run, build the model, make it trainable, train with mlx-lm's
    trainer; the measurements (MLX's peaks per phase, the steps' times, the footprint)."""
    if spec.get("lora_run") is not None or spec.get("batch_shapes") or "val_batch_shapes" in spec:
        phase.enter("setup")
        problem = setup_problem(spec)
        if problem is not None:
            raise SetupError(problem)
    cap = MemoryCap(spec.get("memory_limit_gb"))
    run = spec.get("lora_run") or {}
    say(
        f"probe: {spec.get('preset', '?')} backend={backend_name()} dtype={spec['dtype']} "
        f"bits={spec['bits']} batch={spec['batch_size']} seq={spec['seq_len']} "
        f"rank={spec['lora_rank']} layers={spec['lora_layers']} steps={spec['steps']}"
        + (f" fine_tune={run['fine_tune_type']} optimizer={run['optimizer']}" if run else "")
    )
    phase.enter("build")
    build_started = time.perf_counter()
    model, weights_source = build_model(spec, cap)
    total_parameters = count_parameters(model)
    say(built_line(total_parameters, time.perf_counter() - build_started))
    phase.enter("lora")
    trainable = make_trainable(model, spec)
    resident, load_peak = mx.get_active_memory(), mx.get_peak_memory()
    cap.check(load_peak)
    say(f"resident {gb(resident):.3f} GB, load peak {gb(load_peak):.3f} GB, trainable {trainable}")
    phase.enter("train")
    mx.reset_peak_memory()
    trained = train_steps(model, spec, cap, weights_source)
    train_peak = trained.phase_peak()
    phase.enter("done")
    peaks = trained.step_peaks
    peak_growth = len(peaks) >= 2 and peaks[-1] > peaks[-2] * 1.005
    if peak_growth:
        say("warning: the peak still rose at the last step; more --steps may show a higher peak")
    return {
        "weights": weights_source,
        "peak_memory_gb": gb(max(load_peak, train_peak)),
        "load_peak_memory_gb": gb(load_peak),
        "train_peak_memory_gb": gb(train_peak),
        "resident_memory_gb": gb(resident),
        "steps": len(trained.step_seconds),
        "step_seconds": [round(s, 4) for s in trained.step_seconds],
        "tokens_per_second": tokens_per_second(spec, trained),
        "trainable_parameters": trainable,
        "total_parameters": total_parameters,
        "peak_growth": peak_growth,
        "phase_started_at": phase.started_at,
        **what_ran(spec, trained),
        **phase.footprint(),
    }


def tokens_per_second(spec: dict[str, Any], trained: Trained) -> float:
    """Tokens the model saw per second of steps, the first (compiling) step left out."""
    seconds = trained.step_seconds
    steady = seconds[1:] or seconds
    if not steady:
        return 0.0
    if not spec.get("batch_shapes"):
        tokens_per_step = int(spec["batch_size"]) * int(spec["seq_len"])
        return round(tokens_per_step / statistics.median(steady), 2)
    tokens = [rows * (width - 1) for rows, width in trained.batch_shapes]
    counted = tokens[1:] if len(seconds) > 1 else tokens
    return round(sum(counted[: len(steady)]) / sum(steady), 2)


def what_ran(spec: dict[str, Any], trained: Trained) -> dict[str, Any]:
    """The run as it went: fine-tune type, optimizer, batch shapes, validation peaks."""
    run = spec.get("lora_run") or {}
    fields: dict[str, Any] = {
        "fine_tune_type": run.get("fine_tune_type", "lora"),
        "optimizer": str(run.get("optimizer", "adam")).lower(),
        "batch_shapes_run": trained.batch_shapes,
        "step_peak_memory_gb": gb(max(trained.step_peaks, default=0)),
    }
    if run:
        fields["grad_accumulation_steps"] = int(run["grad_accumulation_steps"])
    if trained.validations:
        fields.update(
            val_batch_shapes_run=trained.val_batch_shapes,
            validations=trained.validations,
            val_peak_memory_gb=gb(trained.val_peak),
        )
    return fields


def measure(spec: dict[str, Any]) -> int:
    """A training run, measured; one result line whatever happens."""
    buffer_env = apply_in_flight(spec["in_flight"])
    info = device_info()
    phase = Phase(FootprintMeter(source_for(str(info["backend"]), CUDA_METER)))
    base: dict[str, Any] = {
        "backend": info["backend"],
        "device_name": str(info.get("device_name", platform.machine())),
        "mlx_version": str(getattr(mx, "__version__", "?")),
        "config": {k: spec[k] for k in ECHOED_SPEC if k in spec},
        "mlx_buffer_env": buffer_env,
    }
    try:
        measured = run_probe(spec, phase)
    except Exception as exc:  # every failure becomes a result line, never a bare traceback
        status = classify_failure(exc)
        if not isinstance(exc, SetupError):
            traceback.print_exc(file=sys.stderr)
        message = one_line(exc)
        say(f"{status} in phase {phase.name}: {message}")
        emit_result(
            {
                **base,
                "status": status,
                "phase": phase.name,
                "error": f"{type(exc).__name__}: {message}",
                "peak_memory_gb": gb(mx.get_peak_memory()),
                "process_peak_rss_gb": process_peak_rss_gb(),
                **phase.footprint(),
            }
        )
        return EXIT_OOM if status == "oom" else EXIT_ERROR
    result = {**base, "status": "ok", "phase": phase.name, **measured}
    emit_result({**result, "process_peak_rss_gb": process_peak_rss_gb()})
    return EXIT_OK
