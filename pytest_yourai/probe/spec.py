"""The probe's command line and its spec: ``YOURAI_PROBE_SPEC`` (JSON) merged with the flags,
the run defaults filled in, and what an ``mlx_lm.lora`` run (``lora_run``, ``batch_shapes``,
``val_batch_shapes``) asks, checked before anything is built."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from pytest_yourai.fields import (
    DEFAULT_STEPS,
    DTYPES,
    IN_FLIGHT_MODES,
    add_run_flags,
    probe_defaults,
)
from pytest_yourai.presets import builtin_presets
from pytest_yourai.probe.shared import EXIT_USAGE
from pytest_yourai.protocol import SPEC_ENV

# MLX encodes GPU work ahead of the device in command buffers (Metal) or graphs (CUDA) and
# keeps every input of an encoded op alive until the device has run it: up to 10 committed
# buffers of up to 100 ops / 1000 MB each on an H100. That is what mlx_lm.lora runs with
# ("mlx", the default) and what the machine must hold; MLX throttles only at its own memory
# limit (0.95 x the device's total on CUDA), not at what another process left free.
# "bounded" commits one op per buffer, which makes the peak the step's own need and
# repeatable; a variable already in the environment wins. Read by MLX at the first GPU op,
# so this must run before any.
BOUNDED_IN_FLIGHT_ENV = {"MLX_MAX_OPS_PER_BUFFER": "1", "MLX_MAX_MB_PER_BUFFER": "1"}

# What the probe's result repeats of its spec (its "config").
ECHOED_SPEC = (
    "preset", "bits", "group_size", "dtype", "batch_size", "seq_len", "steps", "lora_rank",
    "lora_layers", "lora_scale", "grad_checkpoint", "in_flight", "lora_run",
)  # fmt: skip

# mlx_lm/lora.py's choices (--fine-tune-type, --optimizer) and CONFIG_DEFAULTS for what a
# lora_run leaves out (lora.py:45-82 in mlx-lm 0.32.2).
FINE_TUNE_TYPES = ("lora", "dora", "full")
OPTIMIZERS = ("adam", "adamw", "muon", "sgd", "adafactor")
LORA_RUN_DEFAULTS: dict[str, Any] = {
    "fine_tune_type": "lora",
    "optimizer": "adam",
    "optimizer_config": {},
    "learning_rate": 1e-5,
    "lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 20.0},
    "num_layers": 16,
    "grad_accumulation_steps": 1,
    "grad_checkpoint": False,
    "val_batches": 25,
    "seed": 0,
}
FULL_ON_QUANTIZED = (
    "full fine-tuning needs an unquantized model (bits 16), this one has {bits}-bit weights; "
    "mlx-lm fails at the first step with [QuantizedMatmul::vjp] no gradient wrt the "
    "quantized weights"
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pytest_yourai.probe",
        description="Measure the memory of an MLX LoRA fine-tune (mlx-lm's trainer path).",
    )
    model = p.add_mutually_exclusive_group()
    model.add_argument("--preset", help="a built-in preset name")
    model.add_argument("--config", type=Path, help="a Hugging Face config.json")
    add_run_flags(p, in_flight_default=None)
    p.add_argument("--steps", type=int, help=f"optimizer steps (default {DEFAULT_STEPS})")
    p.add_argument("--lora-scale", type=float, help="default 20")
    p.add_argument("--weights", help="auto (local HF cache, else synthetic), synthetic, or a PATH")
    p.add_argument(
        "--data", type=Path, help="a JSONL file of {'text': ...} rows (real weights only)"
    )
    p.add_argument(
        "--memory-limit-gb",
        type=float,
        help="cap MLX memory; exceeding it is reported as an OOM (rehearsal)",
    )
    p.add_argument(
        "--measure-throughput",
        action="store_true",
        help="print the matmul throughput of this backend (GFLOP/s) and exit",
    )
    p.add_argument("--device-info", action="store_true", help="print mx.device_info() and exit")
    p.add_argument(
        "--count-only",
        action="store_true",
        help="build the model lazily and report its parameter count; no training",
    )
    p.add_argument(
        "--census-batch",
        type=Path,
        help="a JSON list of specs (config, bits, group_size, dtype): one census line each",
    )
    p.add_argument(
        "--census",
        action="store_true",
        help="build the model lazily and report what the estimator needs of it (exact weight "
        "bytes, LoRA parameters per block, each block's kind) as JSON; no training",
    )
    p.add_argument(
        "--data-batches",
        type=Path,
        metavar="SPEC_JSON",
        help="a JSON file (model, data, batch_size, max_seq_length, mask_prompt, ...): load the "
        "tokenizer and data sets as mlx_lm.lora does and report the batch shapes its "
        "iterate_batches makes of them; no model, no training",
    )
    return p


def resolve_spec(args: argparse.Namespace) -> dict[str, Any]:
    """Merge YOURAI_PROBE_SPEC with the command-line flags (flags win)."""
    raw = os.environ.get(SPEC_ENV)
    spec: dict[str, Any] = json.loads(raw) if raw else {}
    if not isinstance(spec, dict):
        raise ValueError(f"{SPEC_ENV} is not a JSON object")
    for key in (
        "bits",
        "group_size",
        "dtype",
        "batch_size",
        "seq_len",
        "steps",
        "lora_rank",
        "lora_layers",
        "lora_scale",
        "grad_checkpoint",
        "weights",
        "memory_limit_gb",
        "in_flight",
    ):
        value = getattr(args, key)
        if value is not None:
            spec[key] = value
    if args.data is not None:
        spec["data"] = str(args.data)
    if args.preset is not None:
        presets = builtin_presets()
        if args.preset not in presets:
            raise ValueError(f"unknown preset {args.preset!r}; known: {', '.join(presets)}")
        preset = presets[args.preset]
        spec["preset"] = preset.name
        spec["model_name"] = preset.repo
        spec["config"] = dict(preset.architecture)
        for key, value in preset.pins.items():
            spec.setdefault(key, value)
    elif args.config is not None:
        spec["config"] = json.loads(args.config.read_text())
        spec.setdefault("preset", args.config.parent.name)
    if "config" not in spec:
        raise ValueError(f"no model: pass --preset, --config, or {SPEC_ENV} with a 'config'")
    config = spec["config"]
    for name, value in probe_defaults(config).items():
        spec.setdefault(name, value)
    spec.setdefault("weights", "auto")
    merge_lora_run(spec)
    if spec["in_flight"] not in IN_FLIGHT_MODES:
        raise ValueError(f"in_flight must be one of {IN_FLIGHT_MODES}, got {spec['in_flight']!r}")
    for key in ("batch_size", "seq_len", "steps", "lora_rank", "lora_layers", "group_size"):
        if int(spec[key]) <= 0:
            raise ValueError(f"{key} must be positive, got {spec[key]!r}")
    if spec["dtype"] not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {spec['dtype']!r}")
    return spec


def spec_or_exit(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    try:
        return resolve_spec(args)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as exc:
        parser.exit(EXIT_USAGE, f"{parser.prog}: error: {exc}\n")


def merge_lora_run(spec: dict[str, Any]) -> None:
    """A ``lora_run`` decides how the probe trains: its missing keys take mlx-lm's defaults,
    and the fields the result echoes (lora_rank, lora_scale, lora_layers, grad_checkpoint)
    take its values; ``batch_shapes`` decides the steps (one per shape)."""
    shapes = spec.get("batch_shapes")
    if isinstance(shapes, list) and shapes:
        spec["steps"] = len(shapes)
    run = spec.get("lora_run")
    if run is None:
        return
    if not isinstance(run, dict):
        raise ValueError(f"lora_run must be a JSON object, got {run!r}")
    run = spec["lora_run"] = {**LORA_RUN_DEFAULTS, **run}
    spec["grad_checkpoint"] = bool(run["grad_checkpoint"])
    parameters = run["lora_parameters"]
    if isinstance(parameters, dict):
        spec["lora_rank"] = parameters.get("rank", spec["lora_rank"])
        spec["lora_scale"] = parameters.get("scale", spec["lora_scale"])
    layers = int(run["num_layers"])
    # mlx-lm adapts model.layers[-max(num_layers, 0):]: 0 and -1 mean every block.
    spec["lora_layers"] = layers if layers > 0 else spec["config"].get("num_hidden_layers", 1)


def setup_problem(spec: dict[str, Any]) -> str | None:
    """Why the run cannot go as asked (mlx-lm's own message where it has one), or None."""
    run = spec.get("lora_run")
    for key in ("batch_shapes", "val_batch_shapes"):
        problem = _shapes_problem(key, spec.get(key))
        if problem:
            return problem
    if run is None:
        return None
    kind, name = run["fine_tune_type"], str(run["optimizer"]).lower()
    if kind not in FINE_TUNE_TYPES:
        return f"Received unknown fine-tune-type {kind}"  # lora.py:253-254
    if name not in OPTIMIZERS:
        return f"Unsupported optimizer: {name}"  # lora.py:300-301
    if kind == "full" and int(spec["bits"]) < 16:
        return FULL_ON_QUANTIZED.format(bits=spec["bits"])
    if kind != "full" and not isinstance(run["lora_parameters"], dict):
        return f"fine_tune_type {kind} needs lora_parameters (rank, scale, dropout)"
    if int(run["grad_accumulation_steps"]) < 1:
        return "grad_accumulation_steps must be at least 1"  # trainer.py's message
    if not isinstance(run["optimizer_config"], dict):
        return f"optimizer_config must be a mapping, got {run['optimizer_config']!r}"
    return None


def _shapes_problem(key: str, shapes: Any) -> str | None:
    if shapes is None:
        return None
    if not isinstance(shapes, list) or (key == "batch_shapes" and not shapes):
        return f"{key} must be a list of [rows, padded length], got {shapes!r}"
    for shape in shapes:
        if not (
            isinstance(shape, list | tuple)
            and len(shape) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in shape)
            and shape[0] >= 1
            and shape[1] >= 2
        ):
            return f"{key}: {shape!r} is not [rows >= 1, padded length >= 2]"
    return None


def apply_in_flight(mode: str, environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set MLX's command-buffer limits for ``mode``; returns the values in effect."""
    env = os.environ if environ is None else environ
    if mode == "bounded":
        for key, value in BOUNDED_IN_FLIGHT_ENV.items():
            env.setdefault(key, value)
    return {key: env[key] for key in BOUNDED_IN_FLIGHT_ENV if key in env}
