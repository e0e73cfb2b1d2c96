"""pytest hooks of pytest-yourai: options, parametrization, pre-flight, reports, summary.

Hooks only; the work is done by ``session.YouraiSession`` and the modules it uses.
"""

from __future__ import annotations

import html
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
from pytest_yourai.settings import add_options, disabled, resolve

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
        if disabled(config):
            return
        session = YouraiSession.from_config(config, resolve(config))
    except YouraiUsageError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[SESSION_KEY] = session
    config.pluginmanager.register(YouraiHooks(session), PLUGIN_NAME)
    if config.pluginmanager.hasplugin("html") and not session.is_worker:
        config.pluginmanager.register(HtmlReportHooks(session), PLUGIN_NAME + "-html")
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


DISABLED = pytest.mark.skip(reason="pytest-yourai is turned off (--yourai-disable)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if PRESET_ARG not in metafunc.fixturenames:
        return
    if SESSION_KEY not in metafunc.config.stash:  # turned off: the benchmarks are skipped
        metafunc.parametrize(PRESET_ARG, [pytest.param(None, marks=DISABLED, id="off")])
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


# What goes into the JUnit suite's properties per test under xunit2.
JUNIT_SUITE_FIELDS = (
    "verdict",
    "preset",
    "in_flight",
    "estimated_base_gb",
    "estimated_conservative_gb",
    "available_gb",
    "footprint_peak_gb",
    "peak_memory_gb",
    "batch_size",
    "lora_rank",
    "lora_layers",
)


def junit_xunit2(config: pytest.Config) -> Any:
    """pytest's JUnit writer when --junitxml is on with junit_family xunit2, else None.
    (It is registered as a plugin; its add_global_property is what record_testsuite_property
    uses.)"""
    if not config.option.xmlpath or config.getini("junit_family") != "xunit2":
        return None
    for plugin in config.pluginmanager.get_plugins():
        if type(plugin).__name__ == "LogXML" and hasattr(plugin, "add_global_property"):
            return plugin
    return None


class YouraiHooks:
    """Hooks that need the session; registered once per pytest process."""

    def __init__(self, session: YouraiSession) -> None:
        self.session = session
        self.warned_xunit2 = False
        self.header_shown = False
        self.benchmark_items: int | None = None
        self.finished = 0

    def show_header(self) -> None:
        """The yourai line, once benchmarks were collected (a run without any has none)."""
        reporter = self.session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None and not self.header_shown:
            self.header_shown = True
            reporter.write_line(self.session.header_line())

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
            self.show_header()
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

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.session.is_worker:
            return
        row = self.session.record(report)
        junit = junit_xunit2(self.session.config)
        if junit is None or row is None:
            return
        # xunit2 (pytest's default junit_family) has no per-testcase properties: the figures
        # go to the suite's properties, named by the test, and the testcase keeps none.
        report.user_properties = [
            (k, v) for k, v in report.user_properties if not str(k).startswith(PROP_PREFIX)
        ]
        if report.when == "teardown":
            for name in JUNIT_SUITE_FIELDS:
                value = row.verdict if name == "verdict" else row.get(name)
                if value is not None:
                    junit.add_global_property(f"yourai[{row.nodeid}].{name}", value)
            if not self.warned_xunit2:
                self.warned_xunit2 = True
                self.session.config.issue_config_time_warning(
                    pytest.PytestWarning(
                        "yourai: junit_family=xunit2 allows no properties per testcase, so the "
                        "figures are the suite's properties, yourai[<test id>].<field>; "
                        "junit_family=xunit1 puts them on each testcase"
                    ),
                    stacklevel=2,
                )

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

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self.pytest_session = session

    def pytest_terminal_summary(self, terminalreporter: Any, exitstatus: int) -> None:
        rows = self.session.ordered_results()
        if self.session.is_worker or not rows:
            return
        terminalreporter.section("yourai: LoRA memory benchmark")
        for line in summary_table(rows):
            terminalreporter.write_line(line)
        terminalreporter.write_line("")
        session = getattr(self, "pytest_session", None)
        stopped = session is not None and bool(session.shouldfail or session.shouldstop)
        if (stopped or exitstatus == pytest.ExitCode.INTERRUPTED) and (
            not self.session.safety_stopped
        ):
            total = self.benchmark_items or len(rows)
            why = (session.shouldfail or session.shouldstop) if session is not None else ""
            terminalreporter.write_line(
                f"The run was interrupted ({why or 'Ctrl-C'}): {len(rows)} of {total} "
                "benchmarks reported; nothing is said of the rest",
                yellow=True,
            )
        else:
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
            self.session.ledger.remove()


class HtmlReportHooks:
    """pytest-html's results table, with each benchmark's estimate, footprint and verdict."""

    COLUMNS = ("Needs free (GB)", "Footprint (GB)", "Verdict")

    def __init__(self, session: YouraiSession) -> None:
        self.session = session

    def pytest_html_results_table_header(self, cells: list[str]) -> None:
        cells[2:2] = [f"<th>{name}</th>" for name in self.COLUMNS]

    def pytest_html_results_table_row(self, report: pytest.TestReport, cells: list[str]) -> None:
        row = self.session.results.get(report.nodeid)
        values = ["", "", ""]
        if row is not None:
            base, conservative = row.get("estimated_base_gb"), row.get("estimated_conservative_gb")
            if base is not None:
                values[0] = f"{base}–{conservative}"
            footprint = row.get("footprint_peak_gb") or row.get("peak_memory_gb")
            values[1] = "" if footprint is None else str(footprint)
            values[2] = row.verdict
        cells[2:2] = [f"<td>{html.escape(str(v))}</td>" for v in values]


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
            if isinstance(hooks, YouraiHooks):
                hooks.show_header()
            self.session.write_start()
