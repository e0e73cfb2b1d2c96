"""What this machine's probes taught: the estimate corrected by its own measurements. Pure.

Each finished probe leaves a ``Probe``: today's figures for its run (the footprint and MLX's
peak in its in-flight mode, with one op in flight, at a full queue, the exact part: weights
and LoRA state), the shape features the in-flight window depends on (estimator.window_class,
the tokens x hidden x MLP width that estimator.window_bytes grows with, the adapted blocks),
what it measured, where (its session: the caller's opaque id of an install or a boot) and
how long it took. A ``MachineRecord`` keeps them for one machine key (an opaque string from
the caller: backend, device, memory, MLX version) and one calibration of the estimator; a
record of another key or calibration is never used. ``correct`` makes a new estimate this
machine's; ``predict_time`` says how long a probe takes here.

Memory, per measure (the footprint; MLX's peak) and in-flight mode. A run's figure is its
exact part E, what the graph holds with one op in flight (today: B - E), and, with MLX's
defaults, the in-flight window W (today: the estimate minus B, with the cache kept beside
it): the part that depends on the host, how far MLX's queue fills being the host's encoding
against the device's speed.

- Ratios. A one-op-in-flight probe measured m against B: its ratio (m - E) / (B - E). A
  probe with MLX's defaults that ran alone (a busy device queues more) measured its window,
  m - B', against W: its ratio, where B' = E + (B - E) x the one-op ratio learned for it.
- For a new run each ratio is a weighted mean of the probes' ratios and of today's (1, weight
  PRIOR_WEIGHT). A probe weighs exp(-d^2 / 2), d the distance of the window's inputs (log
  work over WORK_SCALE, log adapted blocks over LAYERS_SCALE), times OTHER_CLASS for another
  window class, SAME_TYPE for the same model type, SAME_MODEL for the same model; the same
  run weighs SAME_RUN: one probe, and a repeat is predicted within a few percent of it.
- Typical figure: B' + ratio x W, never below B' (one op in flight: the least the run can
  hold) and never above today's full-queue figure Q (its conservative figure with the window
  at its cap), unless a probe here measured above its own Q, by that factor. One op in
  flight: E + ratio x (B - E).
- Conservative figure: the typical one plus the larger of margin x (typical - E) and, for a
  new run, SPREAD_Z x the spread (weighted standard deviation) of the ratios its neighbours
  measured x W. The margin is the largest under-prediction seen, as a share of the
  uncertain part, never below FLOOR / sqrt(probes): for a run probed before, each probe held
  out in turn (of runs probed more than once: how far a repeat moves); for a new run, each
  probed run held out whole (how far off a run never seen is). Where the record's probes
  weigh little for the run, it is raised towards today's conservative figure, by
  PRIOR_WEIGHT / (PRIOR_WEIGHT + their weight): the margin shrinks as evidence about such
  runs grows, and a run unlike any probed keeps at least today's envelope. Never above the
  (loosened) full-queue figure.
- Probes without a footprint meter (MLX's peak only): the footprint moves as MLX's peak did.
- No probe of this key and mode: today's estimate, unchanged.

Time. A probe is its start-up (spawn, imports, the build, the first step) plus its steps.
The warm start-up is a + b x weights GB over the probes that were not the first of their
session and used no kernel new to it, leaving out those that took OUTLIER x the median; a
step is c + d x FLOPs. The first probe of a session is cold (MLX compiles its kernels
afresh): what it took above the warm figure is the cold start, learned once (the median over
cold probes, else COLD_START_S) and charged only to a prediction for a session the record
has not seen, which says so (``TimePrediction.includes_cold_start``). A warm session still
compiles, on first use, what a run needs that no earlier probe of the session did
(``kernel_keys``: the quantized matmuls of a bit width, a model family's own kernels): what
a warm probe took above the warm figure is its new keys' first-use costs (``kernel_costs``:
least squares tells keys new together apart; each key costs the least its first uses left
for it), a key never seen new costs the least of its kind here (else nothing), and a
prediction in a warm session adds the costs of the run's keys that the session has not used
(``TimePrediction.compile_s``). A run probed here before is its own best measure: its steady
step and (the least of its warm probes that compiled nothing new) its start-up replace the
fits.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from pytest_yourai.census import Census
from pytest_yourai.estimator import (
    ATTENTION_BACKWARD,
    BACKEND_OVERHEAD,
    CALIBRATION,
    CHECKPOINT_MARGIN,
    ENVELOPE_GB,
    ENVELOPE_SHARE,
    GB,
    GRAPH_MARGIN,
    LOSS_TERMS,
    SDPA_FALLBACK_BYTES,
    Estimate,
    TrainingShape,
    estimate_training_memory,
    model_bytes,
    training_flops,
    window_class,
    window_envelope,
)

RECORD_VERSION = 1
# Probes remember today's figures: a record made against another calibration is not used.
CALIBRATION_ID = hashlib.sha256(
    json.dumps(
        [
            CALIBRATION,
            BACKEND_OVERHEAD,
            GRAPH_MARGIN,
            CHECKPOINT_MARGIN,
            ENVELOPE_GB,
            ENVELOPE_SHARE,
            SDPA_FALLBACK_BYTES,
            [LOSS_TERMS, ATTENTION_BACKWARD],  # never live together: MLX's peak
        ],
        sort_keys=True,
    ).encode()
).hexdigest()[:12]
KEEP_PROBES = 60  # per in-flight mode, the most recent
PRIOR_WEIGHT = 1.0  # today's calibration, as a pseudo-probe of ratio 1
WORK_SCALE = 0.35  # log tokens x hidden x MLP width: a factor of about 1.4
LAYERS_SCALE = 0.5  # log adapted blocks
SAME_TYPE = 2.0
SAME_MODEL = 3.0
SAME_RUN = 30.0
OTHER_CLASS = 0.05
FLOOR = 0.3  # the margin's least value is FLOOR / sqrt(probes), a share of the uncertain part
SPREAD_Z = 2.5
NOVEL_PULL = 1.0  # 0: no pull towards today's conservative figure (for comparison)
TINY_GB = 0.05  # a window below this is none
# Before any warm probe: a warm start-up; before any cold one: the cold start (CUDA compiles
# MLX's kernels on first use, 100-270 s on an H100/H200; Metal ships most of them built).
WARM_STARTUP_S = {"cpu": 8.0, "metal": 15.0, "cuda": 20.0}
COLD_START_S = {"cpu": 0.0, "metal": 10.0, "cuda": 150.0}
OUTLIER = 2.0
SLOPE_POINTS = 5  # a start-up or step slope needs this many probes,
SLOPE_SPAN = 3.0  # spanning this factor of weights or FLOPs
NNLS_SWEEPS = 50  # coordinate descent over the first-use costs of kernel keys,
NNLS_RIDGE = 0.1  # with a little ridge: keys only ever new together share the cost


def run_id(arch: Mapping[str, Any], shape: TrainingShape | None = None) -> str:
    """A short id of a model (no shape) or of a run (model and shape, any in-flight mode)."""
    raw: list[Any] = [dict(arch)]
    if shape is not None:
        raw.append({**asdict(shape), "in_flight": None})
    text = json.dumps(raw, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Features:
    """A run as the correction sees it: today's figures and the window's inputs (GB)."""

    in_flight: str
    model_type: str
    model: str
    run: str
    window_class: str
    work: float  # tokens x hidden x MLP width, what estimator.window_bytes grows with
    adapted: int
    predicted_gb: float  # today's footprint estimate (estimated_base_gb)
    bounded_gb: float  # the same with one op in flight
    full_queue_gb: float  # today's conservative figure with the window at its cap
    predicted_peak_gb: float  # today's MLX peak
    bounded_peak_gb: float
    full_queue_peak_gb: float
    conservative_gb: float  # today's
    conservative_peak_gb: float
    exact_gb: float  # the weights, the LoRA parameters, their gradients and optimizer state


def full_queue_gb(
    estimate: Estimate, bounded: Estimate, shape: TrainingShape
) -> tuple[float, float]:
    """Today's conservative footprint and MLX peak with the window at its cap (MLX's queue
    full): the most the in-flight window can hold, as calibrated. One op in flight: today's
    conservative figures."""
    if shape.in_flight != "mlx":
        return estimate.estimated_conservative_gb, estimate.mlx_peak_conservative_gb
    window = max(estimate.mlx_peak_gb - bounded.mlx_peak_gb, 0.0) * GB
    cap = CALIBRATION[shape.backend][f"window_{window_class(shape)}_cap_gb"] * GB
    more = max(window_envelope(cap, shape) - window_envelope(window, shape), 0.0)
    cache = BACKEND_OVERHEAD[shape.backend]["cache_window_conservative"]
    return (
        estimate.estimated_conservative_gb + more * (1.0 + cache) / GB,
        estimate.mlx_peak_conservative_gb + more / GB,
    )


def features(
    arch: Mapping[str, Any],
    shape: TrainingShape,
    estimate: Estimate | None = None,
    census: Census | None = None,
) -> Features:
    """The run's features; ``estimate`` is today's for ``shape`` (made here when None)."""
    if estimate is None:
        estimate = estimate_training_memory(arch, shape, census)
    bounded = estimate_training_memory(arch, replace(shape, in_flight="bounded"), census)
    effective, _, _ = model_bytes(arch, shape, census)
    tokens = float(shape.batch_size * shape.seq_len)
    work = tokens * float(effective["hidden_size"]) * float(effective["intermediate_size"])
    queue, queue_peak = full_queue_gb(estimate, bounded, shape)
    return Features(
        in_flight=shape.in_flight,
        model_type=str(arch.get("model_type")),
        model=run_id(arch),
        run=run_id(arch, shape),
        window_class=window_class(shape),
        work=work,
        adapted=min(shape.lora_layers, int(effective["num_hidden_layers"])),
        predicted_gb=estimate.estimated_base_gb,
        bounded_gb=bounded.estimated_base_gb,
        full_queue_gb=queue,
        predicted_peak_gb=estimate.mlx_peak_gb,
        bounded_peak_gb=bounded.mlx_peak_gb,
        full_queue_peak_gb=queue_peak,
        conservative_gb=estimate.estimated_conservative_gb,
        conservative_peak_gb=estimate.mlx_peak_conservative_gb,
        exact_gb=sum(
            estimate.breakdown.get(k, 0.0)
            for k in ("weights_gb", "lora_parameters_gb", "gradients_gb", "optimizer_state_gb")
        ),
    )


@dataclass(frozen=True)
class Probe:
    """One finished probe on this machine: its run, what it measured, how long it took."""

    run: Features
    measured_gb: float | None  # the footprint (None where the probe had no meter)
    measured_peak_gb: float  # MLX's peak over training
    phase: str = "train"  # where the footprint peaked: "train" or "build"
    session: str = ""  # the caller's id of the install or boot it ran in
    alone: bool = True  # no other probe ran on the device meanwhile
    weights_gb: float = 0.0
    flops_per_step: float = 0.0
    steps: int = 0
    step_s: float = 0.0  # a steady step (the median after the first)
    elapsed_s: float = 0.0  # the whole probe, spawn to exit
    kernels: tuple[str, ...] = ()  # what MLX compiles on first use for it (kernel_keys)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["run"] = asdict(self.run)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Probe:
        names = {f.name for f in fields(Features)}
        run = Features(**{k: v for k, v in dict(data["run"]).items() if k in names})
        rest = {f.name: data[f.name] for f in fields(cls) if f.name != "run" and f.name in data}
        rest["kernels"] = tuple(str(k) for k in rest.get("kernels", ()))
        return cls(run=run, **rest)


@dataclass(frozen=True)
class MachineRecord:
    """The probes of one machine key, oldest first."""

    key: str
    probes: tuple[Probe, ...] = ()

    def add(self, probe: Probe) -> MachineRecord:
        """The record with ``probe``, keeping the KEEP_PROBES latest of each mode."""
        kept = [*self.probes, probe]
        mode = [i for i, p in enumerate(kept) if p.run.in_flight == probe.run.in_flight]
        dropped = set(mode[:-KEEP_PROBES])
        return MachineRecord(self.key, tuple(p for i, p in enumerate(kept) if i not in dropped))

    def of(self, key: str, in_flight: str | None = None) -> list[Probe]:
        """The probes that speak for ``key`` (none for another key), of one mode or all.
        With MLX's defaults, only probes that ran alone: a busy device lets more queue."""
        if key != self.key:
            return []
        if in_flight is None:
            return list(self.probes)
        return [
            p
            for p in self.probes
            if p.run.in_flight == in_flight and (p.alone or in_flight != "mlx")
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": RECORD_VERSION,
            "key": self.key,
            "calibration": CALIBRATION_ID,
            "probes": [p.to_json() for p in self.probes],
        }

    @classmethod
    def from_json(cls, data: Any, key: str) -> MachineRecord:
        """The stored record if it is this key's, of this calibration and readable, else an
        empty one (what ``--yourai-forget-machine`` gives too)."""
        try:
            stored = (data["version"], data["key"], data["calibration"])
            if stored != (RECORD_VERSION, key, CALIBRATION_ID):
                return cls(key)
            return cls(key, tuple(Probe.from_json(p) for p in data["probes"]))
        except (KeyError, TypeError, ValueError):
            return cls(key)


