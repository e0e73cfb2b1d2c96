"""How long a probe may run: ``--yourai-timeout``, or less when pytest-timeout would end the
test sooner.

pytest-timeout announces each test's timer through its ``pytest_timeout_set_timer`` hook
(when it starts the timer: at the protocol's start, or at the call with ``func_only``).
``TimeLimits`` implements that hook to note the timeout and when its clock started, and
returns None, so pytest-timeout's own timer still runs. The probe's deadline then falls a
second before pytest-timeout's: the plugin's own timeout fires first (the probe tree is
killed, ``subprocess_timeout`` is logged with the output so far, the test fails with the
phase), and pytest-timeout stays the backstop.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

PYTEST_TIMEOUT_MARGIN_S = 1.0
TIMER_KEY = pytest.StashKey[tuple[float, float]]()  # (timeout seconds, clock start)


class TimeLimits:
    """Registered as a plugin; its one hook is pytest-timeout's (optional: without
    pytest-timeout the hook is never called and the plugin's own timeout alone applies)."""

    @pytest.hookimpl(tryfirst=True, optionalhook=True)
    def pytest_timeout_set_timer(self, item: pytest.Item, settings: Any) -> None:
        timeout = getattr(settings, "timeout", None)
        if isinstance(timeout, int | float) and timeout > 0:
            item.stash[TIMER_KEY] = (float(timeout), time.monotonic())


def probe_deadline(item: pytest.Item, own_timeout_s: float) -> tuple[float, str]:
    """Seconds the probe may run, and what limits it ("yourai" or pytest-timeout's)."""
    timer = item.stash.get(TIMER_KEY, None)
    if timer is None:
        return own_timeout_s, "yourai"
    seconds, started = timer
    remaining = seconds - (time.monotonic() - started) - PYTEST_TIMEOUT_MARGIN_S
    if remaining < own_timeout_s:
        return max(remaining, 0.1), f"pytest-timeout's {seconds:g} s"
    return own_timeout_s, "yourai"
