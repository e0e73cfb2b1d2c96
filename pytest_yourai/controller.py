"""Hooks of the process that reports the run: the xdist controller, or the single pytest
process. Registered for that role by plugin.py.

It starts and completes the run in the log, builds the result rows from every test's
reports (whichever worker ran it), prints the per-model lines and the summary, writes the
outputs (JSON, step summary, plot, baselines) and calls ``pytest_yourai_result``.
"""

from __future__ import annotations

import html
import os
from collections.abc import Generator
from typing import Any

import pytest

from pytest_yourai import baseline
from pytest_yourai.eventlog import TEST_VERDICT, WORKER_CRASHED
from pytest_yourai.junit import (
    XUNIT2_WARNING,
    add_suite_properties,
    without_our_properties,
    xunit2_writer,
)
from pytest_yourai.presets import preset_records
from pytest_yourai.relay import ControllerRelay
from pytest_yourai.report import (
    baseline_lines,
    crash_lines,
    item_lines,
    recommendation,
    result_entry,
    summary_table,
    write_outputs,
)
from pytest_yourai.results import PHASES, PROP_PREFIX, ResultRow
from pytest_yourai.session import PRESET_ARG, YouraiSession


class ControllerHooks:
    def __init__(self, session: YouraiSession) -> None:
        self.session = session
        self.header_shown = False
        self.warned_xunit2 = False
        self.benchmark_items: int | None = None
        self.finished = 0
        self.pytest_session: pytest.Session | None = None
        self.relay = ControllerRelay(session.log, session.host)
        self.crashes: list[dict[str, Any]] = []
        self.worker_input: dict[str, Any] | None = None

    def show_header(self) -> None:
        """The yourai line, once benchmarks were collected (a run without any has none)."""
        reporter = self.session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None and not self.header_shown:
            self.header_shown = True
            reporter.write_line(self.session.header_line())

    def benchmarks_collected(self, count: int) -> None:
        if self.benchmark_items is None:
            self.benchmark_items = count
        if count:
            self.show_header()
            self.session.write_start()

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self.pytest_session = session

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        """(The xdist controller collects nothing: its workers tell, below.)"""
        if session.config.option.collectonly:
            return
        self.benchmarks_collected(
            sum(
                1
                for item in session.items
                if PRESET_ARG in getattr(getattr(item, "callspec", None), "params", {})
            )
        )

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node: Any, ids: list[str]) -> None:
        self.benchmarks_collected(sum(1 for n in ids if self.session.is_benchmark_nodeid(n)))

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        """Every worker gets this run's id and presets, the channel its events come back on, the
        controller's reading of memory, whether MLX imports and its admission ledger (a
        worker on the same host takes them), and the stored baselines (so it reads no file
        of ours)."""
        if self.worker_input is None:  # once per run: a restarted worker gets the same
            session = self.session
            self.worker_input = {
                "yourai_run_id": session.run_id,
                "yourai_presets": preset_records(session.presets),
                "yourai_start_memory": {
                    "host": session.host,
                    "available_gb": session.machine.memory().available_gb,
                    "ledger_dir": str(session.ledger.path.parent),
                    "mlx": session.machine.mlx_record(),
                },
            }
            if session.settings.baseline_compare:
                baselines = baseline.load_all(session.settings.baseline_dir)
                self.worker_input["yourai_baselines"] = baselines
        node.workerinput.update(self.worker_input)
        self.relay.open(node)

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: object) -> None:
        """A worker went down (not a clean finish): say so in the log, with its host, the
        preset it was running and the last event it sent."""
        if error is None:
            return
        fields = self.relay.crashed(str(node.gateway.id))
        record = self.session.log.write_event(
            WORKER_CRASHED, **fields, error=str(error).strip()[:500]
        )
        self.crashes.append(record)

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        crashed = report.when not in PHASES and report.failed  # xdist: its worker crashed
        props = list(report.user_properties)
        preset = self.session.preset_of(report.nodeid)
        if crashed and preset is not None:
            props.append((PROP_PREFIX + "preset", preset))
        row = self.session.results.record(report.nodeid, report.when, report.outcome, props)
        if row is None:
            return
        last = report.when == "teardown" or crashed
        if last:
            self.finished_row(row)
        writer = xunit2_writer(self.session.config)
        if writer is not None:
            without_our_properties(report)
            if last:
                add_suite_properties(writer, row)
                self.warn_xunit2_once()

    def finished_row(self, row: ResultRow) -> None:
        """A benchmark's last report: its verdict in the log, and the result hook."""
        self.session.log.write_event(
            TEST_VERDICT, preset=row.get("preset"), nodeid=row.nodeid, outcome=row.outcome,
            verdict=row.verdict,
        )  # fmt: skip
        self.relay.finished(row.nodeid)
        config = self.session.config
        config.hook.pytest_yourai_result(config=config, result=result_entry(row))

    def warn_xunit2_once(self) -> None:
        if not self.warned_xunit2:
            self.warned_xunit2 = True
            self.session.config.issue_config_time_warning(
                pytest.PytestWarning(XUNIT2_WARNING), stacklevel=2
            )

    def pytest_runtest_logfinish(self, nodeid: str) -> None:
        row = self.session.results.get(nodeid)
        reporter = self.session.config.pluginmanager.get_plugin("terminalreporter")
        if row is None or reporter is None or self.session.config.get_verbosity() < 1:
            return
        self.finished += 1
        reporter.ensure_newline()
        for line in item_lines(row, self.finished, self.benchmark_items):
            reporter.write_line(line)

    def pytest_terminal_summary(self, terminalreporter: Any, exitstatus: int) -> None:
        rows = self.session.results.ordered()
        if not rows:
            return
        write = terminalreporter.write_line
        terminalreporter.section("yourai: LoRA memory benchmark")
        for line in summary_table(rows):
            write(line)
        write("")
        safety = self.session.safety
        safety.learn(self.session.results.stopped_reason())
        interrupted = self.interrupted(exitstatus)
        if interrupted and not safety.reason:
            write(f"{interrupted}: {len(rows)} of {self.benchmark_items or len(rows)} "
                  "benchmarks reported; nothing is said of the rest", yellow=True)  # fmt: skip
        else:
            write(recommendation(rows))
        for line in baseline_lines(rows):
            write(line, yellow=True)
        for line in crash_lines(self.crashes) + self.relay.problems:
            write(line, red=True)
        if safety.reason:
            write(safety.reason, red=True)
        write(f"log: {self.session.settings.log_path}")
        for line in self.write_outputs(rows):
            write(line)

    def interrupted(self, exitstatus: int) -> str | None:
        """How the run was cut short (-x, --maxfail, a stop, Ctrl-C), or None."""
        session = self.pytest_session
        why = (session.shouldfail or session.shouldstop) if session is not None else False
        if why or exitstatus == pytest.ExitCode.INTERRUPTED:
            return f"The run was interrupted ({why or 'Ctrl-C'})"
        return None

    def write_outputs(self, rows: list[ResultRow]) -> list[str]:
        settings, machine = self.session.settings, self.session.machine
        written = write_outputs(
            rows,
            machine.info(self.session.run_id),
            settings.json_path,
            settings.plot_path,
            os.environ.get("GITHUB_STEP_SUMMARY"),
        )
        if settings.baseline_save:
            saved = baseline.save_passes(settings.baseline_dir, machine.machine_id(), rows)
            if saved is not None:
                written.append(f"baseline saved: {saved[0]} ({saved[1]} presets)")
        return written

    @pytest.hookimpl(hookwrapper=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> Generator[None, None, None]:
        yield
        self.session.safety.learn(self.session.results.stopped_reason())
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
