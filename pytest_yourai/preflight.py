"""The pre-flight decision for one preset: config, estimate, and run / skip / stop.

Pure: it takes what the machine has as numbers and returns a Preflight.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from pytest_yourai.autoconfig import (
    BenchmarkConfig,
    apply_pins,
    fit_config,
    get_safe_benchmark_config,
)
from pytest_yourai.census import Census, EstimateRefused, census_for
from pytest_yourai.estimate import (
    FORMULA_MODEL_TYPES,
    Estimate,
    TrainingShape,
    default_dtype,
    estimate_training_memory,
    is_mixture_of_experts,
    training_flops,
    weight_bytes,
)
from pytest_yourai.presets import Preset
from pytest_yourai.throughput import TimeModel, predict_seconds

DEFAULT_SEQ_LEN = 512
DEFAULT_BITS = 4
DEFAULT_GROUP_SIZE = 64
DEFAULT_STEPS = 4

RUN, SKIP_MEMORY, SKIP_TIME = "run", "skip_memory", "skip_time"
SKIP_NO_MLX = "skip_no_mlx"  # MLX cannot be imported: nothing is judged
SKIP_REFUSED = "skip_refused"  # the estimator cannot estimate this model (see census.py)
BOUNDED_ENV_TEXT = "MLX_MAX_OPS_PER_BUFFER=1 MLX_MAX_MB_PER_BUFFER=1"


def fits(conservative_gb: float, available_gb: float, safety_gb: float) -> bool:
    """The go rule: the conservative footprint fits what is available with ``safety_gb``
    still free, so the watchdog (which stops a probe below ``safety_gb``) never trips on a
    run that needs what was estimated. The pre-flight, admission and the fit map use it."""
    return conservative_gb <= available_gb - safety_gb


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

    safety_gb: float = 0.0
    refused: bool = False  # no estimate: the model is one the estimator cannot estimate
    census: Census | None = None

    @property
    def insufficient(self) -> bool:
        return not fits(self.estimate.estimated_conservative_gb, self.available_gb, self.safety_gb)

    def record(self) -> dict[str, Any]:
        """The pre-flight as the log, JSON and JUnit have it (estimates null when refused)."""
        e, c, s = self.estimate, self.config, self.shape

        def gb(value: float) -> float | None:
            return None if self.refused else round(value, 3)

        return {
            "preset": self.preset.name,
            "available_gb": round(self.available_gb, 3),
            "estimated_base_gb": gb(e.estimated_base_gb),
            "estimated_conservative_gb": gb(e.estimated_conservative_gb),
            "mlx_peak_gb": gb(e.mlx_peak_gb),
            "batch_size": c.batch_size,
            "lora_rank": c.lora_rank,
            "lora_layers": c.lora_layers,
            "seq_len": s.seq_len,
            "bits": s.bits,
            "dtype": s.dtype,
            "backend": s.backend,
            "in_flight": s.in_flight,
            "grad_checkpoint": s.grad_checkpoint,
            "predicted_seconds": None
            if self.predicted_seconds is None
            else round(self.predicted_seconds, 1),
            "decision": self.decision,
            "reason": self.reason,
            "safety_gb": self.safety_gb,
        }

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
            "in_flight": self.shape.in_flight,
            "steps": self.steps,
            "estimated_base_gb": round(self.estimate.estimated_base_gb, 4),
            "estimated_conservative_gb": round(self.estimate.estimated_conservative_gb, 4),
            "available_gb": round(self.available_gb, 3),
        }


def training_shape(
    preset: Preset, config: BenchmarkConfig, backend: str, in_flight: str = "mlx"
) -> TrainingShape:
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
        in_flight=in_flight,
    )


def choose_config(
    preset: Preset,
    available_gb: float,
    backend: str,
    policy: str,
    in_flight: str = "mlx",
    safety_gb: float = 0.0,
    census: Census | None = None,
) -> BenchmarkConfig:
    """The seed's table (by available memory), or, with the fit policy, the largest config
    whose conservative footprint fits by the go rule."""
    num_layers = int(preset.architecture["num_hidden_layers"])
    seed = apply_pins(
        get_safe_benchmark_config(preset.size_billions, available_gb, num_layers), preset.pins
    )
    if policy != "fit":
        return seed

    def conservative(candidate: BenchmarkConfig) -> float:
        shape = training_shape(preset, apply_pins(candidate, preset.pins), backend, in_flight)
        estimate = estimate_training_memory(preset.architecture, shape, census)
        return estimate.estimated_conservative_gb

    try:
        fitted = fit_config(num_layers, available_gb - safety_gb, conservative)
    except EstimateRefused:
        return seed
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
    in_flight: str = "mlx",
    safety_gb: float = 0.0,
    timing: TimeModel | None = None,
    census: Census | None = None,
    refusal: str | None = None,
) -> Preflight:
    """Choose the config, estimate it, and decide whether to run it.

    ``census`` is what mlx-lm's model class says of the model (census.py; needed for models
    the formula does not know); ``refusal`` says why none could be taken. A model the
    estimator cannot estimate is skipped with the reason, or run under ``force``.

    Time: ``timing`` is what this machine's earlier probes took (throughput.py); without it
    the matmul throughput ``gflops`` stands in. A preset is skipped for time only when even
    the optimistic prediction exceeds the timeout, so one that would finish is never
    skipped."""
    config = choose_config(preset, available_gb, backend, policy, in_flight, safety_gb, census)
    shape = training_shape(preset, config, backend, in_flight)
    steps = int(preset.pins.get("steps", DEFAULT_STEPS))
    if refusal is None:
        try:
            estimate = estimate_training_memory(preset.architecture, shape, census)
        except EstimateRefused as exc:
            refusal = str(exc)
    if refusal is not None:
        return Preflight(
            preset=preset,
            config=config,
            shape=shape,
            steps=steps,
            estimate=Estimate(0.0, 0.0, {}),
            available_gb=available_gb,
            predicted_seconds=None,
            decision=RUN if force else SKIP_REFUSED,
            reason=f"{preset.name}: no estimate: {refusal}; --yourai-force runs it, and then "
            "the probe and the memory watchdog decide",
            safety_gb=safety_gb,
            refused=True,
            census=census,
        )
    weights = (
        census.weights_bytes
        if census is not None
        else weight_bytes(preset.architecture, shape.bits, shape.group_size, shape.dtype)
    )
    times = predict_seconds(
        timing,
        backend,
        training_flops(preset.architecture, shape, census),
        weights / 1e9,
        steps,
        gflops,
    )
    predicted, optimistic = times if times is not None else (None, None)
    decision, reason = RUN, ""
    if not fits(estimate.estimated_conservative_gb, available_gb, safety_gb):
        reason = memory_reason(preset, shape, estimate, available_gb, safety_gb, census)
        if not force:
            decision = SKIP_MEMORY
    if decision == RUN and optimistic is not None and optimistic > timeout_s and not force:
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
        safety_gb=safety_gb,
        census=census,
    )


def estimate_with_census(
    arch: Mapping[str, Any], shape: TrainingShape, cache: Any = None
) -> Estimate:
    """The estimate, with the model's census where it needs one (census.py)."""
    census = (
        census_for(arch, shape.bits, shape.group_size, shape.dtype, cache)
        if needs_census(arch)
        else None
    )
    return estimate_training_memory(arch, shape, census)


