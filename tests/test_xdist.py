"""pytest-xdist: memory admission across workers, one whole log, gateways as hosts."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_yourai.admission import Ledger, NeverFits
from tests.helpers import OK_PROBE, events, read_log, write_fake_probe

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestWarning")

SLOW_PROBE = """
time.sleep(1.5)
result(status="ok", peak_memory_gb=0.05, preset=spec["preset"])
"""


def test_tiny_presets_under_xdist_with_the_real_probe(bench: pytest.Pytester) -> None:
    result = bench.runpytest_subprocess("-k", "tiny", "-n", "2", "--junitxml=junit.xml")
    result.assert_outcomes(passed=2)
    records = read_log(bench.path / "benchmark_log.jsonl")
    assert [r["event"] for r in records].count("benchmark_start") == 1
    assert [r["event"] for r in records].count("benchmark_complete") == 1
    assert records[0]["event"] == "benchmark_start" and records[-1]["event"] == "benchmark_complete"
    assert len(events(records, "subprocess_completed")) == 2
    for record in records[1:-1]:
        # The controller writes each test's verdict once its reports are in.
        expected = ("main",) if record["event"] == "test_verdict" else ("gw0", "gw1")
        assert record["worker"] in expected and record["host"]
    result.stdout.fnmatch_lines(["*tiny-qwen2*Pass*", "*tiny-llama*Pass*"])


def _intervals(records: list[dict[str, object]]) -> list[tuple[float, float]]:
    starts = {r["preset"]: r["timestamp"] for r in records if r["event"] == "subprocess_spawned"}
    ends = {r["preset"]: r["timestamp"] for r in records if r["event"] == "subprocess_completed"}
    return sorted((float(starts[p]), float(ends[p])) for p in starts)  # type: ignore[arg-type]


def test_a_budget_for_one_probe_serializes_them(bench: pytest.Pytester) -> None:
    # tiny-llama and tiny-qwen2 reserve ~0.23 and ~0.21 GB (their conservative footprint):
    # a 0.3 GB budget (2.3 GB capped minus the 2 GB threshold) fits either alone, never both.
    probe = write_fake_probe(bench.path, SLOW_PROBE)
    result = bench.runpytest_subprocess(
        "-k",
        "tiny",
        "-n",
        "2",
        "--yourai-probe-command",
        probe,
        "--yourai-max-memory",
        "2.3",
        "--yourai-safety-gb",
        "2.0",
    )
    result.assert_outcomes(passed=2)
    records = read_log(bench.path / "benchmark_log.jsonl")
    admitted = events(records, "probe_admitted")
    assert len(admitted) == 2
    assert all(a["total_reserved_gb"] <= a["budget_gb"] + 1e-9 for a in admitted)
    (first, second) = _intervals(records)
    assert first[1] <= second[0], "two probes whose sum exceeds the budget ran together"
    assert events(records, "probe_waiting")


def test_a_roomy_budget_runs_them_together(bench: pytest.Pytester) -> None:
    probe = write_fake_probe(bench.path, SLOW_PROBE)
    result = bench.runpytest_subprocess(
        "-k", "tiny", "-n", "2", "--yourai-probe-command", probe, "--yourai-max-memory", "8"
    )
    result.assert_outcomes(passed=2)
    (first, second) = _intervals(read_log(bench.path / "benchmark_log.jsonl"))
    assert second[0] < first[1]


def test_a_probe_that_can_never_fit_is_skipped(bench: pytest.Pytester) -> None:
    probe = write_fake_probe(bench.path, OK_PROBE)
    # 2.05 GB capped: only 0.05 GB is left once the 2 GB threshold is set aside, less than
    # the preset's conservative footprint: the pre-flight (the go rule) refuses it.
    result = bench.runpytest(
        "-k", "tiny-llama", "--yourai-probe-command", probe, "--yourai-max-memory", "2.05", "-rs"
    )
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED*tiny-llama: needs * GB, 2.05 GB available with 2 GB*"])


def test_gateways_as_hosts(bench: pytest.Pytester) -> None:
    probe = write_fake_probe(bench.path, OK_PROBE)
    result = bench.runpytest_subprocess(
        "--tx",
        "2*popen",
        "--dist",
        "load",
        "-k",
        "tiny",
        "--yourai-probe-command",
        probe,
        "--junitxml=junit.xml",
        "-o",
        "junit_family=xunit1",
    )
    result.assert_outcomes(passed=2)
    text = (bench.path / "junit.xml").read_text()
    assert text.count('name="yourai_host"') == 2 and text.count('name="yourai_worker"') == 2
    records = read_log(bench.path / "benchmark_log.jsonl")
    checks = events(records, "preflight_check")
    assert {c["worker"] for c in checks} <= {"gw0", "gw1"} and all(
        c["available_gb"] for c in checks
    )


def _hold(path: str, ready: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    Ledger(Path(path)).reserve("dead", 0.9, 1.0, {}, lambda *_: None)
    ready.set()
    os._exit(0)  # die without releasing


def test_a_dead_workers_reservation_expires(tmp_path: Path) -> None:
    log = tmp_path  # the ledger's directory
    ready = multiprocessing.Event()
    holder = multiprocessing.Process(target=_hold, args=(str(log), ready))
    holder.start()
    holder.join()
    assert ready.is_set()
    waited: list[float] = []
    admission = Ledger(log).reserve("live", 0.5, 1.0, {}, lambda others, _: waited.append(others))
    assert admission.total_reserved_gb == pytest.approx(0.5) and not waited


def test_ledger_never_fits_and_release(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    with pytest.raises(NeverFits):
        ledger.reserve("big", 2.0, 1.0, {}, lambda *_: None)
    ledger.reserve("a", 0.4, 1.0, {}, lambda *_: None)
    assert ledger.reserved_gb() == pytest.approx(0.4)
    ledger.release("a")
    assert ledger.reserved_gb() == 0
    data = json.loads(ledger.path.read_text())
    assert data == {"reservations": {}}


def test_benchmark_script_runs(tmp_path: Path) -> None:
    script = Path(__file__).parent.parent / "benchmarks" / "bench_xdist.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--presets", "2", "--fake"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "wall-time ratio" in proc.stdout and "largest sum of reservations" in proc.stdout


def test_the_ledger_lives_in_the_cache_and_is_removed(bench: pytest.Pytester) -> None:
    probe = write_fake_probe(bench.path, SLOW_PROBE)
    result = bench.runpytest_subprocess("-k", "tiny", "-n", "2", "--yourai-probe-command", probe)
    result.assert_outcomes(passed=2)
    left = [p.name for p in bench.path.rglob("*") if "ledger" in p.name]
    assert left == []
