"""What the controller knows of each benchmark: one ``ResultRow`` per test, and its verdict.

The verdicts are a ``Verdict`` enum (a ``str``: the JSON, JUnit and the log carry its value);
this is the only place their names are written. A row is built from the ``yourai_*``
properties of a test's reports, which reach the controller from every xdist worker.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

PROP_PREFIX = "yourai_"


class Verdict(enum.StrEnum):
    PASS = "Pass"
    FAIL = "Fail"  # the test failed after its probe passed (its own assert, a teardown)
    OOM = "OOM"
    TIMEOUT = "Timeout"
    ERROR = "Error"
    KILLED = "Killed"  # the memory watchdog killed the probe
    OVER_BUDGET = "Over budget"
    REGRESSED = "Regressed"
    NO_BASELINE = "No baseline"
    SKIPPED = "Skipped"
    STOPPED = "Stopped"  # the safety stop: memory was critically low before the probe
    ESTIMATED = "Estimated"  # --yourai-estimate-only
    CRASHED = "Crashed"  # the xdist worker running it went down (worker_crashed)

    @property
    def mark(self) -> str:
        """The Rust CLI's console mark: ✓ for a pass, ✗ for a failure, ? otherwise."""
        if self is Verdict.PASS:
            return "✓"
        return "✗" if self in FAILURES or self is Verdict.FAIL else "?"


# What the probe's judge may say of a failed test; anything else that fails is FAIL.
FAILURES = frozenset(
    {
        Verdict.OOM,
        Verdict.TIMEOUT,
        Verdict.ERROR,
        Verdict.KILLED,
        Verdict.OVER_BUDGET,
        Verdict.REGRESSED,
        Verdict.NO_BASELINE,
        Verdict.CRASHED,
    }
)
PHASES = ("setup", "call", "teardown")
NOT_RUN = frozenset({Verdict.SKIPPED, Verdict.STOPPED, Verdict.ESTIMATED})


def plain(value: Any) -> Any:
    """A property's value as reports carry it (pytest-xdist sends only plain types)."""
    return value.value if isinstance(value, enum.Enum) else value


def properties(values: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """``yourai_``-prefixed user properties, as reports carry them to the controller."""
    return [(PROP_PREFIX + name, plain(value)) for name, value in values.items()]


@dataclass
class ResultRow:
    """What the controller knows of one benchmark item, from its reports' properties."""

    nodeid: str
    properties: dict[str, Any] = field(default_factory=dict)
    outcome: str = ""  # passed | failed | skipped
    verdict: str = ""

    def get(self, name: str, default: Any = None) -> Any:
        return self.properties.get(PROP_PREFIX + name, default)

    def record(self) -> dict[str, Any]:
        """The row as the JSON's results and the result hook have it (no prefix)."""
        return {
            "nodeid": self.nodeid,
            "outcome": self.outcome,
            "verdict": self.verdict,
            **{k[len(PROP_PREFIX) :]: v for k, v in self.properties.items()},
        }


def verdict_for(row: ResultRow) -> str:
    """The verdict from the test's real outcome (setup, call and teardown): a test that fails
    after its probe passed (its own assert, a teardown) is FAIL, never PASS."""
    explicit = row.get("verdict")
    if row.outcome == "skipped":
        if explicit == Verdict.STOPPED:
            return Verdict.STOPPED
        return Verdict.ESTIMATED if row.get("estimate_only") else Verdict.SKIPPED
    if row.outcome == "failed":
        return Verdict(explicit) if explicit in FAILURES else Verdict.FAIL
    if row.outcome == "passed":
        return Verdict.PASS
    return row.verdict


def failed_after_pass(user_properties: Iterable[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """A failed test's properties with a probe's PASS turned into FAIL."""
    key = PROP_PREFIX + "verdict"
    return [
        (k, Verdict.FAIL.value) if k == key and v == Verdict.PASS else (k, v)
        for k, v in user_properties
    ]


class ResultBook:
    """The rows of this run, in the controller (or a single process)."""

    def __init__(self, order: Sequence[str]) -> None:
        self.rows: dict[str, ResultRow] = {}
        self.rank = {name: index for index, name in enumerate(order)}

    def get(self, nodeid: str) -> ResultRow | None:
        return self.rows.get(nodeid)

    def record(
        self, nodeid: str, when: str, outcome: str, user_properties: Iterable[tuple[str, Any]]
    ) -> ResultRow | None:
        """Take one report (setup, call, teardown, or xdist's report of a crashed worker);
        None for a test that is no benchmark."""
        props = {k: v for k, v in user_properties if str(k).startswith(PROP_PREFIX)}
        if not props and nodeid not in self.rows:
            return None
        row = self.rows.setdefault(nodeid, ResultRow(nodeid))
        row.properties.update(props)
        if when not in PHASES and outcome == "failed":
            # xdist's report of an item whose worker crashed (its "when" is "???")
            row.outcome = "failed"
            row.properties[PROP_PREFIX + "verdict"] = Verdict.CRASHED.value
        elif when == "call" or (when == "setup" and outcome != "passed"):
            row.outcome = outcome
        elif when == "teardown" and outcome == "failed":
            row.outcome = "failed"
        row.verdict = verdict_for(row)
        return row

    def ordered(self) -> list[ResultRow]:
        """Rows in preset order (smallest first, as parametrized), not in the order xdist
        workers happened to finish them."""
        return sorted(
            self.rows.values(),
            key=lambda row: (self.rank.get(str(row.get("preset")), len(self.rank)), row.nodeid),
        )

    def stopped_reason(self) -> str | None:
        """Why a worker stopped the run for safety, as its rows say."""
        for row in self.rows.values():
            if row.get("verdict") == Verdict.STOPPED:
                return str(row.get("reason") or "safety stop")
        return None
