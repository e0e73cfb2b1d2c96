"""The estimate learning from this machine's probes (learning.py, pure; table-tested), and the
replay of the committed GPU results (benchmarks/replay_learning.py) against issue 29's
targets."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pytest_yourai import learning
from pytest_yourai.estimator import Estimate, TrainingShape, estimate_training_memory
from pytest_yourai.presets import builtin_presets

ROOT = Path(__file__).resolve().parent.parent
ARCH = builtin_presets()["hermes-mistral-7b"].architecture
OTHER = builtin_presets()["r1-distill-14b"].architecture
KEY = "cuda|NVIDIA H200|151GB|mlx 0.32.4"
SHAPE = TrainingShape(
    bits=4, batch_size=2, seq_len=512, lora_rank=16, lora_layers=16, backend="cuda"
)


def today(shape: TrainingShape = SHAPE, arch: Any = ARCH) -> Estimate:
    return estimate_training_memory(arch, shape)


def bounded(shape: TrainingShape = SHAPE, arch: Any = ARCH) -> Estimate:
    return today(replace(shape, in_flight="bounded"), arch)


def probe(
    footprint: float | None,
    shape: TrainingShape = SHAPE,
    arch: Any = ARCH,
    peak: float | None = None,
    **timing: Any,
) -> learning.Probe:
    """A finished probe that measured ``footprint`` (MLX's peak 1.5 GB under it)."""
    if peak is None:
        peak = (footprint or 0.0) - 1.5
    timing.setdefault("session", "boot-1")
    return learning.probe_of(arch, shape, footprint, peak, **timing)


def record(*probes: learning.Probe, key: str = KEY) -> learning.MachineRecord:
    out = learning.MachineRecord(key)
    for p in probes:
        out = out.add(p)
    return out


def correct(
    rec: learning.MachineRecord, shape: TrainingShape = SHAPE, arch: Any = ARCH, key: str = KEY
) -> learning.Learned:
    return learning.correct(rec, key, today(shape, arch), shape, arch)


# -- no evidence: today's estimate -----------------------------------------------------------


@pytest.mark.parametrize(
    "rec",
    [
        learning.MachineRecord(KEY),
        record(probe(20.0), key="cuda|NVIDIA H100 80GB HBM3|80GB|mlx 0.32.4"),
        record(probe(20.0), key="cuda|NVIDIA H200|151GB|mlx 0.31.0"),
        record(probe(20.0, shape=replace(SHAPE, in_flight="bounded"))),
        record(probe(20.0, alone=False)),
    ],
    ids=["empty", "other device", "other MLX", "other mode", "side by side"],
)
def test_without_evidence_of_this_key_and_mode_the_estimate_is_todays(
    rec: learning.MachineRecord,
) -> None:
    learned = correct(rec)
    assert learned.estimate == today()
    assert learned.learned_from == 0 and learned.footprint is None and learned.peak is None


# -- one probe, and the next estimate of that run is what it measured --------------------------


@pytest.mark.parametrize("mode", ["mlx", "bounded"])
@pytest.mark.parametrize("share", [0.9, 1.0, 1.08])
def test_a_repeat_is_predicted_as_it_measured(mode: str, share: float) -> None:
    shape = replace(SHAPE, in_flight=mode)
    measured = today(shape).estimated_base_gb * share
    learned = correct(record(probe(measured, shape=shape)), shape)
    assert learned.learned_from == 1
    assert learned.estimate.estimated_base_gb == pytest.approx(measured, rel=0.01)
    assert learned.estimate.mlx_peak_gb == pytest.approx(measured - 1.5, rel=0.01)
    assert learned.estimate.estimated_conservative_gb >= measured


def test_the_breakdown_still_adds_up() -> None:
    learned = correct(record(probe(today().estimated_base_gb * 0.9))).estimate
    assert sum(learned.breakdown.values()) == pytest.approx(learned.estimated_base_gb, abs=1e-6)


# -- physics: between one op in flight and a full queue ---------------------------------------


def test_never_below_one_op_in_flight() -> None:
    low = bounded().estimated_base_gb
    learned = correct(record(probe(low * 0.6)))
    assert learned.estimate.estimated_base_gb == pytest.approx(low)
    assert learned.footprint is not None and learned.footprint.bounds[0] == pytest.approx(low)


def test_never_above_the_full_queue_figure() -> None:
    """A run whose window is far from its cap learns a large ratio from a neighbour; the
    figures stop at its full-queue figure (today's conservative one with the window at
    its cap)."""
    small = replace(SHAPE, seq_len=256)
    high = learning.features(ARCH, small).full_queue_gb
    neighbour = replace(SHAPE, seq_len=320)
    measured = learning.features(ARCH, neighbour).full_queue_gb * 0.999
    learned = correct(record(probe(measured, shape=neighbour)), small)
    assert learned.footprint is not None and learned.footprint.bounds[1] == pytest.approx(high)
    assert learned.estimate.estimated_base_gb <= high + 1e-9
    assert learned.estimate.estimated_conservative_gb <= high + 1e-9


def test_a_probe_above_its_full_queue_loosens_the_bound_by_as_much() -> None:
    queue = learning.features(ARCH, SHAPE).full_queue_gb
    learned = correct(record(probe(queue * 1.1)))
    assert learned.footprint is not None
    assert learned.footprint.bounds[1] == pytest.approx(queue * 1.1)
    assert learned.estimate.estimated_base_gb == pytest.approx(queue * 1.1, rel=0.01)


# -- the conservative margin ------------------------------------------------------------------


def shapes(n: int, seq_len: int = 512) -> list[TrainingShape]:
    return [
        replace(SHAPE, batch_size=1 + i % 4, lora_rank=8 * (1 + i), seq_len=seq_len)
        for i in range(n)
    ]


def test_the_margin_is_never_below_what_was_observed() -> None:
    """Held out whole, one run is under-predicted by a fifth of its uncertain part or more; a
    new run's conservative figure keeps at least that share above its typical one (short
    sequences: far from the full-queue bound)."""
    runs = shapes(4, seq_len=256)
    probes = [probe(today(s).estimated_base_gb, shape=s) for s in runs[:3]]
    probes.append(probe(today(runs[3]).estimated_base_gb * 1.2, shape=runs[3]))
    rec = record(*probes)
    worst = 0.0
    for i, p in enumerate(rec.probes):
        others = record(*(q for j, q in enumerate(rec.probes) if j != i))
        held = correct(others, runs[i]).estimate.estimated_base_gb
        worst = max(worst, ((p.measured_gb or 0.0) - held) / (held - p.run.exact_gb))
    new = replace(SHAPE, batch_size=3, lora_rank=12, seq_len=256)
    learned = correct(rec, new)
    assert learned.footprint is not None and learned.footprint.margin >= worst > 0.2
    base, exact = learned.estimate.estimated_base_gb, learning.features(ARCH, new).exact_gb
    assert learned.estimate.estimated_conservative_gb >= base + worst * (base - exact) - 1e-9
    assert learned.estimate.estimated_conservative_gb < learned.footprint.bounds[1]


def test_the_margin_shrinks_as_evidence_grows() -> None:
    """Probes that the model predicts exactly leave only the floor, FLOOR / sqrt(probes)."""
    margins = []
    for n in (2, 8, 32):
        rec = record(*(probe(today(s).estimated_base_gb, shape=s) for s in shapes(n)))
        fp = correct(rec, shapes(n)[0]).footprint
        assert fp is not None
        margins.append(fp.margin)
    assert margins == pytest.approx([learning.FLOOR / n**0.5 for n in (2, 8, 32)], rel=1e-6)


def test_a_run_unlike_any_probed_keeps_at_least_todays_envelope() -> None:
    """Evidence about another model and shape says little of this run: its typical figure
    stays today's, its conservative figure at least today's."""
    far = replace(SHAPE, batch_size=1, seq_len=256, grad_checkpoint=True)
    rec = record(probe(today(SHAPE, OTHER).estimated_base_gb * 0.8, shape=SHAPE, arch=OTHER))
    learned = correct(rec, far)
    assert learned.footprint is not None and learned.footprint.mass < 0.01
    assert learned.estimate.estimated_base_gb == pytest.approx(today(far).estimated_base_gb, 0.01)
    assert learned.estimate.estimated_conservative_gb >= today(far).estimated_conservative_gb


def test_without_a_footprint_meter_mlx_peak_speaks_for_the_footprint() -> None:
    measured_peak = today().mlx_peak_gb * 0.9
    learned = correct(record(probe(None, peak=measured_peak)))
    assert learned.estimate.mlx_peak_gb == pytest.approx(measured_peak, rel=0.01)
    shift = learned.estimate.mlx_peak_gb - today().mlx_peak_gb
    assert learned.estimate.estimated_base_gb == pytest.approx(today().estimated_base_gb + shift)


# -- the record -------------------------------------------------------------------------------


def test_the_record_round_trips_through_json() -> None:
    rec = record(probe(20.0), probe(11.0, shape=replace(SHAPE, in_flight="bounded")))
    data = json.loads(json.dumps(rec.to_json()))
    assert learning.MachineRecord.from_json(data, KEY) == rec


@pytest.mark.parametrize(
    "change",
    [
        {"key": "cuda|NVIDIA H200|151GB|mlx 0.33.0"},
        {"calibration": "another"},
        {"version": 0},
        {"probes": [{"run": {}}]},
    ],
    ids=["other key", "other calibration", "other version", "damaged"],
)
def test_a_stored_record_of_another_kind_starts_fresh(change: dict[str, Any]) -> None:
    data = {**record(probe(20.0)).to_json(), **change}
    assert learning.MachineRecord.from_json(data, KEY) == learning.MachineRecord(KEY)
    assert learning.MachineRecord.from_json(None, KEY) == learning.MachineRecord(KEY)


def test_the_record_keeps_the_latest_probes_of_each_mode() -> None:
    bounded_probe = probe(11.0, shape=replace(SHAPE, in_flight="bounded"))
    rec = record(bounded_probe, *(probe(20.0 + i / 100) for i in range(learning.KEEP_PROBES + 5)))
    assert len(rec.of(KEY, "mlx")) == learning.KEEP_PROBES
    assert rec.of(KEY, "mlx")[0].measured_gb == pytest.approx(20.05)
    assert rec.of(KEY, "bounded") == [bounded_probe]


# -- time -------------------------------------------------------------------------------------


def timed(elapsed: float, session: str, weights_arch: Any = ARCH) -> learning.Probe:
    return probe(20.0, arch=weights_arch, session=session, elapsed_s=elapsed, step_s=0.3, steps=4)


def predict(
    rec: learning.MachineRecord, session: str, shape: TrainingShape = SHAPE
) -> learning.TimePrediction | None:
    return learning.predict_time(
        rec, KEY, "cuda", 1e12, 4.0, 4, session, learning.kernel_keys(ARCH, shape)
    )


def test_no_timed_probe_no_prediction() -> None:
    assert predict(learning.MachineRecord(KEY), "boot-1") is None
    assert predict(record(timed(20.0, "boot-1"), key="elsewhere"), "boot-1") is None


def test_the_cold_start_is_charged_once() -> None:
    """The first probe of a boot compiled MLX's kernels (150 s); the warm probes after it
    take 20 s, and so does the next one; a new boot is charged the cold start again, and
    says so."""
    rec = record(timed(150.0, "boot-1"), timed(20.0, "boot-1"), timed(21.0, "boot-1"))
    warm = predict(rec, "boot-1")
    assert warm is not None and not warm.includes_cold_start and warm.cold_start_s == 0
    assert warm.seconds == pytest.approx(20.5, abs=0.5)
    cold = predict(rec, "boot-2")
    assert cold is not None and cold.includes_cold_start
    assert cold.cold_start_s == pytest.approx(129.5, abs=0.5)
    assert cold.seconds == pytest.approx(warm.seconds + cold.cold_start_s)


def test_after_a_cold_first_probe_the_next_is_not_charged_its_compile() -> None:
    """Issue 29: on a fresh machine the first probe's start-up was carried into the next
    prediction (predicted 105 s, took 18.6 s)."""
    nxt = predict(record(timed(105.0, "boot-1")), "boot-1")
    assert nxt is not None and not nxt.includes_cold_start
    assert nxt.seconds < 1.5 * 18.6
    fresh = predict(record(timed(105.0, "boot-1")), "boot-2")
    assert fresh is not None and fresh.includes_cold_start
    assert fresh.cold_start_s == learning.COLD_START_S["cuda"]


def test_a_warm_probe_that_compiled_new_kernels_does_not_raise_the_warm_figure() -> None:
    rec = record(
        timed(150.0, "boot-1"), *(timed(20.0, "boot-1") for _ in range(4)), timed(90.0, "boot-1")
    )
    warm = predict(rec, "boot-1")
    assert warm is not None and warm.seconds == pytest.approx(20.0, abs=0.5)


def test_a_run_probed_before_takes_its_own_time_not_the_fit() -> None:
    """Other runs took 20 s with 0.3 s steps; this run's own warm probe took 60 s with 5 s
    steps: its repeat is predicted from itself, another run still from the fit."""
    slow = replace(SHAPE, seq_len=4096)
    own = probe(20.0, shape=slow, session="boot-1", elapsed_s=60.0, step_s=5.0, steps=4)
    rec = record(timed(150.0, "boot-1"), timed(20.0, "boot-1"), timed(20.0, "boot-1"), own)
    run = learning.run_id(ARCH, slow)
    keys = learning.kernel_keys(ARCH, slow)
    again = learning.predict_time(rec, KEY, "cuda", 1e12, 4.0, 4, "boot-1", keys, run)
    assert again is not None and again.seconds == pytest.approx(60.0, abs=0.5)
    other = learning.predict_time(rec, KEY, "cuda", 1e12, 4.0, 4, "boot-1", keys, "other")
    assert other is not None and other.seconds < 30.0
    # On a new boot the repeat is charged the cold start on top of its own time.
    cold = learning.predict_time(rec, KEY, "cuda", 1e12, 4.0, 4, "boot-2", keys, run)
    assert cold is not None and cold.seconds == pytest.approx(60.0 + cold.cold_start_s, abs=0.5)


# -- the replay of the committed GPU results --------------------------------------------------

COMMITTED = ROOT / "benchmarks/results/replay-learning.json"
SLACK = 0.5  # percentage points, or hundredths of a ratio


def test_replay_of_the_committed_results_holds_the_targets(tmp_path: Path) -> None:
    """Replays the committed H100 and H200 results as probes (about 5 s). The targets the
    learned estimate meets must hold: with MLX's defaults on the H200, the footprint's median
    error within 5% and the conservative figure never under the footprint; with one op in
    flight never under either; no survival attempt that the learned go rule lets through
    without it surviving; no probe time over-predicted beyond 1.5x. Those it does not meet
    (docs/estimator.md says why) must not slip below the committed figures."""
    out = tmp_path / "replay.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/replay_learning.py"), "--write", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    fresh, committed = json.loads(out.read_text()), json.loads(COMMITTED.read_text())
    survival = fresh["survival"]
    assert survival["learned_go_that_did_not_survive"] == 0
    # What the pre-flight does (learned figures for runs probed before, today's otherwise):
    # no go that died, no more refusals of runs that survived than today's estimate, and
    # never under the footprint with MLX's defaults on the H200.
    assert survival["preflight_go_that_did_not_survive"] == 0
    assert (
        survival["survived_but_preflight_would_not_go"]
        <= survival["survived_but_today_would_not_go"]
    )
    used = fresh["machines"]["H200"]["mlx"]["preflight"]["footprint"]["all"]
    assert used["conservative_under"] == 0
    today = fresh["machines"]["H200"]["mlx"]["today"]["footprint"]["all"]
    assert used["median_abs_error_pct"] <= today["median_abs_error_pct"]
    assert survival["go_runs_with_learned_conservative_under_footprint"] == 0
    h200 = fresh["machines"]["H200"]
    mlx = h200["mlx"]["learning"]["footprint"]["all"]
    assert mlx["median_abs_error_pct"] <= 5.0
    assert mlx["conservative_under"] == 0
    assert h200["bounded"]["learning"]["footprint"]["all"]["conservative_under"] == 0
    repeats = h200["mlx"]["learning"]["footprint"]["repeats"]
    assert repeats["median_abs_error_pct"] <= 1.0 and repeats["max_abs_error_pct"] <= 5.0
    for machine in ("H100", "H200"):
        for mode in ("mlx", "bounded"):
            learned = fresh["machines"][machine][mode]["learning"]
            assert learned["time_alone"].get("time_over_predicted", 0) == 0, (machine, mode)
            was = committed["machines"][machine][mode]["learning"]
            measure = "footprint" if "footprint" in learned else "mlx_peak"
            now, then = learned[measure]["all"], was[measure]["all"]
            assert now["median_abs_error_pct"] <= then["median_abs_error_pct"] + SLACK
            assert now["max_abs_error_pct"] <= then["max_abs_error_pct"] + SLACK
            assert now["conservative_most"] <= then["conservative_most"] + SLACK / 100
            assert now["conservative_under"] <= then["conservative_under"]
            assert learned["time_alone"]["time_within"] >= was["time_alone"]["time_within"]


