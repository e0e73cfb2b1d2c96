"""The census of a model: what the estimator needs to know of the model mlx-lm builds.

The estimator stays pure: it takes a ``Census`` as input. The census comes from mlx-lm's own
model class, built lazily (no memory is allocated) in a child Python
(``python -m pytest_yourai.probe --census``; this process never imports mlx), with the
probe's quantization. It holds the exact bytes of the weights, the LoRA parameters of each
block at rank 1 (LoRA's size is linear in the rank), and each block's kind: how it mixes
tokens (attention or something else), its MLP (gated, plain, or a mixture of experts with
its experts, top-k and shared experts). Censuses are cached in pytest's cache per config, and
the built-in presets ship theirs (``presets_census.json``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_yourai.spawn import ask_probe

SHIPPED_FILE = Path(__file__).with_name("presets_census.json")


class EstimateRefused(ValueError):
    """The estimator cannot estimate this model: it says which type and what is missing."""


@dataclass(frozen=True)
class LinearInfo:
    """One layer of a block that mlx-lm's ``linear_to_lora_layers`` adapts by default."""

    path: str  # as mlx_lm.lora's lora_parameters.keys match it ("self_attn.q_proj")
    in_dim: int
    out_dim: int
    experts: int  # 0: a dense linear; else a switch linear's experts
    quantized: bool
    rank1: int  # its adapter's parameters at rank 1
    reads: str  # the input it reads: linears with one label read one tensor

    @classmethod
    def from_json(cls, row: list[Any]) -> LinearInfo:
        path, in_dim, out_dim, experts, quantized, rank1, reads = row
        return cls(str(path), int(in_dim), int(out_dim), int(experts), bool(quantized),
                   int(rank1), str(reads))  # fmt: skip

    def to_json(self) -> list[Any]:
        return [self.path, self.in_dim, self.out_dim, self.experts, self.quantized, self.rank1,
                self.reads]  # fmt: skip


@dataclass(frozen=True)
class BlockKind:
    count: int
    attention: bool
    mixer: tuple[str, ...]
    mlp: str  # "gated" | "plain" | "moe"
    lora_rank1: int
    attention_width: int = 0  # the q, k and v projections' output widths, summed
    heads: int | None = None
    intermediate: int = 0
    experts: int = 0
    top_k: int | None = None
    moe_intermediate: int = 0
    shared_intermediate: int = 0
    parameters: int = 0  # elements of the block's own weights (what full fine-tuning trains)
    linears: tuple[LinearInfo, ...] = ()

    def active_intermediate(self) -> int:
        """The MLP width each token goes through: for a mixture of experts, its top-k
        experts' and the shared experts'."""
        if self.mlp == "moe":
            return int(self.top_k or 0) * self.moe_intermediate + self.shared_intermediate
        return self.intermediate


@dataclass(frozen=True)
class Census:
    model_type: str
    bits: int
    group_size: int
    dtype: str
    weights_bytes: int
    total_parameters: int
    blocks: tuple[BlockKind, ...]
    hidden_size: int | None = None  # the embeddings' width
    vocab_size: int | None = None  # the embeddings' rows

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Census:
        blocks = tuple(
            BlockKind(
                count=int(b["count"]),
                attention=bool(b["attention"]),
                mixer=tuple(b.get("mixer") or ()),
                mlp=str(b["mlp"]),
                lora_rank1=int(b["lora_rank1"]),
                attention_width=int(b.get("attention_width") or 0),
                heads=None if b.get("heads") is None else int(b["heads"]),
                intermediate=int(b.get("intermediate") or 0),
                experts=int(b.get("experts") or 0),
                top_k=None if b.get("top_k") is None else int(b["top_k"]),
                moe_intermediate=int(b.get("moe_intermediate") or 0),
                shared_intermediate=int(b.get("shared_intermediate") or 0),
                parameters=int(b.get("parameters") or 0),
                linears=tuple(LinearInfo.from_json(row) for row in b.get("linears") or ()),
            )
            for b in data["blocks"]
        )
        return cls(
            model_type=str(data["model_type"]),
            bits=int(data["bits"]),
            group_size=int(data["group_size"]),
            dtype=str(data["dtype"]),
            weights_bytes=int(data["weights_bytes"]),
            total_parameters=int(data["total_parameters"]),
            blocks=blocks,
            hidden_size=data.get("hidden_size"),
            vocab_size=data.get("vocab_size"),
        )

    def per_block(self) -> Iterator[BlockKind]:
        for kind in self.blocks:
            for _ in range(kind.count):
                yield kind

    def last(self, n: int) -> list[BlockKind]:
        """The last ``n`` blocks: the ones LoRA adapts."""
        every = list(self.per_block())
        return every[len(every) - min(n, len(every)) :]

    @property
    def has_linears(self) -> bool:
        """Whether it lists each block's linears (censuses taken before it did do not)."""
        return all(kind.linears for kind in self.blocks)

    def lora_parameters(self, rank: int, layers: int) -> int:
        return rank * sum(kind.lora_rank1 for kind in self.last(layers))

    def effective_arch(self, arch: Mapping[str, Any]) -> dict[str, Any]:
        """The config's fields as the estimator reads them, taken from the model itself
        where the census knows them (configs name them differently across models)."""
        every = list(self.per_block())
        merged = dict(arch)
        merged["num_hidden_layers"] = len(every)
        if self.hidden_size:
            merged["hidden_size"] = self.hidden_size
        if self.vocab_size:
            merged["vocab_size"] = self.vocab_size
        if every:
            merged["intermediate_size"] = every[-1].active_intermediate()
            merged["_attention_width"] = every[-1].attention_width
        if every and every[-1].heads:
            merged["num_attention_heads"] = every[-1].heads
        return merged

    def refusal(self) -> str | None:
        """Why the estimator cannot estimate this model, or None."""
        for kind in self.blocks:
            if not kind.attention:
                mixer = ", ".join(kind.mixer) or "no attention"
                return (
                    f"model type {self.model_type}: its blocks mix tokens with {mixer}, "
                    "which the estimator has no calibrated terms for"
                )
            if kind.mlp == "moe" and not kind.top_k:
                return (
                    f"model type {self.model_type}: a mixture of experts whose config gives "
                    "no experts-per-token (num_experts_per_tok)"
                )
        return None


