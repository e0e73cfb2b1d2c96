"""The run's parts, one ``YouraiSession`` per pytest process (the controller and every xdist
worker): settings and presets, the event log, the machine, this host's timing record and
admission ledger, the results (on the controller) and the safety stop.

It asks and logs; it raises nothing at pytest. What pytest does (skip, fail, stop) is decided
by the hooks: worker.py for the process that runs the tests, controller.py for the one that
reports them.
"""

from __future__ import annotations

import socket
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from pytest_yourai import __version__, baseline
from pytest_yourai.admission import Ledger
from pytest_yourai.estimator import TrainingShape
from pytest_yourai.eventlog import (
    BENCHMARK_COMPLETE,
    BENCHMARK_START,
    MODEL_START,
    PREFLIGHT_CHECK,
    SAFETY_STOP,
    EventLog,
    check_log_path,
)
from pytest_yourai.files import prepare_output
from pytest_yourai.lora_data import check_built_model, data_record, with_data
from pytest_yourai.lora_preset import lora_catalog
from pytest_yourai.machine import Machine
from pytest_yourai.machine_record import MachineLearning, machine_key, record_learner
from pytest_yourai.preflight import SKIP_NO_MLX, Preflight, find_census, plan
from pytest_yourai.presets import (
    Preset,
    pick,
    presets_from_hook,
    presets_from_records,
    sort_smallest_first,
)
from pytest_yourai.relay import RELAY_KEY, WorkerRelay
from pytest_yourai.results import ResultBook
from pytest_yourai.safety import SafetyStop, critical_reason
from pytest_yourai.settings import Settings
from pytest_yourai.throughput import MachineTiming

PRESET_ARG = "yourai_preset"


def load_presets(config: pytest.Config, settings: Settings) -> list[Preset]:
    """Built-in presets, the presets file's, and those of ``pytest_yourai_presets`` hooks;
    filtered by ``--yourai-presets`` and ordered smallest first."""
    presets = lora_catalog(
        settings.presets_file,
        settings.source("yourai_presets_file"),
        settings.lora_configs,
        settings.source("yourai_lora_config"),
    )
    for found in config.hook.pytest_yourai_presets(config=config):
        presets.update(presets_from_hook(found, Path(config.rootpath), "pytest_yourai_presets"))
    if settings.preset_names is not None:
        chosen = pick(presets, settings.preset_names, settings.source("yourai_presets"))
        presets = {preset.name: preset for preset in chosen}
    elif settings.lora_configs:  # the user's own fine-tunes, unless presets are named too
        named = {Path(path).stem for path in settings.lora_configs}
        presets = {name: preset for name, preset in presets.items() if name in named}
    cache = getattr(config, "cache", None)
    data_cache = Path(cache.mkdir("yourai-data")) if cache is not None else None
    for preset in presets.values():
        if preset.lora:
            check_built_model(preset, cache)
    return sort_smallest_first(
        with_data(p, data_cache, settings.trust_remote_code) for p in presets.values()
    )


def check_output_paths(settings: Settings, reports: bool = True) -> None:
    """Every path this process will write, usable before anything runs (else a usage
    error): its log and, where it reports (not an xdist worker), the outputs."""
    check_log_path(settings.log_path, settings.source("yourai_log"))
    if not reports:
        return
    for dest, path in (("yourai_json", settings.json_path), ("yourai_plot", settings.plot_path)):
        if path is not None:
            prepare_output(path, settings.source(dest))
    if settings.baseline_save or settings.baseline_compare:
        prepare_output(
            settings.baseline_dir, settings.source("yourai_baseline_dir"), directory=True
        )


