"""Across machines: xdist workers in their own directories (as remote hosts get the tests),
the controller's log as the run's whole story, and a worker that dies mid-probe."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import BENCHMARK_TEST, OK_PROBE, events, read_log, write_fake_probe

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestWarning")

# tiny-llama hangs in training (the worker running it is killed there); the rest pass.
HANGING_PROBE = """
if spec["preset"] == "tiny-llama":
    print("building block 1/2", flush=True)
    print("step 1/4 loss=2.0", flush=True)
    time.sleep(300)
result(status="ok", phase="done", peak_memory_gb=0.5, train_peak_memory_gb=0.5,
       backend=spec["backend"], preset=spec["preset"])
"""


def hosts_layout(root: Path, probe_body: str) -> tuple[Path, list[str]]:
    """The controller's directory (with benchmarks/, the rsync root) and two worker
    directories beside it; the xdist arguments that send the tests there."""
    controller = root / "controller"
    (controller / "benchmarks").mkdir(parents=True)
    (controller / "benchmarks" / "test_lora_memory.py").write_text(BENCHMARK_TEST)
    for name in ("A", "B"):
        (root / name).mkdir()
    probe = write_fake_probe(root, probe_body)
    args = [
        sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
        "--dist", "load", "--tx", "popen//chdir=../A", "--tx", "popen//chdir=../B",
        "--rsyncdir=benchmarks", "-W", "ignore::DeprecationWarning",
        "-k", "tiny", "--yourai-probe-command", probe, "--yourai-json=results.json",
    ]  # fmt: skip
    return controller, args


def test_workers_in_their_own_directories(tmp_path: Path) -> None:
    controller, args = hosts_layout(tmp_path, OK_PROBE)
    run = subprocess.run(
        args, cwd=controller, capture_output=True, text=True, timeout=240, check=False
    )
    assert run.returncode == 0, run.stdout + run.stderr
    records = read_log(controller / "benchmark_log.jsonl")
    from_workers = [r for r in records if r.get("worker") != "main"]
    assert {r["worker"] for r in from_workers} == {"gw0", "gw1"}
    assert all(r["host"] for r in records)
    for name in ("model_start", "preflight_check", "subprocess_spawned", "subprocess_completed"):
        assert sorted(r["preset"] for r in events(records, name)) == ["tiny-llama", "tiny-qwen2"]
    # Each worker's own log is in its own directory and holds its events only.
    for name in ("A", "B"):
        local = read_log(tmp_path / name / "benchmark_log.jsonl")
        assert local and len({r["worker"] for r in local}) == 1
        assert all(r in from_workers for r in local)
    assert len(from_workers) == sum(
        len(read_log(tmp_path / name / "benchmark_log.jsonl")) for name in ("A", "B")
    )
    # Outputs are the controller's: the JSON lists every preset once; workers write none.
    document = json.loads((controller / "results.json").read_text())
    assert sorted(r["preset"] for r in document["results"]) == ["tiny-llama", "tiny-qwen2"]
    for name in ("A", "B"):
        # (xdist rsyncs the tests and pytest itself there; other plugins may add theirs)
        theirs = {"benchmarks", "pytest", "_pytest", ".benchmarks", "__pycache__"}
        ours = {
            str(p.relative_to(tmp_path / name))
            for p in (tmp_path / name).rglob("*")
            if p.is_file() and not theirs & set(p.relative_to(tmp_path / name).parts)
        }
        assert ours == {"benchmark_log.jsonl"}, ours


def _wait_for(log: Path, predicate: object, seconds: float) -> list[dict[str, object]]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if log.exists():
            lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            if any(predicate(r) for r in lines):  # type: ignore[operator]
                return lines
        time.sleep(0.1)
    raise AssertionError(f"nothing matched in {log} within {seconds} s")


def test_a_worker_killed_mid_probe_is_logged_on_the_controller(tmp_path: Path) -> None:
    controller, args = hosts_layout(tmp_path, HANGING_PROBE)
    log = controller / "benchmark_log.jsonl"
    pytest_run = subprocess.Popen(
        args, cwd=controller, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        # The probe's progress reaches the controller while the probe runs.
        records = _wait_for(
            log,
            lambda r: r["event"] == "probe_progress" and r.get("preset") == "tiny-llama",
            120,
        )
        spawned = next(
            r for r in events(records, "subprocess_spawned") if r["preset"] == "tiny-llama"
        )
        worker = psutil.Process(int(spawned["pid"])).ppid()
        # The worker and its probe's process group, at once: SIGKILL, nothing runs after.
        os.killpg(int(spawned["pid"]), signal.SIGKILL)
        os.kill(worker, signal.SIGKILL)
        out, _ = pytest_run.communicate(timeout=180)
    finally:
        if pytest_run.poll() is None:
            pytest_run.kill()
    assert pytest_run.returncode == 1, out
    records = read_log(log)
    (crash,) = events(records, "worker_crashed")
    assert crash["preset"] == "tiny-llama" and crash["worker"] == spawned["worker"]
    assert crash["host"] == spawned["host"] and crash["last_event"]["event"] == "probe_progress"
    assert records[-1]["event"] == "benchmark_complete"
    verdicts = {r["preset"]: r["verdict"] for r in events(records, "test_verdict")}
    assert verdicts == {"tiny-llama": "Crashed", "tiny-qwen2": "Pass"}
    where = f"worker {spawned['worker']} on {spawned['host']}"
    assert f"{where} crashed while running tiny-llama" in out
    assert "Crashed" in out
    report = subprocess.run(
        [sys.executable, "-m", "pytest_yourai.log", str(log)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr
    assert (
        f"CRASHED: worker {spawned['worker']} on host {spawned['host']}, running tiny-llama"
        in report.stdout
    )
    assert "in flight: tiny-llama, phase: train" in report.stdout


def test_baselines_are_the_controllers_on_every_host(tmp_path: Path) -> None:
    from tests.test_results import PEAK_FROM_ENV

    controller, args = hosts_layout(tmp_path, PEAK_FROM_ENV)

    def run(peak: str, *extra: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "FAKE_PEAK": peak}
        return subprocess.run(
            [*args, *extra], cwd=controller, env=env, capture_output=True, text=True,
            timeout=240, check=False,
        )  # fmt: skip

    saved = run("0.5", "--yourai-baseline-save")
    assert saved.returncode == 0 and "baseline saved:" in saved.stdout, saved.stdout
    assert list((controller / ".yourai" / "baselines").glob("*.json"))
    # The workers run in A and B, where no baseline was ever saved: they compare with the
    # controller's, which it sent them.
    grown = run("0.6", "--yourai-baseline-compare")
    assert grown.returncode == 1, grown.stdout
    assert grown.stdout.count("peak grew 20.0% over the baseline") >= 2, grown.stdout
    assert not list(tmp_path.glob("[AB]/.yourai"))
