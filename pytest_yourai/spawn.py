"""The one way to start a probe: ``python -m pytest_yourai.probe`` (or the user's probe
command) under the supervisor, with the spec in ``YOURAI_PROBE_SPEC``.

``start_probe`` is the benchmark's supervised run (the caller polls it); ``ask_probe`` runs a
short probe errand to its end (the census, Metal's device info, the throughput measurement)
and returns its result line. Either way the probe's whole process tree dies with it.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from pytest_yourai.protocol import SPEC_ENV
from pytest_yourai.supervisor import ProbeOutcome, ProbeProcess


def probe_argv(command: Sequence[str] | None = None) -> list[str]:
    """The probe's command line: the user's ``--yourai-probe-command``, or this package's."""
    return list(command) if command is not None else [sys.executable, "-m", "pytest_yourai.probe"]


def probe_environment(spec: dict[str, Any] | None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if spec is not None:
        env[SPEC_ENV] = json.dumps(spec)
    # pytest's own tmp paths and capture settings mean nothing to the probe.
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def start_probe(spec: dict[str, Any] | None, command: Sequence[str] | None = None) -> ProbeProcess:
    """A supervised probe, running; use it as a context manager (leaving kills the tree)."""
    return ProbeProcess(probe_argv(command), probe_environment(spec))


def ask_probe(
    args: Sequence[str], spec: dict[str, Any] | None, timeout_s: float
) -> tuple[dict[str, Any] | None, str]:
    """Run the package's probe with ``args`` to its end; its result, or why there is none
    (the problem with its result line, its exit, or its last line of stderr)."""
    with ProbeProcess([*probe_argv(), *args], probe_environment(spec)) as proc:
        outcome = proc.wait(timeout_s)
    return outcome.result, problem_of(outcome)


def problem_of(outcome: ProbeOutcome) -> str:
    if outcome.timed_out:
        return f"no answer within {outcome.elapsed_s:.0f} s"
    stderr = outcome.stderr_tail.strip().splitlines()
    if outcome.result is None:
        detail = stderr[-1] if stderr else f"exit code {outcome.exit_code}"
        return f"{outcome.result_problem}; {detail}"
    return str(outcome.result.get("error") or (stderr[-1] if stderr else ""))
