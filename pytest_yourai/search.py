"""Max-fit search: the largest batch size, then LoRA rank, then LoRA layers that fit.

The estimator proposes, the probe confirms. For each knob in turn (the others held at the
best found so far) the search starts at the largest candidate whose conservative estimate
fits the budget, probes it, and then walks up while the probe passes (and the base
estimate is within twice the budget), or down while it fails. Pure: probing is a callable,
so the policy is tested without MLX.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from pytest_yourai.autoconfig import BenchmarkConfig

BATCHES = (1, 2, 4, 8, 16, 32)
RANKS = (4, 8, 16, 32, 48, 64, 128)
LAYER_STEPS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 80, 96, 128)
KNOBS = ("batch_size", "lora_rank", "lora_layers")


@dataclass
class SearchResult:
    config: BenchmarkConfig | None
    peak_gb: float | None
    probes: int
    trail: list[tuple[BenchmarkConfig, bool, float | None]] = field(default_factory=list)


def candidates(knob: str, num_layers: int) -> list[int]:
    if knob == "batch_size":
        return list(BATCHES)
    if knob == "lora_rank":
        return list(RANKS)
    return sorted({n for n in LAYER_STEPS if n < num_layers} | {num_layers})


def search(
    start: BenchmarkConfig,
    num_layers: int,
    budget_gb: float,
    estimate: Callable[[BenchmarkConfig], tuple[float, float]],
    probe: Callable[[BenchmarkConfig], tuple[bool, float | None]],
) -> SearchResult:
    """``estimate(config) -> (base_gb, conservative_gb)``; ``probe(config) -> (fits, peak)``."""
    result = SearchResult(config=None, peak_gb=None, probes=0)
    tried: dict[BenchmarkConfig, tuple[bool, float | None]] = {}

    def measure(config: BenchmarkConfig) -> tuple[bool, float | None]:
        if config not in tried:
            tried[config] = probe(config)
            result.probes += 1
            result.trail.append((config, *tried[config]))
        return tried[config]

    best = start
    smallest = BenchmarkConfig(1, min(RANKS), 1)
    for knob in KNOBS:
        values = candidates(knob, num_layers)

        # Knobs not yet searched sit at their smallest, so this one gets the room.
        def at(value: int, knob: str = knob, base: BenchmarkConfig = best) -> BenchmarkConfig:
            config = replace(base, **{knob: value})
            later = KNOBS[KNOBS.index(knob) + 1 :]
            return replace(config, **{k: getattr(smallest, k) for k in later})

        fitting = [v for v in values if estimate(at(v))[1] <= budget_gb]
        index = values.index(fitting[-1]) if fitting else 0
        passed: int | None = None
        fits, _ = measure(at(values[index]))
        if fits:
            passed = index
            # Up while the probe passes; the estimator only rules out candidates it puts
            # beyond twice the budget (it is never that far off), to bound the overshoot.
            while index + 1 < len(values) and estimate(at(values[index + 1]))[0] <= 2 * budget_gb:
                index += 1
                if not measure(at(values[index]))[0]:
                    break
                passed = index
        else:
            while index > 0:
                index -= 1
                if measure(at(values[index]))[0]:
                    passed = index
                    break
        if passed is None:
            return result  # nothing fits even at the smallest value
        best = at(values[passed])
    result.config = best
    result.peak_gb = tried[best][1] if best in tried else measure(best)[1]
    return result
