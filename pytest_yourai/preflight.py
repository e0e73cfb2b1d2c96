"""The pre-flight decision for one preset: config, estimate, and run / skip / stop.

Pure: it takes what the machine has as numbers and returns a Preflight.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pytest_yourai.autoconfig import (
    FIT_POLICY,
    BenchmarkConfig,
    apply_pins,
    fit_config,
    safe_config_table,
)
from pytest_yourai.census import Census, EstimateRefused, census_for
from pytest_yourai.estimator import (
    FORMULA_MODEL_TYPES,
    Estimate,
    TrainingShape,
    estimate_training_memory,
    is_mixture_of_experts,
    training_flops,
    weight_bytes,
)
from pytest_yourai.fields import (
    DEFAULT_BITS,
    DEFAULT_GROUP_SIZE,
    DEFAULT_SEQ_LEN,
    DEFAULT_STEPS,
    PREFLIGHT_FIELDS,
    default_dtype,
)
from pytest_yourai.learning import Learned
from pytest_yourai.lora_data import data_line
from pytest_yourai.presets import Preset
from pytest_yourai.throughput import TimeModel, predict_seconds

# Today's estimate of a shape, corrected by this machine's probes (or None: no record).
Learner = Callable[[Estimate, TrainingShape], Learned | None]

RUN, SKIP_MEMORY, SKIP_TIME = "run", "skip_memory", "skip_time"
SKIP_NO_MLX = "skip_no_mlx"  # MLX cannot be imported: nothing is judged
SKIP_REFUSED = "skip_refused"  # the estimator cannot estimate this model (see census.py)
BOUNDED_ENV_TEXT = "MLX_MAX_OPS_PER_BUFFER=1 MLX_MAX_MB_PER_BUFFER=1"
# The run's shape as the probe's spec carries it (besides the model and the estimate).
SPEC_FIELDS = (
    "backend", "bits", "dtype", "batch_size", "seq_len", "lora_rank", "lora_layers",
    "grad_checkpoint", "in_flight",
)  # fmt: skip


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
    learned: Learned | None = None  # the correction this machine's probes made to it
    cold_start_s: float | None = None  # the cold start within predicted_seconds (learned)
    compile_s: float | None = None  # a warm session's first-use compiles within it (learned)

    @property
    def insufficient(self) -> bool:
        return not fits(self.estimate.estimated_conservative_gb, self.available_gb, self.safety_gb)

    def record(self) -> dict[str, Any]:
        """The pre-flight as the log, JSON and JUnit have it (fields.PREFLIGHT_FIELDS;
        estimates null when refused)."""
        e, c, s = self.estimate, self.config, self.shape

        def gb(value: float) -> float | None:
            return None if self.refused else round(value, 3)

        values = {
            "preset": self.preset.name,
            "available_gb": round(self.available_gb, 3),
            "estimated_base_gb": gb(e.estimated_base_gb),
            "estimated_conservative_gb": gb(e.estimated_conservative_gb),
            "mlx_peak_gb": gb(e.mlx_peak_gb),
            "batch_size": c.batch_size,
            "lora_rank": c.lora_rank,
            "lora_layers": c.lora_layers,
            "predicted_seconds": None
            if self.predicted_seconds is None
            else round(self.predicted_seconds, 1),
            "decision": self.decision,
            "reason": self.reason,
            "safety_gb": self.safety_gb,
            "learned_from": self.learned.learned_from if self.learned is not None else 0,
            "learned_correction": self.learned.to_json() if self.learned is not None else None,
            "predicted_cold_start_s": None
            if self.cold_start_s is None
            else round(self.cold_start_s, 1),
            "predicted_compile_s": None if self.compile_s is None else round(self.compile_s, 1),
        }
        return {
            name: values[name] if name in values else getattr(s, name) for name in PREFLIGHT_FIELDS
        }

    def properties(self, **context: Any) -> dict[str, Any]:
        """What the test's ``yourai_*`` properties carry (JUnit, the controller's rows):
        the record's known values, the preset's size, and ``context`` (host, worker...)."""
        values = {
            k: v
            for k, v in self.record().items()
            if v is not None and v != "" and k != "learned_correction"  # JSON: the log has it
        }
        data = data_line(self.preset.lora)
        return {
            **values,
            **({"data": data} if data else {}),
            "params": self.preset.params,
            "param_count": self.preset.parameter_count,
            **context,
            "insufficient": self.insufficient,
        }

    def probe_spec(self) -> dict[str, Any]:
        """What the probe (or a custom probe command) gets as YOURAI_PROBE_SPEC: the run's
        shape, the model, and the estimate (for its own report)."""
        record = self.record()
        shape = {name: record[name] for name in SPEC_FIELDS}
        return {
            "preset": self.preset.name,
            "model_name": self.preset.repo,
            "params": self.preset.params,
            "config": dict(self.preset.architecture),
            **shape,
            "group_size": self.shape.group_size,
            "steps": self.steps,
            "estimated_base_gb": round(self.estimate.estimated_base_gb, 4),
            "estimated_conservative_gb": round(self.estimate.estimated_conservative_gb, 4),
            "available_gb": round(self.available_gb, 3),
            **lora_spec(self.preset.lora),
        }

    def weights_gb(self) -> float:
        """The weights' GB as built (the census's exact bytes where there is one)."""
        if self.census is not None:
            return self.census.weights_bytes / 1e9
        shape = self.shape
        arch = self.preset.architecture
        return weight_bytes(arch, shape.bits, shape.group_size, shape.dtype) / 1e9

    def flops_per_step(self) -> float:
        return training_flops(self.preset.architecture, self.shape, self.census)

    def required_text(self) -> str:
        e = self.estimate
        return f"~{e.estimated_base_gb:.3g}-{e.estimated_conservative_gb:.3g} GB"


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
        **lora_shape(preset.lora),
    )


def lora_shape(lora: Mapping[str, Any]) -> dict[str, Any]:
    """The estimator's view of an mlx_lm.lora config's trainer options."""
    run = lora.get("run")
    if not run:
        return {}
    parameters = run.get("lora_parameters") or {}
    keys = parameters.get("keys")
    return {
        "optimizer": run["optimizer"],
        "grad_accumulation_steps": int(run["grad_accumulation_steps"]),
        "fine_tune_type": run.get("fine_tune_type", "lora"),
        "lora_keys": None if keys is None else tuple(str(k) for k in keys),
        "lora_dropout": float(parameters.get("dropout") or 0.0),
    }


def needs_linears(lora: Mapping[str, Any]) -> bool:
    """Whether an mlx_lm.lora config trains other than LoRA on every linear without dropout:
    its estimate needs the census of each block's linears (estimator.adapter_terms)."""
    shape = lora_shape(lora)
    return bool(shape) and not TrainingShape(**shape).default_adapters


