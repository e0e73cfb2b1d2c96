"""Memory estimator for MLX LoRA/QLoRA training: pure functions of shapes, no I/O.

It predicts the probe's ``train_peak_memory_gb``: MLX's peak over the training steps of
mlx-lm's trainer, with the model resident. Terms follow how mlx-lm allocates:

- weights: quantized linears (and embeddings) pack ``bits`` per weight plus a scale and a
  bias per group of ``group_size`` in the model dtype; layers whose input width does not
  divide by the group size stay in the model dtype, as ``nn.quantize`` leaves them;
- LoRA: mlx-lm creates ``lora_a``/``lora_b`` in float32 on every linear of the adapted
  blocks; gradients and Adam's two moments are float32 too (16 bytes per trainable weight);
- activations: what the backward pass keeps for each adapted block, per token, in float32
  (LoRA's float32 output promotes the adapted span); with gradient checkpointing only each
  block's input is kept, plus one block recomputed at a time;
- logits and the float32 cross-entropy over the vocabulary;
- framework overhead: a per-backend constant.

The last three have per-backend coefficients fitted to probe measurements by
``benchmarks/calibrate_estimator.py`` (CALIBRATION below).

Usage::

    python -m pytest_yourai.estimate --preset hermes-70b --batch-size 1 --lora-rank 16 \
        --lora-layers 8 --backend cuda [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_yourai.presets import head_dim, qkv_has_bias, tie_embeddings

GB = 1e9
BACKENDS = ("cpu", "cuda", "metal")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Per-backend coefficients of the terms that cannot be derived from shapes alone, fitted
# by benchmarks/calibrate_estimator.py to probe measurements in benchmarks/results:
#   activation  x T·L·hidden·4 bytes  (the adapted span runs in float32: LoRA is float32)
#   checkpoint  x T·L·hidden·4 bytes  (block inputs kept by gradient checkpointing)
#   logits      x T·vocab·4 bytes     (float32 cross-entropy)
#   constant    x 1 GB
# CUDA: 17 H100 runs (seed presets + accuracy grid). Metal: not measured; assumed equal to
# CUDA (unified memory, same kernels' shapes), pending measurements on a Mac. CPU: tiny
# shapes only, float32 and bf16.
CALIBRATION: dict[str, dict[str, float]] = {
    "cuda": {"activation": 20.7, "checkpoint": 9.906, "logits": 1.683, "constant": 6.465},
    "metal": {"activation": 20.7, "checkpoint": 9.906, "logits": 1.683, "constant": 6.465},
    "cpu": {"activation": 24.88, "checkpoint": 5.56, "logits": 4.291, "constant": 0.0},
}
# base x factor covers every calibration run with room to spare (worst under-estimates:
# CUDA -14% fitted, -7% held out; CPU -5%).
CONSERVATIVE_FACTOR = {"cuda": 1.25, "metal": 1.25, "cpu": 1.25}


def calibration_features(arch: Mapping[str, Any], shape: TrainingShape) -> dict[str, float]:
    """The fitted terms' inputs, in bytes (see CALIBRATION)."""
    hidden = int(arch["hidden_size"])
    vocab = int(arch["vocab_size"])
    adapted = min(shape.lora_layers, int(arch["num_hidden_layers"]))
    tokens = shape.batch_size * shape.seq_len
    active_blocks = 1 if shape.grad_checkpoint else adapted
    return {
        "activation": float(tokens * active_blocks * hidden * 4),
        "checkpoint": float(tokens * adapted * hidden * 4) if shape.grad_checkpoint else 0.0,
        "logits": float(tokens * vocab * 4),
        "constant": GB,
    }


@dataclass(frozen=True)
class TrainingShape:
    """Everything about a LoRA run that decides its memory."""

    bits: int = 4
    group_size: int = 64
    dtype: str = "bfloat16"
    batch_size: int = 1
    seq_len: int = 512
    lora_rank: int = 16
    lora_layers: int = 16
    grad_checkpoint: bool = False
    backend: str = "cpu"


@dataclass(frozen=True)
class Estimate:
    estimated_base_gb: float
    estimated_conservative_gb: float
    breakdown: Mapping[str, float]

    def to_json(self) -> dict[str, Any]:
        return {
            "estimated_base_gb": round(self.estimated_base_gb, 4),
            "estimated_conservative_gb": round(self.estimated_conservative_gb, 4),
            "breakdown": {k: round(v, 4) for k, v in self.breakdown.items()},
        }


