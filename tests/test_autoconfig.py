"""The seed's safe-config table, row by row, and the fit policy."""

from __future__ import annotations

import pytest

from pytest_yourai.autoconfig import (
    BenchmarkConfig,
    apply_pins,
    fit_config,
    get_safe_benchmark_config,
)


@pytest.mark.parametrize(
    ("size", "available", "expected"),
    [
        # The seed's table (rust/src/hardware/profiles.rs get_safe_benchmark_config).
        (70, 17.5, (1, 16, 8)),
        (70, 39.9, (1, 16, 8)),
        (70, 40.0, (1, 24, 12)),
        (70, 60.0, (1, 24, 12)),
        (70, 60.1, (1, 32, 16)),
        (14, 19.9, (1, 32, 12)),
        (14, 20.0, (2, 48, 16)),
        (14, 200.0, (2, 48, 16)),
        (7, 4.0, (2, 64, 16)),
        (8, 400.0, (2, 64, 16)),
        # Between and beyond the rows.
        (32, 80.0, (2, 48, 16)),
        (405, 30.0, (1, 16, 8)),
        (3, 10.0, (2, 32, 16)),
        (0.5, 10.0, (2, 16, 16)),
    ],
)
def test_seed_table(size: float, available: float, expected: tuple[int, int, int]) -> None:
    assert get_safe_benchmark_config(size, available, num_layers=80) == BenchmarkConfig(*expected)


def test_layers_never_exceed_the_model() -> None:
    assert get_safe_benchmark_config(7, 10, num_layers=4).lora_layers == 4


def test_pins_win() -> None:
    config = apply_pins(BenchmarkConfig(2, 64, 16), {"lora_rank": 8, "seq_len": 128})
    assert config == BenchmarkConfig(2, 8, 16)


def test_fit_prefers_batch_then_rank_then_layers() -> None:
    # A budget model where memory grows with each knob: the fit must take the largest
    # batch first, then the largest rank, then the most layers that still fit.
    def cost(c: BenchmarkConfig) -> float:
        return c.batch_size * 10 + c.lora_rank * 0.1 + c.lora_layers * 0.5

    chosen = fit_config(32, 30.0, cost)
    assert chosen is not None
    assert chosen.batch_size == 2
    assert cost(chosen) <= 30.0
    bigger_rank = BenchmarkConfig(chosen.batch_size, 64, chosen.lora_layers)
    assert chosen.lora_rank == 64 or cost(bigger_rank) > 30.0


def test_fit_none_when_nothing_fits() -> None:
    assert fit_config(32, 0.1, lambda c: 1.0) is None
