"""Results people act on: JSON, step summary, plot, crash report, baselines, budgets, search."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from pytest_yourai.autoconfig import BenchmarkConfig
from pytest_yourai.search import candidates, search
from tests.helpers import OK_PROBE, events, read_log, write_fake_probe

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestWarning")

PEAK_FROM_ENV = """
peak = float(os.environ.get("FAKE_PEAK", "0.5"))
print("step 1/1", flush=True)
result(status="ok", peak_memory_gb=peak, train_peak_memory_gb=peak, step_seconds=[0.2, 0.1],
       tokens_per_second=100.0)
"""


def test_json_results(bench: pytest.Pytester) -> None:
    probe = write_fake_probe(bench.path, PEAK_FROM_ENV)
    result = bench.runpytest(
        "-k",
        "tiny or hermes-70b",
        "--yourai-probe-command",
        probe,
        "--yourai-max-memory",
        "8",
        "--yourai-json",
        "out.json",
    )
    result.assert_outcomes(passed=2, skipped=1)
    document = json.loads((bench.path / "out.json").read_text())
    machine = document["machine"]
    assert machine["backend"] == "cpu" and machine["total_gb"] > 0 and machine["memory_cap_gb"] == 8
    assert document["versions"]["pytest-yourai"] and document["versions"]["mlx"]
    by_name = {r["preset"]: r for r in document["results"]}
    assert by_name["hermes-70b"]["verdict"] == "Skipped"
    tiny = by_name["tiny-llama"]
    assert tiny["verdict"] == "Pass" and tiny["peak_memory_gb"] == 0.5
    assert tiny["batch_size"] == 2 and tiny["estimated_conservative_gb"] > tiny["estimated_base_gb"]
    assert tiny["step_seconds_median"] == pytest.approx(0.15) and tiny["tokens_per_second"] == 100


def test_github_step_summary(bench: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    summary = bench.path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    probe = write_fake_probe(bench.path, OK_PROBE)
    bench.runpytest("-k", "tiny", "--yourai-probe-command", probe).assert_outcomes(passed=2)
    text = summary.read_text()
    assert text.startswith("earlier step\n")
    header = "| preset | params | config | estimate | available | footprint | mlx peak | verdict |"
    assert header in text
    assert "| tiny-llama | 4M | batch=2, rank=8, layers=4 |" in text


def test_plot_is_written(bench: pytest.Pytester) -> None:
    probe = write_fake_probe(bench.path, PEAK_FROM_ENV)
    for name in ("peaks.png", "peaks.svg"):
        result = bench.runpytest_subprocess(
            "--yourai-probe-command", probe, "--yourai-max-memory", "8", "--yourai-plot", name
        )
        result.stdout.fnmatch_lines([f"plot: *{name}"])
    assert (bench.path / "peaks.png").read_bytes()[:4] == b"\x89PNG"
    svg = (bench.path / "peaks.svg").read_text()
    assert "hermes-70b" in svg and "available" in svg


def test_plot_needs_a_known_suffix(bench: pytest.Pytester) -> None:
    result = bench.runpytest_subprocess("--yourai-plot", "peaks.pdf")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --yourai-plot: plot file must end in .png or .svg*"])


def test_crash_report_of_a_sigkilled_run(bench: pytest.Pytester) -> None:
    probe = write_fake_probe(
        bench.path,
        "print('building block 1/2', flush=True)\nprint('step 1/4 loss=2.0', flush=True)\n"
        "time.sleep(300)\n",
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-k",
            "tiny-llama",
            "--yourai-probe-command",
            probe,
        ],
        cwd=bench.path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log = bench.path / "benchmark_log.jsonl"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and '"step 1/4' not in (
        log.read_text() if log.exists() else ""
    ):
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with open(log, "a") as handle:
        handle.write('{"timestamp": 1.0, "event": "mod')  # a torn last write
    report = subprocess.run(
        [sys.executable, "-m", "pytest_yourai.log", str(log)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert report.returncode == 0, report.stderr
    out = report.stdout
    assert "INCOMPLETE" in out and "last event: probe_progress" in out
    assert "in flight: tiny-llama, phase: train" in out
    assert "step 1/4 loss=2.0" in out and "memory then:" in out and "torn write" in out


def test_crash_report_of_complete_runs(bench: pytest.Pytester) -> None:
    probe = write_fake_probe(bench.path, OK_PROBE)
    bench.runpytest("-k", "tiny", "--yourai-probe-command", probe)
    bench.runpytest("-k", "hermes-70b", "--yourai-max-memory", "8")
    report = subprocess.run(
        [sys.executable, "-m", "pytest_yourai.log"],
        cwd=bench.path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert "run 1:" in report.stdout and "run 2:" in report.stdout
    assert "complete: 2 passed, 0 failed, 0 skipped" in report.stdout
    assert "hermes-70b: skipped: hermes-70b: needs" in report.stdout
    assert "INCOMPLETE" not in report.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "pytest_yourai.log", "nope.jsonl"],
        cwd=bench.path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode == 4 and "no log at nope.jsonl" in missing.stderr


def test_baseline_save_and_compare(bench: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    probe = write_fake_probe(bench.path, PEAK_FROM_ENV)
    args = ["-k", "tiny", "--yourai-probe-command", probe]
    monkeypatch.setenv("FAKE_PEAK", "0.5")
    result = bench.runpytest(*args, "--yourai-baseline-save")
    result.stdout.fnmatch_lines(["baseline saved: *.yourai/baselines/cpu-*.json (2 presets)"])
    monkeypatch.setenv("FAKE_PEAK", "0.52")  # +4%: inside the default 5%
    bench.runpytest(*args, "--yourai-baseline-compare").assert_outcomes(passed=2)
    monkeypatch.setenv("FAKE_PEAK", "0.6")  # +20%
    result = bench.runpytest(*args, "--yourai-baseline-compare")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        ["*tiny-llama: peak grew 20.0% over the baseline (0.5 GB -> 0.6 GB)*"]
    )
    result.stdout.fnmatch_lines(["tiny-llama*Regressed"])
    bench.runpytest(
        *args, "--yourai-baseline-compare", "--yourai-fail-on-growth", "25%"
    ).assert_outcomes(passed=2)
    # Baselines are kept per in-flight mode (and config): one taken with MLX's defaults is
    # never compared with a run that had one op in flight; that is said, in the summary and
    # the JSON, and --yourai-baseline-require makes it a failure.
    other = [*args, "--yourai-baseline-compare", "--yourai-in-flight", "bounded"]
    result = bench.runpytest(*other, "--yourai-json", "out.json")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["No baseline for tiny-*, tiny-* at this config*"])
    entries = json.loads((bench.path / "out.json").read_text())["results"]
    assert [e["baseline"] for e in entries] == [None, None]
    bench.runpytest(*other, "--yourai-baseline-require").assert_outcomes(failed=2)


def test_budget_from_the_marker_and_the_preset(bench: pytest.Pytester) -> None:
    bench.makepyfile(
        test_budget="""
