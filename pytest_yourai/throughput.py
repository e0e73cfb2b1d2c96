"""How long a probe takes on this machine: learned from the probes it has run.

A probe's wall time is its start-up (Python and MLX import, the build, the first step's
compile: on CUDA the first probe on a machine also compiles MLX's kernels, later ones find
them cached) plus its steps. Each finished probe leaves a ``TimingObservation``; the
model fitted to them predicts

    seconds = startup(weights) + steps x (step_overhead + flops_per_step / throughput)

with the start-up growing with the bytes of weights built, and a per-step overhead that
dominates small, launch-bound shapes. Before any observation the machine's matmul
throughput (a microbenchmark) stands in, with a fixed start-up per backend.

The model is pure; ``MachineTiming`` keeps the observations and the measured throughput in
pytest's cache, per host and backend.
"""

from __future__ import annotations

import statistics
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pytest_yourai.spawn import ask_probe

# Seconds before the steps run at full speed when nothing has been measured yet: the
# typical figure, and the least plausible one (what the time gate decides with).
FALLBACK_STARTUP_S = {"cpu": 8.0, "metal": 20.0, "cuda": 30.0}
OPTIMISTIC_STARTUP_S = {"cpu": 2.0, "metal": 5.0, "cuda": 5.0}
KEEP_OBSERVATIONS = 40


@dataclass(frozen=True)
class TimingObservation:
    """One finished probe: its shape's cost and how long its parts took."""

    flops_per_step: float
    weights_gb: float
    steps: int
    steady_step_s: float  # median of the steps after the first
    startup_s: float  # before the first step: spawn, imports, the build
    compile_s: float = 0.0  # the first step beyond the steady pace: tracing, kernel JIT

    def to_json(self) -> dict[str, Any]:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TimingObservation:
        return cls(
            flops_per_step=float(data["flops_per_step"]),
            weights_gb=float(data["weights_gb"]),
            steps=int(data["steps"]),
            steady_step_s=float(data["steady_step_s"]),
            startup_s=float(data["startup_s"]),
            compile_s=float(data.get("compile_s", 0.0)),
        )


def observe(
    flops_per_step: float, weights_gb: float, elapsed_s: float, step_seconds: Sequence[float]
) -> TimingObservation | None:
    """The observation a finished probe leaves, or None when it reported no steps."""
    if not step_seconds or elapsed_s <= 0:
        return None
    steady = statistics.median(step_seconds[1:] or step_seconds)
    startup = max(elapsed_s - sum(step_seconds), 0.0)
    compile_s = max(step_seconds[0] - steady, 0.0)
    return TimingObservation(
        flops_per_step, weights_gb, len(step_seconds), steady, startup, compile_s
    )


