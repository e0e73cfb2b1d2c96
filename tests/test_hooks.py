"""The extension hooks (hookspec.py), implemented by a conftest as a team would: a preset of
its own that really runs, the memory its scheduler allotted, and every result."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.helpers import events, read_log

TINY_CONFIG = json.dumps(
    {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
     "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}
)  # fmt: skip

CONFTEST = """
import json

def pytest_yourai_presets(config):
    return [{
        "name": "team-tiny", "model_type": "llama", "hidden_size": 64,
        "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 256, "batch_size": 1, "lora_rank": 4,
        "lora_layers": 1, "seq_len": 32, "dtype": "float32", "steps": 2,
    }]

def pytest_yourai_machine_memory(config):
    return 6.5

def pytest_yourai_result(config, result):
    with open("results.jsonl", "a") as handle:
        handle.write(json.dumps(result) + "\\n")
"""


def received(bench: pytest.Pytester) -> list[dict[str, object]]:
    path = bench.path / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_conftest_adds_a_preset_sets_memory_and_receives_results(bench: pytest.Pytester) -> None:
    bench.makeconftest(CONFTEST)
    result = bench.runpytest_subprocess(
        "-k", "team-tiny or hermes-70b", "--yourai-json", "results.json"
    )
    result.assert_outcomes(passed=1, skipped=1)
    records = read_log(bench.path / "benchmark_log.jsonl")
    checks = {r["preset"]: r for r in events(records, "preflight_check")}
    # The hook's memory is what the pre-flight decided with, for every preset.
    assert {r["available_gb"] for r in checks.values()} == {6.5}
    assert checks["team-tiny"]["decision"] == "run"
    assert checks["hermes-70b"]["decision"] == "skip_memory"
    (completed,) = events(records, "subprocess_completed")
    assert completed["preset"] == "team-tiny" and completed["peak_memory_gb"] > 0
    # Every result, once, as the JSON has it.
    got = {r["preset"]: r for r in received(bench)}
    assert set(got) == {"team-tiny", "hermes-70b"} and len(received(bench)) == 2
    document = json.loads((bench.path / "results.json").read_text())
    assert {r["nodeid"]: r for r in document["results"]} == {
        r["nodeid"]: r for r in received(bench)
    }
    assert got["team-tiny"]["verdict"] == "Pass" and got["hermes-70b"]["verdict"] == "Skipped"


def test_results_reach_the_hook_on_the_xdist_controller(bench: pytest.Pytester) -> None:
    bench.makeconftest(CONFTEST)
    result = bench.runpytest_subprocess(
        "-n", "2", "-k", "hermes or dolphin or r1", "--yourai-estimate-only"
    )
    result.assert_outcomes(skipped=4)
    got = received(bench)
    assert sorted(str(r["preset"]) for r in got) == sorted(
        ["hermes-mistral-7b", "hermes-70b", "dolphin-8b", "r1-distill-14b"]
    )
    assert {r["verdict"] for r in got} <= {"Estimated", "Skipped"}


def test_a_hook_preset_with_a_bad_field_is_a_usage_error(bench: pytest.Pytester) -> None:
    bench.makeconftest(
        "def pytest_yourai_presets(config):\n"
        "    return [{'name': 'broken', 'model_type': 'llama', 'hidden_size': 'wide'}]\n"
    )
    result = bench.runpytest_subprocess("--yourai-estimate-only")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*pytest_yourai_presets*broken*"])
    assert "Traceback" not in result.stderr.str()


def test_the_readme_conftest_example_works(
    bench: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    (example,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "conftest" in b]
    bench.makeconftest(example)
    (bench.path / "models" / "team-1b").mkdir(parents=True)
    (bench.path / "models" / "team-1b" / "config.json").write_text(TINY_CONFIG)
    monkeypatch.setenv("ALLOTTED_GB", "7.5")
    result = bench.runpytest_subprocess("-k", "team-1b", "--yourai-estimate-only", "-s")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*team-1b Estimated None*"])
    (check,) = events(read_log(bench.path / "benchmark_log.jsonl"), "preflight_check")
    assert check["preset"] == "team-1b" and check["available_gb"] == 7.5
