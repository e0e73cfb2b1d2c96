"""Hooks of the process that runs the benchmark tests: an xdist worker, or the single
pytest process. Registered for that role by plugin.py.

Setup is the pre-flight: MLX importable, memory not critically low, then the session's
pre-flight (resolve, estimate, decide); the test is skipped, with the reason, when it
should not run. The test's ``yourai_*`` properties carry everything to the controller.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

from pytest_yourai.preflight import RUN, Preflight
from pytest_yourai.presets import Preset
from pytest_yourai.results import Verdict, failed_after_pass, properties
from pytest_yourai.session import PRESET_ARG, YouraiSession

PREFLIGHT_KEY = pytest.StashKey[Preflight]()


class YouraiMemoryWarning(pytest.PytestWarning):
    """A preset was skipped, or forced, although pre-flight says memory may not suffice."""


def benchmark_preset(item: pytest.Item) -> Preset | None:
    callspec = getattr(item, "callspec", None)
    if callspec is None or PRESET_ARG not in callspec.params:
        return None
    preset: Preset = callspec.params[PRESET_ARG]
    return preset


def skip_at_item(reason: str) -> None:
    """Skip, reported at the test's own location (like a skip marker), not this file's."""
    raise pytest.skip.Exception(reason, _use_item_location=True)


class WorkerHooks:
    def __init__(self, session: YouraiSession) -> None:
        self.session = session

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        preset = benchmark_preset(item)
        if preset is None:
            return
        session = self.session
        if not session.machine.mlx.importable:
            # No preset is judged against host RAM as if it were the GPU; --yourai-force
            # does not change this (the probe needs MLX).
            session.log_model_start(preset, item.nodeid)
            reason = session.log_no_mlx(preset)
            item.user_properties.extend(
                properties(
                    {"preset": preset.name, "params": preset.params, "decision": "skip_no_mlx",
                     "reason": reason}
                )
            )  # fmt: skip
            skip_at_item(reason)
        self.stop_if_memory_is_critical(item, preset)
        session.log_model_start(preset, item.nodeid)
        preflight = session.preflight(preset)
        settings = session.settings
        context = {
            "host": session.host,
            "worker": session.worker_id,
            "machine_id": session.machine.machine_id(),
        }
        values = preflight.properties(**context, estimate_only=settings.estimate_only)
        item.user_properties.extend(properties(values))
        item.stash[PREFLIGHT_KEY] = preflight
        if preflight.insufficient:
            action = "running anyway (--yourai-force)" if preflight.decision == RUN else "skipped"
            item.warn(YouraiMemoryWarning(f"{preflight.reason}; {action}"))
        if preflight.decision != RUN:
            skip_at_item(preflight.reason)
        if settings.estimate_only:
            skip_at_item(
                f"estimate only: {preset.name} needs {preflight.required_text()}, "
                f"{preflight.available_gb:.3g} GB available, {preflight.config.describe()}"
            )

    def stop_if_memory_is_critical(self, item: pytest.Item, preset: Preset) -> None:
        """Below the safety threshold nothing is spawned: the run stops after this test
        (the safety stop), or, forced, it goes on with a warning."""
        critical = self.session.critical_memory(preset)
        if critical is None:
            return
        reason, available = critical
        if self.session.settings.force:
            item.warn(pytest.PytestWarning(f"{reason} — continuing because of --yourai-force"))
            return
        self.session.safety.stop(item.session, reason)
        item.user_properties.extend(
            properties(
                {"preset": preset.name, "params": preset.params,
                 "available_gb": round(available, 3), "verdict": Verdict.STOPPED,
                 "reason": reason}
            )
        )  # fmt: skip
        skip_at_item(reason)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, Any, None]:
        """A test that fails after its probe passed (its own assert, a teardown) is no
        "Pass" in JUnit either."""
        outcome = yield
        report: pytest.TestReport = outcome.get_result()
        if report.failed:
            item.user_properties[:] = failed_after_pass(item.user_properties)
            report.user_properties = list(item.user_properties)
