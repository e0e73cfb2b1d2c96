"""Memory estimator for MLX LoRA/QLoRA training: pure functions of shapes, no I/O.

It predicts the probe's ``train_peak_memory_gb``: MLX's peak over the training steps of
mlx-lm's trainer, with the model resident. Terms follow how mlx-lm allocates:

- weights: quantized linears (and embeddings) pack ``bits`` per weight plus a scale and a
  bias per group of ``group_size`` in the model dtype; layers whose input width does not
  divide by the group size stay in the model dtype, as ``nn.quantize`` leaves them;
- LoRA: mlx-lm creates ``lora_a``/``lora_b`` in float32 on every linear of the adapted
  blocks; gradients and Adam's two moments are float32 too (16 bytes per trainable weight);
- activations: what the backward pass keeps for each adapted block, per token, in the model
  dtype; with gradient checkpointing only each block's input is kept, plus one live block;
- logits and the cross-entropy over the vocabulary;
- framework overhead: a fitted constant, plus MLX's in-flight window with ``in_flight="mlx"``.

The fitted terms have per-backend coefficients, found by ``benchmarks/calibrate_estimator.py``
from probe measurements (CALIBRATION below; docs/estimator.md has the commands and figures):

- the graph's own memory: what the backward pass keeps (per live block: the MLP's and the
  attention's activations; gradient checkpointing keeps block inputs instead, and MLX's
  breadth-first scheduler recomputes some blocks ahead of their backward), the logits and the
  cross-entropy, explicit attention scores where attention is not fused (Gemma 2's
  soft-capping on every backend; every model on CPU and Metal; on CUDA where cuDNN does not
  take the shape, from MLX's source: SDPA_FALLBACK_BYTES), and per-token
  hidden-width tensors outside the blocks. The probe measures this by default
  (``--in-flight bounded``: MLX encodes one op ahead of the device), and it repeats;
- with ``in_flight="mlx"`` (MLX's defaults), the in-flight window: MLX encodes ahead of the
  GPU, up to 10 committed command buffers, and every op's inputs stay alive until its buffer
  finishes. How much that holds depends on timing, so it is fitted, capped, and the
  conservative estimate uses an upper envelope of it instead of the typical value.

Usage::

    python -m pytest_yourai.estimate --preset hermes-70b --batch-size 1 --lora-rank 16 \
        --lora-layers 8 --backend cuda [--json]
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_yourai.census import BlockKind, Census, EstimateRefused, LinearInfo
from pytest_yourai.fields import BACKENDS, IN_FLIGHT_MODES
from pytest_yourai.presets import EXPERT_KEYS, head_dim, qkv_has_bias, tie_embeddings

GB = 1e9
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Per-backend coefficients, in bytes per unit of each feature (see calibration_features),
# the backend overhead (see backend_overhead_bytes) and the conservative margins: package
# data written by benchmarks/calibrate_estimator.py from probe measurements (the commands
# are in docs/estimator.md). Read once at import; the functions below stay pure.
CALIBRATION_FILE = Path(__file__).with_name("calibration.json")
_CALIBRATION_DATA: dict[str, Any] = json.loads(CALIBRATION_FILE.read_text(encoding="utf-8"))
CALIBRATION: dict[str, dict[str, float]] = _CALIBRATION_DATA["graph"]
# What the process holds beyond MLX's peak counter, per backend: its footprint on the device
# (footprint.py) minus MLX's peak. ``process_gb``: what the backend holds whatever the model
# (the CUDA context and its workspaces; on CPU the Python process with MLX and mlx-lm
# loaded); ``cache``: the share of the step's transient memory (MLX's peak above the exact
# weights and adapter state) that MLX's buffer cache and the allocator's reserve keep
# beside the live arrays at the peak; ``cache_checkpoint`` the same with gradient
# checkpointing (recomputed blocks leave more buffers of other sizes in the cache). The
# ``*_conservative`` values cover every calibration run.
BACKEND_OVERHEAD: dict[str, dict[str, float]] = _CALIBRATION_DATA["backend_overhead"]
# The conservative estimate: graph terms x GRAPH_MARGIN (CHECKPOINT_MARGIN with gradient
# checkpointing, whose recompute-ahead depends on MLX's scheduling), plus, with MLX's own
# in-flight window, its envelope (window_envelope), plus the conservative backend overhead
# (its cache share taken on the envelope).
GRAPH_MARGIN: dict[str, float] = _CALIBRATION_DATA["graph_margin"]
CHECKPOINT_MARGIN: float = _CALIBRATION_DATA["checkpoint_margin"]
# Per kind of run (window_class): the GB, and the share of the window, above the window
# that cover every measured one (window_envelope).
ENVELOPE_GB: dict[str, float] = _CALIBRATION_DATA["envelope_gb"]
ENVELOPE_SHARE: dict[str, float] = _CALIBRATION_DATA["envelope_share"]
WINDOW_CLASSES = ("quantized", "dense", "quantized_checkpoint", "dense_checkpoint")
UNFUSED_ATTENTION_MODEL_TYPES = frozenset({"gemma2"})
# CUDA: MLX's fused attention (cuDNN) takes a head dim that is a multiple of 8 up to 128, in
# float16 or bfloat16; its backward also needs the sequence a multiple of 128, or it
# recomputes the attention unfused (mlx/backend/cuda/scaled_dot_product_attention.cpp:
# supports_sdpa_cudnn, ScaledDotProductAttentionVJP::use_fallback; MLX 0.30.4-0.32.x).
CUDNN_SDPA_MAX_HEAD_DIM = 128
CUDNN_SDPA_BACKWARD_TILE = 128
# Bytes per score (batch x heads x L x L, bfloat16) of MLX's unfused attention
# (mlx/fast.cpp, the fallback of scaled_dot_product_attention): it keeps the softmax output
# of a block for its backward, and that backward holds about three more of its size (the
# gradient of the softmax output, and the softmax VJP's two products). Derived from the
# source, not fitted: the same figures as Metal's, which trains through the same fallback.
SDPA_FALLBACK_BYTES = {"sdpa_saved": 2.0, "sdpa_backward": 6.0}
# The loss's transients and one block's unfused attention backward: the first is over before
# the second starts (the logits' gradient is consumed by the head's backward), so MLX's peak
# takes the larger of the two (mlx/fast.cpp's fallback; docs/estimator.md, Metal).
LOSS_TERMS = ("logits", "softcap")
ATTENTION_BACKWARD = ("scores_transient", "sdpa_backward")

GRAPH_TERMS = (
    "logits",
    "softcap",
    "mlp",
    "attention",
    "checkpoint",
    "checkpoint_ahead",
    "checkpoint_ahead_fused",
    "scores",
    "scores_transient",
    "hidden",
    "constant",
    "moe_gather",
)
# A plain MLP (up, activation, down) keeps two tensors of its width for the backward pass
# where a gated one (gate, up, their product) keeps three: derived, not measured.
PLAIN_MLP_SHARE = 2.0 / 3.0
# mlx-lm builds these with fused projections (qkv_proj, gate_up_proj): fewer ops per block,
# so with gradient checkpointing MLX's breadth-first scheduler recomputes more blocks ahead
# of their backward (phi-4, 2 x 2048 tokens: 16.66 GB, 13.37 GB with MLX_BFS_MAX_WIDTH=1).
FUSED_PROJECTION_MODEL_TYPES = frozenset({"phi3"})


def calibration_features(
    arch: Mapping[str, Any], shape: TrainingShape, census: Census | None = None
) -> dict[str, float]:
    """The fitted terms' inputs (see CALIBRATION); each is multiplied by a bytes coefficient.

    T = batch x seq tokens (scaled by the dtype's width: the terms are calibrated on
    bfloat16), L = adapted blocks, N = all blocks, w = q + k + v widths. Graph terms:
    ``logits`` T x vocab (one more for final-logit soft-capping, ``softcap``); per live block
    ``mlp`` T x intermediate and ``attention`` T x w, where every adapted block is live, or one
    with gradient checkpointing, which keeps ``checkpoint`` T x L x hidden instead and
    recomputes blocks ahead of their backward (``checkpoint_ahead``, T x (intermediate + w),
    apart for fused-projection models); ``scores`` T x seq x heads per live block where
    attention is unfused; ``hidden`` T x hidden outside the blocks (embeddings, final norm,
    the head's input gradient, frozen blocks' transients); ``constant`` (MB). The in-flight
    window (``in_flight="mlx"`` only) is apart: window_bytes.

    With a census (census.py) the MLP of each live block is the width a token goes through:
    its top-k experts' and the shared experts' for a mixture of experts, two thirds of it for
    a plain (not gated) MLP, which keeps two tensors of that width where a gated one keeps
    three; ``moe_gather`` is T x top-k x hidden per live mixture-of-experts block (the
    tokens gathered to and scattered from their experts)."""
    if census is not None:
        arch = census.effective_arch(arch)
    hidden = int(arch["hidden_size"])
    inter = int(arch["intermediate_size"])
    vocab = int(arch["vocab_size"])
    blocks = int(arch["num_hidden_layers"])
    heads = int(arch.get("num_attention_heads") or 0)
    width = attention_width(arch)
    adapted = min(shape.lora_layers, blocks)
    tokens = float(shape.batch_size * shape.seq_len)
    live = 1 if shape.grad_checkpoint else adapted
    unfused = attention_unfused(arch, shape.backend)
    fused = 1.0 if arch.get("model_type") in FUSED_PROJECTION_MODEL_TYPES else 0.0
    checkpoint = 1.0 if shape.grad_checkpoint else 0.0
    # Graph terms are calibrated on bfloat16 models; activations follow the model dtype.
    t = tokens * DTYPE_BYTES[shape.dtype] / 2
    scores = t * shape.seq_len * heads
    mlp_widths, gather = live_mlp(census, inter, hidden, adapted, live)
    inter = int(mlp_widths[-1]) if mlp_widths else inter
    ahead = t * (inter + width) * checkpoint
    return {
        "logits": t * vocab,
        "softcap": t * vocab if arch.get("final_logit_softcapping") else 0.0,
        "mlp": t * sum(mlp_widths),
        "moe_gather": t * gather,
        "attention": t * live * width,
        "checkpoint": t * adapted * hidden * checkpoint,
        "checkpoint_ahead": ahead * (1 - fused),
        "checkpoint_ahead_fused": ahead * fused,
        "scores": scores * live if unfused else 0.0,
        "scores_transient": scores if unfused else 0.0,
        "hidden": t * hidden,
        "constant": 1e6,
        **sdpa_fallback_features(cuda_attention_fallback(arch, shape), scores, live),
    }


def sdpa_fallback_features(fallback: str | None, scores: float, live: int) -> dict[str, float]:
    """CUDA's unfused attention (not fitted: SDPA_FALLBACK_BYTES): the forward unfused keeps
    each live block's softmax output; a backward recomputed unfused, one block's (its
    recompute does not wait for the loss's gradient: MLX makes it ahead, beside the loss's
    backward, as the H200 runs at 4 x 544 and 4 x 511 tokens show); either backward holds
    one block's transients."""
    if fallback is None:
        return {"sdpa_saved": 0.0, "sdpa_backward": 0.0}
    return {
        "sdpa_saved": scores * (live if fallback == "forward" else 1),
        "sdpa_backward": scores,
    }