# -- memory ------------------------------------------------------------------------------


def similarity(a: Features, b: Features) -> float:
    """How much probe ``b`` says of run ``a`` (see the module's docstring)."""
    if a.run == b.run:
        return SAME_RUN
    work = math.log(max(a.work, 1.0) / max(b.work, 1.0)) / WORK_SCALE
    layers = math.log(max(a.adapted, 1) / max(b.adapted, 1)) / LAYERS_SCALE
    weight = math.exp(-(work * work + layers * layers) / 2.0)
    if a.window_class != b.window_class:
        weight *= OTHER_CLASS
    if a.model_type == b.model_type:
        weight *= SAME_TYPE
    if a.model == b.model:
        weight *= SAME_MODEL
    return weight


@dataclass(frozen=True)
class Figures:
    """Today's figures of a run in one measure (the footprint, or MLX's peak), in GB."""

    exact: float  # the weights and the LoRA state: not estimated, counted
    bounded: float  # with one op in flight
    predicted: float  # in the run's own mode
    full_queue: float  # today's conservative figure with the window at its cap
    conservative: float

    @classmethod
    def of(cls, run: Features, peak: bool) -> Figures:
        if peak:
            return cls(
                run.exact_gb,
                run.bounded_peak_gb,
                run.predicted_peak_gb,
                run.full_queue_peak_gb,
                run.conservative_peak_gb,
            )
        return cls(
            run.exact_gb, run.bounded_gb, run.predicted_gb, run.full_queue_gb, run.conservative_gb
        )

    def window(self) -> float:
        """The predicted excess over one op in flight (0 where there is none to speak of)."""
        return self.predicted - self.bounded if self.predicted - self.bounded > TINY_GB else 0.0


