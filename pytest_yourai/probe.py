"""The probe: a child program that measures what an mlx-lm LoRA fine-tune allocates.

This is the only module that imports mlx / mlx_lm. The plugin runs it as
``python -m pytest_yourai.probe`` with the run's settings as JSON in the environment
variable ``YOURAI_PROBE_SPEC``; each command-line flag overrides the matching field.

It builds the model with mlx-lm's own class for the config's ``model_type`` (synthetic,
shape-exact weights quantized block by block, or real weights when they are on disk),
adds LoRA with ``linear_to_lora_layers``, and trains through mlx-lm's own trainer
(``mlx_lm.tuner.trainer.train``: compiled step, masked cross-entropy) on batches of
random tokens at full length. Progress goes to stdout, flushed, line by line; the last
line is ``BENCHMARK_RESULT: {json}``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, MutableMapping, Sequence
from pathlib import Path
from typing import Any

from pytest_yourai.footprint import FootprintMeter, early_cuda_meter, source_for

# The GPU's used memory before MLX makes its CUDA context: where the driver does not report
# per-process memory, the footprint is what the device uses above this reading.
_CUDA_METER = early_cuda_meter() if sys.platform != "darwin" else None

import mlx.core as mx  # noqa: E402 - after the reading above, before any MLX work
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402

from pytest_yourai.estimator import SLICE_BYTES  # noqa: E402
from pytest_yourai.fields import (  # noqa: E402
    DEFAULT_BITS,
    DEFAULT_GROUP_SIZE,
    DEFAULT_STEPS,
    DTYPES,
    IN_FLIGHT_MODES,
    add_run_flags,
    probe_defaults,
)
from pytest_yourai.presets import builtin_presets  # noqa: E402
from pytest_yourai.protocol import (  # noqa: E402
    SPEC_ENV,
    block_line,
    built_line,
    loading_line,
    result_line,
    step_line,
)

GB = 1e9
EXIT_OK, EXIT_ERROR, EXIT_OOM, EXIT_USAGE = 0, 1, 3, 2

_OOM_PATTERNS = re.compile(
    r"out of memory|unable to allocate|failed to allocate|attempting to allocate|"
    r"insufficient memory|cudaErrorMemoryAllocation|std::bad_alloc|memory limit",
    re.IGNORECASE,
)

_out = sys.stdout

# MLX encodes GPU work ahead of the device in command buffers (Metal) or graphs (CUDA) and
# keeps every input of an encoded op alive until the device has run it: up to 10 committed
# buffers of up to 100 ops / 1000 MB each on an H100. That is what mlx_lm.lora runs with
# ("mlx", the default) and what the machine must hold; MLX throttles only at its own memory
# limit (0.95 x the device's total on CUDA), not at what another process left free.
# "bounded" commits one op per buffer, which makes the peak the step's own need and
# repeatable; a variable already in the environment wins. Read by MLX at the first GPU op,
# so this must run before any.
BOUNDED_IN_FLIGHT_ENV = {"MLX_MAX_OPS_PER_BUFFER": "1", "MLX_MAX_MB_PER_BUFFER": "1"}


def say(message: str) -> None:
    """A progress line on the real stdout, flushed at once for stdout_preview."""
    _out.write(message + "\n")
    _out.flush()


class ProbeOOM(Exception):
    """The probe ran out of (possibly rehearsed) memory."""


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


def gb(nbytes: float) -> float:
    return round(nbytes / GB, 6)


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
    if spec["in_flight"] not in IN_FLIGHT_MODES:
        raise ValueError(f"in_flight must be one of {IN_FLIGHT_MODES}, got {spec['in_flight']!r}")
    for key in ("batch_size", "seq_len", "steps", "lora_rank", "lora_layers", "group_size"):
        if int(spec[key]) <= 0:
            raise ValueError(f"{key} must be positive, got {spec[key]!r}")
    if spec["dtype"] not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {spec['dtype']!r}")
    return spec


def apply_in_flight(mode: str, environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set MLX's command-buffer limits for ``mode``; returns the values in effect."""
    env = os.environ if environ is None else environ
    if mode == "bounded":
        for key, value in BOUNDED_IN_FLIGHT_ENV.items():
            env.setdefault(key, value)
    return {key: env[key] for key in BOUNDED_IN_FLIGHT_ENV if key in env}


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


