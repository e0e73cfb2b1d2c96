"""Every worker's events in the controller's log, as they happen.

Each xdist worker keeps its own crash-safe log on its host (the configured path, resolved
against that worker's directory): the record that survives a crash of that host. Every
event it writes there is also sent to the controller over an execnet channel that the
controller opened on that worker's gateway (``pytest_configure_node`` puts it in the
worker's ``workerinput``). The controller appends each one to its own log in the order it
arrives, tagged with the worker's ``host`` and ``worker``, so its log is the run's whole
story: probe progress arrives while the probe runs, not at the end of the test.

Why a channel and not the report stream: xdist sends reports at the end of each test phase,
so a worker that dies mid-probe would take its progress events with it. A channel carries
each event the moment it is on the worker's disk, and xdist offers no hook for custom events.

When the worker writes the controller's own file (``-n 2`` on one host, the same path),
the event is already there and is not appended twice; it still counts as the last event
received from that worker, which ``worker_crashed`` names when the worker goes down.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from pytest_yourai.eventlog import MODEL_START, EventLog

RELAY_KEY = "yourai_relay"  # the channel, in each worker's workerinput


class WorkerRelay:
    """The worker's side: an ``EventLog`` sink that sends each record to the controller."""

    def __init__(self, channel: Any, log_path: Path, host: str) -> None:
        self.channel = channel
        self.log_path = str(log_path.resolve())
        self.host = host
        self.open = True

    def __call__(self, record: dict[str, Any]) -> None:
        if not self.open:
            return
        message = {
            "record": json.dumps(record, default=str, ensure_ascii=False),
            "host": self.host,
            "log": self.log_path,
        }
        try:
            self.channel.send(message)
        except (OSError, EOFError, ValueError):
            # The controller is gone; this host's own log still holds every event.
            self.open = False


class ControllerRelay:
    """The controller's side: appends what workers send, and remembers per worker the last
    event it received and the preset in flight (for ``worker_crashed``)."""

    def __init__(self, log: EventLog, host: str) -> None:
        self.log = log
        self.host = host
        self.own_log = str(log.path.resolve())
        self.lock = threading.Lock()
        self.last: dict[str, dict[str, Any]] = {}
        self.in_flight: dict[str, dict[str, Any]] = {}
        self.problems: list[str] = []

    def open(self, node: Any) -> None:
        """A channel on this worker's gateway, handed to the worker in its workerinput."""
        worker = str(node.gateway.id)
        channel = node.gateway.newchannel()
        channel.setcallback(lambda message: self.receive(worker, message))
        node.workerinput[RELAY_KEY] = channel

    def receive(self, worker: str, message: dict[str, Any]) -> None:
        """On execnet's thread, in the order the worker sent them."""
        try:
            record = json.loads(message["record"])
            record.setdefault("worker", worker)
            record.setdefault("host", message.get("host"))
            written = message.get("host") == self.host and message.get("log") == self.own_log
            with self.lock:
                if not written:
                    self.log.append(record)
                self.last[worker] = record
                if record.get("event") == MODEL_START:
                    self.in_flight[worker] = record
        except (KeyError, TypeError, ValueError, OSError) as exc:
            self.problems.append(f"{worker}: an event could not be relayed: {exc}")

    def finished(self, nodeid: str) -> None:
        """The controller has this test's last report: it is no longer in flight."""
        with self.lock:
            for worker, start in list(self.in_flight.items()):
                if start.get("nodeid") == nodeid:
                    del self.in_flight[worker]

    def crashed(self, worker: str) -> dict[str, Any]:
        """The ``worker_crashed`` fields: host, the preset in flight, the last event."""
        with self.lock:
            last = self.last.get(worker)
            flying = self.in_flight.pop(worker, None) or {}
        return {
            "host": (last or flying).get("host"),
            "worker": worker,
            "preset": flying.get("preset"),
            "nodeid": flying.get("nodeid"),
            "last_event": last,
        }