def measured_of(probe: Probe, peak: bool) -> float | None:
    if peak:
        return probe.measured_peak_gb
    return probe.measured_gb if probe.phase == "train" else None


@dataclass(frozen=True)
class Evidence:
    """A probe as the correction uses it: its run, what it measured, its own ratio."""

    run: Features
    measured: float
    ratio: float


def mean_ratio(run: Features, evidence: Sequence[Evidence]) -> tuple[float, float, float]:
    """The weighted mean of the evidence's ratios and of today's (1, PRIOR_WEIGHT), their
    weighted spread (a standard deviation: how far the neighbours disagree), and the
    evidence's weight for ``run`` (how much the record knows of it)."""
    pairs = [(similarity(run, item.run), item.ratio) for item in evidence]
    pairs.append((PRIOR_WEIGHT, 1.0))
    mass = sum(w for w, _ in pairs)
    mean = sum(w * r for w, r in pairs) / mass
    spread = math.sqrt(sum(w * (r - mean) ** 2 for w, r in pairs) / mass)
    return mean, spread, mass - PRIOR_WEIGHT


def graph_evidence(probes: Sequence[Probe], peak: bool) -> list[Evidence]:
    """One-op-in-flight probes: their ratio of what they measured beyond the exact part to
    what was predicted beyond it."""
    out = []
    for probe in probes:
        measured = measured_of(probe, peak)
        f = Figures.of(probe.run, peak)
        if probe.run.in_flight == "bounded" and measured is not None and f.bounded > f.exact:
            out.append(Evidence(probe.run, measured, (measured - f.exact) / (f.bounded - f.exact)))
    return out


