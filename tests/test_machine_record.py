"""The estimate learns the machine it runs on (learning.py, machine_record.py): each real probe
that passes is kept in pytest's cache, the next pre-flight's estimate is corrected by it and
says so (``learned_from``, ``learned_correction``, the header), and
``--yourai-forget-machine`` starts afresh. Real probes of the tiny preset on this CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_yourai.learning import MachineRecord
from pytest_yourai.machine_record import cache_key, read_record
from tests.helpers import events, read_log

PRESET = "tiny-llama"


def run(bench: pytest.Pytester, *args: str) -> tuple[pytest.RunResult, dict, dict | None]:
    """One real run of the preset: its result, its pre-flight, the probe's result (if any)."""
    log = bench.path / "benchmark_log.jsonl"
    log.unlink(missing_ok=True)
    result = bench.runpytest_subprocess("-k", PRESET, "--yourai-json", "out.json", *args)
    (check,) = events(read_log(log), "preflight_check")
    rows = json.loads((bench.path / "out.json").read_text()).get("results") or []
    return result, check, rows[0] if rows else None


def test_the_next_estimate_learns_from_this_machines_probe_and_forgets_on_request(
    bench: pytest.Pytester,
) -> None:
    first, check, row = run(bench)
    first.assert_outcomes(passed=1)
    first.stdout.fnmatch_lines(["yourai:*learned from 0 probes on this machine*"])
    assert (check["learned_from"], check["learned_correction"]) == (0, None)
    assert row is not None
    measured = float(row["footprint_peak_gb"])

    second, learned, _ = run(bench)
    second.assert_outcomes(passed=1)
    second.stdout.fnmatch_lines(["yourai:*learned from 1 probe on this machine*"])
    assert learned["learned_from"] == 1
    correction = learned["learned_correction"]
    assert correction is not None and correction["learned_from"] == 1
    # A repeat of the probed run: its estimate moves to what the probe measured, and the
    # conservative figure still covers it.
    before, after = check["estimated_base_gb"], learned["estimated_base_gb"]
    assert abs(after - measured) <= abs(before - measured)
    assert learned["estimated_conservative_gb"] >= measured
    # Time from the probe itself: the same boot and install, so no cold start is charged.
    assert learned["predicted_cold_start_s"] == 0.0
    assert learned["predicted_compile_s"] == 0.0  # the same kernels as the probe before
    took = float(row["elapsed_s"])
    assert 0.5 * took <= learned["predicted_seconds"] <= 2 * took

    third, forgotten, _ = run(bench, "--yourai-forget-machine", "--yourai-estimate-only")
    third.stdout.fnmatch_lines(["yourai:*learned: forgotten (--yourai-forget-machine)*"])
    assert (forgotten["learned_from"], forgotten["learned_correction"]) == (0, None)
    assert forgotten["estimated_base_gb"] == check["estimated_base_gb"]


def test_a_record_of_another_machine_or_calibration_is_not_used(tmp_path: Path) -> None:
    record = MachineRecord("cpu-A-24GB|mlx 0.32.4").to_json()
    path = tmp_path / "v" / cache_key("host")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({**record, "probes": [{"broken": True}]}))
    assert read_record(tmp_path, "host", "cpu-A-24GB|mlx 0.32.4").probes == ()  # damaged
    path.write_text(json.dumps(record))
    assert read_record(tmp_path, "host", "cpu-A-24GB|mlx 0.32.5").key == "cpu-A-24GB|mlx 0.32.5"
    path.write_text(json.dumps({**record, "calibration": "another"}))
    assert read_record(tmp_path, "host", "cpu-A-24GB|mlx 0.32.4").probes == ()


def test_estimate_explain_prints_the_terms_and_what_was_learned(bench: pytest.Pytester) -> None:
    first, _, _ = run(bench)
    first.assert_outcomes(passed=1)
    explained = subprocess.run(
        [sys.executable, "-m", "pytest_yourai.estimate", "--preset", PRESET, "--explain",
         "--cache-dir", str(bench.path / ".pytest_cache")],
        capture_output=True, text=True, timeout=120, check=False, cwd=bench.path,
    )  # fmt: skip
    assert explained.returncode == 0, explained.stderr
    text = explained.stdout
    assert "weights_gb" in text and "estimated_conservative_gb" in text
    assert "learned from 1 probe" in text and PRESET in text


def test_a_run_not_probed_here_keeps_todays_estimate(bench: pytest.Pytester) -> None:
    # Replayed first sightings were off by more than today's estimate: the correction is
    # reported for them, not applied (machine_record.learned_estimate).
    log = bench.path / "benchmark_log.jsonl"
    bench.runpytest_subprocess("-k", "tiny-qwen2", "--yourai-estimate-only")
    (before,) = events(read_log(log), "preflight_check")
    log.unlink()
    run(bench)[0].assert_outcomes(passed=1)  # a probe of tiny-llama
    log.unlink()
    bench.runpytest_subprocess("-k", "tiny-qwen2", "--yourai-estimate-only")
    (after,) = events(read_log(log), "preflight_check")
    correction = after["learned_correction"]
    assert after["learned_from"] == 1 and correction["applied"] is False
    for field in ("estimated_base_gb", "estimated_conservative_gb", "mlx_peak_gb"):
        assert after[field] == before[field], field
    # What learning would have said is logged beside the figures the pre-flight used: the
    # probe of tiny-llama moved it.
    assert correction["estimated_base_gb"] != after["estimated_base_gb"]
    assert correction["estimated_conservative_gb"] >= correction["estimated_base_gb"]


def test_yourai_check_and_estimate_use_the_record_as_the_pre_flight_does(
    bench: pytest.Pytester,
) -> None:
    from tests.test_lora_preset import BASE, model_dir, write_yaml

    model_dir(bench.path)
    write_yaml(bench.path, BASE)
    log = bench.path / "benchmark_log.jsonl"
    bench.runpytest_subprocess("--yourai-lora-config", "lora.yaml").assert_outcomes(passed=1)
    log.unlink()
    bench.runpytest_subprocess("--yourai-lora-config", "lora.yaml", "--yourai-estimate-only")
    (check,) = events(read_log(log), "preflight_check")
    assert check["learned_from"] == 1 and check["learned_correction"]["applied"] is True
    for field in ("estimated_base_gb", "estimated_conservative_gb", "mlx_peak_gb"):
        assert check["learned_correction"][field] == pytest.approx(check[field], abs=1e-3)
    memory = str(check["available_gb"])
    for argv in (
        ["-m", "pytest_yourai.check", "lora.yaml", "--memory", memory, "--json"],
        ["-m", "pytest_yourai.estimate", "--lora-config", "lora.yaml", "--available-gb", memory,
         "--json"],
    ):  # fmt: skip
        done = subprocess.run(
            [sys.executable, *argv], capture_output=True, text=True, timeout=120, check=False,
            cwd=bench.path,
        )  # fmt: skip
        said = json.loads(done.stdout)
        said = said.get("config", said)
        for field in ("estimated_base_gb", "estimated_conservative_gb", "learned_from"):
            assert said[field] == check[field], (argv[1], field)


def test_probes_of_two_xdist_workers_are_both_kept(bench: pytest.Pytester) -> None:
    both = bench.runpytest_subprocess("-n", "2", "-k", "tiny-llama or tiny-qwen2")
    both.assert_outcomes(passed=2)
    again = bench.runpytest_subprocess("-k", "tiny-llama", "--yourai-estimate-only")
    again.stdout.fnmatch_lines(["yourai:*learned from 2 probes on this machine*"])
