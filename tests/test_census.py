"""The model census: mlx-lm's own shapes, built lazily in a child Python, and what the
estimator does with them (exact weights, mixtures of experts, refusals)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_yourai.census import EstimateRefused, census_for
from pytest_yourai.estimator import (
    TrainingShape,
    estimate_training_memory,
    lora_parameter_count,
    weight_bytes,
)
from pytest_yourai.presets import builtin_presets

ROOT = Path(__file__).parent.parent
TEST_CONFIGS = json.loads((ROOT / "benchmarks/configs/mlx_lm_test_configs.json").read_text())[
    "configs"
]
MIXTRAL = dict(TEST_CONFIGS["mixtral"], hidden_size=128, intermediate_size=256, vocab_size=512)
SPEC = {"preset": "tiny-mixtral", "dtype": "float32", "bits": 4, "batch_size": 2,
        "seq_len": 64, "lora_rank": 8, "lora_layers": 2, "steps": 1}  # fmt: skip
SHAPE = TrainingShape(bits=4, group_size=64, dtype="float32", batch_size=2, seq_len=64,
                      lora_rank=8, lora_layers=2, backend="cpu")  # fmt: skip


def test_census_agrees_with_the_formula_on_a_llama() -> None:
    arch = builtin_presets()["tiny-llama"].architecture
    census = census_for(arch, 4, 64, "float32")
    assert census.weights_bytes == weight_bytes(arch, 4, 64, "float32")
    assert census.lora_parameters(8, 3) == lora_parameter_count(arch, 8, 3)
    assert census.hidden_size == arch["hidden_size"] and census.vocab_size == arch["vocab_size"]


def test_a_mixture_of_experts_is_refused_without_a_census_and_exact_with_one() -> None:
    with pytest.raises(EstimateRefused, match="mixtral"):
        estimate_training_memory(MIXTRAL, SHAPE)
    census = census_for(MIXTRAL, 4, 64, "float32")
    (kind,) = census.blocks
    assert (kind.mlp, kind.experts, kind.top_k) == ("moe", 4, 2)
    estimate = estimate_training_memory(MIXTRAL, SHAPE, census)
    assert estimate.breakdown["weights_gb"] * 1e9 == pytest.approx(census.weights_bytes)
    # What the probe holds once the model is built and LoRA attached: the weights and the
    # adapters the census counts, to the byte.
    spec = dict(SPEC, config=MIXTRAL)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest_yourai.probe"],
        env={**__import__("os").environ, "YOURAI_PROBE_SPEC": json.dumps(spec)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1].split(": ", 1)[1])
    assert result["status"] == "ok", result
    resident = census.weights_bytes + 4 * census.lora_parameters(8, 2)
    assert result["resident_memory_gb"] * 1e9 == pytest.approx(resident, rel=0.001)
    assert result["trainable_parameters"] == census.lora_parameters(8, 2)


def test_a_state_space_model_is_refused_with_the_reason() -> None:
    mamba = TEST_CONFIGS["mamba2"]
    census = census_for(mamba, 4, 64, "float32")
    with pytest.raises(EstimateRefused, match=r"mamba2.*Mamba2Block"):
        estimate_training_memory(mamba, SHAPE, census)


def test_the_estimate_cli_refuses_with_a_message(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(TEST_CONFIGS["mamba2"], num_attention_heads=8)))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest_yourai.estimate", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    assert "cannot estimate" in proc.stderr and "model type mamba2" in proc.stderr


@pytest.mark.parametrize("args", [["--check"], ["ship", "--check"]])
def test_coverage_table_and_shipped_censuses_are_current(args: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/model_coverage.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_preflight_skips_a_model_it_cannot_estimate(bench: pytest.Pytester) -> None:
    from tests.helpers import OK_PROBE, read_log, write_fake_probe

    config = bench.path / "mamba2.json"
    config.write_text(json.dumps(dict(TEST_CONFIGS["mamba2"], num_attention_heads=8)))
    bench.path.joinpath("presets.toml").write_text(
        '[presets.tiny-mamba]\nconfig = "mamba2.json"\nseq_len = 64\nbatch_size = 1\n'
    )
    args = ["--yourai-presets-file", "presets.toml", "--yourai-presets", "tiny-mamba", "-rs"]
    result = bench.runpytest(*args)
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED*tiny-mamba: no estimate: model type mamba2*"])
    (preflight,) = [
        r for r in read_log(bench.path / "benchmark_log.jsonl") if r["event"] == "preflight_check"
    ]
    assert preflight["decision"] == "skip_refused" and preflight["estimated_base_gb"] is None
    probe = write_fake_probe(bench.path, OK_PROBE)
    forced = bench.runpytest(*args, "--yourai-force", "--yourai-probe-command", probe)
    forced.assert_outcomes(passed=1)
