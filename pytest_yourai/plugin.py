"""pytest hooks of pytest-yourai: options, parametrization, pre-flight, reports, summary.

Hooks only; the work is done by ``session.YouraiSession`` and the modules it uses.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import Any

import pytest

from pytest_yourai.benchmark import YouraiBenchmark
from pytest_yourai.errors import YouraiUsageError
from pytest_yourai.preflight import RUN, Preflight
from pytest_yourai.presets import Preset
from pytest_yourai.report import baseline_lines, item_lines, recommendation, summary_table
from pytest_yourai.session import (
    CALL_START_KEY,
    PRESET_ARG,
    PROP_PREFIX,
    PROTOCOL_START_KEY,
    YouraiSession,
)
from pytest_yourai.settings import add_options, resolve

SESSION_KEY = pytest.StashKey[YouraiSession]()
PREFLIGHT_KEY = pytest.StashKey[Preflight]()
PLUGIN_NAME = "yourai-session"


class YouraiMemoryWarning(pytest.PytestWarning):
    """A preset was skipped, or forced, although pre-flight says memory may not suffice."""


def skip_at_item(reason: str) -> None:
    """Skip, reported at the test's own location (like a skip marker), not this file's."""
    raise pytest.skip.Exception(reason, _use_item_location=True)


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "yourai(max_peak_gb=None): a pytest-yourai benchmark; max_peak_gb fails a preset whose "
        "measured peak exceeds it",
    )
    if config.option.help:
        return
    try:
        session = YouraiSession.from_config(config, resolve(config))
    except YouraiUsageError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[SESSION_KEY] = session
    config.pluginmanager.register(YouraiHooks(session), PLUGIN_NAME)
    if config.pluginmanager.hasplugin("xdist") and not session.is_worker:
        config.pluginmanager.register(XdistControllerHooks(session), PLUGIN_NAME + "-xdist")


MARKER_KEYWORDS = ("max_peak_gb",)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A typo in the yourai marker's keywords is a usage error, not silently ignored."""
    for item in items:
        for marker in item.iter_markers("yourai"):
            unknown = sorted(set(marker.kwargs) - set(MARKER_KEYWORDS))
            if marker.args or unknown:
                what = ", ".join(unknown) if unknown else "positional arguments"
                raise pytest.UsageError(
                    f"{item.nodeid}: @pytest.mark.yourai: unknown {what}; "
                    f"it takes {', '.join(MARKER_KEYWORDS)}"
                )
            budget = marker.kwargs.get("max_peak_gb")
            if budget is not None and (
                not isinstance(budget, int | float) or isinstance(budget, bool) or budget <= 0
            ):
                raise pytest.UsageError(
                    f"{item.nodeid}: @pytest.mark.yourai(max_peak_gb={budget!r}): "
                    "expected a positive number of GB"
                )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if PRESET_ARG not in metafunc.fixturenames or SESSION_KEY not in metafunc.config.stash:
        return
    presets = metafunc.config.stash[SESSION_KEY].presets
    metafunc.parametrize(PRESET_ARG, presets, ids=[p.name for p in presets])


@pytest.fixture
def yourai_preset(request: pytest.FixtureRequest) -> Preset:
    """The preset under test; the plugin parametrizes it over the selected presets."""
    raise pytest.UsageError(
        "yourai_preset is parametrized by pytest-yourai; it cannot be used here"
    )


@pytest.fixture
def yourai_benchmark(request: pytest.FixtureRequest, yourai_preset: Preset) -> YouraiBenchmark:
    """The pre-flighted preset; call ``.run()`` to run the MLX LoRA probe."""
    return YouraiBenchmark(
        request.node, request.config.stash[SESSION_KEY], request.node.stash[PREFLIGHT_KEY]
    )


def _properties(
    preflight: Preflight, estimate_only: bool, host: str, worker: str
) -> list[tuple[str, Any]]:
    record = preflight.record()
    values: dict[str, Any] = {
        "preset": preflight.preset.name,
        "params": preflight.preset.params,
        "param_count": preflight.preset.parameter_count,
        **{k: v for k, v in record.items() if k not in ("preset", "reason") and v is not None},
        "host": host,
        "worker": worker,
        "insufficient": preflight.insufficient,
        "estimate_only": estimate_only,
    }
    if preflight.reason:
        values["reason"] = preflight.reason
    return [(PROP_PREFIX + k, v) for k, v in values.items()]


