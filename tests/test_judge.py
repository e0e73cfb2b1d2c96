"""The judge: how a probe ended -> the verdict, the message and the one log event. Pure, so a
table: each row is an ending a real probe can have (the supervisor's tests produce them)."""

from __future__ import annotations

from typing import Any

import pytest

from pytest_yourai.eventlog import (
    REQUIRED_FIELDS,
    SAFETY_KILL,
    SUBPROCESS_COMPLETED,
    SUBPROCESS_FAILED,
    SUBPROCESS_TIMEOUT,
)
from pytest_yourai.judge import Facts, judge
from pytest_yourai.protocol import block_line, step_line
from pytest_yourai.results import Verdict
from pytest_yourai.supervisor import ProbeOutcome

TRAINING = f"{block_line(2, 2)}\n{step_line(1, 4, 2.5, 0.1, 0.3)}\n"
BUILDING = f"{block_line(1, 2)}\n"
FACTS = Facts(preset="tiny", pid=42, timeout_s=30.0, limited_by="yourai", in_flight="mlx")


def ending(
    *,
    exit_code: int | None = 0,
    timed_out: bool = False,
    stopped: bool = False,
    stdout: str = "",
    stderr: str = "",
    result: dict[str, Any] | None = None,
    problem: str | None = None,
) -> ProbeOutcome:
    return ProbeOutcome(exit_code, timed_out, stopped, 12.5, stdout, stderr, result, problem)


OK = {"status": "ok", "peak_memory_gb": 0.2, "footprint_peak_gb": 0.3}
CASES = [
    # (ending, verdict, event, words the message must hold)
    (ending(result=OK, stdout=TRAINING), Verdict.PASS, SUBPROCESS_COMPLETED, []),
    (ending(exit_code=None, timed_out=True, stdout=TRAINING), Verdict.TIMEOUT,
     SUBPROCESS_TIMEOUT, ["Timeout after 30 s", "phase train"]),
    (ending(exit_code=-9, stopped=True, stdout=BUILDING), Verdict.KILLED, SAFETY_KILL,
     ["Safety kill in phase build"]),
    (ending(exit_code=1, result={"status": "oom", "phase": "train", "error": "[metal] OOM"}),
     Verdict.OOM, SUBPROCESS_FAILED, ["OOM at train", "[metal] OOM"]),
    (ending(exit_code=-9, stdout=BUILDING, problem="no result line"), Verdict.OOM,
     SUBPROCESS_FAILED, ["OOM at build", "SIGKILL"]),
    (ending(exit_code=-11, stdout=TRAINING, problem="no result line"), Verdict.ERROR,
     SUBPROCESS_FAILED, ["killed by signal 11"]),
    (ending(exit_code=3, problem="the probe printed no BENCHMARK_RESULT: line"),
     Verdict.ERROR, SUBPROCESS_FAILED, ["exited with code 3", "no BENCHMARK_RESULT"]),
    (ending(exit_code=1, result={"status": "error", "phase": "build", "error": "bad config"}),
     Verdict.ERROR, SUBPROCESS_FAILED, ["phase build", "bad config"]),
    # A result line that says ok wins over an odd exit code (the probe measured it).
    (ending(exit_code=1, result=OK), Verdict.PASS, SUBPROCESS_COMPLETED, []),
]  # fmt: skip


@pytest.mark.parametrize(("outcome", "verdict", "event", "words"), CASES)
def test_each_ending_has_its_verdict(
    outcome: ProbeOutcome, verdict: Verdict, event: str, words: list[str]
) -> None:
    judgement = judge(outcome, FACTS)
    assert judgement.verdict is verdict
    assert judgement.event == event
    assert judgement.passed == (verdict is Verdict.PASS)
    for word in words:
        assert word in judgement.message
    # The event it asks for can be written: every required field is there.
    fields = {"preset": FACTS.preset, **judgement.fields}
    assert not [name for name in REQUIRED_FIELDS[event] if name not in fields]


def test_a_stop_wins_over_a_timeout_and_a_timeout_over_a_result() -> None:
    both = ending(exit_code=-9, timed_out=True, stopped=True, result=OK)
    assert judge(both, FACTS).verdict is Verdict.KILLED
    late = ending(exit_code=None, timed_out=True, result=OK)
    assert judge(late, FACTS).verdict is Verdict.TIMEOUT


def test_a_pytest_timeout_limit_is_named() -> None:
    facts = Facts("tiny", 1, 9.0, "pytest-timeout's 10 s", "mlx")
    judgement = judge(ending(exit_code=None, timed_out=True), facts)
    assert "to stay inside pytest-timeout's 10 s" in judgement.message
    assert judgement.fields["source"] == "pytest-timeout's 10 s"


def test_the_pass_event_carries_the_footprint_and_the_mode() -> None:
    fields = judge(ending(result=OK), FACTS).fields
    assert fields["footprint_peak_gb"] == 0.3 and fields["in_flight"] == "mlx"
    assert fields["elapsed_s"] == 12.5