def process_peak_rss_gb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return gb(peak if sys.platform == "darwin" else peak * 1024)


class MemoryCap:
    """``--memory-limit-gb``: MLX's own limit plus a deterministic check of its peak."""

    def __init__(self, limit_gb: float | None) -> None:
        self.limit_bytes = int(limit_gb * GB) if limit_gb is not None else None
        if self.limit_bytes is not None:
            mx.set_memory_limit(self.limit_bytes)

    def check(self, peak_bytes: int) -> None:
        if self.limit_bytes is not None and peak_bytes > self.limit_bytes:
            raise ProbeOOM(
                f"memory limit exceeded: peak {gb(peak_bytes):.3f} GB > "
                f"limit {gb(self.limit_bytes):.3f} GB"
            )


def _get_model_classes(config: dict[str, Any]) -> tuple[Any, Any]:
    """The Model and ModelArgs classes mlx-lm builds for the config: its module for the
    model type, after mlx-lm's public remapping tables (as ``mlx_lm.utils.load_model``)."""
    import mlx_lm.utils as utils

    model_type = config["model_type"]
    architectures = config.get("architectures") or ()
    if isinstance(architectures, str):
        architectures = (architectures,)
    by_architecture = getattr(utils, "MODEL_ARCHITECTURE_REMAPPING", {})
    remapped = [by_architecture.get((model_type, a)) for a in architectures]
    found = next((m for m in remapped if m is not None), None)
    model_type = found or getattr(utils, "MODEL_REMAPPING", {}).get(model_type, model_type)
    try:
        module = importlib.import_module(f"mlx_lm.models.{model_type}")
    except ImportError as exc:
        raise ValueError(f"Model type {model_type} not supported.") from exc
    return module.Model, module.ModelArgs


def quantize_predicate(model: nn.Module, group_size: int) -> Any:
    """mlx-lm's rule (``mlx_lm.utils.quantize_model``): layers that can be quantized and
    whose input width divides by the group size, filtered by the model's own
    ``quant_predicate`` where it has one (MoE routers stay unquantized, for example)."""
    custom = getattr(model, "quant_predicate", None)

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        weight = getattr(module, "weight", None)
        if not hasattr(module, "to_quantized") or weight is None:
            return False
        if weight.shape[-1] % group_size != 0:
            return False
        return custom(path, module) if callable(custom) else True

    return predicate


def local_weights(spec: dict[str, Any]) -> Path | None:
    """A local directory with safetensors for ``weights``: a PATH, or the HF cache on auto."""
    weights = spec.get("weights", "auto")
    if weights == "synthetic":
        return None
    if weights != "auto":
        path = Path(weights)
        if not path.is_dir() or not any(path.glob("*.safetensors")):
            raise ValueError(f"--weights {weights}: not a directory with *.safetensors files")
        return path
    repo = str(spec.get("model_name") or "")
    if "/" not in repo:
        return None
    hub = Path(
        os.environ.get("HF_HUB_CACHE")
        or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
    )
    snapshots = hub / ("models--" + repo.replace("/", "--")) / "snapshots"
    for snapshot in sorted(snapshots.glob("*"), reverse=True):
        if (snapshot / "config.json").exists() and any(snapshot.glob("*.safetensors")):
            return snapshot
    return None


# Matrices with more elements than this are made a slice at a time, so that no phase of the
# build holds a float32 copy of a whole embedding, head or expert stack.
SLICED_MIN_ELEMENTS = 1 << 20