def test_the_sources_of_a_correction_put_a_repeat_first() -> None:
    other = replace(SHAPE, seq_len=1024)
    rec = record(probe(20.0, shape=other), probe(21.0), probe(30.0, shape=other, arch=OTHER))
    found = learning.sources(rec, KEY, SHAPE, ARCH)
    assert found[0][0] == learning.SAME_RUN
    assert found[0][1].measured_gb == 21.0 and len(found) == 3
    assert [w for w, _ in found] == sorted((w for w, _ in found), reverse=True)


def test_a_kernel_new_to_a_warm_session_is_charged_its_first_use() -> None:
    """The first 8-bit probe of a warm session compiled the 8-bit matmuls (60 s more); the
    next 8-bit probe did not. In the next session, after its cold start and a 4-bit probe,
    an 8-bit run is predicted with that compile, and says so; a 4-bit run is not, and an
    8-bit run once the session has used 8 bits is not either."""
    q8 = replace(SHAPE, bits=8)
    first = [
        timed(150.0, "boot-1"),
        timed(20.0, "boot-1"),
        probe(20.0, shape=q8, session="boot-1", elapsed_s=80.0, step_s=0.3, steps=4),
        probe(20.0, shape=q8, session="boot-1", elapsed_s=20.5, step_s=0.3, steps=4),
    ]
    rec = record(*first, timed(150.0, "boot-2"), timed(20.0, "boot-2"))
    eight = predict(rec, "boot-2", q8)
    four = predict(rec, "boot-2")
    assert eight is not None and four is not None
    assert eight.compile_s == pytest.approx(60.0, abs=1.0)
    assert eight.seconds == pytest.approx(four.seconds + eight.compile_s)
    assert four.compile_s == 0.0 and not eight.includes_cold_start
    used = record(*first, timed(150.0, "boot-2"), probe(20.0, shape=q8, session="boot-2",
                  elapsed_s=80.0, step_s=0.3, steps=4))  # fmt: skip
    again = predict(used, "boot-2", q8)
    assert again is not None and again.compile_s == 0.0
    assert again.seconds == pytest.approx(four.seconds, abs=1.0)


