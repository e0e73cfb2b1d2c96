"""The README and docs/ci.md stay true: their tables are generated, and every command and TOML
example in them runs (shrunk to the CPU-sized presets where a model is large)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_yourai.presets import load_presets_file
from tests.helpers import BENCHMARK_TEST, TINY_LLAMA_CONFIG

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
CI = (ROOT / "docs" / "ci.md").read_text()
TINY_CONFIG = (
    '{"model_type": "llama", "hidden_size": 128, "num_hidden_layers": 2, "intermediate_size": '
    '256, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}'
)


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def test_the_readme_presets_table_is_generated() -> None:
    start, end = "<!-- presets-table:start -->\n", "<!-- presets-table:end -->"
    shown = README.split(start, 1)[1].split(end, 1)[0]
    command = re.search(r"`(python -m pytest_yourai\.estimate --table[^`]*)`", README)
    assert command is not None
    fresh = subprocess.run(
        [sys.executable, *shlex.split(command.group(1))[1:]],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert shown == fresh, "README's presets table is stale: rerun the command above it"


def test_every_toml_example_loads(tmp_path: Path) -> None:
    (tmp_path / "models" / "my-3b").mkdir(parents=True)
    (tmp_path / "models" / "my-3b" / "config.json").write_text(TINY_CONFIG)
    presets = [b for b in blocks(README + CI, "toml") if "[presets." in b]
    assert presets
    for number, block in enumerate(presets):
        path = tmp_path / f"presets{number}.toml"
        path.write_text(block)
        assert load_presets_file(path, "README")


def shrink(command: str) -> list[str]:
    """A documented command as this test runs it: on the test file, the large presets left out."""
    argv = shlex.split(command.split("#", 1)[0].replace("\\\n", " "))
    if argv[0] == "pytest":
        argv = ["python", "-m", *argv]
    argv = ["test_lora_memory.py" if a == "benchmarks/" else a for a in argv]
    if (
        "-m" in argv
        and "pytest" in argv
        and "-k" not in argv
        and "--yourai-lora-config" not in argv
    ):
        argv += ["-k", "tiny-llama or hermes-70b"]
    if "-k" in argv:
        i = argv.index("-k")
        # Forced, a 70B would really be built: the tiny preset alone then.
        argv[i + 1] = "tiny-llama" if "--yourai-force" in argv else "tiny-llama or hermes-70b"
    return [sys.executable if a == "python" else a for a in argv]


def documented_commands() -> list[str]:
    commands = []
    for block in blocks(README, "bash")[1:] + blocks(CI, "bash"):  # [0]: Quick start
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.strip()
            if line.startswith(("pytest ", "python -m pytest")):
                commands.append(line)
    return commands


def test_every_command_runs(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_lora_memory=BENCHMARK_TEST)
    (pytester.path / "ci").mkdir()
    (pytester.path / "ci" / "pyproject.toml").write_text(
        next(b for b in blocks(CI, "toml") if "ini_options" in b)
    )
    # The README's lora.yaml: a tiny model of the user's, no data (max_seq_length then).
    (pytester.path / "model").mkdir()
    (pytester.path / "model" / "config.json").write_text(json.dumps(TINY_LLAMA_CONFIG))
    (pytester.path / "lora.yaml").write_text(
        "model: model\nbatch_size: 2\nnum_layers: 2\nmax_seq_length: 64\n"
    )
    commands = documented_commands()
    assert len(commands) >= 8
    for command in commands:
        proc = subprocess.run(
            shrink(command), cwd=pytester.path, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    ini = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", "ci/pyproject.toml", "--rootdir", ".",
         "test_lora_memory.py", "--yourai-estimate-only"],
        cwd=pytester.path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert ini.returncode == 0, ini.stdout[-2000:] + ini.stderr[-2000:]
