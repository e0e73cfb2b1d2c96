"""Building the model mlx-lm trains: its own class for the config's ``model_type``, cast and
quantized as mlx-lm does, with synthetic shape-exact weights made block by block (large
matrices a slice at a time), or real weights when they are on disk; and its parameter
counts."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from pytest_yourai.estimator import SLICE_BYTES
from pytest_yourai.probe.shared import MemoryCap, say
from pytest_yourai.protocol import block_line, loading_line


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


def count_parameters(model: nn.Module) -> int:
    from mlx_lm.utils import get_total_parameters

    return int(get_total_parameters(model))


def trainable_parameter_count(model: nn.Module) -> int:
    from mlx.utils import tree_flatten

    return sum(int(v.size) for _, v in tree_flatten(model.trainable_parameters()))
