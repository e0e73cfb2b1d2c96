"""Presets: the registry and the TOML file format, including its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_yourai.errors import YouraiUsageError
from pytest_yourai.presets import (
    builtin_presets,
    count_parameters,
    load_presets_file,
    parse_params_label,
    sort_smallest_first,
)

SEED = {
    "hermes-mistral-7b": ("NousResearch/Hermes-2-Pro-Mistral-7B", "7B"),
    "dolphin-8b": ("cognitivecomputations/dolphin-2.9-llama3-8b", "8B"),
    "llama-8b": ("mlabonne/Meta-Llama-3.1-8B-Instruct-abliterated", "8B"),
    "r1-distill-14b": ("huihui-ai/DeepSeek-R1-Distill-Qwen-14B-abliterated-v2", "14B"),
    "hermes-70b": ("NousResearch/Hermes-3-Llama-3.1-70B", "70B"),
}


def test_seed_presets_are_registered() -> None:
    presets = builtin_presets()
    for name, (repo, params) in SEED.items():
        assert (presets[name].repo, presets[name].params) == (repo, params)


def test_tiny_presets_have_two_architectures() -> None:
    tiny = [p for p in builtin_presets().values() if p.name.startswith("tiny-")]
    assert len({p.model_type for p in tiny}) >= 2
    assert all(p.architecture["hidden_size"] <= 256 for p in tiny)


def test_smallest_first() -> None:
    ordered = sort_smallest_first(builtin_presets().values())
    counts = [count_parameters(p.architecture) for p in ordered]
    assert counts == sorted(counts)
    assert ordered[-1].name == "hermes-70b"


@pytest.mark.parametrize(
    ("label", "value"), [("7B", 7.0), ("1.5b", 1.5), ("350M", 0.35), ("x", None)]
)
def test_params_labels(label: str, value: float | None) -> None:
    parsed = parse_params_label(label)
    assert parsed == (pytest.approx(value) if value is not None else None)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "presets.toml"
    path.write_text(text)
    return path


INLINE = """
[presets.small-llama]
model_type = "llama"
hidden_size = 512
num_hidden_layers = 8
intermediate_size = 1408
num_attention_heads = 8
num_key_value_heads = 4
vocab_size = 32000
batch_size = 4
seq_len = 256
"""


def test_inline_preset_with_pins(tmp_path: Path) -> None:
    presets = load_presets_file(_write(tmp_path, INLINE), "test")
    preset = presets["small-llama"]
    assert preset.architecture["hidden_size"] == 512
    assert preset.pins == {"batch_size": 4, "seq_len": 256}
    assert preset.params.endswith("M")


def test_config_json_preset(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    arch = dict(builtin_presets()["tiny-llama"].architecture)
    (model_dir / "config.json").write_text(json.dumps(arch))
    path = _write(tmp_path, '[presets.mine]\nconfig = "m/config.json"\nparams = "4M"\nbits = 8\n')
    preset = load_presets_file(path, "test")["mine"]
    # The config's own fields as they are; transformers' defaults fill only what it leaves out.
    assert {key: preset.architecture[key] for key in arch} == arch
    assert preset.pins == {"bits": 8}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[presets.x\n", "invalid TOML"),
        ('[presets.x]\nconfig = "missing/config.json"\n', "config file not found"),
        (INLINE + "colour = 'blue'\n", "unknown field(s) colour"),
        (INLINE.replace("vocab_size = 32000", "vocab_size = -1"), "vocab_size"),
        (INLINE.replace("batch_size = 4", "batch_size = 0"), "batch_size"),
        (INLINE.replace("hidden_size = 512\n", ""), "hidden_size"),
        ("[other]\n", "unknown top-level"),
        (INLINE + "bits = 7\n", "bits"),
    ],
)
def test_bad_files_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(YouraiUsageError, match=r"presets\.toml") as info:
        load_presets_file(path, "--yourai-presets-file")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(YouraiUsageError, match="file not found"):
        load_presets_file(tmp_path / "nope.toml", "ini yourai_presets_file")


@pytest.mark.parametrize(
    ("model_type", "hidden", "heads", "expected"),
    [
        # Llama derives head_dim (SmolLM2-360M: 960 / 15 = 64); Qwen3 has a constant 128.
        ("llama", 960, 15, 64),
        ("mistral", 1024, 32, 32),
        ("qwen3", 960, 15, 128),
    ],
)
def test_a_missing_head_dim_is_what_transformers_gives_this_config(
    tmp_path: Path, model_type: str, hidden: int, heads: int, expected: int
) -> None:
    config = {
        "model_type": model_type,
        "hidden_size": hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "intermediate_size": 4 * hidden,
        "vocab_size": 1024,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "presets.toml").write_text('[presets.m]\nconfig = "config.json"\n')
    # A fresh interpreter: transformers' defaults, as the plugin's process reads them.
    script = (
        "import importlib.util, json, sys\n"
        "from pathlib import Path\n"
        "if importlib.util.find_spec('transformers') is None: sys.exit(3)\n"
        "from pytest_yourai.presets import load_presets_file\n"
        "presets = load_presets_file(Path(sys.argv[1]), 'test')\n"
        "print(json.dumps(presets['m'].architecture.get('head_dim')))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "presets.toml")],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode == 3:
        pytest.skip("transformers is not installed: no defaults are filled")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == expected
