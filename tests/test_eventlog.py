"""The event log: whole lines, append-only, durable, safe with concurrent writers."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from pytest_yourai.errors import YouraiUsageError
from pytest_yourai.eventlog import (
    MODEL_START,
    REQUIRED_FIELDS,
    SUBPROCESS_SPAWNED,
    EventLog,
    check_log_path,
)


def test_lines_are_json_with_timestamp_and_event(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "log.jsonl", run_id="r1")
    log.write_event(MODEL_START, preset="p", model_name="m", params="7B")
    (record,) = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert record["event"] == MODEL_START and isinstance(record["timestamp"], float)
    assert record["run_id"] == "r1" and record["preset"] == "p"


def test_existing_content_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text('{"event": "older"}\n')
    EventLog(path).write_event(SUBPROCESS_SPAWNED, preset="p", pid=1)
    lines = path.read_text().splitlines()
    assert lines[0] == '{"event": "older"}' and len(lines) == 2


def test_missing_fields_are_a_programming_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pid"):
        EventLog(tmp_path / "log.jsonl").write_event(SUBPROCESS_SPAWNED, preset="p")


def test_every_event_has_its_required_fields_listed() -> None:
    assert set(REQUIRED_FIELDS) >= {"benchmark_start", "safety_stop", "benchmark_complete"}


def _hammer(path: str, worker: int, count: int) -> None:
    log = EventLog(Path(path), worker=f"w{worker}")
    for i in range(count):
        log.write_event(SUBPROCESS_SPAWNED, preset="x" * 3000, pid=i)


def test_concurrent_writers_never_interleave(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    procs = [multiprocessing.Process(target=_hammer, args=(str(path), w, 100)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 400
    assert {r["worker"] for r in records} == {"w0", "w1", "w2", "w3"}


@pytest.mark.parametrize("case", ["directory", "parent-is-a-file", "read-only-file"])
def test_bad_log_paths_are_usage_errors(tmp_path: Path, case: str) -> None:
    if case == "directory":
        path = tmp_path
    elif case == "parent-is-a-file":
        (tmp_path / "a-file").write_text("")
        path = tmp_path / "a-file" / "log.jsonl"
    else:
        path = tmp_path / "log.jsonl"
        path.write_text("")
        path.chmod(0o444)
        import os

        if os.access(path, os.W_OK):  # root ignores file modes
            pytest.skip("running as root: file modes do not apply")
    with pytest.raises(YouraiUsageError, match="--yourai-log"):
        check_log_path(path, "--yourai-log")


def test_check_creates_nothing(tmp_path: Path) -> None:
    check_log_path(tmp_path / "log.jsonl", "--yourai-log")
    assert not (tmp_path / "log.jsonl").exists()
