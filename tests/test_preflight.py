"""The pre-flight's go rule and its reasons (pure: no machine, no MLX)."""

from __future__ import annotations

import pytest

from pytest_yourai.preflight import BOUNDED_ENV_TEXT, RUN, SKIP_MEMORY, fits, plan
from pytest_yourai.presets import builtin_presets

PRESETS = builtin_presets()


@pytest.mark.parametrize(
    ("conservative", "available", "safety", "expected"),
    [
        (10.0, 12.0, 2.0, True),  # exactly the go threshold
        (10.0, 11.99, 2.0, False),
        (10.0, 10.0, 0.0, True),
        (0.5, 2.4, 2.0, False),
    ],
)
def test_go_rule(conservative: float, available: float, safety: float, expected: bool) -> None:
    assert fits(conservative, available, safety) is expected


def _plan(available: float, in_flight: str, safety: float = 2.0, force: bool = False):  # type: ignore[no-untyped-def]
    return plan(
        PRESETS["hermes-mistral-7b"],
        available,
        "cuda",
        policy="seed",
        force=force,
        timeout_s=300,
        gflops=None,
        in_flight=in_flight,
        safety_gb=safety,
    )


def test_the_go_threshold_is_conservative_plus_safety() -> None:
    need = _plan(100, "mlx").estimate.estimated_conservative_gb
    assert _plan(need + 2.0, "mlx").decision == RUN
    assert _plan(need + 1.9, "mlx").decision == SKIP_MEMORY


def test_a_preset_that_fits_only_bounded_says_how_to_run_it() -> None:
    mlx = _plan(100, "mlx").estimate.estimated_conservative_gb
    bounded = _plan(100, "bounded").estimate.estimated_conservative_gb
    assert bounded < mlx
    between = (bounded + mlx) / 2 + 2.0
    skipped = _plan(between, "mlx")
    assert skipped.decision == SKIP_MEMORY
    assert "one op in flight" in skipped.reason and BOUNDED_ENV_TEXT in skipped.reason
    assert "--yourai-in-flight bounded" in skipped.reason
    assert _plan(between, "bounded").decision == RUN
    # Nothing to suggest when neither mode fits.
    assert BOUNDED_ENV_TEXT not in _plan(bounded / 2, "mlx").reason


def test_force_runs_it_anyway_with_the_reason() -> None:
    forced = _plan(4.0, "mlx", force=True)
    assert forced.decision == RUN and forced.insufficient and "needs" in forced.reason
