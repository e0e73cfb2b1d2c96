"""The pre-flight decision for one preset: config, estimate, and run / skip / stop.

Pure: it takes what the machine has as numbers and returns a Preflight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pytest_yourai.autoconfig import (
    BenchmarkConfig,
    apply_pins,
    fit_config,
    get_safe_benchmark_config,
)
from pytest_yourai.estimate import (
    Estimate,
    TrainingShape,
    default_dtype,
    estimate_training_memory,
    predict_probe_seconds,
)
from pytest_yourai.presets import Preset

DEFAULT_SEQ_LEN = 512
DEFAULT_BITS = 4
DEFAULT_GROUP_SIZE = 64
DEFAULT_STEPS = 4

RUN, SKIP_MEMORY, SKIP_TIME = "run", "skip_memory", "skip_time"


@dataclass(frozen=True)
class Preflight:
    preset: Preset
    config: BenchmarkConfig
    shape: TrainingShape
    steps: int
    estimate: Estimate
    available_gb: float
    predicted_seconds: float | None
    decision: str
    reason: str

    @property
    def insufficient(self) -> bool:
        return self.available_gb < self.estimate.estimated_conservative_gb

    def required_text(self) -> str:
        e = self.estimate
        return f"~{e.estimated_base_gb:.3g}-{e.estimated_conservative_gb:.3g} GB"

    def probe_spec(self) -> dict[str, Any]:
        """What the probe (or a custom probe command) gets as YOURAI_PROBE_SPEC."""
        return {
            "preset": self.preset.name,
            "model_name": self.preset.repo,
            "params": self.preset.params,
            "config": dict(self.preset.architecture),
            "backend": self.shape.backend,
            "bits": self.shape.bits,
            "group_size": self.shape.group_size,
            "dtype": self.shape.dtype,
            "batch_size": self.shape.batch_size,
            "seq_len": self.shape.seq_len,
            "lora_rank": self.shape.lora_rank,
            "lora_layers": self.shape.lora_layers,
            "grad_checkpoint": self.shape.grad_checkpoint,
            "steps": self.steps,
            "estimated_base_gb": round(self.estimate.estimated_base_gb, 4),
            "estimated_conservative_gb": round(self.estimate.estimated_conservative_gb, 4),
            "available_gb": round(self.available_gb, 3),
        }


def training_shape(preset: Preset, config: BenchmarkConfig, backend: str) -> TrainingShape:
    pins = preset.pins
    return TrainingShape(
        bits=int(pins.get("bits", DEFAULT_BITS)),
        group_size=int(pins.get("group_size", DEFAULT_GROUP_SIZE)),
        dtype=str(pins.get("dtype") or default_dtype(preset.architecture)),
        batch_size=config.batch_size,
        seq_len=int(pins.get("seq_len", DEFAULT_SEQ_LEN)),
        lora_rank=config.lora_rank,
        lora_layers=config.lora_layers,
        grad_checkpoint=bool(pins.get("grad_checkpoint", False)),
        backend=backend,
    )


def choose_config(
    preset: Preset, available_gb: float, backend: str, policy: str
) -> BenchmarkConfig:
    num_layers = int(preset.architecture["num_hidden_layers"])
    seed = apply_pins(
        get_safe_benchmark_config(preset.size_billions, available_gb, num_layers), preset.pins
    )
    if policy != "fit":
        return seed

    def conservative(candidate: BenchmarkConfig) -> float:
        shape = training_shape(preset, apply_pins(candidate, preset.pins), backend)
        return estimate_training_memory(preset.architecture, shape).estimated_conservative_gb

    fitted = fit_config(num_layers, available_gb, conservative)
    return apply_pins(fitted, preset.pins) if fitted is not None else seed


def plan(
    preset: Preset,
    available_gb: float,
    backend: str,
    *,
    policy: str,
    force: bool,
    timeout_s: float,
    gflops: float | None,
) -> Preflight:
    """Choose the config, estimate it, and decide whether to run it."""
    config = choose_config(preset, available_gb, backend, policy)
    shape = training_shape(preset, config, backend)
    steps = int(preset.pins.get("steps", DEFAULT_STEPS))
    estimate = estimate_training_memory(preset.architecture, shape)
    predicted = predict_probe_seconds(preset.architecture, shape, steps, gflops) if gflops else None
    decision, reason = RUN, ""
    if available_gb < estimate.estimated_conservative_gb:
        reason = (
            f"{preset.name}: needs ~{estimate.estimated_base_gb:.3g}–"
            f"{estimate.estimated_conservative_gb:.3g} GB, {available_gb:.3g} GB available"
        )
        if not force:
            decision = SKIP_MEMORY
    if decision == RUN and predicted is not None and predicted > timeout_s and not force:
        decision = SKIP_TIME
        reason = (
            f"{preset.name}: would take ~{predicted:,.0f} s on {backend} "
            f"(timeout {timeout_s:g} s; --yourai-force runs it anyway)"
        )
    return Preflight(
        preset=preset,
        config=config,
        shape=shape,
        steps=steps,
        estimate=estimate,
        available_gb=available_gb,
        predicted_seconds=predicted,
        decision=decision,
        reason=reason,
    )


def safety_stop_reason(available_gb: float, threshold_gb: float) -> str | None:
    if available_gb < threshold_gb:
        return (
            f"yourai safety stop: {available_gb:.2f} GB available is below the "
            f"{threshold_gb:g} GB safety threshold (--yourai-safety-gb; --yourai-force overrides)"
        )
    return None
