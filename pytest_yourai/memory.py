"""What the machine has: the MLX backend in use and its total/available memory.

The pytest process never imports mlx (a crash in MLX must stay in the probe), so the
backend is inferred from the platform and the installed MLX distributions, and CUDA
memory is read with nvidia-smi.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import psutil

from pytest_yourai.spawn import ask_probe

GB = 1e9
CUDA_DISTRIBUTIONS = ("mlx-cuda-13", "mlx-cuda-12", "mlx-cuda")


@dataclass(frozen=True)
class MachineMemory:
    backend: str  # "cpu" | "cuda" | "metal"
    total_gb: float
    available_gb: float
    device_name: str
    source: str  # where available_gb came from
    cap_gb: float | None = None

    def capped(self, cap_gb: float | None) -> MachineMemory:
        """Apply ``--yourai-max-memory``: count at most ``cap_gb`` as available."""
        if cap_gb is None:
            return self
        cap = cap_gb if self.cap_gb is None else min(self.cap_gb, cap_gb)
        return replace(self, available_gb=min(self.available_gb, cap), cap_gb=cap)


def _distribution_installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def detect_backend() -> str:
    """The backend MLX would use here, inferred without importing it (see check_mlx)."""
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return "metal"
    if any(_distribution_installed(name) for name in CUDA_DISTRIBUTIONS) and shutil.which(
        "nvidia-smi"
    ):
        return "cuda"
    return "cpu"


MLX_DISTRIBUTIONS = ("mlx", "mlx-metal", "mlx-cpu", *CUDA_DISTRIBUTIONS)
_MLX_CHECK = """
import json, sys
try:
    import mlx.core as mx
    device = mx.default_device()
except Exception as exc:
    print(json.dumps({"importable": False, "error": f"{type(exc).__name__}: {exc}"}))
else:
    gpu = "metal" if sys.platform == "darwin" else "cuda"
    print(json.dumps({"importable": True, "backend": "cpu" if device.type == mx.cpu else gpu}))
"""


@dataclass(frozen=True)
class MlxStatus:
    """Whether ``import mlx.core`` works in this Python, and the device MLX picks."""

    importable: bool
    backend: str | None = None  # "cpu" | "cuda" | "metal"
    error: str = ""

    def reason(self) -> str:
        return f"MLX is not importable ({self.error}); install it: {install_hint()}"


def install_hint() -> str:
    """The extra that brings the right MLX build to this machine."""
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return "pip install pytest-yourai (MLX's Metal build comes with it)"
    if shutil.which("nvidia-smi"):
        return "pip install 'pytest-yourai[cuda]'"
    return "pip install 'pytest-yourai[cpu]'"


def mlx_fingerprint() -> str:
    """What decides whether MLX imports: this interpreter and the installed MLX builds."""
    versions = []
    for name in MLX_DISTRIBUTIONS:
        try:
            versions.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return f"{sys.executable}|{os.environ.get('PYTHONPATH', '')}|{','.join(versions)}"


_MLX_STATUS: dict[str, MlxStatus] = {}


def mlx_status(cache: Any = None, host: str = "", known: Any = None) -> MlxStatus:
    """check_mlx, remembered per installation: in this process, in pytest's ``cache``
    when it worked (an installation that imported once keeps importing), or ``known``: what
    the xdist controller found for the same installation on this host (mlx_record)."""
    fingerprint = mlx_fingerprint()
    if isinstance(known, dict) and known.get("fingerprint") == fingerprint:
        _MLX_STATUS[fingerprint] = MlxStatus(
            bool(known.get("importable")), known.get("backend"), str(known.get("error", ""))
        )
    if fingerprint in _MLX_STATUS:
        return _MLX_STATUS[fingerprint]
    key = f"yourai/mlx/{host}"
    cached = cache.get(key, None) if cache is not None else None
    if isinstance(cached, dict) and cached.get("fingerprint") == fingerprint:
        status = MlxStatus(True, backend=str(cached.get("backend")))
    else:
        status = check_mlx()
        if status.importable and cache is not None:
            cache.set(key, {"fingerprint": fingerprint, "backend": status.backend})
    _MLX_STATUS[fingerprint] = status
    return status


def mlx_record(status: MlxStatus) -> dict[str, Any]:
    """A status as the controller hands it to workers on its host (with the installation's
    fingerprint, so a worker with another Python or MLX asks for itself)."""
    return {"fingerprint": mlx_fingerprint(), **dataclasses.asdict(status)}


def check_mlx(timeout_s: float = 120.0) -> MlxStatus:
    """Import mlx.core in a child Python (this process never imports it)."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _MLX_CHECK],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return MlxStatus(False, error=f"the check could not run: {exc}")
    lines = proc.stdout.strip().splitlines()
    try:
        data = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        data = {}
    if not isinstance(data, dict) or "importable" not in data:
        tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return MlxStatus(False, error=tail)
    if not data["importable"]:
        return MlxStatus(False, error=str(data.get("error", "")))
    return MlxStatus(True, backend=str(data["backend"]))