def one_op(run: Features, graph: Sequence[Evidence], peak: bool) -> float:
    """The run's figure with one op in flight, corrected by this machine's such probes."""
    f = Figures.of(run, peak)
    return f.exact + mean_ratio(run, graph)[0] * (f.bounded - f.exact)


def window_evidence(
    probes: Sequence[Probe], graph: Sequence[Evidence], peak: bool, mode: str
) -> list[Evidence]:
    """Probes of ``mode`` (with MLX's defaults, those that ran alone): with a window, their
    ratio of measured excess over their corrected one-op figure to the predicted window; with
    none, their ratio of what they measured beyond the exact part to the prediction."""
    out = []
    for probe in probes:
        measured = measured_of(probe, peak)
        f = Figures.of(probe.run, peak)
        if probe.run.in_flight != mode or measured is None or (mode == "mlx" and not probe.alone):
            continue
        if f.window():
            ratio = (measured - one_op(probe.run, graph, peak)) / f.window()
        elif f.predicted > f.exact:
            ratio = (measured - f.exact) / (f.predicted - f.exact)
        else:
            continue
        out.append(Evidence(probe.run, measured, ratio))
    return out


def loosened(evidence: Sequence[Evidence], peak: bool) -> float:
    """How far probes here measured above their own full-queue figure (a factor, >= 1)."""
    return max([1.0, *(e.measured / Figures.of(e.run, peak).full_queue for e in evidence)])


