"""Where this machine's probes are kept for learning.py: pytest's cache, per host, beside the
timing that throughput.MachineTiming keeps.

The record's key is the machine as the correction needs it to be the same: the backend, the
device and its memory (baseline.machine_id) and MLX's version (read from the installed
package's metadata: this process never imports mlx). A record of another key, or of another
calibration of the estimator, is not used (learning.MachineRecord.from_json).
``--yourai-forget-machine`` empties it at the start of a run.

Probes are added after each one that passed, by whichever process ran it (an xdist worker
writes the cache of its own host), under a file lock beside the cache entry, so two workers
finishing at once both keep their probe.
"""

from __future__ import annotations

import argparse
import json
import socket
from collections.abc import Callable
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any

from filelock import FileLock

from pytest_yourai.census import Census
from pytest_yourai.estimator import Estimate, TrainingShape
from pytest_yourai.learning import (
    Learned,
    MachineRecord,
    Probe,
    correct,
    kernel_keys,
    predict_time,
    probe_of,
    run_id,
    sources,
)
from pytest_yourai.preflight import Preflight
from pytest_yourai.presets import Preset


def mlx_version() -> str:
    try:
        return metadata.version("mlx")
    except metadata.PackageNotFoundError:
        return "none"


def machine_key(machine_id: str) -> str:
    """The record's key: the machine (backend, device, memory) and MLX's version."""
    return f"{machine_id}|mlx {mlx_version()}"