@dataclass(frozen=True)
class Resolved:
    """A preset's config, its one training shape, and its estimate (None when refused)."""

    config: BenchmarkConfig
    shape: TrainingShape
    estimate: Estimate | None
    refusal: str | None = None
    learned: Learned | None = None


def resolve(
    preset: Preset,
    available_gb: float,
    backend: str,
    policy: str,
    in_flight: str = "mlx",
    safety_gb: float = 0.0,
    census: Census | None = None,
    refusal: str | None = None,
    learner: Learner | None = None,
) -> Resolved:
    """The config, once: the preset's pins over the safe-config table's row (by available
    memory), or, with the fit policy, over the largest candidate whose conservative
    footprint fits by the go rule. Each distinct candidate is estimated once; nothing is
    estimated for a model whose census was refused (``refusal``). ``learner`` corrects
    each estimate by this machine's own probes (machine_record.py), or says nothing."""
    pins, arch = preset.pins, preset.architecture
    num_layers = int(arch["num_hidden_layers"])
    table = apply_pins(safe_config_table(preset.size_billions, available_gb, num_layers), pins)
    if refusal is not None:
        return Resolved(table, training_shape(preset, table, backend, in_flight), None, refusal)
    estimates: dict[BenchmarkConfig, Estimate] = {}
    learned: dict[BenchmarkConfig, Learned | None] = {}

    def estimate(config: BenchmarkConfig) -> Estimate:
        if config not in estimates:
            shape = training_shape(preset, config, backend, in_flight)
            today = estimate_training_memory(arch, shape, census)
            learned[config] = learner(today, shape) if learner is not None else None
            found = learned[config]
            estimates[config] = found.estimate if found is not None else today
        return estimates[config]

    config = table
    try:
        if policy == FIT_POLICY:
            budget = available_gb - safety_gb
            fitted = fit_config(
                num_layers,
                budget,
                lambda c: estimate(apply_pins(c, pins)).estimated_conservative_gb,
            )
            config = apply_pins(fitted, pins) if fitted is not None else table
        found = estimate(config)
    except EstimateRefused as exc:
        return Resolved(table, training_shape(preset, table, backend, in_flight), None, str(exc))
    shape = training_shape(preset, config, backend, in_flight)
    return Resolved(config, shape, found, learned=learned.get(config))


