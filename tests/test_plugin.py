"""The plugin through pytester: parametrization, pre-flight, the log, JUnit, errors."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import psutil
import pytest

from pytest_yourai.eventlog import EVENTS
from tests.helpers import OK_PROBE, events, read_log, write_fake_probe

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestWarning")


def test_presets_become_items_smallest_first(bench: pytest.Pytester) -> None:
    result = bench.runpytest("--collect-only", "-q")
    ids = [
        line.split("[")[1].rstrip("]") for line in result.outlines if "::test_lora_memory[" in line
    ]
    assert ids[:2] == ["tiny-qwen2", "tiny-llama"]
    assert ids[-1] == "hermes-70b"
    assert {"hermes-mistral-7b", "dolphin-8b", "llama-8b", "r1-distill-14b"} <= set(ids)
    # Collecting alone writes no log.
    assert not (bench.path / "benchmark_log.jsonl").exists()


def test_options_are_in_help(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(
        ["yourai*", "*--yourai-force*", "*--yourai-max-memory=GB*", "*yourai_timeout*"]
    )


def test_tiny_presets_pass_with_every_event_and_junit(bench: pytest.Pytester) -> None:
    """The acceptance run: real MLX probes of the tiny presets on this CPU."""
    result = bench.runpytest(
        "-k", "tiny", "-v", "--junitxml=junit.xml", "-o", "junit_family=xunit1"
    )
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "*Pre-flight: Available=*GB, Required=~*GB*",
            "*Config: batch=2, rank=8, layers=*",
            "*Testing... ✓ Pass (*GB peak)*",
            "*yourai: LoRA memory benchmark*",
            "preset*params*config*estimate*available*peak*verdict*",
            "Largest preset that fits: tiny-llama*",
        ]
    )
    records = read_log(bench.path / "benchmark_log.jsonl")
    assert len(events(records, "benchmark_start")) == 1
    assert len(events(records, "benchmark_complete")) == 1
    assert events(records, "benchmark_complete")[0]["passed"] == 2
    for preset in ("tiny-llama", "tiny-qwen2"):
        seen = [r["event"] for r in records if r.get("preset") == preset]
        assert "probe_progress" in seen  # build and step lines reached the log as they happened
        seen = [e for e in seen if e != "probe_progress"]
        assert seen == [
            "model_start",
            "preflight_check",
            "probe_admitted",
            "subprocess_start",
            "subprocess_spawned",
            "subprocess_completed",
            "test_verdict",
        ]
        (done,) = [
            r for r in records if r["event"] == "subprocess_completed" and r["preset"] == preset
        ]
        assert done["peak_memory_gb"] > 0 and "BENCHMARK_RESULT" in done["stdout_preview"]
        (check,) = [r for r in records if r["event"] == "preflight_check" and r["preset"] == preset]
        assert check["predicted_seconds"] < 300 and check["decision"] == "run"
    cases = ET.parse(bench.path / "junit.xml").getroot().iter("testcase")
    for case in cases:
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        for name in (
            "yourai_peak_memory_gb",
            "yourai_estimated_base_gb",
            "yourai_estimated_conservative_gb",
            "yourai_available_gb",
            "yourai_batch_size",
            "yourai_lora_rank",
            "yourai_lora_layers",
            "yourai_backend",
        ):
            assert name in props, (case.get("name"), name)
        assert float(props["yourai_peak_memory_gb"]) > 0


def test_70b_is_skipped_with_both_figures_and_nothing_spawned(bench: pytest.Pytester) -> None:
    result = bench.runpytest("-k", "hermes-70b", "--yourai-max-memory", "8", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED*hermes-70b: needs ~*–* GB, 8 GB available*"])
    records = read_log(bench.path / "benchmark_log.jsonl")
    (check,) = events(records, "preflight_check")
    assert check["available_gb"] == 8.0 and check["estimated_conservative_gb"] > 8.0
    assert not [r for r in records if r["event"].startswith("subprocess_")]


def test_safety_stop_before_any_probe(bench: pytest.Pytester) -> None:
    result = bench.runpytest("--yourai-max-memory", "1.5")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*safety stop*1.50 GB available*2 GB*"])
    records = read_log(bench.path / "benchmark_log.jsonl")
    (stop,) = events(records, "safety_stop")
    assert stop["available_gb"] == 1.5 and stop["threshold_gb"] == 2.0
    assert not [r for r in records if r["event"].startswith("subprocess_")]
    assert len(events(records, "benchmark_complete")) == 1


def test_force_runs_below_the_safety_threshold(bench: pytest.Pytester) -> None:
    result = bench.runpytest("-k", "tiny", "--yourai-max-memory", "1.5", "--yourai-force")
    result.assert_outcomes(passed=2)
    records = read_log(bench.path / "benchmark_log.jsonl")
    assert not events(records, "safety_stop")
    assert events(records, "benchmark_start")[0]["force_mode"] is True
    assert len(events(records, "subprocess_completed")) == 2


def test_force_runs_what_does_not_fit(bench: pytest.Pytester) -> None:
    probe = write_fake_probe(bench.path, OK_PROBE)
    result = bench.runpytest(
        "-k",
        "hermes-70b",
        "--yourai-max-memory",
        "8",
        "--yourai-force",
        "--yourai-probe-command",
        probe,
        "-v",
    )
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*WARNING: Available memory may be insufficient*"])


def test_presets_that_would_outlast_the_timeout_are_skipped(bench: pytest.Pytester) -> None:
    # A 7B on this CPU needs hours per probe; the time check measures throughput once and
    # skips it instead of letting it run into the timeout.
    result = bench.runpytest("-k", "hermes-mistral-7b", "--yourai-timeout", "60", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(
        ["SKIPPED*hermes-mistral-7b: would take ~* s on cpu (timeout 60 s*"]
    )
    records = read_log(bench.path / "benchmark_log.jsonl")
    (check,) = events(records, "preflight_check")
    assert check["decision"] == "skip_time" and check["predicted_seconds"] > 60
    assert not [r for r in records if r["event"].startswith("subprocess_")]


def test_estimate_only_spawns_nothing(bench: pytest.Pytester) -> None:
    from pytest_yourai.presets import builtin_presets

    result = bench.runpytest("--yourai-estimate-only")
    count = len(builtin_presets())
    result.assert_outcomes(skipped=count)
    result.stdout.fnmatch_lines(["*hermes-70b*70B*Estimated*", "*Largest preset that should fit*"])
    records = read_log(bench.path / "benchmark_log.jsonl")
    assert len(events(records, "preflight_check")) == count
    assert not [r for r in records if r["event"].startswith("subprocess_")]


def test_hanging_probe_times_out_and_leaves_nothing(bench: pytest.Pytester) -> None:
    probe = write_fake_probe(bench.path, "print('loading', flush=True)\ntime.sleep(120)\n")
    started = time.monotonic()
    result = bench.runpytest(
        "-k", "tiny-llama", "--yourai-probe-command", probe, "--yourai-timeout", "3"
    )
    assert time.monotonic() - started < 30
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*Timeout after 3 s in phase start*", "*loading*"])
    records = read_log(bench.path / "benchmark_log.jsonl")
    (timeout,) = events(records, "subprocess_timeout")
    assert timeout["timeout_s"] == 3 and "loading" in timeout["stdout_preview"]
    (spawned,) = events(records, "subprocess_spawned")
    assert not psutil.pid_exists(spawned["pid"]) or (
        psutil.Process(spawned["pid"]).status() == psutil.STATUS_ZOMBIE
    )


def test_oom_result_fails_cleanly(bench: pytest.Pytester) -> None:
    probe = write_fake_probe(
        bench.path,
        """
