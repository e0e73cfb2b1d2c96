"""The time model of probes on a machine (pure functions, table-tested)."""

from __future__ import annotations

import pytest

from pytest_yourai.throughput import (
    TimingObservation,
    fit,
    observe,
    predict_seconds,
)


def test_observation_splits_startup_compile_and_steps() -> None:
    seen = observe(1e12, 4.0, elapsed_s=30.0, step_seconds=[11.0, 1.0, 1.2, 0.8])
    assert seen is not None
    assert seen.steady_step_s == 1.0 and seen.compile_s == pytest.approx(10.0)
    assert seen.startup_s == pytest.approx(30.0 - 14.0)
    assert observe(1e12, 4.0, 30.0, []) is None


def test_no_observation_falls_back_to_the_matmul_throughput() -> None:
    assert predict_seconds(None, "cuda", 1e12, 4.0, 4, None) is None
    typical, optimistic = predict_seconds(None, "cuda", 1e12, 4.0, 4, 1000.0) or (0, 0)
    assert optimistic < typical and typical == pytest.approx(30.0 + 4.0)


def _obs(flops: float, steady: float, startup: float, compile_s: float) -> TimingObservation:
    return TimingObservation(flops, 4.0, 4, steady, startup, compile_s)


def test_a_first_probe_that_compiled_everything_does_not_inflate_the_next() -> None:
    cold = _obs(1e12, 1.0, 12.0, 110.0)  # the machine's first probe: kernels compiled
    model = fit([cold])
    assert model is not None
    assert model.predict(1e12, 4.0, 4) == pytest.approx(12.0 + 4.0)
    warm = [cold, _obs(2e12, 2.0, 13.0, 1.0), _obs(4e12, 4.0, 14.0, 1.5)]
    model = fit(warm)
    assert model is not None
    predicted = model.predict(3e12, 4.0, 4)
    assert 13.0 + 1.0 + 4 * 2.5 < predicted < 14.5 + 1.5 + 4 * 3.5
    assert model.optimistic(3e12, 4.0, 4) <= predicted


def test_steps_follow_flops_with_a_per_step_overhead() -> None:
    model = fit(
        [_obs(1e12, 0.6, 10.0, 1.0), _obs(3e12, 1.4, 10.0, 1.0), _obs(5e12, 2.2, 10.0, 1.0)]
    )
    assert model is not None
    assert model.step_overhead_s == pytest.approx(0.2)
    assert model.seconds_per_flop == pytest.approx(0.4e-12)