def cuda_attention_fallback(arch: Mapping[str, Any], shape: TrainingShape) -> str | None:
    """Where MLX on CUDA trains a model's attention unfused although mlx-lm calls the fused
    kernel: "forward" (and so the backward) where cuDNN does not take the head dim or the
    dtype, "backward" where it takes them but not the sequence length (not a multiple of
    128: mlx-lm pads batches to 32 and the model sees one token less, so most of its runs);
    None where attention is fused, on other backends, and for models whose attention mlx-lm
    writes out itself (UNFUSED_ATTENTION_MODEL_TYPES: the ``scores`` terms)."""
    if shape.backend != "cuda" or arch.get("model_type") in UNFUSED_ATTENTION_MODEL_TYPES:
        return None
    if not arch.get("num_attention_heads"):
        return None  # attention that is not Llama's (a census width): as fitted
    dim = head_dim(arch)
    if dim % 8 or dim > CUDNN_SDPA_MAX_HEAD_DIM or shape.dtype == "float32":
        return "forward"
    if shape.seq_len % CUDNN_SDPA_BACKWARD_TILE:
        return "backward"
    return None


def attention_unfused(arch: Mapping[str, Any], backend: str) -> bool:
    """Whether the attention scores are materialized (no fused kernel for them)."""
    unfused = backend in ("cpu", "metal") or arch.get("model_type") in UNFUSED_ATTENTION_MODEL_TYPES
    if unfused and not arch.get("num_attention_heads"):
        raise EstimateRefused(
            f"model type {arch.get('model_type')}: its attention scores need the number of "
            "heads, which its config does not give (num_attention_heads)"
        )
    return unfused


