"""Which of the data's batches the probe runs, and in which order (pure)."""

from __future__ import annotations

import pytest

from pytest_yourai.lora_data import MIN_STEPS, probe_shapes, validation_shapes

MIXED = [[4, 225], [4, 193], [4, 257], [4, 161], [4, 129]]


@pytest.mark.parametrize("accumulation", [1, 2, 4])
def test_the_longest_batch_comes_right_after_the_first_update(accumulation: int) -> None:
    # mlx-lm meets the longest first: the probe warms up on other shapes before it.
    longest_first = [MIXED[2], *MIXED[:2], *MIXED[3:]]
    shapes = probe_shapes(longest_first, accumulation=accumulation)
    longest = MIXED[2]
    assert shapes.index(longest) == accumulation
    assert longest not in shapes[:accumulation]
    assert len(shapes) >= MIN_STEPS
    assert all(shape in MIXED for shape in shapes)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_mlx_lms_own_order_where_it_meets_the_longest_early(accumulation: int) -> None:
    # The longest (third) comes after the first update: the probe runs mlx-lm's first steps.
    assert probe_shapes(MIXED, accumulation=accumulation) == MIXED[:4]


def test_a_longest_batch_met_late_is_brought_forward() -> None:
    late = [*MIXED[:2], *MIXED[3:], [4, 97], MIXED[2]]
    shapes = probe_shapes(late)
    assert shapes[:2] == [MIXED[0], MIXED[2]] and len(shapes) == 4


def test_equal_rows_run_the_one_shape_enough_steps() -> None:
    assert probe_shapes([[2, 97]] * 8) == [[2, 97]] * MIN_STEPS


def test_no_data_no_batches() -> None:
    assert probe_shapes([]) == []


def test_validation_takes_the_first_val_batches_batches() -> None:
    assert validation_shapes(MIXED, 2) == MIXED[:2]
    assert validation_shapes(MIXED, -1) == MIXED