print("step 1/4 loss=2.0", flush=True)
result(status="oom", phase="train", error="RuntimeError: [malloc] Unable to allocate 9 GB")
sys.exit(3)
""",
    )
    result = bench.runpytest("-k", "tiny-llama", "--yourai-probe-command", probe)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*OOM at train: RuntimeError: *Unable to allocate*"])
    assert "Traceback" not in result.stdout.str()
    result.stdout.fnmatch_lines(["tiny-llama*OOM"])
    (failed,) = events(read_log(bench.path / "benchmark_log.jsonl"), "subprocess_failed")
    assert failed["status"] == "oom" and failed["exit_code"] == 3


def test_garbage_output_fails_with_the_preview(bench: pytest.Pytester) -> None:
    probe = write_fake_probe(bench.path, "print('no result here', flush=True)\n")
    result = bench.runpytest("-k", "tiny-llama", "--yourai-probe-command", probe)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*printed no BENCHMARK_RESULT: line*", "*no result here*"])


def test_probe_command_gets_the_spec(bench: pytest.Pytester) -> None:
    probe = write_fake_probe(
        bench.path,
        """
assert spec["preset"] == "tiny-llama" and spec["config"]["model_type"] == "llama"
assert spec["seq_len"] == 128 and spec["lora_rank"] == 8
result(status="ok", peak_memory_gb=spec["batch_size"] / 10)
""",
    )
    result = bench.runpytest("-k", "tiny-llama", "--yourai-probe-command", probe)
    result.assert_outcomes(passed=1)


def test_ini_values_apply_and_cli_wins(bench: pytest.Pytester) -> None:
    bench.makeini("[pytest]\nyourai_max_memory = 8\nyourai_log = custom.jsonl\n")
    result = bench.runpytest("-k", "hermes-70b", "-rs")
    result.stdout.fnmatch_lines(["*8 GB available*"])
    assert (bench.path / "custom.jsonl").exists()
    result = bench.runpytest("-k", "hermes-70b", "-rs", "--yourai-max-memory", "4")
    result.stdout.fnmatch_lines(["*4 GB available*"])


def test_existing_log_is_appended_to(bench: pytest.Pytester) -> None:
    log = bench.path / "benchmark_log.jsonl"
    log.write_text('{"timestamp": 1.0, "event": "benchmark_complete"}\n')
    bench.runpytest("-k", "hermes-70b", "--yourai-max-memory", "8")
    lines = log.read_text().splitlines()
    assert lines[0] == '{"timestamp": 1.0, "event": "benchmark_complete"}' and len(lines) > 1


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--yourai-timeout", "-3"], "--yourai-timeout"),
        (["--yourai-timeout", "soon"], "'soon'"),
        (["--yourai-max-memory", "-1"], "--yourai-max-memory"),
        (["--yourai-safety-gb", "lots"], "--yourai-safety-gb"),
        (["--yourai-config", "best"], "'best'"),
        (["--yourai-in-flight", "sideways"], "'sideways'"),
        (["--yourai-presets", "nope"], "nope"),
        (["--yourai-log", "a-file/log.jsonl"], "a-file"),
        (["--yourai-json", "a-file/out.json"], "--yourai-json"),
        (["--yourai-plot", "a-file/peaks.png"], "--yourai-plot"),
        (["--yourai-baseline-save", "--yourai-baseline-dir", "a-file"], "a-file"),
        (["-o", "yourai_force=maybe"], "ini yourai_force"),
        (["--yourai-presets-file", "broken.toml"], "broken.toml"),
        (["--yourai-presets-file", "unknown.toml"], "colour"),
        (["--yourai-presets-file", "noconfig.toml"], "config file not found"),
    ],
)
def test_bad_input_is_a_one_line_usage_error(
    bench: pytest.Pytester, args: list[str], named: str
) -> None:
    (bench.path / "a-file").write_text("not a directory\n")
    (bench.path / "broken.toml").write_text("[presets.x\n")
    (bench.path / "unknown.toml").write_text("[presets.x]\nconfig = 'c.json'\ncolour = 1\n")
    (bench.path / "c.json").write_text('{"model_type": "llama"}')
    (bench.path / "noconfig.toml").write_text("[presets.x]\nconfig = 'nope/config.json'\n")
    log = bench.path / "benchmark_log.jsonl"
    log.write_text("keep me\n")
    result = bench.runpytest_subprocess(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.errlines if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("ERROR:") and named in errors[0], errors
    assert "Traceback" not in result.stderr.str() + result.stdout.str()
    assert log.read_text() == "keep me\n"


def test_in_flight_mode_is_recorded_everywhere(bench: pytest.Pytester) -> None:
    """MLX's defaults unless asked: in the pre-flight, the probe's result and JUnit."""
    result = bench.runpytest(
        "-k", "tiny-llama", "--junitxml=junit.xml", "-o", "junit_family=xunit1"
    )
    result.assert_outcomes(passed=1)
    records = read_log(bench.path / "benchmark_log.jsonl")
    (preflight,) = events(records, "preflight_check")
    (completed,) = events(records, "subprocess_completed")
    assert preflight["in_flight"] == completed["in_flight"] == "mlx"
    assert completed["train_footprint_gb"] >= completed["train_peak_memory_gb"] > 0
    props = {
        p.get("name"): p.get("value")
        for p in ET.parse(bench.path / "junit.xml").getroot().iter("property")
    }
    assert props["yourai_in_flight"] == "mlx" and float(props["yourai_footprint_peak_gb"]) > 0
    for how in (["--yourai-in-flight", "bounded"], ["-o", "yourai_in_flight=bounded"]):
        bench.path.joinpath("benchmark_log.jsonl").unlink()
        bench.runpytest("-k", "tiny-llama", *how).assert_outcomes(passed=1)
        records = read_log(bench.path / "benchmark_log.jsonl")
        assert events(records, "preflight_check")[0]["in_flight"] == "bounded"
        assert events(records, "subprocess_completed")[0]["in_flight"] == "bounded"


def test_in_flight_option_in_help(bench: pytest.Pytester) -> None:
    result = bench.runpytest("--help")
    result.stdout.fnmatch_lines(["*--yourai-in-flight*"])


def test_mlx_that_cannot_be_imported_is_said_not_guessed(
    bench: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = bench.path / "fake" / "mlx"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('libmlx.so: cannot open shared object')")
    monkeypatch.setenv("PYTHONPATH", str(fake.parent))
    result = bench.runpytest_subprocess("-k", "tiny-llama or hermes-70b", "-rs")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(
        [
            "yourai: *MLX is not importable (ImportError: libmlx.so*); install it: pip install*",
            "SKIPPED*tiny-llama: MLX is not importable*",
        ]
    )
    records = read_log(bench.path / "benchmark_log.jsonl")
    assert {r["decision"] for r in events(records, "preflight_check")} == {"skip_no_mlx"}
    assert all(r["available_gb"] is None for r in events(records, "preflight_check"))
    assert not events(records, "subprocess_start")


def test_output_paths_get_their_directories(bench: pytest.Pytester) -> None:
    """As --junitxml does: the CI recipe writes everything under reports/, which is new."""
    probe = write_fake_probe(bench.path, OK_PROBE)
    result = bench.runpytest(
        "-k", "tiny-llama", "--yourai-probe-command", probe,
        "--yourai-log", "reports/log/benchmark_log.jsonl", "--yourai-json", "reports/r.json",
        "--junitxml", "reports/junit.xml",
    )  # fmt: skip
    result.assert_outcomes(passed=1)
    assert (bench.path / "reports/log/benchmark_log.jsonl").exists()
    assert (bench.path / "reports/r.json").exists()


@pytest.mark.skipif(
    int(pytest.__version__.split(".")[0]) < 9,
    reason="pytest before 9 reads no native [tool.pytest] table",
)
def test_ini_paths_resolve_from_the_ini_file_and_native_toml_values(
    bench: pytest.Pytester,
) -> None:
    probe = write_fake_probe(bench.path, OK_PROBE)
    (bench.path / "conf").mkdir()
    (bench.path / "conf" / "pyproject.toml").write_text(
        "[tool.pytest]\n"
        'yourai_log = "logs/benchmark.jsonl"\n'
        "yourai_max_memory = 8\n"
        "yourai_force = false\n"
        "yourai_timeout = 120\n"
    )
    result = bench.runpytest(
        "-c", "conf/pyproject.toml", "--rootdir", str(bench.path), "-k", "tiny-llama",
        "--yourai-probe-command", probe, str(bench.path / "test_lora_memory.py"),
    )  # fmt: skip
    result.assert_outcomes(passed=1)
    assert (bench.path / "conf" / "logs" / "benchmark.jsonl").exists()
    result.stdout.fnmatch_lines(["tiny-llama*8.0 GB*Pass"])


def test_bad_ini_value_names_the_ini_key(bench: pytest.Pytester) -> None:
    bench.makeini("[pytest]\nyourai_timeout = never\n")
    result = bench.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    # pytest converts the ini value to the key's type (float); the error names key and value.
    result.stderr.fnmatch_lines(["ERROR: ini yourai_timeout:*'never'*"])


def test_presets_file_adds_presets(bench: pytest.Pytester) -> None:
    bench.path.joinpath("presets.toml").write_text(
        "[presets.my-model]\nmodel_type='llama'\nhidden_size=128\nnum_hidden_layers=2\n"
        "intermediate_size=256\nnum_attention_heads=2\nvocab_size=1024\nseq_len=32\n"
    )
    probe = write_fake_probe(bench.path, OK_PROBE)
    result = bench.runpytest(
        "--yourai-presets-file",
        "presets.toml",
        "--yourai-presets",
        "my-model",
        "--yourai-probe-command",
        probe,
        "-v",
    )
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*test_lora_memory[[]my-model[]] PASSED*"])


def test_xdist_one_start_one_complete_and_properties(bench: pytest.Pytester) -> None:
    probe = write_fake_probe(bench.path, OK_PROBE)
    result = bench.runpytest_subprocess(
        "-n",
        "2",
        "--yourai-probe-command",
        probe,
        "--yourai-max-memory",
        "20",
        "--yourai-presets",
        "tiny-llama,tiny-qwen2,hermes-mistral-7b,hermes-70b",
        "--junitxml=junit.xml",
        "-o",
        "junit_family=xunit1",
    )
    result.assert_outcomes(passed=3, skipped=1)
    result.stdout.fnmatch_lines(["*hermes-70b*Skipped*"])
    records = read_log(bench.path / "benchmark_log.jsonl")
    assert len(events(records, "benchmark_start")) == 1
    (complete,) = events(records, "benchmark_complete")
    assert (complete["total_tested"], complete["passed"], complete["skipped"]) == (3, 3, 1)
    workers = {r["worker"] for r in records if r["event"] == "subprocess_spawned"}
    assert workers <= {"gw0", "gw1"} and workers
    assert {r["run_id"] for r in records} == {records[0]["run_id"]}
    for case in ET.parse(bench.path / "junit.xml").getroot().iter("testcase"):
        props = {p.get("name") for p in case.iter("property")}
        assert "yourai_estimated_base_gb" in props


def test_docs_cover_every_option_and_event() -> None:
    from pytest_yourai.eventlog import REQUIRED_FIELDS
    from pytest_yourai.settings import OPTIONS

    root = Path(__file__).parent.parent
    reference = (root / "docs" / "reference.md").read_text()
    readme = (root / "README.md").read_text()
    for option in OPTIONS:
        assert f"`{option.flag}" in reference and f"`{option.ini}`" in reference, option.flag
    for name in EVENTS:
        assert f"`{name}`" in reference and f"`{name}`" in readme, name
        row = next(line for line in reference.splitlines() if line.startswith(f"| `{name}` |"))
        for field in REQUIRED_FIELDS.get(name, ()):
            assert f"`{field}`" in row, (name, field)


def test_non_benchmark_sessions_write_no_log(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_plain(): pass")
    pytester.runpytest().assert_outcomes(passed=1)
    assert not (pytester.path / "benchmark_log.jsonl").exists()
    assert os.listdir(pytester.path) is not None


def test_the_pytest_process_never_imports_mlx(bench: pytest.Pytester) -> None:
    bench.makeconftest(
        """
