"""The safety stop: "the run stops here", with one owner.

Two things stop a run: memory critically low before a probe (below ``--yourai-safety-gb``)
and the memory watchdog killing a probe. Either way ``SafetyStop.stop`` is the one place that
records the reason and asks pytest (and pytest-xdist) to stop after the current test. The
controller of an xdist run learns a worker's stop from that worker's reports
(``SafetyStop.learn``). ``--yourai-force`` keeps going: the callers then never call ``stop``.
"""

from __future__ import annotations

import pytest


def critical_reason(available_gb: float, threshold_gb: float) -> str | None:
    """Why memory is too low to spawn anything, or None."""
    if available_gb < threshold_gb:
        return (
            f"yourai safety stop: {available_gb:.2f} GB available is below the "
            f"{threshold_gb:g} GB safety threshold (--yourai-safety-gb; --yourai-force overrides)"
        )
    return None


class SafetyStop:
    def __init__(self) -> None:
        self.reason: str | None = None

    def stop(self, session: pytest.Session, reason: str) -> None:
        """Record the reason; pytest (and xdist) stop after the current test."""
        self.reason = reason
        session.shouldstop = reason

    def learn(self, reason: str | None) -> None:
        """The controller: a worker stopped for safety (its reports say so)."""
        if self.reason is None and reason:
            self.reason = reason
