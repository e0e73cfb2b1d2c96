"""Config policies: the safe-config table of the original Rust CLI (policy "seed", the
default), and the estimator-driven "fit" policy.

Pure functions: memory in, a BenchmarkConfig out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

SAFE_CONFIG_TABLE_POLICY, FIT_POLICY = "seed", "fit"  # the values of --yourai-config
CONFIG_POLICIES = (SAFE_CONFIG_TABLE_POLICY, FIT_POLICY)


@dataclass(frozen=True)
class BenchmarkConfig:
    batch_size: int
    lora_rank: int
    lora_layers: int

    def describe(self) -> str:
        return f"batch={self.batch_size}, rank={self.lora_rank}, layers={self.lora_layers}"


def safe_config_table(
    size_billions: float, available_gb: float, num_layers: int
) -> BenchmarkConfig:
    """The safe-config table (``get_safe_benchmark_config`` in the original Rust CLI).

    | size | available | batch | rank | layers |
    | 70B  | < 40 GB   | 1 | 16 | 8  |
    | 70B  | 40–60 GB  | 1 | 24 | 12 |
    | 70B  | > 60 GB   | 1 | 32 | 16 |
    | 14B  | < 20 GB   | 1 | 32 | 12 |
    | 14B  | otherwise | 2 | 48 | 16 |
    | 7–8B | any       | 2 | 64 | 16 |

    Sizes between the rows take the row of the next size down (a 32B model is treated as
    a 14B, a 10B as a 7-8B); models above 70B take the 70B row. Models below 7B are not in
    the Rust table: they get batch 2, rank 16 under 1B and rank 32 up to 7B, adapting up to 16
    blocks. ``lora_layers`` never exceeds the model's block count.
    """
    if size_billions >= 40:
        if available_gb < 40:
            config = BenchmarkConfig(1, 16, 8)
        elif available_gb <= 60:
            config = BenchmarkConfig(1, 24, 12)
        else:
            config = BenchmarkConfig(1, 32, 16)
    elif size_billions >= 12:
        config = BenchmarkConfig(1, 32, 12) if available_gb < 20 else BenchmarkConfig(2, 48, 16)
    elif size_billions >= 6:
        config = BenchmarkConfig(2, 64, 16)
    elif size_billions >= 1:
        config = BenchmarkConfig(2, 32, 16)
    else:
        config = BenchmarkConfig(2, 16, 16)
    return replace(config, lora_layers=min(config.lora_layers, num_layers))


def apply_pins(config: BenchmarkConfig, pins: Mapping[str, Any]) -> BenchmarkConfig:
    """A preset's pinned batch_size / lora_rank / lora_layers win over any policy."""
    return BenchmarkConfig(
        batch_size=int(pins.get("batch_size", config.batch_size)),
        lora_rank=int(pins.get("lora_rank", config.lora_rank)),
        lora_layers=int(pins.get("lora_layers", config.lora_layers)),
    )


def fit_candidates(num_layers: int) -> Iterable[BenchmarkConfig]:
    """Candidates for the fit policy, most preferred first: batch, then rank, then layers."""
    layer_steps = sorted(
        {n for n in (4, 8, 12, 16, 24, 32, 48, 64, 80, 96, 128) if n < num_layers} | {num_layers},
        reverse=True,
    )
    for batch in (8, 4, 2, 1):
        for rank in (64, 48, 32, 16, 8):
            for layers in layer_steps:
                yield BenchmarkConfig(batch, rank, layers)


def fit_config(
    num_layers: int,
    budget_gb: float,
    conservative_gb: Callable[[BenchmarkConfig], float],
) -> BenchmarkConfig | None:
    """The largest (batch, rank, layers) whose conservative estimate fits ``budget_gb``."""
    for candidate in fit_candidates(num_layers):
        if conservative_gb(candidate) <= budget_gb:
            return candidate
    return None


get_safe_benchmark_config = safe_config_table  # the Rust CLI's name