def plan(
    preset: Preset,
    available_gb: float,
    backend: str,
    *,
    policy: str,
    force: bool,
    timeout_s: float,
    gflops: float | Callable[[TrainingShape], float | None] | None,
    in_flight: str = "mlx",
    safety_gb: float = 0.0,
    timing: TimeModel | None = None,
    census: Census | None = None,
    refusal: str | None = None,
    learner: Learner | None = None,
) -> Preflight:
    """Resolve the config (once), then decide: memory by the go rule, then time.

    ``census`` is what mlx-lm's model class says of the model (census.py; needed for models
    the formula does not know); ``refusal`` says why none could be taken. A model the
    estimator cannot estimate is skipped with the reason, or run under ``force``.

    Time: ``timing`` is what this machine's earlier probes took (throughput.py); without it
    the matmul throughput ``gflops`` stands in (a callable is asked only when a preset
    would run, so nothing is measured for one skipped on memory). A preset is skipped for
    time only when even the optimistic prediction exceeds the timeout, so one that would
    finish is never skipped."""
    chosen = resolve(
        preset, available_gb, backend, policy, in_flight, safety_gb, census, refusal, learner
    )
    steps = int(preset.pins.get("steps", DEFAULT_STEPS))
    result = Preflight(
        preset, chosen.config, chosen.shape, steps, chosen.estimate or Estimate(0.0, 0.0, {}),
        available_gb, None, RUN, "", safety_gb=safety_gb, census=census, learned=chosen.learned,
    )  # fmt: skip
    if chosen.refusal is not None:
        reason = (
            f"{preset.name}: no estimate: {chosen.refusal}; --yourai-force runs it, and then the "
            "probe and the memory watchdog decide"
        )
        return replace(result, decision=RUN if force else SKIP_REFUSED, reason=reason, refused=True)
    if result.insufficient:
        reason = memory_reason(
            preset, chosen.shape, result.estimate, available_gb, safety_gb, census
        )
        result = replace(result, decision=RUN if force else SKIP_MEMORY, reason=reason)
    return time_gate(result, timing, gflops, timeout_s, force)


def time_gate(
    result: Preflight,
    timing: TimeModel | None,
    gflops: float | Callable[[TrainingShape], float | None] | None,
    timeout_s: float,
    force: bool,
) -> Preflight:
    """The predicted seconds, and a skip when even the optimistic prediction is over the
    timeout (not under ``force``)."""
    if timing is None and (result.decision != RUN or force):
        return result  # nothing learned yet, and no reason to measure
    speed = gflops(result.shape) if callable(gflops) and timing is None else gflops
    times = predict_seconds(
        timing,
        result.shape.backend,
        result.flops_per_step(),
        result.weights_gb(),
        result.steps,
        speed if not callable(speed) else None,
    )
    if times is None:
        return result
    predicted, optimistic = times
    result = replace(result, predicted_seconds=predicted)
    if result.decision == RUN and optimistic > timeout_s and not force:
        reason = (
            f"{result.preset.name}: would take ~{predicted:,.0f} s on {result.shape.backend} "
            f"(timeout {timeout_s:g} s; --yourai-force runs it anyway)"
        )
        result = replace(result, decision=SKIP_TIME, reason=reason)
    return result


def estimate_with_census(
    arch: Mapping[str, Any], shape: TrainingShape, cache: Any = None
) -> Estimate:
    """The estimate, with the model's census where it needs one (census.py)."""
    linears = not shape.default_adapters
    census = (
        census_for(arch, shape.bits, shape.group_size, shape.dtype, cache, linears)
        if needs_census(arch) or linears
        else None
    )
    return estimate_training_memory(arch, shape, census)


def lora_spec(lora: Mapping[str, Any]) -> dict[str, Any]:
    """An mlx_lm.lora config's part of the probe's spec: what to train, and the batches
    its data makes (longest first), where it has data."""
    if not lora:
        return {}
    spec: dict[str, Any] = {"lora_run": dict(lora["run"]), "model_dir": lora["model_dir"]}
    if any(Path(lora["model_dir"]).glob("*.safetensors")):
        spec["weights"] = lora["model_dir"]  # the user's own weights, as mlx-lm loads them
    data = lora.get("batches")
    if data:
        spec["batch_shapes"] = data["train"]["probe_shapes"]
        spec["val_batch_shapes"] = data["valid"]["probe_shapes"]
    return spec


def find_census(
    preset: Preset, backend: str, cache: Any = None
) -> tuple[Census | None, str | None]:
    """The model's census (census.py) where the estimate needs one, from the shipped file,
    pytest's ``cache`` or a child Python; or why none could be taken (also: an mlx_lm.lora
    config's choices the estimator has no term for yet, named)."""
    unmodeled = preset.lora.get("unmodeled")
    if unmodeled:
        return None, f"not modeled yet: {'; '.join(unmodeled)}"
    linears = needs_linears(preset.lora)
    if not needs_census(preset.architecture) and not linears:
        return None, None
    shape = training_shape(preset, BenchmarkConfig(1, 1, 1), backend)
    try:
        return census_for(
            preset.architecture, shape.bits, shape.group_size, shape.dtype, cache, linears
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
    learner_of: Callable[[Preset, Census | None], Learner | None] | None = None,
) -> Preflight:
    """The pre-flight's decision on memory alone (no timeout, no force): what the estimate
    command and the fit map report, so they and the pre-flight cannot drift apart.
    ``learner_of`` gives the preset's correction by this machine's probes, if any."""
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
        learner=learner_of(preset, census) if learner_of is not None else None,
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