def typical(
    run: Features, graph: Sequence[Evidence], evidence: Sequence[Evidence], peak: bool
) -> tuple[float, float, float]:
    """The corrected typical figure for ``run`` within its physical bounds (never below its
    corrected one-op-in-flight figure, never above its full-queue figure loosened by what was
    measured above such figures here), and those bounds."""
    f = Figures.of(run, peak)
    ratio = mean_ratio(run, evidence)[0]
    if f.window():
        low = one_op(run, graph, peak)
        value = low + ratio * f.window()
    else:
        low, value = 0.0, f.exact + ratio * (f.predicted - f.exact)
    high = f.full_queue * loosened(evidence, peak)
    return min(max(value, low), high), low, high


def margin(
    run: Features, graph: Sequence[Evidence], evidence: Sequence[Evidence], peak: bool
) -> float:
    """The conservative margin, a share of the uncertain part (the figure beyond the exact
    part): the largest under-prediction of the corrected model on the evidence, never below
    FLOOR / sqrt(evidence). For a run the record holds, each probe is held out in turn and
    the runs with a repeat speak (how far a repeat moves); for a new run, each probe's run is
    held out whole (how far off a run never seen is)."""
    repeat = any(e.run.run == run.run for e in evidence)
    runs = Counter(e.run.run for e in evidence)
    worst = 0.0
    for i, item in enumerate(evidence):
        if repeat and runs[item.run.run] < 2:
            continue
        if repeat:
            others = [*evidence[:i], *evidence[i + 1 :]]
        else:
            others = [e for e in evidence if e.run.run != item.run.run]
        value = typical(item.run, graph, others, peak)[0]
        uncertain = value - Figures.of(item.run, peak).exact
        if uncertain > 0:
            worst = max(worst, (item.measured - value) / uncertain)
    return max(worst, FLOOR / math.sqrt(len(evidence)))


@dataclass(frozen=True)
class Corrected:
    """One measure's corrected figures and what they came from."""

    typical: float
    conservative: float
    ratio: float  # the window's (the whole's beyond the exact part without a window)
    graph_ratio: float  # the one-op-in-flight figure's, beyond the exact part
    margin: float
    spread: float  # how far the neighbours' ratios disagree (a standard deviation)
    evidence: int
    mass: float  # the evidence's weight for this run (SAME_RUN for each repeat)
    bounds: tuple[float, float]


def corrected(run: Features, probes: Sequence[Probe], peak: bool) -> Corrected | None:
    """The run's corrected figures in one measure (the module's docstring says how); None
    where no probe of its mode measured it."""
    graph = graph_evidence(probes, peak)
    evidence = window_evidence(probes, graph, peak, run.in_flight)
    if not evidence:
        return None
    value, low, high = typical(run, graph, evidence, peak)
    f = Figures.of(run, peak)
    m = margin(run, graph, evidence, peak)
    ratio, spread, mass = mean_ratio(run, evidence)
    if any(e.run.run == run.run for e in evidence):
        spread = 0.0  # a repeat: how far repeats move is the margin's
    scaled = f.window() or max(f.predicted - f.exact, 0.0)
    learned = value + max(m * max(value - f.exact, 0.0), SPREAD_Z * spread * scaled)
    pull = PRIOR_WEIGHT / (PRIOR_WEIGHT + mass) * NOVEL_PULL
    conservative = min(learned + pull * max(f.conservative - learned, 0.0), high)
    return Corrected(
        typical=value,
        conservative=max(conservative, value),
        ratio=ratio,
        graph_ratio=mean_ratio(run, graph)[0],
        margin=m,
        spread=spread,
        evidence=len(evidence),
        mass=mass,
        bounds=(low, high),
    )