def boot_id() -> str:
    """This boot of this machine (a cold start is the first probe of one): Linux's boot id,
    else nothing (every probe then counts as warm after the first the record holds)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text(encoding="utf-8").strip()
    except OSError:
        return ""


def session_id() -> str:
    """A probe's session for the cold start: this boot and this MLX (a new install
    compiles its kernels afresh too)."""
    return f"{boot_id()}|mlx {mlx_version()}"


def cache_key(host: str) -> str:
    return f"yourai/learned/{host}"


class MachineLearning:
    """The record of this machine in pytest's ``cache``. ``enabled`` is False for a custom
    probe command (its measurements are its own) or without a cache."""

    def __init__(self, cache: Any, host: str, enabled: bool) -> None:
        self.cache, self.host = cache, host
        self.enabled = enabled and cache is not None

    def record(self, key: str) -> MachineRecord:
        if not self.enabled:
            return MachineRecord(key)
        return MachineRecord.from_json(self.cache.get(cache_key(self.host), None), key)

    def forget(self, key: str) -> None:
        if self.enabled:
            self.cache.set(cache_key(self.host), MachineRecord(key).to_json())

    @staticmethod
    def timed(record: MachineRecord, result: Preflight) -> Preflight:
        """The pre-flight's predicted seconds from this machine's timed probes, where it has
        any: the warm start-up and steps it learned, plus the cold start (learned once)
        when this boot or install has run no probe yet, which ``cold_start_s`` says, else the
        first-use compiles of kernels this boot has not used (``compile_s``). The
        time gate's skip is left as it was (it needs the optimistic figure, and a wrong
        skip loses a run that would have finished)."""
        if result.refused:
            return result
        timed = predict_time(
            record, record.key, result.shape.backend, result.flops_per_step(),
            result.weights_gb(), result.steps, session_id(),
            kernel_keys(result.preset.architecture, result.shape),
            run_id(result.preset.architecture, result.shape),
        )  # fmt: skip
        if timed is None:
            return result
        return replace(
            result,
            predicted_seconds=timed.seconds,
            cold_start_s=timed.cold_start_s,
            compile_s=timed.compile_s,
        )

    def add(
        self,
        key: str,
        arch: dict[str, Any],
        shape: TrainingShape,
        result: dict[str, Any],
        census: Census | None,
        *,
        alone: bool,
        elapsed_s: float,
    ) -> None:
        """Keep what a probe that passed measured (nothing without MLX's peak)."""
        peak = result.get("train_peak_memory_gb", result.get("peak_memory_gb"))
        if not self.enabled or not isinstance(peak, int | float):
            return
        footprint = result.get("footprint_peak_gb")
        build, train = result.get("build_footprint_gb"), result.get("train_footprint_gb")
        phase = "build" if isinstance(build, int | float) and build > (train or 0.0) else "train"
        steps = [float(s) for s in result.get("step_seconds") or []]
        steady = sorted(steps[1:]) or steps
        probe: Probe = probe_of(
            arch,
            shape,
            float(footprint) if isinstance(footprint, int | float) else None,
            float(peak),
            census,
            phase=phase,
            session=session_id(),
            alone=alone,
            steps=len(steps),
            step_s=steady[len(steady) // 2] if steady else 0.0,
            elapsed_s=elapsed_s,
        )
        with FileLock(str(self.cache.mkdir("yourai") / f"learned-{self.host}.lock")):
            self.cache.set(cache_key(self.host), self.record(key).add(probe).to_json())


def learned_estimate(
    record: MachineRecord,
    key: str,
    estimate: Estimate,
    shape: TrainingShape,
    arch: dict[str, Any],
    census: Census | None,
) -> Learned:
    """The correction the pre-flight applies: for a run this machine has probed (in this
    in-flight mode), learning.correct's; for any other, today's estimate, with the
    correction reported but not applied (``applied`` False). Replayed on the committed
    H100 and H200 files, repeats of probed runs were predicted within 4.9% (conservative
    1.01-1.11x, never under), while first sightings were off by up to 32%, more than
    today's estimate, and the learned go rule refused 11 survival runs that survived
    (docs/estimator.md, "Learning the machine")."""
    learned = correct(record, key, estimate, shape, arch, census)
    this_run = run_id(arch, shape)
    if any(p.run.run == this_run for p in record.of(key, shape.in_flight)):
        return learned
    return replace(learned, estimate=estimate, applied=False)


def record_learner(record: MachineRecord, key: str, preset: Preset, census: Census | None) -> Any:
    """The pre-flight's ``learner`` (preflight.Learner) for ``preset`` from this machine's
    record (read once per pre-flight), or None where it holds nothing of ``key``."""
    if not record.of(key):
        return None
    arch = dict(preset.architecture)

    def learner(estimate: Estimate, shape: TrainingShape) -> Learned | None:
        return learned_estimate(record, key, estimate, shape, arch, census)

    return learner


def explain(
    record: MachineRecord, key: str, shape: TrainingShape, arch: dict[str, Any],
    census: Census | None, today: Estimate,
) -> str:  # fmt: skip
    """What ``yourai estimate --explain`` says of the correction: today's figures, the
    corrected ones, the correction's terms and the probes it came from."""
    probes = record.of(key, shape.in_flight)
    if not probes:
        return f"learned from 0 probes on this machine ({key}): today's estimate, uncorrected"
    learned = correct(record, key, today, shape, arch, census)
    used = learned_estimate(record, key, today, shape, arch, census).applied
    e = learned.estimate
    lines = [
        f"learned from {len(probes)} probe{'s' if len(probes) != 1 else ''} on this machine "
        f"({key}, in flight {shape.in_flight}):",
        f"  footprint: today {today.estimated_base_gb:.3f}-{today.estimated_conservative_gb:.3f}"
        f" GB, learned {e.estimated_base_gb:.3f}-{e.estimated_conservative_gb:.3f} GB",
        f"  MLX peak:  today {today.mlx_peak_gb:.3f} GB, learned {e.mlx_peak_gb:.3f} GB",
        "  the pre-flight uses the learned figures"
        if used
        else "  the pre-flight keeps today's: this run has not been probed here in this mode",
        f"  correction: {learned.to_json()}",
        "  from (weight, measured footprint / MLX peak GB, predicted then, seconds):",
    ]
    for weight, probe in sources(record, key, shape, arch, census):
        measured = "-" if probe.measured_gb is None else f"{probe.measured_gb:.3f}"
        lines.append(
            f"    {weight:7.3f}  {measured} / {probe.measured_peak_gb:.3f}  "
            f"{probe.run.predicted_gb:.3f}  {probe.elapsed_s:.1f} s  "
            f"({probe.run.model_type}, run {probe.run.run}, {probe.run.window_class})"
        )
    return "\n".join(lines)


def add_cache_dir_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(".pytest_cache"),
        help="pytest's cache directory, where this machine's record of its probes is kept "
        "(default: %(default)s); on this machine's backend the estimate uses it, as the "
        "pre-flight does",
    )


def this_machine(cache_dir: Path, backend: str) -> tuple[MachineRecord, str] | None:
    """This machine's record of its probes, as a command line tool finds it (pytest's
    ``cache_dir``), when the question is about this machine's backend: (record, key)."""
    from pytest_yourai.baseline import machine_id
    from pytest_yourai.memory import detect_backend, read_machine_memory

    if backend != detect_backend():
        return None
    m = read_machine_memory(backend)
    key = machine_key(machine_id(m.backend, m.device_name, m.total_gb))
    return read_record(cache_dir, socket.gethostname(), key), key


def learner_of(
    record: tuple[MachineRecord, str] | None,
) -> Callable[[Preset, Census | None], Any] | None:
    """preflight.memory_decision's ``learner_of`` for a record (None: no record)."""
    if record is None:
        return None
    found = record
    return lambda preset, census: record_learner(*found, preset, census)


def read_record(cache_dir: Path, host: str, key: str) -> MachineRecord:
    """The record as a command line tool finds it: pytest's cache directory holds each key
    as a JSON file under ``v/``."""
    path = cache_dir / "v" / cache_key(host)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return MachineRecord(key)
    return MachineRecord.from_json(data, key)