def find_census(
    preset: Preset, backend: str, cache: Any = None
) -> tuple[Census | None, str | None]:
    """The model's census (census.py) where the estimate needs one, from the shipped file,
    pytest's ``cache`` or a child Python; or why none could be taken."""
    if not needs_census(preset.architecture):
        return None, None
    shape = training_shape(preset, BenchmarkConfig(1, 1, 1), backend)
    try:
        return census_for(
            preset.architecture, shape.bits, shape.group_size, shape.dtype, cache
        ), None
    except EstimateRefused as exc:
        return None, str(exc)


def memory_decision(
    preset: Preset,
    available_gb: float,
    backend: str,
    *,
    policy: str,
    in_flight: str,
    safety_gb: float,
    cache: Any = None,
) -> Preflight:
    """The pre-flight's decision on memory alone (no timeout, no force): what the estimate
    command and the fit map report, so they and the pre-flight cannot drift apart."""
    census, refusal = find_census(preset, backend, cache)
    return plan(
        preset,
        available_gb,
        backend,
        policy=policy,
        force=False,
        timeout_s=float("inf"),
        gflops=None,
        in_flight=in_flight,
        safety_gb=safety_gb,
        census=census,
        refusal=refusal,
    )


def needs_census(arch: Mapping[str, Any]) -> bool:
    """Whether the estimate needs mlx-lm's own shapes (census.py): every model the
    estimator's formula does not get exactly."""
    return arch.get("model_type") not in FORMULA_MODEL_TYPES or is_mixture_of_experts(arch)


def memory_reason(
    preset: Preset,
    shape: TrainingShape,
    estimate: Estimate,
    available_gb: float,
    safety_gb: float,
    census: Census | None = None,
) -> str:
    """Why a preset does not fit; with MLX's defaults, whether one op in flight would fit,
    and how to run the real fine-tune that way."""
    kept = f" with {safety_gb:g} GB kept free" if safety_gb else ""
    reason = (
        f"{preset.name}: needs ~{estimate.estimated_base_gb:.3g}–"
        f"{estimate.estimated_conservative_gb:.3g} GB, {available_gb:.3g} GB available{kept}"
    )
    if shape.in_flight != "mlx":
        return reason
    bounded = estimate_training_memory(
        preset.architecture, replace(shape, in_flight="bounded"), census
    )
    if not fits(bounded.estimated_conservative_gb, available_gb, safety_gb):
        return reason
    return (
        f"{reason}; with one op in flight it needs ~{bounded.estimated_base_gb:.3g}–"
        f"{bounded.estimated_conservative_gb:.3g} GB and fits: run the fine-tune as "
        f"`{BOUNDED_ENV_TEXT} mlx_lm.lora ...` and benchmark it with --yourai-in-flight bounded"
    )


def safety_stop_reason(available_gb: float, threshold_gb: float) -> str | None:
    if available_gb < threshold_gb:
        return (
            f"yourai safety stop: {available_gb:.2f} GB available is below the "
            f"{threshold_gb:g} GB safety threshold (--yourai-safety-gb; --yourai-force overrides)"
        )
    return None