def attention_width(arch: Mapping[str, Any]) -> int:
    """q + k + v widths (a census may give it: models whose attention is not Llama's)."""
    if arch.get("_attention_width"):
        return int(arch["_attention_width"])
    heads = int(arch.get("num_attention_heads") or 0)
    kv_heads = int(arch.get("num_key_value_heads") or heads)
    return (heads + 2 * kv_heads) * head_dim(arch)


def live_mlp(
    census: Census | None, inter: int, hidden: int, adapted: int, live: int
) -> tuple[list[float], float]:
    """The MLP width each live block's tokens go through, and the tokens' gather width of
    the mixture-of-experts blocks among them (see calibration_features)."""
    if census is None:
        return [float(inter)] * live, 0.0
    kinds = census.last(adapted)[-live:]
    widths = [
        k.active_intermediate() * (PLAIN_MLP_SHARE if k.mlp == "plain" else 1.0) for k in kinds
    ]
    gather = sum(float(k.top_k or 0) * hidden for k in kinds if k.mlp == "moe")
    return widths, gather


def graph_bytes(features: Mapping[str, float], coefficients: Mapping[str, float]) -> float:
    return sum(coefficients.get(t, 0.0) * features[t] for t in GRAPH_TERMS)


def window_class(shape: TrainingShape) -> str:
    """The kind of run, for the in-flight window: quantized (4- and 8-bit windows overlap:
    how far the queue fills is timing, not width) or dense; checkpointed or not."""
    kind = "quantized" if shape.bits < 16 else "dense"
    return kind + ("_checkpoint" if shape.grad_checkpoint else "")