def _command_output(argv: list[str], timeout_s: float) -> str | None:
    """A helper command's stdout, or None when it cannot run, fails, or hangs."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def _cuda_memory() -> MachineMemory | None:
    """Total and free memory of GPU 0 (MLX's default device) from nvidia-smi, in GB."""
    query = [
        "nvidia-smi",
        "--query-gpu=memory.total,memory.free,name",
        "--format=csv,noheader,nounits",
    ]
    out = _command_output(query, 10)
    if out is None:
        return None
    first = out.strip().splitlines()[0] if out.strip() else ""
    parts = [p.strip() for p in first.split(",")]
    if len(parts) < 3:
        return None
    try:
        total_mib, free_mib = float(parts[0]), float(parts[1])
    except ValueError:
        return None
    mib = 1024 * 1024
    return MachineMemory(
        backend="cuda",
        total_gb=total_mib * mib / GB,
        available_gb=free_mib * mib / GB,
        device_name=parts[2],
        source="nvidia-smi free memory",
    )


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def system_memory(backend: str) -> MachineMemory:
    vm = psutil.virtual_memory()
    name = cpu_name()
    return MachineMemory(
        backend=backend,
        total_gb=vm.total / GB,
        available_gb=vm.available / GB,
        device_name=name,
        source="psutil available",
    )


def metal_working_set_gb(ram_gb: float) -> float:
    """What macOS lets the GPU use on a Mac with ``ram_gb`` of RAM, when MLX does not say:
    Metal's recommended working set, 2/3 of the RAM up to 32 GB and 3/4 above. RAM sizes
    are binary (a "16 GB" Mac has 16 GiB). Observed on macOS 13-15: 10922.67 MiB on 16 GB
    (llama.cpp #2209), 21845.34 MiB on 32 GB (ollama #434), 49152 MiB on 64 GB (llama.cpp
    #1870), 73728 MiB on 96 GB (llama.cpp #3213); the 36 GB boundary is not measured. macOS
    26 reports more (about 74% on 16-24 GB, 84% on a 128 GB M5 Max), so the rule errs low;
    a Mac's own pre-flight reads the real figure from MLX."""
    share = 2 / 3 if ram_gb <= 32 else 3 / 4
    return ram_gb * 1024**3 * share / GB


def metal_memory(
    device_info: Mapping[str, object], available_bytes: float, total_bytes: float
) -> MachineMemory:
    """Metal: unified memory shared with the OS, and mlx-lm caps training at the GPU's
    recommended working set (its wired limit, about 65-75% of RAM). What a probe can use
    is the smaller of psutil's available memory and that working set.

    ``device_info`` is what ``mx.device_info()`` (mlx >= 0.30) or ``mx.metal.device_info()``
    (older) reports; either may lack keys, and then macOS's usual rule stands in for the
    working set (metal_working_set_gb)."""
    working_set = device_info.get("max_recommended_working_set_size")
    memory_size = device_info.get("memory_size")
    total = (
        float(memory_size)
        if isinstance(memory_size, int | float) and memory_size > 0
        else total_bytes
    )
    name = str(device_info.get("device_name") or device_info.get("architecture") or "Apple GPU")
    rule = "Metal recommended working set"
    if (
        not isinstance(working_set, int | float)
        or isinstance(working_set, bool)
        or working_set <= 0
    ):
        # MLX did not say (older MLX, or no device info): macOS's usual rule.
        working_set = metal_working_set_gb(total / 1024**3) * GB
        rule = "working set by macOS's rule"
    available = min(float(working_set), available_bytes)
    if working_set < available_bytes:
        source = (
            f"{rule} {working_set / GB:.1f} GB "
            f"(below psutil available {available_bytes / GB:.1f} GB)"
        )
    else:
        source = f"psutil available (below the {rule} {working_set / GB:.1f} GB)"
    return MachineMemory(
        backend="metal",
        total_gb=total / GB,
        available_gb=available / GB,
        device_name=name,
        source=source,
    )


def _metal_device_info() -> dict[str, object]:
    """Ask a child Python (the probe) what MLX reports: the pytest process never imports mlx."""
    result, _ = ask_probe(["--device-info"], None, 60)
    return dict(result) if result is not None else {}


def read_machine_memory(backend: str | None = None) -> MachineMemory:
    backend = backend or detect_backend()
    if backend == "cuda":
        cuda = _cuda_memory()
        if cuda is not None:
            return cuda
    if backend == "metal":
        vm = psutil.virtual_memory()
        return metal_memory(_metal_device_info_cached(), vm.available, vm.total)
    return system_memory(backend)


_DEVICE_INFO: dict[str, object] | None = None


def _metal_device_info_cached() -> dict[str, object]:
    # The working set is fixed per boot; ask once per process.
    global _DEVICE_INFO
    if _DEVICE_INFO is None:
        _DEVICE_INFO = _metal_device_info()
    return _DEVICE_INFO


class MemoryWatchdog:
    """Samples available memory while a probe runs; trips below the safety threshold.

    Called every 100 ms by the supervisor's poll loop. On CUDA the device's free memory is
    read too, once a second (nvidia-smi is slower than psutil). With a ``cap_gb``
    (``--yourai-max-memory``) the rehearsed machine has ``cap - probe RSS`` available.
    """

    GPU_EVERY = 10

    def __init__(
        self,
        backend: str,
        threshold_gb: float,
        cap_gb: float | None,
        probe_rss_bytes: Callable[[], int],
    ) -> None:
        self.backend = backend
        self.threshold_gb = threshold_gb
        self.cap_gb = cap_gb
        self.probe_rss_bytes = probe_rss_bytes
        self.peak_rss_gb = 0.0
        self.min_available_gb = float("inf")
        self.tripped_available_gb: float | None = None
        self.rss_at_trip_gb = 0.0
        self._ticks = 0
        self._gpu_free_gb: float | None = None

    def available_now(self, rss_gb: float) -> float:
        available = psutil.virtual_memory().available / GB
        if self.backend == "cuda":
            if self._ticks % self.GPU_EVERY == 0:
                cuda = _cuda_memory()
                self._gpu_free_gb = cuda.available_gb if cuda is not None else None
            if self._gpu_free_gb is not None:
                available = min(available, self._gpu_free_gb)
        if self.cap_gb is not None:
            available = min(available, self.cap_gb - rss_gb)
        return available

    def __call__(self) -> bool:
        """One sample; True means: kill the probe now."""
        rss_gb = self.probe_rss_bytes() / GB
        self.peak_rss_gb = max(self.peak_rss_gb, rss_gb)
        available = self.available_now(rss_gb)
        self._ticks += 1
        self.min_available_gb = min(self.min_available_gb, available)
        if available < self.threshold_gb:
            self.tripped_available_gb = available
            self.rss_at_trip_gb = rss_gb
            return True
        return False