class YouraiSession:
    def __init__(
        self, config: pytest.Config, settings: Settings, presets: Sequence[Preset]
    ) -> None:
        self.config = config
        self.settings = settings
        self.presets = list(presets)
        workerinput: dict[str, Any] = getattr(config, "workerinput", None) or {}
        self.is_worker = bool(workerinput)
        self.worker_id = str(workerinput.get("workerid", "main"))
        self.run_id = str(workerinput.get("yourai_run_id") or uuid.uuid4().hex[:12])
        self.host = socket.gethostname()
        channel = workerinput.get(RELAY_KEY)
        relay = WorkerRelay(channel, settings.log_path, self.host) if channel else None
        self.log = EventLog(
            settings.log_path, sink=relay, run_id=self.run_id, worker=self.worker_id
        )
        start = workerinput.get("yourai_start_memory") or {}
        shared_host = start.get("host") == self.host
        self.machine = Machine(
            config,
            self.host,
            settings.max_memory_gb,
            custom_probe=settings.probe_command is not None,
            start_available_gb=float(start["available_gb"]) if shared_host else None,
            known_mlx=start.get("mlx") if shared_host else None,
        )
        cache = getattr(config, "cache", None)
        self.timing = MachineTiming(cache, self.host, enabled=settings.probe_command is None)
        self.learning = MachineLearning(cache, self.host, enabled=settings.probe_command is None)
        self.alone = int(workerinput.get("workercount") or 1) <= 1
        # One ledger per host: a worker on the controller's host uses the controller's
        # (whatever directory the worker runs in); another host, its own cache dir.
        ledger_dir = cache.mkdir("yourai") if cache is not None else settings.log_path.parent
        if shared_host and start.get("ledger_dir"):
            ledger_dir = Path(start["ledger_dir"])
        self.ledger = Ledger(Path(ledger_dir))
        self.sent_baselines: dict[str, Any] | None = workerinput.get("yourai_baselines")
        self.results = ResultBook([p.name for p in self.presets])
        self.safety = SafetyStop()
        self.started = False
        self.start_time = time.time()

    @classmethod
    def from_config(cls, config: pytest.Config, settings: Settings) -> YouraiSession:
        workerinput = getattr(config, "workerinput", None)
        check_output_paths(settings, reports=workerinput is None)
        if workerinput and workerinput.get("yourai_presets"):
            # an xdist worker runs the controller's presets (already checked, filtered and
            # ordered there): no presets file to read on this host
            return cls(config, settings, presets_from_records(workerinput["yourai_presets"]))
        return cls(config, settings, load_presets(config, settings))

    def baselines(self) -> dict[str, Any]:
        """This machine's stored baselines: those the controller sent (a worker reads no
        file of the controller's), else the baseline directory's file."""
        machine = self.machine.machine_id()
        if self.sent_baselines is not None:
            found = self.sent_baselines.get(machine)
            return found if isinstance(found, dict) else {}
        return baseline.load(self.settings.baseline_dir, machine)

    def preset_of(self, nodeid: str) -> str | None:
        """Benchmark items are parametrized with preset names as ids: ``test_x[NAME]``."""
        name = nodeid[nodeid.rfind("[") + 1 : -1] if nodeid.endswith("]") else ""
        return name if name in {preset.name for preset in self.presets} else None

    def is_benchmark_nodeid(self, nodeid: str) -> bool:
        return self.preset_of(nodeid) is not None

    def header_line(self) -> str:
        settings, mlx = self.settings, self.machine.mlx
        if not mlx.importable:
            return f"yourai: log {settings.log_path} | {mlx.reason()}"
        m = self.machine.memory()
        cap = f" (capped at {m.cap_gb:g} GB)" if m.cap_gb is not None else ""
        return (
            f"yourai: log {settings.log_path} | backend {m.backend} ({m.device_name}) | "
            f"total {m.total_gb:.1f} GB, available {m.available_gb:.1f} GB{cap} | "
            f"in flight {settings.in_flight} | force {'on' if settings.force else 'off'}"
            + (" | estimate only" if settings.estimate_only else "")
            + self.learned_text()
            + (f" | available = {m.source}" if m.backend == "metal" else "")
        )

    def machine_key(self) -> str:
        return machine_key(self.machine.machine_id())

    def learned_text(self) -> str:
        if not self.learning.enabled:
            return ""
        if self.settings.forget_machine:
            return " | learned: forgotten (--yourai-forget-machine)"
        probes = len(self.learning.record(self.machine_key()).probes)
        return f" | learned from {probes} probe{'s' if probes != 1 else ''} on this machine"

    def learn(self, preflight: Preflight, result: dict[str, Any], elapsed_s: float) -> None:
        """What a probe that passed measured, for the next estimates on this machine."""
        if preflight.refused:
            return
        self.learning.add(
            self.machine_key(), dict(preflight.preset.architecture), preflight.shape, result,
            preflight.census, alone=self.alone, elapsed_s=elapsed_s,
        )  # fmt: skip

    # -- run start / complete (the controller, or a single process) ----------------------

    def write_start(self) -> None:
        if self.started:
            return
        self.started = True
        m, s = self.machine.memory(fresh=True), self.settings
        if s.forget_machine:
            self.learning.forget(self.machine_key())
        self.log.write_event(
            BENCHMARK_START,
            max_memory_gb=s.max_memory_gb,
            force_mode=s.force,
            backend=m.backend,
            total_gb=round(m.total_gb, 3),
            available_gb=round(m.available_gb, 3),
            device_name=m.device_name,
            safety_gb=s.safety_gb,
            timeout_s=s.timeout_s,
            estimate_only=s.estimate_only,
            config_policy=s.config_policy,
            in_flight=s.in_flight,
            presets=[p.name for p in self.presets],
            plugin_version=__version__,
            python=sys.version.split()[0],
        )

    def write_complete(self) -> None:
        if not self.started:
            return
        rows = self.results.ordered()
        self.log.write_event(
            BENCHMARK_COMPLETE,
            total_tested=sum(1 for r in rows if r.outcome in ("passed", "failed")),
            passed=sum(1 for r in rows if r.outcome == "passed"),
            failed=sum(1 for r in rows if r.outcome == "failed"),
            skipped=sum(1 for r in rows if r.outcome == "skipped"),
            duration_s=round(time.time() - self.start_time, 3),
            stopped=self.safety.reason,
        )

    # -- the pre-flight (the process that runs the item) -----------------------------------

    def log_model_start(self, preset: Preset, nodeid: str) -> None:
        self.log.write_event(
            MODEL_START, preset=preset.name, model_name=preset.repo, params=preset.params,
            nodeid=nodeid,
        )  # fmt: skip

    def log_no_mlx(self, preset: Preset) -> str:
        """MLX cannot be imported here: the preset is not judged at all. Returns why."""
        reason = f"{preset.name}: {self.machine.mlx.reason()}"
        self.log.write_event(
            PREFLIGHT_CHECK, preset=preset.name, available_gb=None, estimated_base_gb=None,
            estimated_conservative_gb=None, batch_size=None, lora_rank=None, lora_layers=None,
            decision=SKIP_NO_MLX, reason=reason,
        )  # fmt: skip
        return reason

    def critical_memory(self, preset: Preset) -> tuple[str, float] | None:
        """(why, GB available) when memory is below the safety threshold right now, logged
        as ``safety_stop`` unless forced; None when it is not."""
        available = self.machine.memory(fresh=True).available_gb
        reason = critical_reason(available, self.settings.safety_gb)
        if reason is None:
            return None
        if not self.settings.force:
            self.log.write_event(
                SAFETY_STOP, reason=reason, available_gb=round(available, 3),
                threshold_gb=self.settings.safety_gb, preset=preset.name,
            )  # fmt: skip
        return reason, available

    def preflight(self, preset: Preset) -> Preflight:
        """Resolve, estimate and decide (preflight.plan), and log ``preflight_check``."""
        machine, settings = self.machine.memory(), self.settings
        census, refusal = find_census(preset, machine.backend, getattr(self.config, "cache", None))
        measure = not settings.estimate_only
        record = self.learning.record(self.machine_key())  # read once, for every candidate

        def gflops(shape: TrainingShape) -> float | None:
            return self.timing.gflops(shape.backend, shape.dtype, shape.bits, measure)

        result = plan(
            preset,
            machine.available_gb,
            machine.backend,
            policy=settings.config_policy,
            force=settings.force,
            timeout_s=settings.timeout_s,
            gflops=gflops,
            in_flight=settings.in_flight,
            safety_gb=settings.safety_gb,
            timing=self.timing.model(machine.backend),
            census=census,
            refusal=refusal,
            learner=record_learner(record, record.key, preset, census),
        )
        result = self.learning.timed(record, result)
        self.log.write_event(
            PREFLIGHT_CHECK,
            **result.record(),
            **data_record(preset.lora),
            memory_source=machine.source,
        )
        return result