def window_bytes(
    arch: Mapping[str, Any], shape: TrainingShape, coefficients: Mapping[str, float]
) -> float:
    """MLX's in-flight window with its default command-buffer limits (``in_flight="mlx"``).

    MLX encodes work ahead of the device, up to about 11 committed command buffers of up
    to 100 ops or 1000 MB of inputs each on an H100/H200, and every queued op keeps its
    inputs alive until the device has run it. The queue fills when the device is slower
    than the encoding, that is when each op is large: the window grows with the tokens
    times hidden width times MLP width (an op's work), saturates at the buffers' limit
    (``cap``), and is smaller when few blocks are adapted (a shorter backward pass to queue).
    Fitted per kind of run (window_class: quantized or dense weights, checkpointed or not).
    Measured on CUDA; Metal's buffers are smaller (see CALIBRATION["metal"])."""
    kind = window_class(shape)
    blocks = int(arch["num_hidden_layers"])
    adapted = min(shape.lora_layers, blocks)
    tokens = float(shape.batch_size * shape.seq_len)
    work = tokens * float(arch["hidden_size"]) * float(arch["intermediate_size"])
    scale = coefficients[f"window_{kind}_scale"] * 1e-10
    cap = coefficients[f"window_{kind}_cap_gb"] * GB
    layers = float(min(1.0, adapted / 16.0) ** coefficients["window_layers_power"])
    return min(scale * work * layers * GB, cap)


def window_envelope(
    window: float,
    shape: TrainingShape,
    most_gb: Mapping[str, float] = ENVELOPE_GB,
    share: Mapping[str, float] = ENVELOPE_SHARE,
) -> float:
    """The most the in-flight window can take, for the conservative figure: the window plus
    what the measured runs of its kind took above theirs, as a share of the window
    (ENVELOPE_SHARE) up to a most in GB (ENVELOPE_GB), both fitted. How far MLX queues
    depends on how fast the host encodes against how fast the device runs: one shape
    (llama-3.2-1b, 8-bit, 2 x 2048 tokens) queued 5.4 GB on the H100 host, 11.9 GB on the
    H200 host."""
    kind = window_class(shape)
    return window + min(most_gb[kind] * GB, share[kind] * window)


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
    in_flight: str = "mlx"
    # mlx_lm.lora's optimizer (OPTIMIZER_STATES) and grad_accumulation_steps
    optimizer: str = "adam"
    grad_accumulation_steps: int = 1
    # mlx_lm.lora's fine_tune_type (FINE_TUNE_TYPES), lora_parameters.keys (None: every
    # linear, mlx-lm's default) and lora_parameters.dropout: see adapter_terms
    fine_tune_type: str = "lora"
    lora_keys: tuple[str, ...] | None = None
    lora_dropout: float = 0.0

    @property
    def default_adapters(self) -> bool:
        """LoRA on every linear without dropout: what the graph terms were calibrated on."""
        return self.fine_tune_type == "lora" and self.lora_keys is None and not self.lora_dropout


@dataclass(frozen=True)
class Estimate:
    """What a LoRA run needs, in decimal GB.

    ``estimated_base_gb`` and ``estimated_conservative_gb`` are the process's footprint on
    its device (what the machine must hold free), in the run's in-flight mode: the larger of
    the build's and the training's. ``mlx_peak_gb`` and ``mlx_peak_conservative_gb`` are
    MLX's own peak counter over training (mlx_lm.lora's "Peak mem"), the figure
    baselines compare."""

    estimated_base_gb: float
    estimated_conservative_gb: float
    breakdown: Mapping[str, float]
    mlx_peak_gb: float = 0.0
    mlx_peak_conservative_gb: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "estimated_base_gb": round(self.estimated_base_gb, 4),
            "estimated_conservative_gb": round(self.estimated_conservative_gb, 4),
            "mlx_peak_gb": round(self.mlx_peak_gb, 4),
            "mlx_peak_conservative_gb": round(self.mlx_peak_conservative_gb, 4),
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


# Model types whose weights and adapters the estimator's own formula gets exactly (a
# Llama-shaped block: attention and a gated MLP), checked against mlx-lm's lazily built
# models by benchmarks/model_coverage.py. Every other model needs its census.
FORMULA_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "olmo2", "gemma2"})


# State per trainable element, as mlx.optimizers keeps it (zeros_like(param): float32 for
# LoRA), read from mlx/optimizers/optimizers.py: Adam and AdamW keep m and v; SGD keeps v even
# with momentum 0; Muon keeps v (its Newton-Schulz temporaries are min(rows, cols)^2, tiny for
# LoRA); Adafactor (beta_1 unset, its default) keeps a row and a column vector per matrix:
# in + r and r + out for a LoRA pair of r * (in + out) elements, about 1/r of them.
OPTIMIZER_STATES = {"adam": 2.0, "adamw": 2.0, "sgd": 1.0, "muon": 1.0, "adafactor": 0.0}