@dataclass(frozen=True)
class Learned:
    """A corrected estimate and what it came from (None: that measure had no evidence)."""

    estimate: Estimate
    learned_from: int  # probes of this key and mode
    footprint: Corrected | None
    peak: Corrected | None
    # whether the caller uses ``estimate`` (machine_record.py: only for runs probed here)
    applied: bool = True

    def to_json(self) -> dict[str, Any]:
        def part(c: Corrected | None) -> dict[str, Any] | None:
            if c is None:
                return None
            return {
                "ratio": round(c.ratio, 4),
                "graph_ratio": round(c.graph_ratio, 4),
                "margin": round(c.margin, 4),
                "spread": round(c.spread, 4),
                "evidence": c.evidence,
                "weight": round(c.mass, 3),
                "bounds_gb": [round(b, 3) for b in c.bounds],
            }

        # The learned figures, applied or not: for a run not probed here the log keeps what
        # learning would have said, beside today's figures that the pre-flight used.
        figures = {
            "estimated_base_gb": self.estimate.estimated_base_gb,
            "estimated_conservative_gb": self.estimate.estimated_conservative_gb,
            "mlx_peak_gb": self.estimate.mlx_peak_gb,
            "mlx_peak_conservative_gb": self.estimate.mlx_peak_conservative_gb,
        }
        return {
            "learned_from": self.learned_from,
            "applied": self.applied,
            **{k: round(v, 4) for k, v in figures.items()},
            "footprint": part(self.footprint),
            "mlx_peak": part(self.peak),
        }


def correct(
    record: MachineRecord,
    key: str,
    estimate: Estimate,
    shape: TrainingShape,
    arch: Mapping[str, Any],
    census: Census | None = None,
) -> Learned:
    """``estimate`` (today's for ``shape``: estimator.estimate_training_memory's, not an
    already corrected one) corrected by the record's probes of ``key``; unchanged where none
    of its in-flight mode measured anything. Where no probe measured the footprint (no
    meter), MLX's peak speaks for it: its shift and margin."""
    probes = record.of(key)
    run = features(arch, shape, estimate, census)
    peak = corrected(run, probes, True)
    footprint = corrected(run, probes, False)
    figures: dict[str, float] = {}
    if peak is not None:
        figures.update(peak=peak.typical, peak_conservative=peak.conservative)
    if footprint is None and peak is not None:
        footprint = by_peak(run, peak)
    if footprint is not None:
        figures.update(base=footprint.typical, conservative=footprint.conservative)
    return Learned(
        estimate=corrected_estimate(estimate, figures),
        learned_from=len(record.of(key, shape.in_flight)),
        footprint=footprint,
        peak=peak,
    )


def sources(
    record: MachineRecord,
    key: str,
    shape: TrainingShape,
    arch: Mapping[str, Any],
    census: Census | None = None,
    most: int = 5,
) -> list[tuple[float, Probe]]:
    """The probes that weigh most in the correction of ``shape``'s estimate, with their
    weight (SAME_RUN for a repeat of this run): what ``--explain`` can list."""
    run = features(arch, shape, None, census)
    probes = record.of(key, shape.in_flight)
    weighed = sorted(((similarity(run, p.run), p) for p in probes), key=lambda wp: -wp[0])
    return weighed[:most]


def by_peak(run: Features, peak: Corrected) -> Corrected:
    """The footprint corrected as MLX's peak was (for probes without the footprint meter):
    the same shift of the typical figure, the same margin, within the footprint's bounds."""
    f = Figures.of(run, False)
    low = f.bounded if run.in_flight == "mlx" else 0.0
    value = min(max(f.predicted + peak.typical - run.predicted_peak_gb, low), f.full_queue)
    scaled = f.window() or max(f.predicted - f.exact, 0.0)
    learned = value + max(peak.margin * max(value - f.exact, 0.0), SPREAD_Z * peak.spread * scaled)
    pull = PRIOR_WEIGHT / (PRIOR_WEIGHT + peak.mass) * NOVEL_PULL
    conservative = min(learned + pull * max(f.conservative - learned, 0.0), f.full_queue)
    return replace(
        peak,
        typical=value,
        conservative=max(conservative, value),
        bounds=(low, f.full_queue),
    )