import pytest

@pytest.mark.yourai(max_peak_gb=0.4)
def test_budgeted(yourai_benchmark):
    yourai_benchmark.run()
"""
    )
    probe = write_fake_probe(bench.path, PEAK_FROM_ENV)
    result = bench.runpytest("test_budget.py", "-k", "tiny-llama", "--yourai-probe-command", probe)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*tiny-llama: peak 0.5 GB exceeds its budget of 0.4 GB*"])
    (bench.path / "presets.toml").write_text(
        "[presets.capped]\nmodel_type='llama'\nhidden_size=128\nnum_hidden_layers=2\n"
        "intermediate_size=256\nnum_attention_heads=2\nvocab_size=1024\nmax_peak_gb=0.45\n"
    )
    result = bench.runpytest(
        "test_lora_memory.py",
        "--yourai-presets-file",
        "presets.toml",
        "--yourai-presets",
        "capped",
        "--yourai-probe-command",
        probe,
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*capped: peak 0.5 GB exceeds its budget of 0.45 GB*"])


# A stand-in probe whose peak grows with the config, failing like an OOM above its limit.
SCALING_PROBE = """
peak = 0.001 * spec["batch_size"] * spec["lora_rank"] * spec["lora_layers"] + 0.02
if peak > spec["memory_limit_gb"]:
    result(status="oom", phase="train", error="memory limit exceeded", peak_memory_gb=peak)