FINE_TUNE_TYPES = ("lora", "dora", "full")


def optimizer_state_elements(
    shape: TrainingShape, trainable: float, factored: float | None = None
) -> float:
    """``factored``: Adafactor's state where it is not trainable / rank (full fine-tuning:
    a row and a column vector per matrix, the whole of every vector)."""
    if shape.optimizer == "adafactor":
        return factored if factored is not None else trainable / max(shape.lora_rank, 1)
    return OPTIMIZER_STATES[shape.optimizer] * trainable


def gradient_elements(shape: TrainingShape, trainable: float) -> float:
    """One gradient tree; accumulating over several steps holds a second, the running sum,
    between the steps (mlx_lm/tuner/trainer.py's grad_accum)."""
    return trainable * (2.0 if shape.grad_accumulation_steps > 1 else 1.0)


def check_shape(shape: TrainingShape) -> None:
    if shape.backend not in BACKENDS:
        raise ValueError(f"unknown backend {shape.backend!r}; expected one of {BACKENDS}")
    if shape.dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {shape.dtype!r}; expected one of {tuple(DTYPE_BYTES)}")
    if shape.in_flight not in IN_FLIGHT_MODES:
        raise ValueError(
            f"unknown in_flight {shape.in_flight!r}; expected one of {IN_FLIGHT_MODES}"
        )
    if shape.optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"unknown optimizer {shape.optimizer!r}; expected {OPTIMIZER_STATES}")
    if shape.fine_tune_type not in FINE_TUNE_TYPES:
        raise ValueError(
            f"unknown fine_tune_type {shape.fine_tune_type!r}; expected one of {FINE_TUNE_TYPES}"
        )


@dataclass(frozen=True)
class Trainable:
    """What training holds for the trained weights: their elements, the bytes of each (LoRA's
    and DoRA's adapters are float32; full fine-tuning trains the model's own weights in its
    dtype), the bytes of new weights (adapters; none for full), the optimizer's state
    elements, and the graph's change from calibrated LoRA (adapter_terms)."""

    elements: float
    element_bytes: float
    new_bytes: float
    optimizer_elements: float
    graph_bytes: float


def chosen_linears(kind: BlockKind, keys: tuple[str, ...] | None) -> list[LinearInfo]:
    """The linears of a block mlx-lm adapts: every one, or those whose block-relative path
    is one of ``keys`` (tuner/utils.py: ``k in keys`` over ``named_modules()``)."""
    return [lin for lin in kind.linears if keys is None or lin.path in keys]


def input_copy_bytes(
    linears: list[LinearInfo], tokens: float, each: float, shared: bool, top_k: int = 1
) -> float:
    """What the backward pass keeps of the inputs of these linears: ``each`` bytes per
    element, one tensor per input they read (``shared``: the compiled step reads one cast
    of a tensor that several linears read) or one per linear (dropout draws a mask and a
    product per linear). A mixture of experts' down projection reads each token's top-k
    experts' outputs: ``top_k`` rows per token."""

    def rows(lin: LinearInfo) -> float:
        return tokens * (top_k if lin.experts and lin.reads == lin.path else 1)

    if shared:
        widths = {lin.reads: rows(lin) * lin.in_dim for lin in linears}
        return sum(width * each for width in widths.values())
    return sum(rows(lin) * lin.in_dim * each for lin in linears)


