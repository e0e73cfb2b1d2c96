"""The probe's protocol, both sides of it: the ``BENCHMARK_RESULT: {json}`` line and the
progress lines that say where a probe is (and, after a crash, where it was).

The probe writes these lines; the supervisor, the benchmark's progress log, the census and
the crash diagnosis read them. Nothing else in the package spells them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

RESULT_PREFIX = "BENCHMARK_RESULT:"
# The environment variable that carries the probe's spec (JSON).
SPEC_ENV = "YOURAI_PROBE_SPEC"

# Phases a probe goes through, as its progress lines show them.
START, BUILD, TRAIN = "start", "build", "train"
PROGRESS_LINE = re.compile(r"(building block \d+/\d+|step \d+/\d+|loading weights|built model)")
_TRAIN_LINE = re.compile(r"step \d+/\d+")


def result_line(result: Mapping[str, Any]) -> str:
    return f"{RESULT_PREFIX} {json.dumps(result)}"


def parse_result_line(line: str | None) -> tuple[dict[str, Any] | None, str | None]:
    """Parse ``BENCHMARK_RESULT: {json}``; returns (result, problem)."""
    if line is None:
        return None, f"the probe printed no {RESULT_PREFIX} line"
    payload = line[len(RESULT_PREFIX) :].strip()
    try:
        value = json.loads(payload)
    except json.JSONDecodeError as exc:
        return None, f"the {RESULT_PREFIX} line is not valid JSON ({exc.msg})"
    if not isinstance(value, dict):
        return None, f"the {RESULT_PREFIX} line is not a JSON object"
    return value, None


# -- progress lines ----------------------------------------------------------------------


def loading_line(path: object) -> str:
    return f"loading weights from {path}"


def block_line(index: int, total: int) -> str:
    return f"building block {index}/{total}"


def built_line(parameters: int, seconds: float) -> str:
    return f"built model: {parameters / 1e9:.3f}B parameters in {seconds:.1f} s"


def step_line(step: int, steps: int, loss: float, peak_gb: float, seconds: float) -> str:
    return f"step {step}/{steps} loss={loss:.4f} peak={peak_gb:.3f} GB time={seconds:.2f} s"


def is_progress(line: str) -> bool:
    return PROGRESS_LINE.match(line) is not None


def phase_of(output: str) -> str:
    """Where a probe was, judged from its output's progress lines (the last one wins)."""
    phase = START
    for line in output.splitlines():
        if line.startswith(("building block", "loading weights", "built model")):
            phase = BUILD
        elif _TRAIN_LINE.match(line):
            phase = TRAIN
    return phase
