"""The process's memory footprint on its device, phase by phase: what the machine must hold.

MLX's own counter (``mx.get_peak_memory``, ``mlx_lm.lora``'s "Peak mem") counts
the arrays alive at once. The machine holds more: MLX's buffer cache, the allocator's
reserve, the backend's context and its workspaces. A run needs its footprint to be free,
not its MLX peak. This module measures the footprint with each backend's standard source,
and never imports mlx (the probe imports this module before it imports mlx):

- CUDA: NVML (``nvidia-ml-py``, the ``cuda`` extra). The process's own used memory where
  the driver reports it (``nvmlDeviceGetComputeRunningProcesses``); otherwise the device's
  used memory above what it was when the meter was created, before MLX made its context
  (containers often hide processes from NVML). Sampled every ``interval_s``, and combined
  with the high-water mark of CUDA's default memory pool, which MLX allocates from with
  ``cudaMallocAsync``: the pool's peak plus what the process holds outside the pool (the
  context, cuBLAS workspaces, managed memory) catches a peak between two samples.
- Metal: the task's physical footprint, what Activity Monitor shows as Memory
  (``proc_pid_rusage``: ``ri_phys_footprint``, with ``ri_lifetime_max_phys_footprint`` as a
  high-water mark). Not run here (no Mac): from Apple's headers.
- CPU: the resident set. Linux keeps a high-water mark (``VmHWM``) that is reset per phase
  through ``/proc/self/clear_refs``; elsewhere ``ru_maxrss``.
"""

from __future__ import annotations

import ctypes
import os
import resource
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

GB = 1e9
DEFAULT_INTERVAL_S = 0.02


def _round_gb(nbytes: float) -> float:
    return round(nbytes / GB, 6)


# -- sources: current bytes, and a high-water mark where the backend keeps one ------------


@dataclass
class Source:
    """Where the footprint comes from.

    ``current()`` is what the process holds now. ``high_water()`` is the largest value
    since ``reset_high_water()`` (or since the process started, if ``resettable`` is
    False), or None where there is no such mark."""

    name: str
    current: Callable[[], int | None]
    high_water: Callable[[], int | None] = lambda: None
    reset_high_water: Callable[[], bool] = lambda: False
    details: dict[str, Any] = field(default_factory=dict)
    high_water_name: str = ""  # when the mark is not part of ``name`` already
    parts: dict[str, int] = field(default_factory=dict)  # the last high_water()'s terms

    def describe(self) -> str:
        return f"{self.name} + {self.high_water_name}" if self.high_water_name else self.name


def _linux_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_linux_hwm() -> bool:
    # "5" resets the peak resident set size to the current one (Linux >= 4.0).
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def _maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def cpu_source() -> Source:
    import psutil

    process = psutil.Process()

    def current() -> int | None:
        try:
            return int(process.memory_info().rss)
        except psutil.Error:
            return None

    if sys.platform.startswith("linux") and _linux_status_kb("VmHWM") is not None:
        return Source(
            "peak RSS (VmHWM, reset per phase)",
            current,
            lambda: _linux_status_kb("VmHWM"),
            _reset_linux_hwm,
        )
    return Source("peak RSS (ru_maxrss)", current, _maxrss_bytes)


class _RusageInfoV4(ctypes.Structure):
    """``struct rusage_info_v4`` from <sys/resource.h> (xnu bsd/sys/resource.h)."""

    _fields_ = [
        ("ri_uuid", ctypes.c_uint8 * 16),
        *[
            (name, ctypes.c_uint64)
            for name in (
                "ri_user_time",
                "ri_system_time",
                "ri_pkg_idle_wkups",
                "ri_interrupt_wkups",
                "ri_pageins",
                "ri_wired_size",
                "ri_resident_size",
                "ri_phys_footprint",
                "ri_proc_start_abstime",
                "ri_proc_exit_abstime",
                "ri_child_user_time",
                "ri_child_system_time",
                "ri_child_pkg_idle_wkups",
                "ri_child_interrupt_wkups",
                "ri_child_pageins",
                "ri_child_elapsed_abstime",
                "ri_diskio_bytesread",
                "ri_diskio_byteswritten",
                "ri_cpu_time_qos_default",
                "ri_cpu_time_qos_maintenance",
                "ri_cpu_time_qos_background",
                "ri_cpu_time_qos_utility",
                "ri_cpu_time_qos_legacy",
                "ri_cpu_time_qos_user_initiated",
                "ri_cpu_time_qos_user_interactive",
                "ri_billed_system_time",
                "ri_serviced_system_time",
                "ri_logical_writes",
                "ri_lifetime_max_phys_footprint",
                "ri_instructions",
                "ri_cycles",
                "ri_billed_energy",
                "ri_serviced_energy",
                "ri_interval_max_phys_footprint",
                "ri_runnable_time",
            )
        ],
    ]