else:
    result(status="ok", peak_memory_gb=peak)
"""


def brute_force(fits: object, num_layers: int) -> BenchmarkConfig:
    """The largest batch (rank and layers at their smallest), then rank, then layers."""
    ok = fits  # type: ignore[assignment]
    batch = max(b for b in candidates("batch_size", num_layers) if ok(BenchmarkConfig(b, 4, 1)))  # type: ignore[operator]
    rank = max(r for r in candidates("lora_rank", num_layers) if ok(BenchmarkConfig(batch, r, 1)))  # type: ignore[operator]
    layers = max(
        n for n in candidates("lora_layers", num_layers) if ok(BenchmarkConfig(batch, rank, n))
    )  # type: ignore[operator]
    return BenchmarkConfig(batch, rank, layers)


@pytest.mark.parametrize("budget", [0.05, 0.3, 2.0, 40.0])
@pytest.mark.parametrize("estimate_bias", [0.5, 1.0, 2.0])
def test_search_finds_the_largest_fit(budget: float, estimate_bias: float) -> None:
    def peak(c: BenchmarkConfig) -> float:
        return 0.001 * c.batch_size * c.lora_rank * c.lora_layers + 0.02

    def fits(c: BenchmarkConfig) -> bool:
        return peak(c) <= budget

    found = search(
        BenchmarkConfig(2, 16, 8),
        16,
        budget,
        lambda c: (peak(c) * estimate_bias, peak(c) * estimate_bias * 1.2),
        lambda c: (fits(c), peak(c)),
    )
    if not fits(BenchmarkConfig(1, 4, 1)):
        assert found.config is None
        return
    assert found.config == brute_force(fits, 16)
    assert found.probes == len(found.trail) and found.probes <= 3 * 7


def test_search_in_the_plugin(bench: pytest.Pytester) -> None:
    probe = write_fake_probe(bench.path, SCALING_PROBE)
    result = bench.runpytest(
        "-k",
        "tiny-llama",
        "--yourai-probe-command",
        probe,
        "--yourai-search",
        "--yourai-max-memory",
        "2.4",
        "--yourai-json",
        "out.json",
        "-v",
    )
    result.assert_outcomes(passed=1)
    (entry,) = json.loads((bench.path / "out.json").read_text())["results"]
    found = entry["search"]
    budget = found["budget_gb"]
    expected = brute_force(
        lambda c: 0.001 * c.batch_size * c.lora_rank * c.lora_layers + 0.02 <= budget, 4
    )
    assert (found["batch_size"], found["lora_rank"], found["lora_layers"]) == (
        expected.batch_size,
        expected.lora_rank,
        expected.lora_layers,
    )
    records = read_log(bench.path / "benchmark_log.jsonl")
    assert found["probes"] == len(events(records, "subprocess_spawned"))
    result.stdout.fnmatch_lines(
        [f"*Search: batch={expected.batch_size}, rank=*after {found['probes']} probes*"]
    )


def test_a_failed_test_is_never_pass(bench: pytest.Pytester) -> None:
    """The probe passes, the test's own assert fails: Fail in the table, JSON, JUnit and
    the log CLI, and no baseline is saved for it."""
    import xml.etree.ElementTree as ET

    bench.makepyfile(
        test_lora_memory="""
def test_lora_memory(yourai_benchmark):
    result = yourai_benchmark.run()
    assert result["peak_memory_gb"] < 0.1, "over my own budget"