def corrected_estimate(estimate: Estimate, figures: Mapping[str, float]) -> Estimate:
    """``estimate`` with the corrected figures; the breakdown's window and backend overhead
    take the change, so that it still adds up."""
    base = figures.get("base", estimate.estimated_base_gb)
    peak = figures.get("peak", estimate.mlx_peak_gb)
    breakdown = dict(estimate.breakdown)
    if "framework_overhead_gb" in breakdown and "backend_overhead_gb" in breakdown:
        breakdown["framework_overhead_gb"] += peak - estimate.mlx_peak_gb
        breakdown["backend_overhead_gb"] += (base - estimate.estimated_base_gb) - (
            peak - estimate.mlx_peak_gb
        )
    return Estimate(
        estimated_base_gb=base,
        estimated_conservative_gb=max(
            figures.get("conservative", estimate.estimated_conservative_gb), base
        ),
        breakdown=breakdown,
        mlx_peak_gb=peak,
        mlx_peak_conservative_gb=max(
            figures.get("peak_conservative", estimate.mlx_peak_conservative_gb), peak
        ),
    )


# -- time --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimePrediction:
    seconds: float
    includes_cold_start: bool
    cold_start_s: float  # the part of ``seconds`` that is the cold start (0 when warm)
    learned_from: int  # probes of this key that timed it
    compile_s: float = 0.0  # the part that compiles kernels new to a warm session


def kernel_keys(arch: Mapping[str, Any], shape: TrainingShape) -> tuple[str, ...]:
    """What MLX compiles on first use in a session, as the record tells runs apart: the
    model family's own kernels (its compiled activations and attention), the dtype, the
    quantized matmuls of a bit width and group size, gradient checkpointing. Which of them
    cost anything on a machine is learned (``predict_time``)."""
    keys = [f"type {arch.get('model_type')}", f"dtype {shape.dtype}"]
    if shape.bits < 16:
        keys.append(f"bits {shape.bits} group {shape.group_size}")
    if shape.grad_checkpoint:
        keys.append("checkpoint")
    return tuple(keys)


def new_kernels(probes: Sequence[Probe]) -> list[tuple[str, ...] | None]:
    """For each probe, its kernel keys that no earlier probe of its session used; None for
    the first probe of a session (a cold start: everything is new)."""
    seen: dict[str, set[str]] = {}
    out: list[tuple[str, ...] | None] = []
    for probe in probes:
        used = seen.get(probe.session)
        out.append(None if used is None else tuple(k for k in probe.kernels if k not in used))
        seen.setdefault(probe.session, set()).update(probe.kernels)
    return out


def kernel_costs(
    probes: Sequence[Probe], new: Sequence[tuple[str, ...] | None], warm: Sequence[float]
) -> dict[str, float]:
    """Each key's first-use cost (s), from the warm probes that were the first of their
    session to use some key (``new``), each of which took its new keys' costs above its warm
    figure (``warm``). Keys new together are told apart by non-negative least squares with
    a little ridge (keys only ever new together share evenly); a key's cost is then the
    least that any of its first uses left for it once the others' are taken off: like the
    rest of the time prediction, what the run takes at least. Probes that ran alone only:
    side by side, a start-up also waits for the others."""
    rows = [
        (keys, max(startup_s(p) - expected, 0.0))
        for p, keys, expected in zip(probes, new, warm, strict=True)
        if keys and p.alone
    ]

    def left(key: str, costs: Mapping[str, float]) -> list[float]:
        return [
            extra - sum(costs[k] for k in keys if k != key) for keys, extra in rows if key in keys
        ]

    costs = {key: 0.0 for keys, _ in rows for key in keys}
    for _ in range(NNLS_SWEEPS):
        for key in costs:
            rest = left(key, costs)
            costs[key] = max(sum(rest) / (len(rest) + NNLS_RIDGE), 0.0)
    return {key: max(min(left(key, costs)), 0.0) for key in costs}


def compile_s(costs: Mapping[str, float], keys: Sequence[str], used: set[str]) -> float:
    """What a warm session that used ``used`` compiles for a run of ``keys``: each new key's
    learned cost, else the least cost learned here for a key of its kind (a new bit width
    compiles as the others did; most model families compile nothing of their own), else
    none."""
    total = 0.0
    for key in keys:
        if key in used:
            continue
        if key in costs:
            total += costs[key]
            continue
        kind = [v for k, v in costs.items() if k.split(" ")[0] == key.split(" ")[0]]
        total += min(kind, default=0.0)
    return total


