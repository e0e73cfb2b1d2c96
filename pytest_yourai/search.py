"""Max-fit search: the largest batch size, then LoRA rank, then LoRA layers that fit.

The estimator proposes, the probe confirms. For each knob in turn (the others held at the
best found so far) the search starts at the largest candidate whose conservative estimate
fits the budget, probes it, and then walks up while the probe passes (and the base
estimate is within twice the budget), or down while it fails. The policy (``search``) is
pure: probing is a callable, so it is tested without MLX. ``SearchBenchmark`` runs it for
``--yourai-search``: the fixture's object, probing each candidate under a memory limit.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from pytest_yourai.autoconfig import BenchmarkConfig
from pytest_yourai.benchmark import YouraiBenchmark
from pytest_yourai.estimator import estimate_training_memory
from pytest_yourai.eventlog import SUBPROCESS_COMPLETED, SUBPROCESS_FAILED
from pytest_yourai.judge import judge
from pytest_yourai.results import Verdict
from pytest_yourai.timelimits import probe_deadline

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


class SearchBenchmark(YouraiBenchmark):
    """``--yourai-search``: the largest batch, then rank, then layers that fit: the
    estimator proposes, probes confirm.

    Every probe runs with ``--memory-limit-gb`` at the budget (available minus the safety
    threshold), so a candidate that does not fit fails as a rehearsed OOM, never by
    exhausting the machine. The whole budget is reserved for the search."""

    def run(self) -> dict[str, Any]:
        budget = self.budget_gb()
        admission = self.admit(None)
        timeout_s, _ = probe_deadline(self.item, self.session.settings.timeout_s)
        try:
            found = search(
                self.preflight.config,
                int(self.preset.architecture["num_hidden_layers"]),
                budget,
                self.estimate,
                lambda config: self.probe(config, budget, timeout_s),
            )
        finally:
            self.session.ledger.release(admission.key)
        return self.report(found, budget)

    def estimate(self, config: BenchmarkConfig) -> tuple[float, float]:
        shape = replace(
            self.preflight.shape,
            batch_size=config.batch_size,
            lora_rank=config.lora_rank,
            lora_layers=config.lora_layers,
        )
        e = estimate_training_memory(self.preset.architecture, shape, self.preflight.census)
        return e.estimated_base_gb, e.estimated_conservative_gb

    def probe(
        self, config: BenchmarkConfig, budget: float, timeout_s: float
    ) -> tuple[bool, float | None]:
        """One candidate, logged like any other probe; its failure is data, not a test
        failure. A watchdog kill still stops the search (and the run, unless forced)."""
        knobs = {name: getattr(config, name) for name in KNOBS}
        spec = {**self.spec, **knobs, "memory_limit_gb": round(budget, 4)}
        outcome, watchdog, pid = self.spawn(spec, timeout_s, search=knobs)
        judgement = judge(outcome, self.facts(pid, watchdog, timeout_s, "yourai"))
        if judgement.verdict is Verdict.KILLED:
            self.session.log.write_event(
                judgement.event, preset=self.preset.name, **judgement.fields
            )
            self.fail_with(judgement)
        event = SUBPROCESS_COMPLETED if judgement.passed else SUBPROCESS_FAILED
        fields = {k: v for k, v in judgement.fields.items() if k in SEARCH_EVENT_FIELDS[event]}
        self.session.log.write_event(event, preset=self.preset.name, search=knobs, **fields)
        peak = (outcome.result or {}).get("peak_memory_gb")
        peak = float(peak) if isinstance(peak, int | float) else None
        return judgement.passed and peak is not None and peak <= budget, peak

    def report(self, found: SearchResult, budget: float) -> dict[str, Any]:
        config = found.config
        summary = {
            "batch_size": config.batch_size if config else None,
            "lora_rank": config.lora_rank if config else None,
            "lora_layers": config.lora_layers if config else None,
            "peak_memory_gb": found.peak_gb,
            "budget_gb": round(budget, 4),
            "probes": found.probes,
        }
        self.prop("search", json.dumps(summary))
        if config is None:
            self.fail(
                Verdict.OOM,
                f"search: nothing fits in {budget:.3g} GB, even batch 1, rank "
                f"{min(RANKS)}, 1 layer ({found.probes} probes)",
                "",
            )
        for name in KNOBS:
            self.prop(name, getattr(config, name))
        if found.peak_gb is not None:
            self.prop("peak_memory_gb", found.peak_gb)
        self.prop("verdict", Verdict.PASS)
        return {"status": "ok", **summary}


# What the search's probe events carry (a search probe's failure is data, not a verdict).
SEARCH_EVENT_FIELDS = {
    SUBPROCESS_COMPLETED: ("exit_code", "peak_memory_gb", "stdout_preview"),
    SUBPROCESS_FAILED: ("exit_code", "status", "stderr", "stdout_preview"),
}
