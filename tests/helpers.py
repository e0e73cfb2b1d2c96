"""Helpers for the plugin's own tests: a benchmark test file, fake probes, the log,
and the fault suite's ledger (one module, so conftest and tests share one ledger)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any

BENCHMARK_TEST = textwrap.dedent(
    """
    def test_lora_memory(yourai_benchmark):
        result = yourai_benchmark.run()
        assert result["status"] == "ok"
    """
)


def read_log(path: Path) -> list[dict[str, Any]]:
    """Every line of the log must parse on its own."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def events(records: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [r for r in records if r["event"] == name]


def write_fake_probe(directory: Path, body: str, name: str = "fake_probe.py") -> str:
    """A probe command: Python code that can read the spec and print a result line."""
    script = directory / name
    script.write_text(
        "import json, os, sys, time, signal\n"
        "spec = json.loads(os.environ['YOURAI_PROBE_SPEC'])\n"
        "def result(**kw):\n"
        "    print('BENCHMARK_RESULT: ' + json.dumps(kw), flush=True)\n" + textwrap.dedent(body)
    )
    return f"{sys.executable} {script}"


# A config.json of the user's for a tiny Llama mlx-lm builds (an mlx_lm.lora YAML's model).
TINY_LLAMA_CONFIG = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


OK_PROBE = """
print("building block 1/1", flush=True)
print("step 1/1 loss=1.0", flush=True)
result(status="ok", phase="done", peak_memory_gb=0.5, train_peak_memory_gb=0.5,
       backend=spec["backend"], preset=spec["preset"])
"""


# -- the fault suite's ledger: counts printed at the end of the run -------------------------

FAULT_LEDGER: dict[str, int] = {"faults": 0, "log_lines": 0, "orphans": 0}


def orphans_of(marker: str) -> list[int]:
    """Processes still alive whose command line mentions ``marker`` (a test's tmp dir)."""
    import psutil

    found = []
    for process in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            cmdline = " ".join(process.info["cmdline"] or [])
            if marker in cmdline and process.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(process.info["pid"])
        except psutil.Error:
            pass
    return found


def record_fault(log_lines: int, orphans: int) -> None:
    FAULT_LEDGER["faults"] += 1
    FAULT_LEDGER["log_lines"] += log_lines
    FAULT_LEDGER["orphans"] += orphans
