"""Run-level state of a yourai session: settings, presets, the log, machine memory, results.

One ``YouraiSession`` lives in each pytest process (the controller and every xdist
worker). Hooks in ``plugin.py`` call into it; it holds no hooks itself.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pytest_yourai import __version__, baseline
from pytest_yourai.admission import Admission, Ledger, NeverFits
from pytest_yourai.census import Census
from pytest_yourai.errors import YouraiUsageError
from pytest_yourai.estimate import TrainingShape, training_flops, weight_bytes
from pytest_yourai.eventlog import (
    BENCHMARK_COMPLETE,
    BENCHMARK_START,
    MODEL_START,
    PREFLIGHT_CHECK,
    PROBE_ADMITTED,
    PROBE_WAITING,
    SAFETY_STOP,
    TEST_VERDICT,
    EventLog,
    check_log_path,
    prepare_output,
)
from pytest_yourai.memory import (
    MachineMemory,
    MlxStatus,
    detect_backend,
    mlx_status,
    read_machine_memory,
)
from pytest_yourai.preflight import (
    SKIP_NO_MLX,
    Preflight,
    find_census,
    plan,
    safety_stop_reason,
)
from pytest_yourai.presets import Preset, builtin_presets, load_presets_file, sort_smallest_first
from pytest_yourai.runner import ProbeProcess
from pytest_yourai.settings import Settings
from pytest_yourai.throughput import (
    KEEP_OBSERVATIONS,
    TimeModel,
    TimingObservation,
    observe,
)
from pytest_yourai.throughput import fit as fit_time

PRESET_ARG = "yourai_preset"
PROTOCOL_START_KEY = pytest.StashKey[float]()
CALL_START_KEY = pytest.StashKey[float]()
PYTEST_TIMEOUT_MARGIN_S = 1.0
THROUGHPUT_TIMEOUT_S = 120.0
# Assumed GFLOP/s when the throughput probe fails: slow on purpose.
FALLBACK_GFLOPS = {"cpu": 0.3, "metal": 200.0, "cuda": 2000.0}
PROP_PREFIX = "yourai_"


def load_presets(settings: Settings) -> list[Preset]:
    """Built-in presets plus the presets file, filtered and ordered smallest first."""
    presets = builtin_presets()
    if settings.presets_file is not None:
        extra = load_presets_file(settings.presets_file, settings.source("yourai_presets_file"))
        presets.update(extra)
    if settings.preset_names is not None:
        unknown = [name for name in settings.preset_names if name not in presets]
        if unknown:
            raise YouraiUsageError(
                f"{settings.source('yourai_presets')}: unknown preset(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(presets))}"
            )
        presets = {name: presets[name] for name in settings.preset_names}
    return sort_smallest_first(presets.values())


@dataclass
class ResultRow:
    """What the controller knows of one benchmark item, from its reports' properties."""

    nodeid: str
    properties: dict[str, Any] = field(default_factory=dict)
    outcome: str = ""  # passed | failed | skipped
    verdict: str = ""

    def get(self, name: str, default: Any = None) -> Any:
        return self.properties.get(PROP_PREFIX + name, default)