class YouraiHooks:
    """Hooks that need the session; registered once per pytest process."""

    def __init__(self, session: YouraiSession) -> None:
        self.session = session
        self.benchmark_items: int | None = None
        self.finished = 0

    def pytest_report_header(self, config: pytest.Config) -> list[str] | None:
        if self.session.is_worker:
            return None
        return [self.session.header_line()]

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        if self.session.is_worker or session.config.option.collectonly:
            return
        count = sum(
            1
            for item in session.items
            if PRESET_ARG in getattr(getattr(item, "callspec", None), "params", {})
        )
        self.benchmark_items = count
        if count:
            self.session.write_start()

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> None:
        # pytest-timeout's clock starts about here; the probe's deadline is measured from it.
        item.stash[PROTOCOL_START_KEY] = time.monotonic()

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, Any, None]:
        """A test that fails after its probe passed (its own assert, a teardown) is no
        "Pass" in JUnit either."""
        outcome = yield
        report: pytest.TestReport = outcome.get_result()
        if report.failed:
            fixed = [
                (k, "Fail") if k == PROP_PREFIX + "verdict" and v == "Pass" else (k, v)
                for k, v in item.user_properties
            ]
            item.user_properties[:] = fixed
            report.user_properties = list(fixed)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_call(self, item: pytest.Item) -> None:
        item.stash[CALL_START_KEY] = time.monotonic()

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        callspec = getattr(item, "callspec", None)
        if callspec is None or PRESET_ARG not in callspec.params:
            return
        preset: Preset = callspec.params[PRESET_ARG]
        settings = self.session.settings
        self.session.require_mlx(item, preset)
        self.session.safety_check(item)
        preflight = self.session.preflight(item, preset)
        item.user_properties.extend(
            _properties(
                preflight, settings.estimate_only, self.session.host, self.session.worker_id
            )
        )
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

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if not self.session.is_worker:
            self.session.record(report)

    def pytest_runtest_logfinish(self, nodeid: str) -> None:
        row = self.session.results.get(nodeid)
        if row is None or self.session.is_worker or self.session.config.get_verbosity() < 1:
            return
        self.finished += 1
        reporter = self.session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None:
            return
        reporter.ensure_newline()
        for line in item_lines(row, self.finished, self.benchmark_items):
            reporter.write_line(line)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        rows = self.session.ordered_results()
        if self.session.is_worker or not rows:
            return
        terminalreporter.section("yourai: LoRA memory benchmark")
        for line in summary_table(rows):
            terminalreporter.write_line(line)
        terminalreporter.write_line("")
        terminalreporter.write_line(recommendation(rows))
        for line in baseline_lines(rows):
            terminalreporter.write_line(line, yellow=True)
        if self.session.safety_stopped:
            terminalreporter.write_line(self.session.safety_stopped, red=True)
        terminalreporter.write_line(f"log: {self.session.settings.log_path}")
        for line in self.session.write_outputs():
            terminalreporter.write_line(line)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> Generator[None, None, None]:
        yield
        if not self.session.is_worker:
            for row in self.session.results.values():
                if row.get("verdict") == "Stopped" and not self.session.safety_stopped:
                    self.session.safety_stopped = str(row.get("reason") or "safety stop")
            self.session.write_complete()


class XdistControllerHooks:
    """The controller's side of pytest-xdist: one run id, one benchmark_start."""

    def __init__(self, session: YouraiSession) -> None:
        self.session = session

    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput["yourai_run_id"] = self.session.run_id
        machine = self.session.machine()
        node.workerinput["yourai_start_memory"] = {
            "host": self.session.host,
            "available_gb": machine.available_gb,
        }

    def pytest_xdist_node_collection_finished(self, node: Any, ids: list[str]) -> None:
        hooks = self.session.config.pluginmanager.get_plugin(PLUGIN_NAME)
        count = sum(1 for nodeid in ids if self.session.is_benchmark_nodeid(nodeid))
        if isinstance(hooks, YouraiHooks) and hooks.benchmark_items is None:
            hooks.benchmark_items = count
        if count:
            self.session.write_start()