def adapter_terms(census: Census | None, shape: TrainingShape, adapted: int) -> Trainable:
    """The trained weights and the graph's change from LoRA on every linear (what the graph
    terms were calibrated on), derived from mlx-lm's tuner (tuner/lora.py, tuner/dora.py,
    lora.py) and MLX's autograd, per adapted block, where T is the tokens of a batch:

    - LoRA (``LoRALinear``): ``(dropout(x) @ lora_a) @ lora_b`` with float32 adapters casts
      x to float32 and keeps it for ``lora_a``'s gradient: T x in x 4 bytes per input read
      (q, k and v read one; the compiled step casts it once). ``keys`` leave out the copies
      of inputs no chosen linear reads. With dropout each linear keeps its own product
      (float32) and mask (1 byte): T x in x 5 per linear.
    - DoRA (``DoRALinear``) adds, per adapted linear, the output it scales by the learned
      magnitude (kept for ``m``'s gradient, T x out in the model dtype) and, for a quantized
      model, the dequantized weight the forward pass multiplies with (kept for the input's
      gradient, out x in in the model dtype); ``m`` (out, float32) is trained too.
    - full (``unfreeze()`` of each adapted block): every weight of the block is trained in
      the model's dtype; each linear keeps its input in that dtype for its weight's gradient
      (one per input read) instead of LoRA's float32 copies.

    Blocks that keep activations (every adapted one; one with gradient checkpointing) carry
    the graph terms; the trained weights are those of every adapted block."""
    if shape.default_adapters:
        raise ValueError("adapter_terms is for runs other than LoRA on every linear")
    if census is None or not census.has_linears:
        raise EstimateRefused(
            f"fine_tune_type {shape.fine_tune_type} with these lora_parameters needs the "
            "model's census of its linears (what mlx-lm builds)"
        )
    kinds = census.last(adapted)
    refuse_moe(census, shape, kinds)
    live = kinds[-1:] if shape.grad_checkpoint else kinds
    graph = sum(block_graph_bytes(kind, shape) for kind in live)
    dtype_bytes = float(DTYPE_BYTES[shape.dtype])
    if shape.fine_tune_type == "full":
        elements = float(sum(kind.parameters for kind in kinds))
        linears = [lin for k in kinds for lin in k.linears]
        matrices = sum((lin.in_dim + lin.out_dim) * max(1, lin.experts) for lin in linears)
        vectors = elements - sum(lin.in_dim * lin.out_dim * max(1, lin.experts) for lin in linears)
        factored = float(matrices) + max(0.0, vectors)
        optimizer = optimizer_state_elements(shape, elements, factored)
        return Trainable(elements, dtype_bytes, 0.0, optimizer, graph)
    adapters = [lin for k in kinds for lin in chosen_linears(k, shape.lora_keys)]
    elements = float(shape.lora_rank * sum(lin.rank1 for lin in adapters))
    optimizer = optimizer_state_elements(shape, elements)
    if shape.fine_tune_type == "dora":
        magnitudes = float(sum(lin.out_dim for lin in adapters))
        optimizer += optimizer_state_elements(shape, magnitudes, factored=magnitudes)
        elements += magnitudes
    return Trainable(elements, 4.0, elements * 4.0, optimizer, graph)


def block_graph_bytes(kind: BlockKind, shape: TrainingShape) -> float:
    """One live block's graph change from calibrated LoRA (see adapter_terms)."""
    tokens = float(shape.batch_size * shape.seq_len)
    dtype_bytes = float(DTYPE_BYTES[shape.dtype])
    every = list(kind.linears)
    k = int(kind.top_k or 1)
    calibrated = input_copy_bytes(every, tokens, 4.0, shared=True, top_k=k)
    if shape.fine_tune_type == "full":
        return input_copy_bytes(every, tokens, dtype_bytes, shared=True) - calibrated
    chosen = chosen_linears(kind, shape.lora_keys)
    if shape.lora_dropout:
        graph = input_copy_bytes(chosen, tokens, 5.0, shared=False, top_k=k) - calibrated
    else:
        graph = input_copy_bytes(chosen, tokens, 4.0, shared=True, top_k=k) - calibrated
    if shape.fine_tune_type == "dora":
        for lin in chosen:
            graph += tokens * lin.out_dim * dtype_bytes
            if lin.quantized:
                graph += float(lin.out_dim * lin.in_dim) * dtype_bytes
    return graph


def trained_weights(
    arch: Mapping[str, Any], shape: TrainingShape, census: Census | None, lora_params: float
) -> Trainable:
    """LoRA on every linear (the calibrated case), or adapter_terms."""
    if shape.default_adapters:
        return Trainable(
            lora_params, 4.0, lora_params * 4.0, optimizer_state_elements(shape, lora_params), 0.0
        )
    return adapter_terms(census, shape, min(shape.lora_layers, int(arch["num_hidden_layers"])))


def full_fine_tune_peaks(
    shape: TrainingShape, weights: float, optimizer: float, gradients: float, trained: Trainable
) -> tuple[float, float]:
    """(what the backward pass holds beside the graph, the optimizer update's peak) for full
    fine-tuning, whose gradients are as large as the trained weights. The backward pass
    makes them as it frees the activations (at its start it holds the most activations and
    no gradient); the update, compiled into the step, makes the new state and the new
    weights while the step's inputs (the old ones) stay alive: old and new state, the new
    weights, and the running sum of gradients when accumulating."""
    update = (
        weights
        + 2.0 * optimizer
        + trained.elements * trained.element_bytes
        + (gradients / 2.0 if shape.grad_accumulation_steps > 1 else 0.0)
    )
    return weights + optimizer, update


