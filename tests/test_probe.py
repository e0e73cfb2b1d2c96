"""The MLX probe, run for real on tiny models on this CPU (float32 unless about dtype)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pytest_yourai.estimator import lora_parameter_count
from pytest_yourai.presets import builtin_presets, count_parameters
from pytest_yourai.probe import BOUNDED_IN_FLIGHT_ENV, apply_in_flight

SCRIPTS = Path(__file__).parent / "scripts"
TINY = dict(
    hidden_size=128,
    num_hidden_layers=2,
    intermediate_size=256,
    num_attention_heads=2,
    num_key_value_heads=1,
    vocab_size=1024,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=512,
    tie_word_embeddings=True,
    torch_dtype="float32",
)


def probe(*args: str, env_spec: dict[str, Any] | None = None) -> tuple[dict[str, Any], str, int]:
    import os

    env = dict(os.environ)
    env.pop("YOURAI_PROBE_SPEC", None)
    if env_spec is not None:
        env["YOURAI_PROBE_SPEC"] = json.dumps(env_spec)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest_yourai.probe", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    lines = proc.stdout.strip().splitlines()
    assert lines and lines[-1].startswith("BENCHMARK_RESULT: "), proc.stdout + proc.stderr
    return json.loads(lines[-1].split(": ", 1)[1]), proc.stdout, proc.returncode


def write_config(tmp_path: Path, **fields: Any) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**TINY, **fields}))
    return path


def test_tiny_preset_result_fields() -> None:
    result, stdout, code = probe("--preset", "tiny-llama", "--steps", "3")
    assert code == 0 and result["status"] == "ok" and result["phase"] == "done"
    arch = builtin_presets()["tiny-llama"].architecture
    assert result["total_parameters"] == count_parameters(arch)
    assert result["trainable_parameters"] == lora_parameter_count(arch, 8, 4)
    assert result["steps"] == 3 and len(result["step_seconds"]) == 3
    assert result["tokens_per_second"] > 0 and result["backend"] == "cpu"
    assert 0 < result["resident_memory_gb"] < result["train_peak_memory_gb"]
    assert result["peak_memory_gb"] >= result["train_peak_memory_gb"]
    assert result["process_peak_rss_gb"] > 0 and isinstance(result["peak_growth"], bool)
    assert result["config"]["lora_rank"] == 8 and result["config"]["dtype"] == "float32"
    assert "building block 1/4" in stdout and "step 3/3 loss=" in stdout
    # By default MLX keeps its own command-buffer limits, as mlx_lm.lora runs.
    assert result["config"]["in_flight"] == "mlx"
    assert result["mlx_buffer_env"] == {}
    # The footprint, phase by phase: on CPU the resident set, with Linux's high-water mark.
    assert 0 < result["build_footprint_gb"] <= result["train_footprint_gb"]
    assert result["footprint_peak_gb"] == result["train_footprint_gb"]
    assert result["train_footprint_gb"] >= result["train_peak_memory_gb"]
    assert "RSS" in result["footprint_source"] and result["footprint_interval_ms"] == 20


def test_in_flight_mode_bounded_sets_the_buffer_limits() -> None:
    result, _, code = probe(
        "--preset", "tiny-llama", "--steps", "1", "--seq-len", "32", "--in-flight", "bounded"
    )
    assert code == 0 and result["config"]["in_flight"] == "bounded"
    assert result["mlx_buffer_env"] == BOUNDED_IN_FLIGHT_ENV


LARGE_VOCABULARY = dict(
    model_type="qwen2",
    hidden_size=256,
    num_hidden_layers=2,
    intermediate_size=512,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=152064,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=False,
)


@pytest.mark.parametrize(("bits", "dtype"), [(4, "float32"), (16, "bfloat16")])
def test_the_build_never_needs_more_than_training(tmp_path: Path, bits: int, dtype: str) -> None:
    # A 152k vocabulary at hidden 256: the embeddings and the head are most of the model, so
    # making them whole in float32 before casting would dominate the build.
    config = tmp_path / "config.json"
    config.write_text(json.dumps(LARGE_VOCABULARY))
    result, _, code = probe(
        "--config", str(config), "--bits", str(bits), "--dtype", dtype,
        "--batch-size", "1", "--seq-len", "32", "--lora-rank", "8", "--lora-layers", "2",
        "--steps", "2",
    )  # fmt: skip
    assert code == 0, result
    build, train = result["load_peak_memory_gb"], result["train_peak_memory_gb"]
    assert build <= max(train, 1.25 * result["resident_memory_gb"])
    assert result["build_footprint_gb"] <= result["train_footprint_gb"]


def test_apply_in_flight_keeps_what_the_user_set() -> None:
    env = {"MLX_MAX_OPS_PER_BUFFER": "8"}
    assert apply_in_flight("bounded", env) == {
        "MLX_MAX_OPS_PER_BUFFER": "8",
        "MLX_MAX_MB_PER_BUFFER": "1",
    }
    assert apply_in_flight("mlx", {}) == {}


def test_spec_from_the_environment_and_flags_override() -> None:
    spec = {
        "preset": "env",
        "config": {**TINY, "model_type": "llama"},
        "bits": 16,
        "batch_size": 1,
        "seq_len": 32,
        "lora_rank": 4,
        "lora_layers": 1,
        "steps": 1,
    }
    result, _, code = probe("--lora-rank", "2", env_spec=spec)
    assert code == 0
    assert result["config"]["lora_rank"] == 2 and result["config"]["seq_len"] == 32
    assert result["trainable_parameters"] == lora_parameter_count(spec["config"], 2, 1)


@pytest.mark.parametrize(
    ("name", "published"),
    [
        ("hermes-mistral-7b", 7.24e9),
        ("dolphin-8b", 8.03e9),
        ("llama-8b", 8.03e9),
        ("r1-distill-14b", 14.77e9),
        ("hermes-70b", 70.55e9),
    ],
)
def test_seed_presets_build_synthetically_at_their_published_size(
    name: str, published: float
) -> None:
    # Built lazily with mlx-lm's own classes and quantized: nothing is evaluated, so even the
    # 70B builds on this 24 GB machine. (Full builds ran on an H100: benchmarks/results.)
    result, _, code = probe("--preset", name, "--count-only")
    assert code == 0
    assert result["total_parameters"] == pytest.approx(published, rel=0.02)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "phi3"])
def test_fidelity_against_mlx_lm_lora(tmp_path: Path, model_type: str) -> None:
    """The probe's train peak equals what mlx_lm.lora reaches on the same model, within 5%."""
    config = write_config(tmp_path, model_type=model_type)
    work = tmp_path / "work"
    ref = subprocess.run(
        [
            sys.executable,
            str(SCRIPTS / "lora_reference.py"),
            str(config),
            str(work),
            "--batch-size",
            "2",
            "--lora-layers",
            "2",
            "--lora-rank",
            "8",
            "--seq-len",
            "64",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert ref.returncode == 0, ref.stderr[-2000:]
    lora_peak = int(ref.stdout.split("LORA_TRAIN_PEAK_BYTES: ")[1].split()[0]) / 1e9
    result, _, code = probe(
        "--config",
        str(config),
        "--bits",
        "16",
        "--dtype",
        "float32",
        "--batch-size",
        "2",
        "--seq-len",
        "64",
        "--lora-rank",
        "8",
        "--lora-layers",
        "2",
        "--steps",
        "4",
    )
    assert code == 0
    assert result["train_peak_memory_gb"] == pytest.approx(lora_peak, rel=0.05)
    if model_type == "llama":
        # The same model from its files on disk, with real text batches.
        real, _, code = probe(
            "--config",
            str(config),
            "--weights",
            str(work / "model"),
            "--data",
            str(work / "data" / "train.jsonl"),
            "--bits",
            "16",
            "--batch-size",
            "2",
            "--seq-len",
            "64",
            "--lora-rank",
            "8",
            "--lora-layers",
            "2",
            "--steps",
            "2",
        )
        assert code == 0 and real["weights"] == str(work / "model")
        assert real["train_peak_memory_gb"] == pytest.approx(lora_peak, rel=0.10)


@pytest.mark.parametrize(
    "model_type",
    ["gemma", "gemma2", "qwen3", "cohere", "olmo2", "starcoder2", "internlm2", "mixtral"],
)
def test_more_architectures_train(tmp_path: Path, model_type: str) -> None:
    config = write_config(
        tmp_path,
        model_type=model_type,
        head_dim=64,
        layer_norm_eps=1e-5,
        num_local_experts=2,
        num_experts_per_tok=1,
    )
    result, _, code = probe(
        "--config",
        str(config),
        "--bits",
        "4",
        "--batch-size",
        "1",
        "--seq-len",
        "32",
        "--lora-rank",
        "4",
        "--lora-layers",
        "2",
        "--steps",
        "1",
    )
    assert code == 0 and result["status"] == "ok", result
    assert result["trainable_parameters"] > 0 and result["train_peak_memory_gb"] > 0


def test_bfloat16_on_a_very_small_shape(tmp_path: Path) -> None:
    config = write_config(tmp_path, model_type="llama", torch_dtype="bfloat16")
    result, _, code = probe(
        "--config",
        str(config),
        "--batch-size",
        "1",
        "--seq-len",
        "32",
        "--lora-rank",
        "4",
        "--lora-layers",
        "1",
        "--steps",
        "2",
    )
    assert code == 0 and result["config"]["dtype"] == "bfloat16" and result["config"]["bits"] == 4
    f32, _, _ = probe(
        "--config",
        str(config),
        "--dtype",
        "float32",
        "--batch-size",
        "1",
        "--seq-len",
        "32",
        "--lora-rank",
        "4",
        "--lora-layers",
        "1",
        "--steps",
        "2",
    )
    assert result["resident_memory_gb"] < f32["resident_memory_gb"]


def test_rehearsed_oom_reports_the_phase() -> None:
    result, stdout, code = probe("--preset", "tiny-llama", "--memory-limit-gb", "0.02")
    assert code == 3 and result["status"] == "oom" and result["phase"] in ("build", "train")
    assert "memory limit exceeded" in result["error"]
    assert "oom in phase" in stdout


def test_errors_are_results_not_tracebacks(tmp_path: Path) -> None:
    config = write_config(tmp_path, model_type="no_such_architecture")
    result, _, code = probe("--config", str(config), "--steps", "1")
    assert code == 1 and result["status"] == "error" and result["phase"] == "build"
    assert "no_such_architecture" in result["error"]


def test_usage_errors() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest_yourai.probe", "--preset", "nope"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2 and "unknown preset 'nope'" in proc.stderr
    assert "Traceback" not in proc.stderr