RUSAGE_INFO_V4 = 4


def metal_source() -> Source | None:
    """The task's physical footprint (Activity Monitor's Memory column); None off macOS."""
    if sys.platform != "darwin":
        return None
    try:
        libproc = ctypes.CDLL("/usr/lib/libproc.dylib", use_errno=True)
        proc_pid_rusage = libproc.proc_pid_rusage
    except (OSError, AttributeError):
        return None
    pid = os.getpid()

    def read() -> _RusageInfoV4 | None:
        info = _RusageInfoV4()
        if proc_pid_rusage(pid, RUSAGE_INFO_V4, ctypes.byref(info)) != 0:
            return None
        return info

    def current() -> int | None:
        info = read()
        return None if info is None else int(info.ri_phys_footprint)

    def lifetime_max() -> int | None:
        info = read()
        return None if info is None else int(info.ri_lifetime_max_phys_footprint)

    if read() is None:
        return None
    return Source("phys_footprint (proc_pid_rusage)", current, lifetime_max)


# -- CUDA: NVML and the driver's default memory pool --------------------------------------

_CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT = 5
_CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH = 6


class CudaPool:
    """The high-water mark of CUDA's default memory pool on device 0 of this process,
    read through the driver API (libcuda), which MLX's ``cudaMallocAsync`` draws from."""

    def __init__(self) -> None:
        lib = ctypes.CDLL("libcuda.so.1")
        if lib.cuInit(0) != 0:
            raise OSError("cuInit failed")
        device = ctypes.c_int()
        if lib.cuDeviceGet(ctypes.byref(device), 0) != 0:
            raise OSError("cuDeviceGet failed")
        self._pool = ctypes.c_void_p()
        if lib.cuDeviceGetDefaultMemPool(ctypes.byref(self._pool), device) != 0:
            raise OSError("cuDeviceGetDefaultMemPool failed")
        self._lib = lib

    def _get(self, attribute: int) -> int | None:
        value = ctypes.c_uint64()
        if self._lib.cuMemPoolGetAttribute(self._pool, attribute, ctypes.byref(value)) != 0:
            return None
        return int(value.value)

    def reserved(self) -> int | None:
        return self._get(_CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)

    def reserved_high(self) -> int | None:
        return self._get(_CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)

    def reset_high(self) -> bool:
        zero = ctypes.c_uint64(0)  # resets the mark to the current value
        result = self._lib.cuMemPoolSetAttribute(
            self._pool, _CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH, ctypes.byref(zero)
        )
        return bool(result == 0)


def _nvml_device_index() -> int:
    """NVML numbers devices physically; CUDA_VISIBLE_DEVICES renumbers them for MLX."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return int(visible) if visible.isdigit() else 0


class CudaMeter:
    """NVML readings for the process (or, where NVML hides processes, the device)."""

    def __init__(self) -> None:
        import pynvml  # nvidia-ml-py: the cuda extra

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(_nvml_device_index())
        self.device_used_at_start = int(pynvml.nvmlDeviceGetMemoryInfo(self._handle).used)
        self._pid = os.getpid()

    def device_used(self) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)

    def process_used(self) -> int | None:
        """This process's used memory as the driver reports it, or None when it does not."""
        try:
            processes = self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
        except self._nvml.NVMLError:
            return None
        for process in processes:
            if process.pid == self._pid:
                used = process.usedGpuMemory
                return int(used) if isinstance(used, int) else None
        return None


def early_cuda_meter() -> CudaMeter | None:
    """Read the device before MLX makes its context (called where the probe starts)."""
    try:
        return CudaMeter()
    except Exception:  # no nvidia-ml-py, no driver, no GPU: not a CUDA run
        return None