class YouraiSession:
    def __init__(
        self, config: pytest.Config, settings: Settings, presets: Sequence[Preset]
    ) -> None:
        self.config = config
        self.settings = settings
        self.presets = list(presets)
        self.preset_names = {p.name for p in self.presets}
        workerinput: dict[str, Any] | None = getattr(config, "workerinput", None)
        self.is_worker = workerinput is not None
        self.worker_id = str(workerinput["workerid"]) if workerinput else "main"
        self.run_id = str((workerinput or {}).get("yourai_run_id") or uuid.uuid4().hex[:12])
        self._mlx: MlxStatus | None = None
        self.log = EventLog(settings.log_path, run_id=self.run_id, worker=self.worker_id)
        self.started = False
        self.start_time = time.time()
        self.results: dict[str, ResultRow] = {}
        self.safety_stopped: str | None = None
        self._gflops: dict[str, float] = {}
        self._machine: MachineMemory | None = None
        cache = getattr(config, "cache", None)
        ledger_dir = cache.mkdir("yourai") if cache is not None else settings.log_path.parent
        self.ledger = Ledger(Path(ledger_dir))
        self.host = socket.gethostname()
        # The controller's reading at start, when this worker shares its host: the budget
        # must not shrink because other workers' probes are already running.
        controller = (workerinput or {}).get("yourai_start_memory")
        self._start_available: float | None = None
        if isinstance(controller, dict) and controller.get("host") == self.host:
            self._start_available = float(controller["available_gb"])

    @classmethod
    def from_config(cls, config: pytest.Config, settings: Settings) -> YouraiSession:
        check_log_path(settings.log_path, settings.source("yourai_log"))
        for dest, path in (
            ("yourai_json", settings.json_path),
            ("yourai_plot", settings.plot_path),
        ):
            if path is not None:
                prepare_output(path, settings.source(dest))
        if settings.baseline_save or settings.baseline_compare:
            prepare_output(
                settings.baseline_dir, settings.source("yourai_baseline_dir"), directory=True
            )
        return cls(config, settings, load_presets(settings))

    # -- machine -------------------------------------------------------------------------

    @property
    def mlx(self) -> MlxStatus:
        """Whether MLX imports here (asked of a child Python once per installation). A
        custom probe command needs no MLX: then the backend is inferred."""
        if self._mlx is None:
            if self.settings.probe_command is not None:
                self._mlx = MlxStatus(True, backend=detect_backend())
            else:
                self._mlx = mlx_status(getattr(self.config, "cache", None), self.host)
        return self._mlx

    @property
    def backend(self) -> str:
        return self.mlx.backend or detect_backend()

    def machine(self, fresh: bool = False) -> MachineMemory:
        if fresh or self._machine is None:
            self._machine = read_machine_memory(self.backend).capped(self.settings.max_memory_gb)
        return self._machine

    def machine_id(self) -> str:
        m = self.machine()
        return baseline.machine_id(m.backend, m.device_name, m.total_gb)

    def machine_info(self) -> dict[str, Any]:
        m = self.machine()
        return {
            "backend": m.backend,
            "device_name": m.device_name,
            "total_gb": round(m.total_gb, 3),
            "available_gb": round(m.available_gb, 3),
            "memory_cap_gb": m.cap_gb,
            "host": self.host,
            "machine_id": self.machine_id(),
            "run_id": self.run_id,
            "python": sys.version.split()[0],
        }

    def write_outputs(self) -> list[str]:
        """After the run (controller only): JSON, step summary, plot, baseline. Returns
        lines for the terminal saying what was written."""
        from pytest_yourai import report

        rows = self.ordered_results()
        written: list[str] = []
        if not rows:
            return written
        settings = self.settings
        if settings.json_path is not None:
            document = report.results_document(rows, self.machine_info())
            settings.json_path.write_text(json.dumps(document, indent=1), encoding="utf-8")
            written.append(f"results JSON: {settings.json_path}")
        summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if summary:
            with open(summary, "a", encoding="utf-8") as handle:
                handle.write(report.markdown_table(rows) + "\n")
            written.append(f"step summary: {summary}")
        if settings.plot_path is not None:
            report.plot(rows, settings.plot_path)
            written.append(f"plot: {settings.plot_path}")
        if settings.baseline_save:
            peaks = {
                baseline.run_key(
                    str(r.get("preset")),
                    *(r.get(name) for name in baseline.KEY_FIELDS),
                ): {
                    "preset": r.get("preset"),
                    "peak_memory_gb": r.get("peak_memory_gb"),
                    "footprint_peak_gb": r.get("footprint_peak_gb"),
                    **{name: r.get(name) for name in baseline.KEY_FIELDS},
                }
                for r in rows
                if r.verdict == "Pass" and isinstance(r.get("peak_memory_gb"), int | float)
            }
            if peaks:
                path = baseline.save(settings.baseline_dir, self.machine_id(), peaks)
                written.append(f"baseline saved: {path} ({len(peaks)} presets)")
        return written

    def header_line(self) -> str:
        if not self.mlx.importable:
            return f"yourai: log {self.settings.log_path} | {self.mlx.reason()}"
        m = self.machine()
        cap = f" (capped at {m.cap_gb:g} GB)" if m.cap_gb is not None else ""
        return (
            f"yourai: log {self.settings.log_path} | backend {m.backend} ({m.device_name}) | "
            f"total {m.total_gb:.1f} GB, available {m.available_gb:.1f} GB{cap} | "
            f"in flight {self.settings.in_flight} | force {'on' if self.settings.force else 'off'}"
            + (" | estimate only" if self.settings.estimate_only else "")
            + (f" | available = {m.source}" if m.backend == "metal" else "")
        )

    # -- run start / complete (controller or single process only) ------------------------

    def write_start(self) -> None:
        if self.started or self.is_worker:
            return
        self.started = True
        m = self.machine(fresh=True)
        self.log.write_event(
            BENCHMARK_START,
            max_memory_gb=self.settings.max_memory_gb,
            force_mode=self.settings.force,
            backend=m.backend,
            total_gb=round(m.total_gb, 3),
            available_gb=round(m.available_gb, 3),
            device_name=m.device_name,
            safety_gb=self.settings.safety_gb,
            timeout_s=self.settings.timeout_s,
            estimate_only=self.settings.estimate_only,
            config_policy=self.settings.config_policy,
            in_flight=self.settings.in_flight,
            presets=[p.name for p in self.presets],
            plugin_version=__version__,
            python=sys.version.split()[0],
        )

    def write_complete(self) -> None:
        if not self.started or self.is_worker:
            return
        rows = self.ordered_results()
        self.log.write_event(
            BENCHMARK_COMPLETE,
            total_tested=sum(1 for r in rows if r.outcome in ("passed", "failed")),
            passed=sum(1 for r in rows if r.outcome == "passed"),
            failed=sum(1 for r in rows if r.outcome == "failed"),
            skipped=sum(1 for r in rows if r.outcome == "skipped"),
            duration_s=round(time.time() - self.start_time, 3),
            stopped=self.safety_stopped,
        )

    def is_benchmark_nodeid(self, nodeid: str) -> bool:
        """Benchmark items are parametrized with preset names as ids: ``test_x[NAME]``."""
        return nodeid.endswith("]") and nodeid[nodeid.rfind("[") + 1 : -1] in self.preset_names

    # -- pre-flight (in the process that runs the item) -----------------------------------

    def require_mlx(self, item: pytest.Item, preset: Preset) -> None:
        """Skip the preset, logged with the reason, when MLX cannot be imported here: no
        preset is judged against host RAM as if it were the GPU. --yourai-force does not
        change this (the probe needs MLX); a custom probe command does not need it."""
        if self.mlx.importable:
            return
        reason = f"{preset.name}: {self.mlx.reason()}"
        self.log.write_event(
            MODEL_START, preset=preset.name, model_name=preset.repo, params=preset.params
        )
        self.log.write_event(
            PREFLIGHT_CHECK,
            preset=preset.name,
            available_gb=None,
            estimated_base_gb=None,
            estimated_conservative_gb=None,
            batch_size=None,
            lora_rank=None,
            lora_layers=None,
            decision=SKIP_NO_MLX,
            reason=reason,
        )
        item.user_properties.extend(
            (PROP_PREFIX + name, value)
            for name, value in (
                ("preset", preset.name),
                ("params", preset.params),
                ("decision", SKIP_NO_MLX),
                ("reason", reason),
            )
        )
        raise pytest.skip.Exception(reason, _use_item_location=True)

    def safety_check(self, item: pytest.Item) -> None:
        """Stop the whole session before spawning anything when memory is critically low."""
        machine = self.machine(fresh=True)
        reason = safety_stop_reason(machine.available_gb, self.settings.safety_gb)
        if reason is None:
            return
        if self.settings.force:
            item.warn(pytest.PytestWarning(f"{reason} — continuing because of --yourai-force"))
            return
        self.safety_stopped = reason
        self.log.write_event(
            SAFETY_STOP,
            reason=reason,
            available_gb=round(machine.available_gb, 3),
            threshold_gb=self.settings.safety_gb,
            preset=item.callspec.params[PRESET_ARG].name if hasattr(item, "callspec") else None,
        )
        item.session.shouldstop = reason  # pytest (and xdist) stop after this item
        preset = item.callspec.params[PRESET_ARG] if hasattr(item, "callspec") else None
        item.user_properties.extend(
            [
                (PROP_PREFIX + "preset", getattr(preset, "name", item.name)),
                (PROP_PREFIX + "params", getattr(preset, "params", "?")),
                (PROP_PREFIX + "available_gb", round(machine.available_gb, 3)),
                (PROP_PREFIX + "verdict", "Stopped"),
                (PROP_PREFIX + "reason", reason),
            ]
        )
        raise pytest.skip.Exception(reason, _use_item_location=True)

    def preflight(self, item: pytest.Item, preset: Preset) -> Preflight:
        machine = self.machine()
        self.log.write_event(
            MODEL_START,
            preset=preset.name,
            model_name=preset.repo,
            params=preset.params,
            nodeid=item.nodeid,
        )
        timing = self.time_model(machine.backend)
        census, refusal = self.census(preset, machine.backend)
        result = self._plan(preset, machine, None, timing, census, refusal)
        if result.decision == "run" and not self.settings.force and timing is None:
            gflops = self.throughput(result.shape)
            if gflops is not None:
                result = self._plan(preset, machine, gflops, timing, census, refusal)
        self.log.write_event(PREFLIGHT_CHECK, **result.record(), memory_source=machine.source)
        return result

    def _plan(
        self,
        preset: Preset,
        machine: MachineMemory,
        gflops: float | None,
        timing: TimeModel | None,
        census: Census | None,
        refusal: str | None,
    ) -> Preflight:
        return plan(
            preset,
            machine.available_gb,
            machine.backend,
            policy=self.settings.config_policy,
            force=self.settings.force,
            timeout_s=self.settings.timeout_s,
            gflops=gflops,
            in_flight=self.settings.in_flight,
            safety_gb=self.settings.safety_gb,
            timing=timing,
            census=census,
            refusal=refusal,
        )

    def census(self, preset: Preset, backend: str) -> tuple[Census | None, str | None]:
        """The model's census where the estimate needs one, from pytest's cache or a child
        Python; or why none could be taken."""
        return find_census(preset, backend, getattr(self.config, "cache", None))

    def _timing_key(self, backend: str) -> str:
        return f"yourai/timing/{self.host}-{backend}"

    def time_model(self, backend: str) -> TimeModel | None:
        """What this machine's earlier probes took, fitted (None: nothing measured yet, or
        a custom probe command, whose speed is its own)."""
        cache = getattr(self.config, "cache", None)
        if cache is None or self.settings.probe_command is not None:
            return None
        raw = cache.get(self._timing_key(backend), [])
        try:
            return fit_time([TimingObservation.from_json(o) for o in raw])
        except (KeyError, TypeError, ValueError):
            return None  # an older or damaged cache entry: measure again

    def record_timing(self, preflight: Preflight, result: dict[str, Any], elapsed_s: float) -> None:
        """Learn from a finished probe how long probes take here."""
        cache = getattr(self.config, "cache", None)
        if cache is None or self.settings.probe_command is not None:
            return
        shape, arch, census = preflight.shape, preflight.preset.architecture, preflight.census
        weights = (
            census.weights_bytes
            if census is not None
            else weight_bytes(arch, shape.bits, shape.group_size, shape.dtype)
        )
        seen = observe(
            training_flops(arch, shape, census),
            weights / 1e9,
            elapsed_s,
            [float(s) for s in result.get("step_seconds") or []],
        )
        if seen is None:
            return
        key = self._timing_key(shape.backend)
        raw = cache.get(key, [])
        kept = [o for o in raw if isinstance(o, dict)] if isinstance(raw, list) else []
        cache.set(key, [*kept, seen.to_json()][-KEEP_OBSERVATIONS:])

    def throughput(self, shape: TrainingShape) -> float | None:
        """GFLOP/s of this backend at the run's dtype and bits, measured once and cached.

        None when it cannot be known without spawning (estimate-only) or does not apply
        (a custom probe command has its own speed).
        """
        if self.settings.probe_command is not None:
            return None
        key = f"yourai/throughput/{shape.backend}-{shape.dtype}-{shape.bits}bit"
        if key in self._gflops:
            return self._gflops[key]
        cache = getattr(self.config, "cache", None)
        cached = cache.get(key, None) if cache is not None else None
        if isinstance(cached, int | float) and cached > 0:
            self._gflops[key] = float(cached)
            return float(cached)
        if self.settings.estimate_only:
            return None
        argv = [
            sys.executable,
            "-m",
            "pytest_yourai.probe",
            "--measure-throughput",
            "--dtype",
            shape.dtype,
            "--bits",
            str(shape.bits),
        ]
        with ProbeProcess(argv, probe_environment(None)) as proc:
            outcome = proc.wait(THROUGHPUT_TIMEOUT_S)
        gflops = (outcome.result or {}).get("gflops")
        if not isinstance(gflops, int | float) or gflops <= 0:
            # Not knowing the speed must not mean "no time limit": assume a slow machine.
            fallback = FALLBACK_GFLOPS[shape.backend]
            detail = outcome.result_problem or f"exit code {outcome.exit_code}"
            self.config.issue_config_time_warning(
                pytest.PytestWarning(
                    f"yourai: could not measure {shape.backend} throughput ({detail}); "
                    f"assuming {fallback:g} GFLOP/s for time estimates"
                ),
                stacklevel=2,
            )
            self._gflops[key] = fallback
            return fallback
        self._gflops[key] = float(gflops)
        if cache is not None:
            cache.set(key, float(gflops))
        return float(gflops)

    # -- admission (the process that runs the probe) -----------------------------------------

    def start_available_gb(self) -> float:
        if self._start_available is None:
            self._start_available = self.machine().available_gb
        return self._start_available

    def admit(self, preflight: Preflight, key: str) -> Admission:
        """Reserve the probe's conservative estimate on this host; wait while it does not
        fit next to the probes already running; skip it if it can never fit."""
        name = preflight.preset.name
        budget = self.start_available_gb() - self.settings.safety_gb
        # A model with no estimate (forced) runs alone.
        needed = budget if preflight.refused else preflight.estimate.estimated_conservative_gb
        if self.settings.force:
            budget = max(budget, needed)  # forced: run it, but alone if need be

        def waiting(others: float, budget_gb: float) -> None:
            self.log.write_event(
                PROBE_WAITING,
                preset=name,
                needed_gb=round(needed, 4),
                reserved_gb=round(others, 4),
                budget_gb=round(budget_gb, 4),
            )

        try:
            admission = self.ledger.reserve(
                key, needed, budget, {"preset": name, "worker": self.worker_id}, waiting
            )
        except NeverFits as exc:
            raise pytest.skip.Exception(
                f"{name}: {exc} (available {self.start_available_gb():.3g} GB minus the "
                f"{self.settings.safety_gb:g} GB safety threshold)",
                _use_item_location=True,
            ) from None
        self.log.write_event(
            PROBE_ADMITTED,
            preset=name,
            reserved_gb=round(admission.reserved_gb, 4),
            total_reserved_gb=round(admission.total_reserved_gb, 4),
            budget_gb=round(admission.budget_gb, 4),
            waited_s=round(admission.waited_s, 3),
        )
        return admission

    # -- time limits -------------------------------------------------------------------------

    def probe_deadline(self, item: pytest.Item) -> tuple[float, str]:
        """Seconds the probe may run, and what limits it.

        ``--yourai-timeout`` normally. When pytest-timeout would end the test sooner, the
        probe's deadline moves to a second before pytest-timeout's, so the plugin's own
        timeout fires first: the probe tree is killed, subprocess_timeout is logged with
        the output so far, and the test fails with the phase. pytest-timeout stays the
        backstop (its thread method ends pytest; the supervisor then kills the tree).
        """
        ours = self.settings.timeout_s
        pytest_timeout = pytest_timeout_settings(item)
        if pytest_timeout is None:
            return ours, "yourai"
        seconds, func_only = pytest_timeout
        started = item.stash.get(CALL_START_KEY if func_only else PROTOCOL_START_KEY, None)
        used = time.monotonic() - started if started is not None else 0.0
        remaining = seconds - used - PYTEST_TIMEOUT_MARGIN_S
        if remaining < ours:
            return max(remaining, 0.1), f"pytest-timeout's {seconds:g} s"
        return ours, "yourai"

    # -- results (controller or single process) -------------------------------------------

    def ordered_results(self) -> list[ResultRow]:
        """Results in preset order (smallest first, as parametrized), not in the order
        xdist workers happened to finish them."""
        rank = {preset.name: index for index, preset in enumerate(self.presets)}
        return sorted(
            self.results.values(),
            key=lambda row: (rank.get(str(row.get("preset")), len(rank)), row.nodeid),
        )

    def record(self, report: pytest.TestReport) -> ResultRow | None:
        props = {k: v for k, v in report.user_properties if str(k).startswith(PROP_PREFIX)}
        if not props and report.nodeid not in self.results:
            return None
        row = self.results.setdefault(report.nodeid, ResultRow(report.nodeid))
        row.properties.update(props)
        if report.when == "call" or (report.when == "setup" and not report.passed):
            row.outcome = report.outcome
        elif report.when == "teardown" and report.failed:
            row.outcome = "failed"
        row.verdict = verdict_for(row, report)
        if report.when == "teardown":
            self.log.write_event(
                TEST_VERDICT,
                preset=row.get("preset"),
                nodeid=row.nodeid,
                outcome=row.outcome,
                verdict=row.verdict,
            )
        return row