import sys

def pytest_sessionfinish(session):
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("mlx", "mlx_lm"))
    open("mlx_modules.txt", "w").write(",".join(loaded))
"""
    )
    probe = write_fake_probe(bench.path, OK_PROBE)
    bench.runpytest_subprocess("--yourai-probe-command", probe, "--yourai-max-memory", "8")
    assert (bench.path / "mlx_modules.txt").read_text() == ""
    bench.runpytest_subprocess("-k", "tiny-qwen2")  # the real probe, in its own process
    assert (bench.path / "mlx_modules.txt").read_text() == ""


@pytest.mark.parametrize(
    ("marker", "named"),
    [("max_peak=20", "max_peak"), ("max_peak_gb='a lot'", "max_peak_gb='a lot'")],
)
def test_a_bad_marker_is_a_usage_error(pytester: pytest.Pytester, marker: str, named: str) -> None:
    pytester.makepyfile(
        test_lora_memory=f"""
import pytest

@pytest.mark.yourai({marker})
def test_lora_memory(yourai_benchmark):
    yourai_benchmark.run()
"""
    )
    result = pytester.runpytest_subprocess("-k", "tiny-llama")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert named in result.stderr.str() and "Traceback" not in result.stderr.str()
    log = pytester.path / "benchmark_log.jsonl"
    assert not log.exists() or "subprocess_" not in log.read_text()


def test_an_inline_preset_gets_the_defaults_transformers_gives(bench: pytest.Pytester) -> None:
    """The README's inline example has no rms_norm_eps: mlx-lm's llama needs one."""
    bench.path.joinpath("presets.toml").write_text(
        "[presets.small-llama]\nmodel_type = 'llama'\nhidden_size = 128\nnum_hidden_layers = 2\n"
        "intermediate_size = 256\nnum_attention_heads = 4\nnum_key_value_heads = 2\n"
        "vocab_size = 512\nseq_len = 32\n"
    )
    result = bench.runpytest_subprocess(
        "--yourai-presets-file", "presets.toml", "-k", "small-llama"
    )
    result.assert_outcomes(passed=1)


def test_an_unknown_model_type_names_close_matches(bench: pytest.Pytester) -> None:
    bench.path.joinpath("presets.toml").write_text(
        "[presets.x]\nmodel_type = 'qwen_2'\nhidden_size = 128\nnum_hidden_layers = 2\n"
        "intermediate_size = 256\nnum_attention_heads = 4\nvocab_size = 512\n"
    )
    result = bench.runpytest_subprocess("--yourai-presets-file", "presets.toml")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*model type 'qwen_2' is not one mlx-lm builds; close matches:*"])


def test_the_yourai_command_runs_the_module_command_lines(tmp_path: Path) -> None:
    import shutil

    # beside this Python (a venv that is not activated), else on PATH
    yourai = shutil.which("yourai", path=str(Path(sys.executable).parent)) or shutil.which("yourai")
    assert yourai is not None, "the console script is installed with the package"
    usage = subprocess.run([yourai], capture_output=True, text=True, check=False)
    assert usage.returncode == 2 and "estimate, probe, log, compare" in usage.stderr
    estimate = subprocess.run(
        [yourai, "estimate", "--preset", "tiny-llama", "--backend", "cpu", "--available-gb", "8"],
        capture_output=True,
        text=True,
        check=False,
    )
    module = subprocess.run(
        [sys.executable, "-m", "pytest_yourai.estimate", "--preset", "tiny-llama",
         "--backend", "cpu", "--available-gb", "8"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert estimate.returncode == 0 and estimate.stdout == module.stdout
    assert estimate.stdout.startswith("config: batch=2, rank=8, layers=4")
    log = subprocess.run(
        [yourai, "log", str(tmp_path / "none.jsonl")], capture_output=True, text=True, check=False
    )
    assert log.returncode == 4