def build_sliced(module: nn.Module) -> None:
    """Give ``module`` synthetic weights of its exact shapes, made, cast and quantized a
    slice of rows at a time into arrays allocated once at their final size (MLX updates
    them in place), instead of evaluating mlx-lm's float32 initialisation whole."""
    weight = module.weight
    quantized = "scales" in module
    if quantized:
        group_size, bits = int(module.group_size), int(module.bits)
        mode = str(getattr(module, "mode", "affine"))
        shape = (*weight.shape[:-1], module.scales.shape[-1] * group_size)
        dtype = module.scales.dtype
        targets = {
            name: mx.zeros(module[name].shape, module[name].dtype)
            for name in ("weight", "scales", "biases")
            if name in module
        }
    else:
        shape, dtype = tuple(weight.shape), weight.dtype
        targets = {"weight": mx.zeros(shape, dtype)}
    mx.eval(*targets.values())
    row_elements = 1
    for size in shape[1:]:
        row_elements *= int(size)
    step = max(1, SLICE_BYTES // (4 * row_elements))
    scale = float(shape[-1]) ** -0.5
    for start in range(0, int(shape[0]), step):
        stop = min(int(shape[0]), start + step)
        part = mx.random.uniform(-scale, scale, (stop - start, *shape[1:])).astype(dtype)
        if quantized:
            pieces = dict(
                zip(
                    ("weight", "scales", "biases"),
                    mx.quantize(part, group_size=group_size, bits=bits, mode=mode),
                    strict=False,
                )
            )
        else:
            pieces = {"weight": part}
        for name, target in targets.items():
            target[start:stop] = pieces[name]
        mx.eval(*targets.values())
    module.update(targets)


def _is_large(module: nn.Module) -> bool:
    weight = module.get("weight")
    if not isinstance(weight, mx.array) or weight.ndim < 2:
        return False
    elements = weight.size
    if "scales" in module:  # packed: count the weights it stands for
        elements = module["scales"].size * int(module.group_size)
    return bool(elements >= SLICED_MIN_ELEMENTS)


def _materialize(module: nn.Module) -> None:
    """Build ``module``'s large matrices a slice at a time, then evaluate the rest."""
    for _, leaf in module.named_modules():
        if _is_large(leaf):
            build_sliced(leaf)
    mx.eval(module.parameters())


def build_model(
    spec: dict[str, Any], cap: MemoryCap, evaluate: bool = True
) -> tuple[nn.Module, str]:
    """The model with the target dtype and quantization; returns (model, weights source).

    With ``evaluate=False`` nothing is computed: parameters stay lazy, which is enough to
    count them for a model far larger than this machine."""
    dtype = getattr(mx, spec["dtype"])
    bits, group_size = int(spec["bits"]), int(spec["group_size"])
    path = local_weights(spec)
    if path is not None:
        from mlx_lm.utils import load_model

        say(loading_line(path))
        model, config = load_model(path, lazy=True)
        if bits < 16 and "quantization" not in config:
            nn.quantize(
                model,
                group_size=group_size,
                bits=bits,
                class_predicate=quantize_predicate(model, group_size),
            )
        mx.eval(model.parameters())
        return model, str(path)

    config = dict(spec["config"])
    model_class, args_class = _get_model_classes(config)
    model = model_class(args_class.from_dict(config))
    # Everything stays lazy until evaluated: cast and quantize the whole model (so the
    # quantization predicate sees full paths, as in mlx-lm), then build block by block,
    # large matrices a slice at a time, and last what lies outside the blocks (the
    # embeddings, the head). No phase of the build holds more than one slice in float32.
    model.set_dtype(dtype)
    if bits < 16:
        nn.quantize(
            model,
            group_size=group_size,
            bits=bits,
            class_predicate=quantize_predicate(model, group_size),
        )
    if not evaluate:
        return model, "synthetic"
    blocks = list(model.layers)
    total = len(blocks)
    for index, block in enumerate(blocks, start=1):
        _materialize(block)
        cap.check(mx.get_peak_memory())
        if index == 1 or index == total or index % max(1, total // 10) == 0:
            say(block_line(index, total))
    _materialize(model)
    cap.check(mx.get_peak_memory())
    # The build's freed slices sit in MLX's buffer cache; a model loaded from disk leaves
    # none, so neither does this one.
    mx.clear_cache()
    return model, "synthetic"


# Leaf names of attention projections across mlx-lm's models: a block holding one of these
# mixes tokens by attention; any other mixer (state space, linear attention, convolution) is
# one the estimator is not calibrated for.
ATTENTION_LEAVES = frozenset(
    {
        "q_proj",
        "qkv_proj",
        "c_attn",
        "query_key_value",
        "Wqkv",
        "wqkv",
        "q_a_proj",
        "kv_a_proj_with_mqa",
        "qkv",
        "query",
        "in_proj_qkv",
        "W_pack",
        "c_q",
        "wq",
    }
)
# The projections whose outputs make queries, keys and values (their widths, summed, are the
# attention's activation width per token).
QKV_LEAVES = frozenset(
    {
        "q_proj",
        "k_proj",
        "v_proj",
        "qkv_proj",
        "c_attn",
        "query_key_value",
        "Wqkv",
        "wqkv",
        "W_pack",
        "c_q",
        "c_k",
        "c_v",
        "wq",
        "wk",
        "wv",
        "q_b_proj",
        "kv_b_proj",
    }
)
TOP_K_ATTRIBUTES = ("num_experts_per_tok", "top_k", "n_activated_experts", "k")
HEADS_ATTRIBUTES = ("n_heads", "num_heads", "num_attention_heads", "n_head", "heads")
GATED_LEAVES = frozenset({"gate_proj", "gate_up_proj", "w1", "w3", "gate", "c_fc2"})
UP_LEAVES = ("gate_up_proj", "up_proj", "gate_proj", "fc1", "c_fc", "dense_h_to_4h", "w1", "w3")
TOP_K_KEYS = (
    "num_experts_per_tok",
    "num_experts_per_token",
    "moe_top_k",
    "moe_topk",
    "n_activated_experts",
    "num_activated_experts",
    "top_k",
    "moe_k",
)


def _attention_class(name: str) -> bool:
    return "Attention" in name and not any(k in name for k in ("Linear", "Delta", "Lightning"))


def _int_attribute(block: nn.Module, names: Sequence[str]) -> int | None:
    """The first positive int attribute of that name on the block's modules."""
    for module in block.modules():
        for name in names:
            value = vars(module).get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _top_k(block: nn.Module, config: dict[str, Any]) -> int | None:
    """Experts per token: what the block's router keeps, else the config's field."""
    found = _int_attribute(block, TOP_K_ATTRIBUTES)
    if found is not None:
        return found
    for key in TOP_K_KEYS:
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _out_dim(module: nn.Module) -> int:
    """Output width of a (possibly quantized, possibly switch) linear layer."""
    weight = module["weight"]
    return int(weight.shape[-2])


def block_census(block: nn.Module, config: dict[str, Any]) -> dict[str, Any]:
    """What the estimator needs of one decoder block of mlx-lm's model: how it mixes
    tokens, its MLP (gated or not, dense or a mixture of experts) and its widths."""
    leaves = [(path, m) for path, m in block.named_modules() if "weight" in m]
    names = {path.rsplit(".", 1)[-1] for path, _ in leaves}
    switch = [(p, m) for p, m in leaves if "Switch" in type(m).__name__]
    attention = bool(names & ATTENTION_LEAVES) or any(
        _attention_class(type(m).__name__) for m in block.modules()
    )
    info: dict[str, Any] = {
        "attention": attention,
        "heads": _int_attribute(block, HEADS_ATTRIBUTES) if attention else None,
        "attention_width": sum(
            _out_dim(m) for p, m in leaves if p.rsplit(".", 1)[-1] in QKV_LEAVES
        ),
        "mixer": []
        if attention
        else sorted(
            {
                type(m).__name__
                for _, m in block.children().items()
                if isinstance(m, nn.Module) and "Norm" not in type(m).__name__
            }
        ),
        "gated": bool(names & GATED_LEAVES)
        or any("GLU" in type(m).__name__ for m in block.modules()),
    }
    if switch:
        experts = int(switch[0][1]["weight"].shape[0])
        ups = [m for p, m in switch if p.rsplit(".", 1)[-1] in UP_LEAVES]
        top_k = _top_k(block, config)
        shared = sum(
            _out_dim(m)
            for p, m in leaves
            if "shared" in p and p.rsplit(".", 1)[-1] in ("up_proj", "gate_up_proj", "w1", "fc1")
        )
        info.update(
            mlp="moe",
            experts=experts,
            top_k=top_k,
            moe_intermediate=_out_dim(ups[0]) if ups else None,
            shared_intermediate=shared,
        )
    else:
        ups = [m for p, m in leaves if p.rsplit(".", 1)[-1] in UP_LEAVES]
        width = _out_dim(ups[0]) if ups else 0
        if ups and "gate_up_proj" in names:
            width //= 2
        info.update(mlp="gated" if info["gated"] else "plain", intermediate=width)
    return info


def model_census(spec: dict[str, Any]) -> dict[str, Any]:
    """The estimator's input for a model mlx-lm builds: built lazily (nothing allocated),
    quantized as the probe and mlx-lm do. Exact weight bytes, LoRA parameters per block at
    rank 1 (LoRA's size is linear in the rank: ``linear_to_lora_layers`` on every linear,
    switch and embedding layer of each adapted block), and each block's kind."""
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = build_model({**spec, "weights": "synthetic"}, MemoryCap(None), evaluate=False)
    weights = sum(int(v.nbytes) for _, v in tree_flatten(model.parameters()))
    total = count_parameters(model)
    blocks = list(model.layers)
    config = dict(spec["config"])
    kinds = [block_census(block, config) for block in blocks]
    model.freeze()
    linear_to_lora_layers(model, len(blocks), {"rank": 1, "scale": 20.0, "dropout": 0.0})
    for kind, block in zip(kinds, blocks, strict=True):
        kind["lora_rank1"] = sum(int(v.size) for _, v in tree_flatten(block.trainable_parameters()))
    runs: list[dict[str, Any]] = []
    for kind in kinds:
        if runs and {k: v for k, v in runs[-1].items() if k != "count"} == kind:
            runs[-1]["count"] += 1
        else:
            runs.append({"count": 1, **kind})
    embeddings = [
        m for _, m in model.named_modules() if "Embedding" in type(m).__name__ and "weight" in m
    ]
    embedding = embeddings[0] if embeddings else None
    hidden = vocab = None
    if embedding is not None:
        rows = int(embedding["weight"].shape[0])
        width = (
            int(embedding["scales"].shape[-1]) * int(embedding.group_size)
            if "scales" in embedding
            else int(embedding["weight"].shape[-1])
        )
        hidden, vocab = width, rows
    return {
        "model_type": config.get("model_type"),
        "hidden_size": hidden,
        "vocab_size": vocab,
        "bits": int(spec["bits"]),
        "group_size": int(spec["group_size"]),
        "dtype": spec["dtype"],
        "weights_bytes": weights,
        "total_parameters": total,
        "blocks": runs,
    }


def count_parameters(model: nn.Module) -> int:
    from mlx_lm.utils import get_total_parameters

    return int(get_total_parameters(model))


def trainable_parameter_count(model: nn.Module) -> int:
    from mlx.utils import tree_flatten

    return sum(int(v.size) for _, v in tree_flatten(model.trainable_parameters()))


def random_batches(spec: dict[str, Any], vocab_size: int) -> Any:
    """An iterate_batches replacement: full-length rows of random tokens, the worst case."""
    batch, seq_len = int(spec["batch_size"]), int(spec["seq_len"])

    def iterate(
        dataset: Any,
        batch_size: int,
        max_seq_length: int,
        loop: bool = False,
        seed: int | None = None,
        comm_group: Any = None,
    ) -> Iterator[tuple[mx.array, mx.array]]:
        lengths = mx.array([[0, seq_len]] * batch)
        while True:
            tokens = mx.random.randint(0, vocab_size, (batch, seq_len + 1))
            yield tokens, lengths

    return iterate


def text_batches(spec: dict[str, Any], model_path: Path) -> Any:
    """Batches of real text from ``--data``, tokenized and cut/padded to seq_len."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tokenizer = load_tokenizer(model_path)
    batch, seq_len = int(spec["batch_size"]), int(spec["seq_len"])
    rows: list[list[int]] = []
    with open(spec["data"], encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                text = json.loads(line).get("text", "")
                rows.append(list(tokenizer.encode(text))[: seq_len + 1])
    if len(rows) < batch:
        raise ValueError(f"--data {spec['data']}: {len(rows)} rows, fewer than batch size {batch}")

    def iterate(
        dataset: Any,
        batch_size: int,
        max_seq_length: int,
        loop: bool = False,
        seed: int | None = None,
        comm_group: Any = None,
    ) -> Iterator[tuple[mx.array, mx.array]]:
        index = 0
        while True:
            chosen = [rows[(index + j) % len(rows)] for j in range(batch)]
            index += batch
            width = max(len(r) for r in chosen)
            padded = [r + [0] * (width - len(r)) for r in chosen]
            lengths = [[0, len(r) - 1] for r in chosen]
            yield mx.array(padded), mx.array(lengths)

    return iterate


def run_probe(spec: dict[str, Any], phase: Phase) -> dict[str, Any]:
    """Build the model, add LoRA, train ``steps`` steps with mlx-lm's trainer; the
    measurements (MLX's peaks per phase, the steps' times, the footprint)."""
    cap = MemoryCap(spec.get("memory_limit_gb"))
    steps = int(spec["steps"])
    say(
        f"probe: {spec.get('preset', '?')} backend={backend_name()} dtype={spec['dtype']} "
        f"bits={spec['bits']} batch={spec['batch_size']} seq={spec['seq_len']} "
        f"rank={spec['lora_rank']} layers={spec['lora_layers']} steps={steps}"
    )
    phase.enter("build")
    build_started = time.perf_counter()
    model, weights_source = build_model(spec, cap)
    total_parameters = count_parameters(model)
    say(built_line(total_parameters, time.perf_counter() - build_started))
    phase.enter("lora")
    trainable = add_lora(model, spec)
    resident, load_peak = mx.get_active_memory(), mx.get_peak_memory()
    cap.check(load_peak)
    say(f"resident {gb(resident):.3f} GB, load peak {gb(load_peak):.3f} GB, trainable {trainable}")
    phase.enter("train")
    mx.reset_peak_memory()
    step_seconds, step_peaks = train_steps(model, spec, cap, weights_source)
    train_peak = mx.get_peak_memory()
    phase.enter("done")
    tokens_per_step = int(spec["batch_size"]) * int(spec["seq_len"])
    steady = step_seconds[1:] or step_seconds
    peak_growth = len(step_peaks) >= 2 and step_peaks[-1] > step_peaks[-2] * 1.005
    if peak_growth:
        say("warning: the peak still rose at the last step; more --steps may show a higher peak")
    return {
        "weights": weights_source,
        "peak_memory_gb": gb(max(load_peak, train_peak)),
        "load_peak_memory_gb": gb(load_peak),
        "train_peak_memory_gb": gb(train_peak),
        "resident_memory_gb": gb(resident),
        "steps": len(step_seconds),
        "step_seconds": [round(s, 4) for s in step_seconds],
        "tokens_per_second": round(tokens_per_step / statistics.median(steady), 2)
        if steady
        else 0.0,
        "trainable_parameters": trainable,
        "total_parameters": total_parameters,
        "peak_growth": peak_growth,
        "phase_started_at": phase.started_at,
        **phase.footprint(),
    }


def add_lora(model: nn.Module, spec: dict[str, Any]) -> int:
    """mlx-lm's LoRA on the last ``lora_layers`` blocks; the trainable parameter count."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model.freeze()
    num_layers = min(int(spec["lora_layers"]), len(model.layers))
    linear_to_lora_layers(
        model,
        num_layers,
        {"rank": int(spec["lora_rank"]), "scale": float(spec["lora_scale"]), "dropout": 0.0},
    )
    mx.eval(model.parameters())
    return trainable_parameter_count(model)


def train_steps(
    model: nn.Module, spec: dict[str, Any], cap: MemoryCap, weights_source: str
) -> tuple[list[float], list[int]]:
    """mlx-lm's own trainer for ``steps`` steps; each step's seconds and MLX peak."""
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.trainer import TrainingArgs, train

    steps, batch = int(spec["steps"]), int(spec["batch_size"])
    step_seconds: list[float] = []
    step_peaks: list[int] = []

    class Progress(TrainingCallback):  # type: ignore[misc]
        def on_train_loss_report(self, info: dict[str, Any]) -> None:
            peak = mx.get_peak_memory()
            step_peaks.append(peak)
            step_seconds.append(1.0 / float(info["iterations_per_second"]))
            say(step_line(info["iteration"], steps, info["train_loss"], gb(peak), step_seconds[-1]))
            cap.check(peak)

    if spec.get("data") and weights_source != "synthetic":
        batches = text_batches(spec, Path(weights_source))
    else:
        batches = random_batches(spec, int(spec["config"]["vocab_size"]))
    with tempfile.TemporaryDirectory(prefix="yourai-probe-") as scratch:
        args = TrainingArgs(
            batch_size=batch,
            iters=steps,
            steps_per_report=1,
            steps_per_eval=steps + 1,
            steps_per_save=steps + 1,
            max_seq_length=int(spec["seq_len"]) + 1,
            adapter_file=str(Path(scratch) / "adapters.safetensors"),
            grad_checkpoint=bool(spec["grad_checkpoint"]),
        )
        # mlx-lm's trainer draws its progress UI on stdout; keep stdout for our protocol.
        with contextlib.redirect_stdout(sys.stderr):
            train(
                model, optim.Adam(learning_rate=1e-5), [0] * batch, None, args=args,
                iterate_batches=batches, training_callback=Progress(),
            )  # fmt: skip
    return step_seconds, step_peaks


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


def classify_failure(exc: BaseException) -> str:
    if isinstance(exc, ProbeOOM | MemoryError):
        return "oom"
    return "oom" if _OOM_PATTERNS.search(str(exc)) else "error"


def emit_result(result: dict[str, Any]) -> None:
    _out.write(result_line(result) + "\n")
    _out.flush()


# What the probe's result repeats of its spec (its "config").
ECHOED_SPEC = (
    "preset", "bits", "group_size", "dtype", "batch_size", "seq_len", "steps", "lora_rank",
    "lora_layers", "lora_scale", "grad_checkpoint", "in_flight",
)  # fmt: skip


def errand(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int | None:
    """The short jobs: device info, a census, a parameter count, the matmul throughput;
    None when asked for none of them (then: a training run)."""
    if args.device_info:
        emit_result({"status": "ok", **device_info()})
        return EXIT_OK
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
    try:
        emit_result({"status": "ok", "census": model_census(spec)})
    except (Exception, SystemExit) as exc:  # mlx-lm cannot build it (some modules exit)
        emit_result({"status": "error", "error": f"{type(exc).__name__}: {exc}"})
        return EXIT_ERROR
    return EXIT_OK


def spec_or_exit(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    try:
        return resolve_spec(args)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as exc:
        parser.exit(EXIT_USAGE, f"{parser.prog}: error: {exc}\n")


def measure(spec: dict[str, Any]) -> int:
    """A training run, measured; one result line whatever happens."""
    buffer_env = apply_in_flight(spec["in_flight"])
    info = device_info()
    phase = Phase(FootprintMeter(source_for(str(info["backend"]), _CUDA_METER)))
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
        traceback.print_exc(file=sys.stderr)
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    done = errand(args, parser)
    if done is not None:
        return done
    return measure(spec_or_exit(args, parser))


if __name__ == "__main__":
    sys.exit(main())