def refuse_moe(census: Census, shape: TrainingShape, kinds: list[BlockKind]) -> None:
    """What adapter_terms does not model for a mixture of experts' switch linears, named."""
    for kind in kinds:
        switch = [lin for lin in kind.linears if lin.experts]
        if not switch:
            continue
        chosen = {lin.path for lin in chosen_linears(kind, shape.lora_keys)}
        if shape.fine_tune_type == "full":
            what = "fine_tune_type: full of a mixture of experts"
        elif shape.fine_tune_type == "dora" and chosen & {lin.path for lin in switch}:
            what = "fine_tune_type: dora on switch linears (mlx-lm refuses it too)"
        elif shape.lora_dropout and chosen & {lin.path for lin in switch}:
            what = "lora_parameters.dropout on a mixture of experts' switch linears"
        else:
            continue
        raise EstimateRefused(f"model type {census.model_type}: not modeled yet: {what}")


def model_bytes(
    arch: Mapping[str, Any], shape: TrainingShape, census: Census | None
) -> tuple[Mapping[str, Any], float, float]:
    """(the architecture as estimated, the weights' bytes, the LoRA parameters): from the
    formula for the types it knows, else from the census."""
    if census is None:
        model_type = arch.get("model_type")
        if model_type not in FORMULA_MODEL_TYPES or is_mixture_of_experts(arch):
            raise EstimateRefused(
                f"model type {model_type}: its shapes are not the Llama-shaped block the "
                "formula knows; the estimate needs the model's census (what mlx-lm builds)"
            )
        adapted = min(shape.lora_layers, int(arch["num_hidden_layers"]))
        weights = weight_bytes(arch, shape.bits, shape.group_size, shape.dtype)
        return arch, weights, lora_parameter_count(arch, shape.lora_rank, adapted)
    refusal = census.refusal()
    if refusal is not None:
        raise EstimateRefused(refusal)
    if (census.bits, census.group_size, census.dtype) != (
        shape.bits,
        shape.group_size,
        shape.dtype,
    ):
        raise ValueError("the census was taken for other bits, group size or dtype")
    arch = census.effective_arch(arch)
    adapted = min(shape.lora_layers, int(arch["num_hidden_layers"]))
    return arch, float(census.weights_bytes), census.lora_parameters(shape.lora_rank, adapted)


def estimate_training_memory(
    arch: Mapping[str, Any], shape: TrainingShape, census: Census | None = None
) -> Estimate:
    """Predict the memory (decimal GB) of an mlx-lm LoRA training run.

    ``census`` (census.py) is what mlx-lm's own model class says of the model; without one,
    only the model types in FORMULA_MODEL_TYPES are estimated. EstimateRefused names the
    model type and what is missing when the estimator cannot estimate it."""
    check_shape(shape)
    effective, weights, lora_params = model_bytes(arch, shape, census)
    trained = trained_weights(effective, shape, census, lora_params)
    # The adapters (float32; none for full fine-tuning), the trained weights' gradients and
    # the optimizer's state, in the trained weights' dtype.
    lora = trained.new_bytes
    gradients = gradient_elements(shape, trained.elements) * trained.element_bytes
    optimizer = trained.optimizer_elements * trained.element_bytes
    coefficients = CALIBRATION[shape.backend]
    features = calibration_features(effective, shape, census)
    graph = {t: coefficients.get(t, 0.0) * features[t] for t in GRAPH_TERMS}
    graph.update({t: b * features[t] for t, b in SDPA_FALLBACK_BYTES.items()})
    graph["adapters"] = trained.graph_bytes
    if shape.in_flight == "mlx":
        window = window_bytes(effective, shape, coefficients)
        envelope = window_envelope(window, shape)
    else:  # one op in flight: nothing beyond the graph (the graph terms were fitted so)
        window = envelope = 0.0
    exact = weights + lora + gradients + optimizer
    update = 0.0
    if shape.fine_tune_type == "full":
        exact, update = full_fine_tune_peaks(shape, weights, optimizer, gradients, trained)
    margin = CHECKPOINT_MARGIN if shape.grad_checkpoint else GRAPH_MARGIN[shape.backend]
    graph_total = sum(graph.values())
    # Two moments of the backward that are never live together: the loss's (the logits and
    # their gradient) and one block's unfused attention backward. MLX's peak is the larger;
    # the footprint holds both, the other's buffers kept in MLX's cache (other sizes).
    apart = min(sum(graph[t] for t in LOSS_TERMS), sum(graph[t] for t in ATTENTION_BACKWARD))
    held = max(exact + graph_total + window, update)
    mlx_peak = max(exact + graph_total - apart + window, update)
    mlx_peak_conservative = max(
        exact + (graph_total - apart) * margin + max(window, envelope), mlx_peak
    )
    held_conservative = max(exact + graph_total * margin + max(window, envelope), held)
    overhead = backend_overhead_bytes(shape, graph_total, window, conservative=False)
    # The conservative shares were fitted to cover every run against its graph and window.
    overhead_conservative = backend_overhead_bytes(
        shape, graph_total, max(window, envelope), conservative=True
    )
    # The build (weights made a slice at a time, as a model loads from disk) needs the
    # weights and what the backend holds; training needs more, except for odd shapes.
    build = weights + SLICE_BYTES + BACKEND_OVERHEAD[shape.backend]["process_gb"] * GB
    base = max(held + overhead, build)
    return Estimate(
        estimated_base_gb=base / GB,
        estimated_conservative_gb=max(held_conservative + overhead_conservative, build, base) / GB,
        breakdown=breakdown(weights, (lora, gradients, optimizer), graph, window, overhead),
        mlx_peak_gb=mlx_peak / GB,
        mlx_peak_conservative_gb=mlx_peak_conservative / GB,
    )


