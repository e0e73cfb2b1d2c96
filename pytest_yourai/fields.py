"""One table of a run's defaults and fields, and the command-line flags that set them.

Everything that names a run setting reads it here: the pre-flight (``training_shape``), the
probe, the presets file, and the parsers of ``python -m pytest_yourai.estimate``,
``python -m pytest_yourai.probe`` and ``yourai fit``. Plain data and argparse types; it
imports nothing of the package.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

BACKENDS = ("cpu", "cuda", "metal")
# How far MLX may encode ahead of the device: "mlx" is MLX's own default (what mlx_lm.lora
# runs), "bounded" one op per command buffer (MLX_MAX_OPS_PER_BUFFER=1 MLX_MAX_MB_PER_BUFFER=1).
IN_FLIGHT_MODES = ("bounded", "mlx")
DEFAULT_IN_FLIGHT = "mlx"
DTYPES = ("float32", "bfloat16", "float16")
BITS = (2, 3, 4, 5, 6, 8, 16)  # 16: unquantized

# Run defaults: a preset's pins and the command line override them.
DEFAULT_SEQ_LEN = 512
DEFAULT_BITS = 4
DEFAULT_GROUP_SIZE = 64
DEFAULT_STEPS = 4
DEFAULT_LORA_SCALE = 20.0

# A probe run by hand (python -m pytest_yourai.probe) with no config policy to choose these.
PROBE_DEFAULT_BATCH_SIZE = 1
PROBE_DEFAULT_LORA_RANK = 16
PROBE_DEFAULT_LORA_LAYERS = 16


def default_dtype(arch: Mapping[str, Any]) -> str:
    """The config's torch_dtype when MLX supports it, else bfloat16 (mlx-lm's habit)."""
    dtype = arch.get("torch_dtype") or arch.get("dtype")
    return str(dtype) if dtype in DTYPES else "bfloat16"


def probe_defaults(arch: Mapping[str, Any]) -> dict[str, Any]:
    """What a probe run by hand uses for what it is not told."""
    return {
        "bits": DEFAULT_BITS,
        "group_size": DEFAULT_GROUP_SIZE,
        "dtype": default_dtype(arch),
        "batch_size": PROBE_DEFAULT_BATCH_SIZE,
        "seq_len": DEFAULT_SEQ_LEN,
        "steps": DEFAULT_STEPS,
        "lora_rank": PROBE_DEFAULT_LORA_RANK,
        "lora_layers": min(PROBE_DEFAULT_LORA_LAYERS, int(arch["num_hidden_layers"])),
        "lora_scale": DEFAULT_LORA_SCALE,
        "grad_checkpoint": False,
        "in_flight": DEFAULT_IN_FLIGHT,
    }


# The plugin's own defaults (options and ini keys in settings.py).
DEFAULT_LOG = "benchmark_log.jsonl"
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_SAFETY_GB = 2.0

# Fields of the run that a preset may pin; anything else is chosen by the config policy.
PINNABLE_FIELDS = ("batch_size", "lora_rank", "lora_layers", "seq_len", "bits")
# Optional probe settings a preset may carry.
PROBE_FIELDS = ("dtype", "group_size", "steps", "grad_checkpoint", "max_peak_gb")
# What the pre-flight records of each preset: the preflight_check event, the JSON's rows and
# the JUnit properties carry these names.
PREFLIGHT_FIELDS = (
    "preset",
    "available_gb",
    "estimated_base_gb",
    "estimated_conservative_gb",
    "mlx_peak_gb",
    "batch_size",
    "lora_rank",
    "lora_layers",
    "seq_len",
    "bits",
    "dtype",
    "backend",
    "in_flight",
    "grad_checkpoint",
    "predicted_seconds",
    "decision",
    "reason",
    "safety_gb",
    # what this machine's own probes changed (learning.py): how many, and the correction
    "learned_from",
    "learned_correction",
    # of predicted_seconds, the cold start (MLX compiling its kernels afresh) it includes
    "predicted_cold_start_s",
    # of predicted_seconds, in a warm session, the first use of kernels it has not compiled
    "predicted_compile_s",
)


def _number(text: str, kind: type[int] | type[float], *, zero_ok: bool, what: str) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not (0 <= value if zero_ok else 0 < value) or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return int(_number(text, int, zero_ok=False, what="a positive integer"))


def positive_float(text: str) -> float:
    return _number(text, float, zero_ok=False, what="a positive number")


def non_negative_float(text: str) -> float:
    return _number(text, float, zero_ok=True, what="GB >= 0")


@dataclass(frozen=True)
class Flag:
    """A run setting's command-line flag (dest is the field's name)."""

    name: str
    kind: type = int
    help: str = ""


RUN_FLAGS = (
    Flag("--bits", int, f"weight bits; 16 means unquantized (default {DEFAULT_BITS})"),
    Flag("--group-size", int, f"quantization group size (default {DEFAULT_GROUP_SIZE})"),
    Flag("--dtype", str, "default: the config's torch_dtype, else bfloat16"),
    Flag("--batch-size"),
    Flag("--seq-len", int, f"model inputs per row (default {DEFAULT_SEQ_LEN})"),
    Flag("--lora-rank"),
    Flag("--lora-layers"),
    Flag("--grad-checkpoint", bool, "gradient checkpointing"),
)
IN_FLIGHT_HELP = (
    "mlx (default): MLX's own command-buffer limits, what mlx_lm.lora runs; bounded: one op "
    "in flight (MLX_MAX_OPS_PER_BUFFER=1 MLX_MAX_MB_PER_BUFFER=1), smaller and slower"
)


def add_run_flags(parser: argparse.ArgumentParser, *, in_flight_default: str | None) -> None:
    """The run-setting flags every command line shares: --bits, --group-size, --dtype,
    --batch-size, --seq-len, --lora-rank, --lora-layers, --grad-checkpoint, --in-flight."""
    for flag in RUN_FLAGS:
        if flag.kind is bool:
            parser.add_argument(flag.name, action="store_true", default=None, help=flag.help)
        elif flag.name == "--bits":
            parser.add_argument(flag.name, type=int, choices=BITS, help=flag.help)
        elif flag.name == "--dtype":
            parser.add_argument(flag.name, choices=DTYPES, help=flag.help)
        else:
            parser.add_argument(flag.name, type=positive_int, help=flag.help or None)
    parser.add_argument(
        "--in-flight", choices=IN_FLIGHT_MODES, default=in_flight_default, help=IN_FLIGHT_HELP
    )


def run_pins(args: argparse.Namespace) -> dict[str, object]:
    """The run settings given on a command line, as a preset's pins."""
    names = [flag.name[2:].replace("-", "_") for flag in RUN_FLAGS]
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}
