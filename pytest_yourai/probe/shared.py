"""What every part of the probe shares: the output (progress lines and the one result line),
exit codes, the out-of-memory exception and its classification, and the memory cap."""

from __future__ import annotations

import re
import resource
import sys
from typing import Any

import mlx.core as mx

from pytest_yourai.protocol import result_line

GB = 1e9
EXIT_OK, EXIT_ERROR, EXIT_OOM, EXIT_USAGE = 0, 1, 3, 2

_OOM_PATTERNS = re.compile(
    r"out of memory|unable to allocate|failed to allocate|attempting to allocate|"
    r"insufficient memory|cudaErrorMemoryAllocation|std::bad_alloc|memory limit",
    re.IGNORECASE,
)

# The real stdout, kept for the protocol while mlx-lm's own output goes to stderr.
_out = sys.stdout


def say(message: str) -> None:
    """A progress line on the real stdout, flushed at once for stdout_preview."""
    _out.write(message + "\n")
    _out.flush()


def emit_result(result: dict[str, Any]) -> None:
    _out.write(result_line(result) + "\n")
    _out.flush()


def gb(nbytes: float) -> float:
    return round(nbytes / GB, 6)


def one_line(exc: BaseException) -> str:
    """The last line of an exception's message (mlx-lm's are often several)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[-1]


class ProbeOOM(Exception):
    """The probe ran out of (possibly rehearsed) memory."""


class SetupError(ValueError):
    """What the spec asks cannot run (refused before anything is built)."""


def classify_failure(exc: BaseException) -> str:
    if isinstance(exc, ProbeOOM | MemoryError):
        return "oom"
    return "oom" if _OOM_PATTERNS.search(str(exc)) else "error"


def process_peak_rss_gb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return gb(peak if sys.platform == "darwin" else peak * 1024)


class MemoryCap:
    """``--memory-limit-gb``: MLX's own limit plus a deterministic check of its peak."""

    def __init__(self, limit_gb: float | None) -> None:
        self.limit_bytes = int(limit_gb * GB) if limit_gb is not None else None
        if self.limit_bytes is not None:
            mx.set_memory_limit(self.limit_bytes)

    def check(self, peak_bytes: int) -> None:
        if self.limit_bytes is not None and peak_bytes > self.limit_bytes:
            raise ProbeOOM(
                f"memory limit exceeded: peak {gb(peak_bytes):.3f} GB > "
                f"limit {gb(self.limit_bytes):.3f} GB"
            )