def line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Intercept and slope of ys on xs, both kept non-negative; the intercept the median
    residual (robust to one slow probe). The slope only from SLOPE_POINTS points or more
    whose xs span a factor of SLOPE_SPAN, else none (a few points extrapolate wildly)."""
    xs_pos = [x for x in xs if x > 0]
    if len(xs) < SLOPE_POINTS or not xs_pos or max(xs_pos) < SLOPE_SPAN * min(xs_pos):
        return max(statistics.median(ys), 0.0), 0.0
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    cov = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    slope = max(cov / var, 0.0)
    intercept = statistics.median(y - slope * x for x, y in zip(xs, ys, strict=True))
    return max(intercept, 0.0), slope


def startup_s(probe: Probe) -> float:
    return max(probe.elapsed_s - probe.steps * probe.step_s, 0.0)


def typical_warm(warm: Sequence[Probe]) -> list[Probe]:
    """Warm probes without a compile of their own: a start-up within OUTLIER times the
    median (the callers leave out those that used a kernel new to their session; this
    catches the compiles the keys do not tell apart)."""
    if not warm:
        return []
    median = statistics.median(startup_s(p) for p in warm)
    return [p for p in warm if startup_s(p) <= OUTLIER * median]


def predict_time(
    record: MachineRecord,
    key: str,
    backend: str,
    flops_per_step: float,
    weights_gb: float,
    steps: int,
    session: str,
    kernels: Sequence[str] = (),
    run: str = "",
) -> TimePrediction | None:
    """Seconds a probe takes here; None before any probe of ``key`` was timed. A session the
    record has not seen is charged the cold start (learned, else COLD_START_S); a warm one,
    the first-use cost of the run's ``kernels`` (kernel_keys) it has not used yet. A run
    probed here before (``run``: its run_id) takes its own steady step and, where one of its
    probes was warm and compiled nothing new, its own start-up, rather than the fits over
    all probes: what a repeat took is the best measure of what it takes."""
    probes = [p for p in record.of(key) if p.elapsed_s > 0 and p.steps > 0]
    if not probes:
        return None
    new = new_kernels(probes)
    warm = typical_warm([p for p, n in zip(probes, new, strict=True) if n == ()])
    if warm:
        a, b = line([p.weights_gb for p in warm], [startup_s(p) for p in warm])
    else:
        a, b = WARM_STARTUP_S[backend], 0.0
    c, d = line([p.flops_per_step for p in probes], [p.step_s for p in probes])
    expected = [a + b * p.weights_gb for p in probes]
    extra = [startup_s(p) - e for p, e, n in zip(probes, expected, new, strict=True) if n is None]
    cold_s = max(statistics.median(extra), 0.0) if warm and extra else COLD_START_S[backend]
    used = {k for p in probes if p.session == session for k in p.kernels}
    fresh = session not in {p.session for p in probes}
    compiles = 0.0 if fresh else compile_s(kernel_costs(probes, new, expected), kernels, used)
    startup = a + b * weights_gb
    step = c + d * flops_per_step
    own = [(p, n) for p, n in zip(probes, new, strict=True) if run and p.run.run == run and p.alone]
    if own:
        step = statistics.median(p.step_s for p, _ in own)
        # Its warm start-ups, however far from other runs' (a larger model loads longer);
        # the least of them, as one may still hold a compile the keys do not tell apart.
        startup = min([startup_s(p) for p, n in own if n == ()], default=startup)
    seconds = startup + steps * step + compiles
    return TimePrediction(
        seconds=seconds + (cold_s if fresh else 0.0),
        includes_cold_start=fresh,
        cold_start_s=cold_s if fresh else 0.0,
        learned_from=len(probes),
        compile_s=compiles,
    )


def probe_of(
    arch: Mapping[str, Any],
    shape: TrainingShape,
    measured_gb: float | None,
    measured_peak_gb: float,
    census: Census | None = None,
    **timing: Any,
) -> Probe:
    """The record's entry for a finished probe of ``shape``: today's figures computed here,
    the measurements and the timing (Probe's fields: phase, session, elapsed_s, step_s,
    steps) given."""
    _, weights, _ = model_bytes(arch, shape, census)
    return Probe(
        run=features(arch, shape, None, census),
        measured_gb=measured_gb,
        measured_peak_gb=measured_peak_gb,
        weights_gb=weights / GB,
        flops_per_step=training_flops(arch, shape, census),
        kernels=kernel_keys(arch, shape),
        **timing,
    )