"""
    )
    probe = write_fake_probe(bench.path, OK_PROBE)
    result = bench.runpytest(
        "-k", "tiny-llama", "--yourai-probe-command", probe, "--yourai-json", "out.json",
        "--junitxml", "junit.xml", "-o", "junit_family=xunit1", "--yourai-baseline-save",
    )  # fmt: skip
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["tiny-llama*Fail"])
    (entry,) = json.loads((bench.path / "out.json").read_text())["results"]
    assert entry["verdict"] == "Fail"
    verdicts = [
        p.get("value")
        for p in ET.parse(bench.path / "junit.xml").getroot().iter("property")
        if p.get("name") == "yourai_verdict"
    ]
    assert verdicts and set(verdicts) == {"Fail"}
    assert "baseline saved" not in result.stdout.str()
    report = subprocess.run(
        [sys.executable, "-m", "pytest_yourai.log", "benchmark_log.jsonl"],
        cwd=bench.path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert "tiny-llama: test failed (Fail)" in report.stdout


# What each family's schema allows a testcase to hold (xunit2: Jenkins' junit-10.xsd, the
# schema pytest's own tests validate with; xunit1 adds properties).
TESTCASE_CHILDREN = {
    "xunit2": {"skipped", "error", "failure", "system-out", "system-err"},
    "xunit1": {"skipped", "error", "failure", "system-out", "system-err", "properties"},
}


@pytest.mark.parametrize("family", ["xunit2", "xunit1"])
def test_junit_stays_schema_valid(bench: pytest.Pytester, family: str) -> None:
    import xml.etree.ElementTree as ET

    probe = write_fake_probe(bench.path, OK_PROBE)
    result = bench.runpytest_subprocess(
        "-k", "tiny", "--yourai-probe-command", probe, "--junitxml", "junit.xml",
        "-o", f"junit_family={family}",
    )  # fmt: skip
    result.assert_outcomes(passed=2)
    root = ET.parse(bench.path / "junit.xml").getroot()
    cases = list(root.iter("testcase"))
    assert len(cases) == 2
    for case in cases:
        assert {child.tag for child in case} <= TESTCASE_CHILDREN[family]
    suite = {
        p.get("name"): p.get("value")
        for s in root.iter("testsuite")
        for props in s.findall("properties")
        for p in props.iter("property")
    }
    if family == "xunit2":
        assert any(k.endswith("[tiny-llama]].verdict") and v == "Pass" for k, v in suite.items())
        result.stdout.fnmatch_lines(["*junit_family=xunit2 allows no properties per testcase*"])
    else:
        case_props = {p.get("name") for p in cases[0].iter("property")}
        assert "yourai_verdict" in case_props


def test_pytest_html_rows_show_the_figures(bench: pytest.Pytester) -> None:
    probe = write_fake_probe(bench.path, OK_PROBE)
    result = bench.runpytest_subprocess(
        "-k", "tiny-llama", "--yourai-probe-command", probe, "--html", "report.html",
    )  # fmt: skip
    result.assert_outcomes(passed=1)
    page = (bench.path / "report.html").read_text()
    assert "Needs free (GB)" in page and "Footprint (GB)" in page
    assert "0.154" in page and "Pass" in page


def test_several_tests_of_one_preset_are_named_and_an_interruption_is_said(
    bench: pytest.Pytester,
) -> None:
    bench.makepyfile(
        test_two="""
def test_first(yourai_benchmark):
    yourai_benchmark.run()
    assert False, "stop here"

def test_second(yourai_benchmark):
    yourai_benchmark.run()
"""
    )
    probe = write_fake_probe(bench.path, OK_PROBE)
    result = bench.runpytest("test_two.py", "-k", "tiny-llama", "--yourai-probe-command", probe)
    result.stdout.fnmatch_lines(["tiny-llama (test_first)*Fail", "tiny-llama (test_second)*Pass"])
    stopped = bench.runpytest("test_two.py", "-k", "tiny", "--yourai-probe-command", probe, "-x")
    stopped.stdout.fnmatch_lines(["The run was interrupted (stopping after 1 failures)*"])
    assert "No preset fits" not in stopped.stdout.str()


def test_no_header_without_benchmarks_and_a_switch_to_turn_it_off(
    bench: pytest.Pytester,
) -> None:
    bench.makepyfile(test_plain="def test_plain():\n    pass\n")
    plain = bench.runpytest("test_plain.py")
    plain.assert_outcomes(passed=1)
    assert "yourai:" not in plain.stdout.str()
    assert not (bench.path / "benchmark_log.jsonl").exists()
    for how in (["--yourai-disable"], ["-o", "yourai_enable=false"]):
        off = bench.runpytest(*how, "-rs")
        off.assert_outcomes(passed=1, skipped=1)
        off.stdout.fnmatch_lines(["*pytest-yourai is turned off*"])
        assert not (bench.path / "benchmark_log.jsonl").exists()