def census_key(arch: Mapping[str, Any], bits: int, group_size: int, dtype: str) -> str:
    raw = json.dumps([dict(arch), bits, group_size, dtype], sort_keys=True, default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def shipped() -> dict[str, Any]:
    try:
        data = json.loads(SHIPPED_FILE.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def take_census(
    arch: Mapping[str, Any], bits: int, group_size: int, dtype: str, timeout_s: float = 300.0
) -> Census:
    """Ask a child Python to build the model lazily; EstimateRefused when mlx-lm cannot."""
    spec = {
        "config": dict(arch),
        "bits": bits,
        "group_size": group_size,
        "dtype": dtype,
        "preset": "census",
    }
    result, problem = ask_probe(["--census"], spec, timeout_s)
    if result is not None and result.get("status") == "ok":
        return Census.from_json(result["census"])
    detail = problem or "no output"
    raise EstimateRefused(
        f"model type {arch.get('model_type')}: mlx-lm cannot build it from this config ({detail})"
    )


_TAKEN: dict[str, Census] = {}


def census_for(
    arch: Mapping[str, Any],
    bits: int,
    group_size: int,
    dtype: str,
    cache: Any = None,
    linears: bool = False,
) -> Census:
    """The census of a model: shipped with the built-in presets, taken already in this
    process, from pytest's ``cache``, or taken (and then cached). ``linears``: one that
    lists each block's linears (an mlx_lm.lora config's keys, dropout, DoRA or full
    fine-tuning need them); an older one without is taken again."""
    key = census_key(arch, bits, group_size, dtype)
    if key in _TAKEN and (_TAKEN[key].has_linears or not linears):
        return _TAKEN[key]
    known = shipped().get(key)
    if known is None and cache is not None:
        known = cache.get(f"yourai/census/{key}", None)
    if isinstance(known, dict):
        try:
            found = Census.from_json(known)
            if found.has_linears or not linears:
                _TAKEN[key] = found
                return found
        except (KeyError, TypeError, ValueError):
            pass  # an older or damaged entry: take it again
    census = take_census(arch, bits, group_size, dtype)
    _TAKEN[key] = census
    if cache is not None:
        cache.set(f"yourai/census/{key}", census_to_json(census))
    return census


def census_to_json(census: Census) -> dict[str, Any]:
    return {
        "model_type": census.model_type,
        "bits": census.bits,
        "group_size": census.group_size,
        "dtype": census.dtype,
        "weights_bytes": census.weights_bytes,
        "total_parameters": census.total_parameters,
        "hidden_size": census.hidden_size,
        "vocab_size": census.vocab_size,
        "blocks": [
            {
                "count": b.count,
                "attention": b.attention,
                "mixer": list(b.mixer),
                "mlp": b.mlp,
                "lora_rank1": b.lora_rank1,
                "attention_width": b.attention_width,
                "heads": b.heads,
                "intermediate": b.intermediate,
                "experts": b.experts,
                "top_k": b.top_k,
                "moe_intermediate": b.moe_intermediate,
                "shared_intermediate": b.shared_intermediate,
                "parameters": b.parameters,
                "linears": [linear.to_json() for linear in b.linears],
            }
            for b in census.blocks
        ],
    }
