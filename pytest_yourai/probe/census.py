"""The census: what the estimator needs of a model mlx-lm builds (exact weight bytes, LoRA
parameters per block, each block's kind), from the model built lazily: nothing allocated."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.nn as nn

from pytest_yourai.probe.build import build_model, count_parameters
from pytest_yourai.probe.shared import MemoryCap

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


# Leaf names of the linears that read a tensor of their own (an attention's output, the
# MLP's product): every other linear of a block's part (self_attn, mlp, ...) reads that
# part's input, shared with its siblings of the same input width (q, k and v; gate and up).
OUTPUT_LEAVES = frozenset(
    {"o_proj", "out_proj", "down_proj", "dense", "c_proj", "w2", "fc2", "wo", "dense_4h_to_h"}
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


def linear_census(block: nn.Module, before: dict[str, nn.Module]) -> list[list[Any]]:
    """The layers ``linear_to_lora_layers`` made adapters of in one block (``before``: the
    block's modules before it ran, by path): for each, its path as mlx-lm's ``keys`` match
    it, input and output widths, experts (0: a dense linear), whether its weight is
    quantized, its adapter's parameters at rank 1, and the input it reads (a label shared by
    the linears that read the same tensor)."""
    from mlx.utils import tree_flatten

    found = []
    for path, module in block.named_modules():
        if "lora_a" not in module:
            continue
        base = before.get(path)
        if base is None or "weight" not in base:
            continue
        weight = base["weight"]
        experts = int(weight.shape[0]) if weight.ndim == 3 else 0
        out_dim = int(weight.shape[-2])
        in_dim = (
            int(base["scales"].shape[-1]) * int(base.group_size)
            if "scales" in base
            else int(weight.shape[-1])
        )
        leaf = path.rsplit(".", 1)[-1]
        part = path.split(".", 1)[0]
        reads = path if leaf in OUTPUT_LEAVES else f"{part}:{in_dim}"
        rank1 = sum(int(v.size) for _, v in tree_flatten(module.trainable_parameters()))
        found.append([path, in_dim, out_dim, experts, "scales" in base, rank1, reads])
    return found


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
    for kind, block in zip(kinds, blocks, strict=True):
        # What full fine-tuning unfreezes (mlx_lm.lora: each adapted block's unfreeze()).
        kind["parameters"] = sum(int(v.size) for _, v in tree_flatten(block.parameters()))
    befores = [dict(block.named_modules()) for block in blocks]
    model.freeze()
    linear_to_lora_layers(model, len(blocks), {"rank": 1, "scale": 20.0, "dropout": 0.0})
    for kind, block, before in zip(kinds, blocks, befores, strict=True):
        kind["lora_rank1"] = sum(int(v.size) for _, v in tree_flatten(block.trainable_parameters()))
        kind["linears"] = linear_census(block, before)
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
