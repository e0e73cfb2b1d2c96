"""Which of the data's batches the probe runs, and in which order (pure)."""

from __future__ import annotations

import pytest

from pytest_yourai.lora_data import MIN_STEPS, probe_shapes, validation_shapes

MIXED = [[4, 225], [4, 193], [4, 257], [4, 161], [4, 129]]


@pytest.mark.parametrize("accumulation", [1, 2, 4])
def test_the_longest_batch_comes_right_after_the_first_update(accumulation: int) -> None:
    shapes = probe_shapes(MIXED, accumulation=accumulation)
    longest = max(MIXED, key=lambda s: s[0] * s[1])
    assert shapes.index(longest) == accumulation
    assert longest not in shapes[:accumulation]
    assert len(shapes) >= MIN_STEPS
    assert all(shape in MIXED for shape in shapes)


def test_equal_rows_run_the_one_shape_enough_steps() -> None:
    assert probe_shapes([[2, 97]] * 8) == [[2, 97]] * MIN_STEPS


def test_no_data_no_batches() -> None:
    assert probe_shapes([]) == []


def test_validation_takes_the_first_val_batches_batches() -> None:
    assert validation_shapes(MIXED, 2) == MIXED[:2]
    assert validation_shapes(MIXED, -1) == MIXED