def _line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares intercept and slope, both kept non-negative."""
    if len(set(xs)) < 2:
        return max(statistics.median(ys), 0.0), 0.0
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    slope = max(sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var, 0.0)
    intercept = mean_y - slope * mean_x
    if intercept < 0:  # through the origin instead
        slope = sum(x * y for x, y in zip(xs, ys, strict=True)) / sum(x * x for x in xs)
        intercept = 0.0
    return intercept, slope


@dataclass(frozen=True)
class TimeModel:
    startup_s: float  # spawn, imports and the build: the median seen
    startup_s_per_gb: float
    compile_s: float  # the first step's extra once kernels are cached: the least seen
    step_overhead_s: float
    seconds_per_flop: float
    least_startup_s: float
    observations: int

    def predict(self, flops_per_step: float, weights_gb: float, steps: int) -> float:
        startup = self.startup_s + self.startup_s_per_gb * weights_gb + self.compile_s
        return startup + steps * (self.step_overhead_s + flops_per_step * self.seconds_per_flop)

    def optimistic(self, flops_per_step: float, weights_gb: float, steps: int) -> float:
        """A lower bound: the fastest start-up seen, the steps at the fitted pace."""
        steps_s = steps * (self.step_overhead_s + flops_per_step * self.seconds_per_flop)
        return min(self.least_startup_s, self.predict(flops_per_step, weights_gb, 0)) + steps_s


def fit(observations: Sequence[TimingObservation]) -> TimeModel | None:
    """The model of this machine's probe times, or None before the first observation.

    Start-up (spawn, imports, the build) is the median seen plus what the weights' size
    adds; the first step's compile is counted as the least seen after the first probe:
    MLX caches compiled kernels on the machine, so the first probe (and the first of a
    new kind of model) pays more, and the prediction is then low, never high: a probe is
    never skipped for a compile it will not pay."""
    if not observations:
        return None
    recent = list(observations)[-KEEP_OBSERVATIONS:]
    weights = [o.weights_gb for o in recent]
    startups = [o.startup_s for o in recent]
    intercept, per_gb = _line(weights, startups)
    if len(recent) >= 3:  # robust to one slow start: the median, the slope kept
        intercept = max(
            statistics.median(s - per_gb * w for s, w in zip(startups, weights, strict=True)),
            0.0,
        )
    overhead, per_flop = _line(
        [o.flops_per_step for o in recent], [o.steady_step_s for o in recent]
    )
    if per_flop == 0.0:  # one shape only: its pace stands for all
        per_flop = min(o.steady_step_s / max(o.flops_per_step, 1.0) for o in recent)
        overhead = 0.0
    return TimeModel(
        startup_s=intercept,
        startup_s_per_gb=per_gb,
        # The first observation kept may be the machine's first probe, whose kernels were
        # all compiled afresh: it says nothing of the compile of the next one.
        compile_s=min([o.compile_s for o in recent[1:]] or [0.0]),
        step_overhead_s=overhead,
        seconds_per_flop=per_flop,
        least_startup_s=min(o.startup_s + o.compile_s for o in recent),
        observations=len(recent),
    )


def predict_seconds(
    model: TimeModel | None,
    backend: str,
    flops_per_step: float,
    weights_gb: float,
    steps: int,
    gflops: float | None,
) -> tuple[float, float] | None:
    """(typical, optimistic) seconds of a probe: from the learned model, else from the
    matmul throughput ``gflops`` and a fixed start-up; None when neither is known."""
    if model is not None:
        return (
            model.predict(flops_per_step, weights_gb, steps),
            model.optimistic(flops_per_step, weights_gb, steps),
        )
    if not gflops:
        return None
    steps_s = steps * flops_per_step / (gflops * 1e9)
    return FALLBACK_STARTUP_S[backend] + steps_s, OPTIMISTIC_STARTUP_S[backend] + steps_s


# -- this machine's record, in pytest's cache ---------------------------------------------

THROUGHPUT_TIMEOUT_S = 120.0
# Assumed GFLOP/s when the throughput probe fails: slow on purpose.
FALLBACK_GFLOPS = {"cpu": 0.3, "metal": 200.0, "cuda": 2000.0}


class MachineTiming:
    """What this host's probes took (fitted into a TimeModel) and its matmul throughput,
    kept in pytest's ``cache`` per host and backend. ``enabled`` is False for a custom probe
    command, whose speed is its own."""

    def __init__(self, cache: Any, host: str, enabled: bool) -> None:
        self.cache, self.host, self.enabled = cache, host, enabled
        self._gflops: dict[str, float] = {}

    def _key(self, backend: str) -> str:
        return f"yourai/timing/{self.host}-{backend}"

    def model(self, backend: str) -> TimeModel | None:
        """None: nothing measured yet (or no cache, or a custom probe)."""
        if self.cache is None or not self.enabled:
            return None
        raw = self.cache.get(self._key(backend), [])
        try:
            return fit([TimingObservation.from_json(o) for o in raw])
        except (KeyError, TypeError, ValueError):
            return None  # an older or damaged cache entry: measure again

    def learn(
        self, backend: str, flops_per_step: float, weights_gb: float, elapsed_s: float,
        step_seconds: Sequence[float],
    ) -> None:  # fmt: skip
        """Learn from a finished probe how long probes take here."""
        if self.cache is None or not self.enabled:
            return
        seen = observe(flops_per_step, weights_gb, elapsed_s, step_seconds)
        if seen is None:
            return
        raw = self.cache.get(self._key(backend), [])
        kept = [o for o in raw if isinstance(o, dict)] if isinstance(raw, list) else []
        self.cache.set(self._key(backend), [*kept, seen.to_json()][-KEEP_OBSERVATIONS:])

    def gflops(self, backend: str, dtype: str, bits: int, measure: bool) -> float | None:
        """GFLOP/s of the backend at this dtype and bits: cached, or measured by a probe
        when ``measure`` (not in estimate-only). A failed measurement assumes a slow machine
        (with a warning): not knowing the speed must not mean "no time limit"."""
        if not self.enabled:
            return None
        key = f"yourai/throughput/{backend}-{dtype}-{bits}bit"
        if key in self._gflops:
            return self._gflops[key]
        cached = self.cache.get(key, None) if self.cache is not None else None
        if isinstance(cached, int | float) and cached > 0:
            self._gflops[key] = float(cached)
            return float(cached)
        if not measure:
            return None
        args = ["--measure-throughput", "--dtype", dtype, "--bits", str(bits)]
        result, problem = ask_probe(args, None, THROUGHPUT_TIMEOUT_S)
        value = (result or {}).get("gflops")
        if not isinstance(value, int | float) or value <= 0:
            fallback = FALLBACK_GFLOPS[backend]
            warnings.warn(
                f"yourai: could not measure {backend} throughput ({problem}); "
                f"assuming {fallback:g} GFLOP/s for time estimates",
                stacklevel=2,
            )
            self._gflops[key] = fallback
            return fallback
        self._gflops[key] = float(value)
        if self.cache is not None:
            self.cache.set(key, float(value))
        return float(value)