# What the probe's judge may say of a failed test; anything else that fails is "Fail".
FAILURE_VERDICTS = frozenset(
    {"OOM", "Timeout", "Error", "Killed", "Over budget", "Regressed", "No baseline"}
)


def verdict_for(row: ResultRow, report: pytest.TestReport) -> str:
    """The verdict from the test's real outcome (setup, call and teardown): a test that fails
    after its probe passed (its own assert, a teardown) is "Fail", never "Pass"."""
    explicit = row.get("verdict")
    if row.outcome == "skipped":
        if explicit == "Stopped":
            return "Stopped"
        return "Estimated" if row.get("estimate_only") else "Skipped"
    if row.outcome == "failed":
        return str(explicit) if explicit in FAILURE_VERDICTS else "Fail"
    if row.outcome == "passed":
        return "Pass"
    return row.verdict


def pytest_timeout_settings(item: pytest.Item) -> tuple[float, bool] | None:
    """(timeout seconds, func_only) that pytest-timeout applies to ``item``, if any."""
    if not item.config.pluginmanager.hasplugin("timeout"):
        return None
    try:
        from pytest_timeout import _get_item_settings

        settings = _get_item_settings(item)
    except Exception:  # a pytest-timeout without this helper: no interplay
        return None
    timeout = getattr(settings, "timeout", None)
    if not timeout or timeout <= 0:
        return None
    return float(timeout), bool(getattr(settings, "func_only", False))


def probe_environment(spec: dict[str, Any] | None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if spec is not None:
        env["YOURAI_PROBE_SPEC"] = json.dumps(spec)
    # pytest's own tmp paths and capture settings mean nothing to the probe.
    env.pop("PYTEST_CURRENT_TEST", None)
    return env