def block_linears(arch: Mapping[str, Any]) -> list[tuple[int, int]]:
    """(input, output) widths of the linears of one decoder block, in mlx-lm's order."""
    hidden = int(arch["hidden_size"])
    inter = int(arch["intermediate_size"])
    heads = int(arch["num_attention_heads"])
    kv_heads = int(arch.get("num_key_value_heads") or heads)
    hd = head_dim(arch)
    return [
        (hidden, heads * hd),  # q_proj
        (hidden, kv_heads * hd),  # k_proj
        (hidden, kv_heads * hd),  # v_proj
        (heads * hd, hidden),  # o_proj
        (hidden, inter),  # gate_proj
        (hidden, inter),  # up_proj
        (inter, hidden),  # down_proj
    ]


def _matrix_bytes(rows: int, cols_in: int, bits: int, group_size: int, dtype_bytes: int) -> float:
    """Bytes of a weight matrix of ``rows`` x ``cols_in`` after ``nn.quantize``."""
    if bits >= 16 or cols_in % group_size != 0:
        return float(rows * cols_in * dtype_bytes)
    packed = rows * cols_in * bits / 8
    scales_and_biases = rows * (cols_in // group_size) * 2 * dtype_bytes
    return packed + scales_and_biases


def weight_bytes(arch: Mapping[str, Any], bits: int, group_size: int, dtype: str) -> float:
    dtype_bytes = DTYPE_BYTES[dtype]
    hidden = int(arch["hidden_size"])
    vocab = int(arch["vocab_size"])
    layers = int(arch["num_hidden_layers"])
    per_block = sum(
        _matrix_bytes(o, i, bits, group_size, dtype_bytes) for i, o in block_linears(arch)
    )
    per_block += 2 * hidden * dtype_bytes  # norms
    if qkv_has_bias(arch):
        per_block += sum(o for _, o in block_linears(arch)[:3]) * dtype_bytes
    embed = _matrix_bytes(vocab, hidden, bits, group_size, dtype_bytes)
    head = (
        0.0 if tie_embeddings(arch) else _matrix_bytes(vocab, hidden, bits, group_size, dtype_bytes)
    )
    return layers * per_block + embed + head + hidden * dtype_bytes


def lora_parameter_count(arch: Mapping[str, Any], lora_rank: int, lora_layers: int) -> int:
    layers = min(lora_layers, int(arch["num_hidden_layers"]))
    return layers * sum(lora_rank * (i + o) for i, o in block_linears(arch))


def estimate_training_memory(arch: Mapping[str, Any], shape: TrainingShape) -> Estimate:
    """Predict the peak memory (decimal GB) of an mlx-lm LoRA training run."""
    if shape.backend not in BACKENDS:
        raise ValueError(f"unknown backend {shape.backend!r}; expected one of {BACKENDS}")
    if shape.dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {shape.dtype!r}; expected one of {tuple(DTYPE_BYTES)}")
    adapted = min(shape.lora_layers, int(arch["num_hidden_layers"]))
    weights = weight_bytes(arch, shape.bits, shape.group_size, shape.dtype)
    lora_params = lora_parameter_count(arch, shape.lora_rank, adapted)
    lora = lora_params * 4.0
    gradients = lora_params * 4.0
    optimizer = lora_params * 8.0

    features = calibration_features(arch, shape)
    coefficients = CALIBRATION[shape.backend]
    activations = coefficients["activation"] * features["activation"]
    checkpoints = coefficients["checkpoint"] * features["checkpoint"]
    logits = coefficients["logits"] * features["logits"]
    overhead = coefficients["constant"] * features["constant"]

    breakdown = {
        "weights_gb": weights / GB,
        "lora_parameters_gb": lora / GB,
        "gradients_gb": gradients / GB,
        "optimizer_state_gb": optimizer / GB,
        "activations_gb": (activations + checkpoints) / GB,
        "logits_and_loss_gb": logits / GB,
        "framework_overhead_gb": overhead / GB,
    }
    base = sum(breakdown.values())
    return Estimate(
        estimated_base_gb=base,
        estimated_conservative_gb=base * CONSERVATIVE_FACTOR[shape.backend],
        breakdown=breakdown,
    )


def seed_estimate_gb(parameters_billions: float) -> tuple[float, float]:
    """The Rust seed's formula, kept for comparison: 2 + 1.8·P and 2 + 2.2·P GB."""
    return 2.0 + 1.8 * parameters_billions, 2.0 + 2.2 * parameters_billions


def training_flops(arch: Mapping[str, Any], shape: TrainingShape) -> float:
    """Floating-point operations of one training step.

    Forward through every block and the head (2 per weight per token), backward through
    the adapted span and the head (input gradients: 2 more; LoRA's own are negligible),
    plus attention (4·S·d per token per block, forward, doubled where backward runs).
    """
    layers = int(arch["num_hidden_layers"])
    adapted = min(shape.lora_layers, layers)
    hidden = int(arch["hidden_size"])
    vocab = int(arch["vocab_size"])
    tokens = shape.batch_size * shape.seq_len
    per_block = sum(i * o for i, o in block_linears(arch))
    head = vocab * hidden
    forward = 2.0 * tokens * (layers * per_block + head)
    backward = 2.0 * tokens * (adapted * per_block + head)
    if shape.grad_checkpoint:
        backward += 2.0 * tokens * adapted * per_block
    attention = 4.0 * tokens * shape.seq_len * hidden * (layers + 2 * adapted)
    return forward + backward + attention


# Seconds a probe spends before its steps run at full speed: Python and MLX import, the
# build, and the compile of the trainer's step (on CUDA the first step also JIT-compiles
# kernels, 60-90 s once per process).
PROBE_STARTUP_S = {"cpu": 8.0, "metal": 20.0, "cuda": 120.0}


def predict_probe_seconds(
    arch: Mapping[str, Any], shape: TrainingShape, steps: int, gflops: float
) -> float:
    """Wall time of a probe from its FLOPs and a throughput measured on this machine."""
    return PROBE_STARTUP_S[shape.backend] + steps * training_flops(arch, shape) / (gflops * 1e9)


def format_breakdown(estimate: Estimate) -> str:
    lines = [f"{name:<24} {value:>10.3f} GB" for name, value in estimate.breakdown.items()]
    lines.append(f"{'estimated_base_gb':<24} {estimate.estimated_base_gb:>10.3f} GB")
    lines.append(
        f"{'estimated_conservative_gb':<24} {estimate.estimated_conservative_gb:>10.3f} GB"
    )
    return "\n".join(lines)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    from pytest_yourai.errors import YouraiUsageError
    from pytest_yourai.presets import builtin_presets, preset_from_config_json

    parser = argparse.ArgumentParser(
        prog="python -m pytest_yourai.estimate",
        description="Estimate the peak memory of an MLX LoRA fine-tune from its architecture.",
    )
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--config", type=Path, help="a Hugging Face config.json")
    model.add_argument("--preset", help="a built-in preset name")
    parser.add_argument("--bits", type=int, choices=(2, 3, 4, 5, 6, 8, 16), default=4)
    parser.add_argument("--group-size", type=_positive_int, default=64)
    parser.add_argument(
        "--dtype",
        choices=tuple(DTYPE_BYTES),
        default=None,
        help="default: the config's torch_dtype, else bfloat16",
    )
    parser.add_argument("--batch-size", type=_positive_int, default=1)
    parser.add_argument("--seq-len", type=_positive_int, default=512)
    parser.add_argument("--lora-rank", type=_positive_int, default=16)
    parser.add_argument("--lora-layers", type=_positive_int, default=16)
    parser.add_argument("--grad-checkpoint", action="store_true")
    parser.add_argument("--backend", choices=BACKENDS, default="cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)
    try:
        if args.preset is not None:
            presets = builtin_presets()
            if args.preset not in presets:
                parser.error(f"unknown preset {args.preset!r}; known: {', '.join(presets)}")
            arch = presets[args.preset].architecture
        else:
            arch = preset_from_config_json(args.config).architecture
    except YouraiUsageError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    dtype = args.dtype or default_dtype(arch)
    shape = TrainingShape(
        bits=args.bits,
        group_size=args.group_size,
        dtype=dtype,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lora_rank=args.lora_rank,
        lora_layers=args.lora_layers,
        grad_checkpoint=args.grad_checkpoint,
        backend=args.backend,
    )
    estimate = estimate_training_memory(arch, shape)
    if args.json:
        print(json.dumps(estimate.to_json()))
    else:
        print(format_breakdown(estimate))
    return 0


def default_dtype(arch: Mapping[str, Any]) -> str:
    """The config's torch_dtype when MLX supports it, else bfloat16 (mlx-lm's habit)."""
    dtype = arch.get("torch_dtype") or arch.get("dtype")
    return str(dtype) if dtype in DTYPE_BYTES else "bfloat16"


if __name__ == "__main__":
    sys.exit(main())
