"""Fixtures for the plugin's own tests, and the fault suite's summary line."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import BENCHMARK_TEST, FAULT_LEDGER


@pytest.fixture
def bench(pytester: pytest.Pytester) -> pytest.Pytester:
    """A pytester directory holding the benchmark test, with the log in it."""
    pytester.makepyfile(test_lora_memory=BENCHMARK_TEST)
    return pytester


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FAULT_LEDGER["faults"]:
        terminalreporter.write_line(
            f"fault suite: {FAULT_LEDGER['faults']} faults tried, "
            f"{FAULT_LEDGER['log_lines']} log lines checked, "
            f"{FAULT_LEDGER['orphans']} orphans found"
        )