def breakdown(
    weights: float,
    trainable: tuple[float, float, float],
    graph: Mapping[str, float],
    window: float,
    overhead: float,
) -> dict[str, float]:
    """Where the base estimate goes, in GB."""
    activations = sum(
        graph[t]
        for t in (
            "mlp",
            "attention",
            "checkpoint",
            "checkpoint_ahead",
            "checkpoint_ahead_fused",
            "adapters",
        )
    )
    return {
        "weights_gb": weights / GB,
        "lora_parameters_gb": trainable[0] / GB,
        "gradients_gb": trainable[1] / GB,
        "optimizer_state_gb": trainable[2] / GB,
        "activations_gb": (activations + graph["hidden"]) / GB,
        "attention_scores_gb": sum(
            graph[t] for t in ("scores", "scores_transient", *SDPA_FALLBACK_BYTES)
        )
        / GB,
        "logits_and_loss_gb": (graph["logits"] + graph["softcap"]) / GB,
        "framework_overhead_gb": (graph["constant"] + window) / GB,
        "backend_overhead_gb": overhead / GB,
    }


# The probe makes large matrices this many bytes (float32) at a time.
SLICE_BYTES = 16 * 1024 * 1024


def backend_overhead_bytes(
    shape: TrainingShape, graph: float, window: float, conservative: bool
) -> float:
    """What the process holds beyond MLX's peak (see BACKEND_OVERHEAD): what the backend
    holds whatever the model, plus shares of the step's graph memory and of the in-flight
    window that MLX's buffer cache and the allocator's reserve keep beside the live arrays."""
    terms = BACKEND_OVERHEAD[shape.backend]
    suffix = "_conservative" if conservative else ""
    graph_share = terms[("cache_checkpoint" if shape.grad_checkpoint else "cache") + suffix]
    process = terms["process_conservative_gb" if conservative else "process_gb"]
    return process * GB + graph_share * graph + terms["cache_window" + suffix] * window


def is_mixture_of_experts(arch: Mapping[str, Any]) -> bool:
    return any(arch.get(key) for key in EXPERT_KEYS)


def seed_estimate_gb(parameters_billions: float) -> tuple[float, float]:
    """The original Rust CLI's formula, kept for comparison: 2 + 1.8·P and 2 + 2.2·P GB."""
    return 2.0 + 1.8 * parameters_billions, 2.0 + 2.2 * parameters_billions


def training_flops(
    arch: Mapping[str, Any], shape: TrainingShape, census: Census | None = None
) -> float:
    """Floating-point operations of one training step.

    Forward through every block and the head (2 per weight per token), backward through
    the adapted span and the head (input gradients: 2 more; LoRA's own are negligible),
    plus attention (4·S·d per token per block, forward, doubled where backward runs). With a
    census the MLP is the width a token goes through (its experts', for a mixture)."""
    if census is not None:
        arch = census.effective_arch(arch)
    layers = int(arch["num_hidden_layers"])
    adapted = min(shape.lora_layers, layers)
    hidden = int(arch["hidden_size"])
    vocab = int(arch["vocab_size"])
    tokens = shape.batch_size * shape.seq_len
    if census is not None:
        widths = [k.active_intermediate() for k in census.per_block()]
        mixing = float(hidden * int(arch.get("_attention_width") or hidden) + hidden * hidden)
        per_block = mixing + 3.0 * hidden * (sum(widths) / max(1, len(widths)))
    else:
        per_block = float(sum(i * o for i, o in block_linears(arch)))
    head = vocab * hidden
    forward = 2.0 * tokens * (layers * per_block + head)
    backward = 2.0 * tokens * (adapted * per_block + head)
    if shape.grad_checkpoint:
        backward += 2.0 * tokens * adapted * per_block
    attention = 4.0 * tokens * shape.seq_len * hidden * (layers + 2 * adapted)
    return forward + backward + attention


def format_breakdown(estimate: Estimate) -> str:
    lines = [f"{name:<24} {value:>10.3f} GB" for name, value in estimate.breakdown.items()]
    lines.append(f"{'estimated_base_gb':<24} {estimate.estimated_base_gb:>10.3f} GB")
    lines.append(
        f"{'estimated_conservative_gb':<24} {estimate.estimated_conservative_gb:>10.3f} GB"
    )
    return "\n".join(lines)