def cuda_source(meter: CudaMeter) -> Source:
    """The process's used memory where NVML reports it, else the device's above the start.

    Before MLX makes its context the process is not listed yet, so the choice is made at
    each reading; ``name`` says which answered last."""
    source = Source("", lambda: None)

    def current() -> int | None:
        own = meter.process_used()
        if own is not None:
            source.name = "NVML process used memory"
            return own
        source.name = "NVML device used memory above the probe's start"
        return max(0, meter.device_used() - meter.device_used_at_start)

    source.current = current
    source.details["footprint_device_used_at_start_gb"] = _round_gb(meter.device_used_at_start)
    try:
        pool = CudaPool()
    except (OSError, AttributeError):
        return source

    def high_water() -> int | None:
        # The pool's peak, plus what the process holds outside the pool now (context,
        # workspaces, managed memory): the footprint at the pool's peak.
        high, now, held = pool.reserved_high(), pool.reserved(), current()
        if high is None or now is None or held is None:
            return None
        source.parts = {"pool_high": high, "outside_pool": max(0, held - now)}
        return high + source.parts["outside_pool"]

    source.high_water = high_water
    source.reset_high_water = pool.reset_high
    source.high_water_name = "CUDA pool high-water"
    return source


# -- the meter: a sampler thread and phase boundaries --------------------------------------


@dataclass
class PhasePeak:
    sampled: int = 0
    high_water: int | None = None
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return max(self.sampled, self.high_water or 0)


class FootprintMeter:
    """Samples the footprint every ``interval_s`` on a thread; ``phase(name)`` closes the
    previous phase. Each phase's figure is the larger of its samples and the source's
    high-water mark over the phase (where the source keeps one)."""

    def __init__(self, source: Source, interval_s: float = DEFAULT_INTERVAL_S) -> None:
        self.source = source
        self.interval_s = interval_s
        self.phases: dict[str, PhasePeak] = {}
        self._current: PhasePeak | None = None
        self._resettable = False
        self._high_at_start: int | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="yourai-footprint", daemon=True)

    @property
    def started(self) -> bool:
        return self._thread.is_alive()

    def start(self, phase: str) -> FootprintMeter:
        self._open(phase)
        self._thread.start()
        return self

    def _sample(self) -> None:
        value = self.source.current()
        if value is None:
            return
        with self._lock:
            if self._current is not None:
                self._current.sampled = max(self._current.sampled, value)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _open(self, phase: str) -> None:
        self._resettable = self.source.reset_high_water()
        self._high_at_start = None if self._resettable else self.source.high_water()
        with self._lock:
            self._current = self.phases.setdefault(phase, PhasePeak())

    def _close(self) -> None:
        self._sample()
        high = self.source.high_water()
        with self._lock:
            current = self._current
        if current is None or high is None:
            return
        # A lifetime mark belongs to this phase only if it rose during it.
        if self._resettable or self._high_at_start is None or high > self._high_at_start:
            current.high_water = max(current.high_water or 0, high)
            current.parts = dict(self.source.parts)

    def phase(self, name: str) -> None:
        self._close()
        self._open(name)

    def stop(self) -> dict[str, Any]:
        self._close()
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(1.0)
        with self._lock:
            self._current = None
        return self.report()

    def peak_gb(self, phase: str) -> float | None:
        found = self.phases.get(phase)
        return None if found is None or found.peak == 0 else _round_gb(found.peak)

    def report(self) -> dict[str, Any]:
        """The result fields: per phase, the peak over all, and how it was measured."""
        build, train = self.peak_gb("build"), self.peak_gb("train")
        peaks = [p for p in (build, train) if p is not None]
        return {
            "build_footprint_gb": build,
            "train_footprint_gb": train,
            "footprint_peak_gb": max(peaks) if peaks else None,
            "footprint_source": self.source.describe(),
            "footprint_interval_ms": round(self.interval_s * 1000),
            "footprint_high_water": any(p.high_water for p in self.phases.values()),
            "footprint_sampled_gb": {
                name: _round_gb(p.sampled) for name, p in self.phases.items() if p.sampled
            },
            **(
                {
                    "footprint_parts_gb": {
                        name: {k: _round_gb(v) for k, v in p.parts.items()}
                        for name, p in self.phases.items()
                        if p.parts
                    }
                }
                if any(p.parts for p in self.phases.values())
                else {}
            ),
            **self.source.details,
        }


def source_for(backend: str, cuda: CudaMeter | None) -> Source:
    """The standard source for ``backend`` ("cuda", "metal" or "cpu")."""
    if backend == "cuda" and cuda is not None:
        return cuda_source(cuda)
    if backend == "metal":
        metal = metal_source()
        if metal is not None:
            return metal
    return cpu_source()