def test_keys_new_together_share_their_cost_until_one_is_seen_alone() -> None:
    """A probe new in both its model family and its bit width took 60 s more: the two share
    it. Once the family is seen new alone at no cost, the bit width carries it."""
    q8, other = replace(SHAPE, bits=8), builtin_presets()["r1-distill-14b"].architecture
    both = probe(20.0, shape=q8, arch=other, session="boot-1", elapsed_s=80.0, step_s=0.3,
                 steps=4)  # fmt: skip
    rec = record(timed(150.0, "boot-1"), timed(20.0, "boot-1"), both)
    costs = learning.kernel_costs(
        list(rec.probes), learning.new_kernels(list(rec.probes)), [20.0 - 1.2] * 3
    )
    family, bits = f"type {other['model_type']}", "bits 8 group 64"
    assert costs[family] == pytest.approx(costs[bits], abs=0.5) and costs[bits] > 20.0
    alone = probe(20.0, arch=other, session="boot-2", elapsed_s=20.0, step_s=0.3, steps=4)
    rec = record(timed(150.0, "boot-2"), timed(20.0, "boot-2"), alone, *rec.probes)
    probes = list(rec.probes)
    costs = learning.kernel_costs(probes, learning.new_kernels(probes), [20.0 - 1.2] * 6)
    assert costs[family] < 5.0 and costs[bits] > 50.0
