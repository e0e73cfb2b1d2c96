"""Metal code paths, with the device info real Macs reported (this machine has no Metal)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from pytest_yourai.memory import metal_memory, metal_working_set_gb

GB = 1e9
# Recorded from `mx.metal.device_info()` on an Apple M1 16 GB, mlx 0.29.3 (no mx.device_info).
M1_16GB = {
    "resource_limit": 499000,
    "max_buffer_length": 8589934592,
    "architecture": "applegpu_g13g",
    "memory_size": 17179869184,
    "max_recommended_working_set_size": 11453251584,
    "device_name": "Apple M1",
}
# Recorded from `mx.device_info()` on an Apple M5 Max 128 GB, mlx 0.32.2.
M5_MAX_128GB = {
    "device_name": "Apple M5 Max",
    "max_recommended_working_set_size": 115448725504,
    "memory_size": 137438953472,
    "architecture": "applegpu_g17s",
    "max_buffer_length": 86586540032,
    "resource_limit": 499000,
}


def test_working_set_caps_available_memory() -> None:
    # An idle 16 GB M1: psutil says 13 GB available, but mlx-lm's wired limit is ~11.45 GB.
    memory = metal_memory(M1_16GB, 13.0 * GB, 17179869184)
    assert memory.backend == "metal" and memory.device_name == "Apple M1"
    assert memory.available_gb == pytest.approx(11.453251584)
    assert memory.total_gb == pytest.approx(17.179869184)
    assert "Metal recommended working set 11.5 GB" in memory.source


def test_psutil_wins_when_it_is_lower() -> None:
    # A busy 128 GB M5 Max with 40 GB free: the working set (115 GB) is not the limit.
    memory = metal_memory(M5_MAX_128GB, 40.0 * GB, 137438953472)
    assert memory.available_gb == pytest.approx(40.0)
    assert memory.source.startswith("psutil available (below the Metal recommended working set")


def test_working_set_fraction_is_what_the_docs_say() -> None:
    for info in (M1_16GB, M5_MAX_128GB):
        fraction = info["max_recommended_working_set_size"] / info["memory_size"]
        assert 0.6 < fraction < 0.9


@pytest.mark.parametrize(
    "info", [{}, {"memory_size": 17179869184}, {"max_recommended_working_set_size": 0}]
)
def test_missing_or_odd_keys_fall_back_to_psutil(info: dict[str, Any]) -> None:
    memory = metal_memory(info, 9.0 * GB, 16.0 * GB)
    assert memory.available_gb == pytest.approx(9.0)
    assert "psutil" in memory.source


@pytest.mark.parametrize(
    ("ram_gib", "observed_mib"),
    # recommendedMaxWorkingSetSize as llama.cpp and ollama logged it on macOS 13-15
    # (llama.cpp #2209, ollama #434, llama.cpp #1870, #3213).
    [(16, 10922.67), (32, 21845.34), (64, 49152.0), (96, 73728.0)],
)
def test_macos_working_set_rule_matches_public_observations(
    ram_gib: int, observed_mib: float
) -> None:
    assert metal_working_set_gb(ram_gib) * 1e9 / 2**20 == pytest.approx(observed_mib, abs=0.01)


def test_without_a_reported_working_set_the_rule_caps_available() -> None:
    """An MLX that reports nothing: a 32 GB Mac with 30 GB free still gives the GPU only
    what macOS allows, not all 30 GB."""
    memory = metal_memory({}, 30.0 * 2**30, 32.0 * 2**30)
    assert memory.available_gb == pytest.approx(metal_working_set_gb(32))
    assert memory.available_gb < 30.0 * 2**30 / GB
    assert "rule" in memory.source


def _fake_core(new_api: bool, info: dict[str, Any]) -> SimpleNamespace:
    gpu = SimpleNamespace(type="gpu")
    core = SimpleNamespace(cpu="cpu", gpu="gpu", default_device=lambda: gpu)
    if new_api:
        core.device_info = lambda: info
    else:
        core.metal = SimpleNamespace(is_available=lambda: True, device_info=lambda: info)
    return core


@pytest.mark.parametrize(("new_api", "info"), [(False, M1_16GB), (True, M5_MAX_128GB)])
def test_probe_reads_old_and_new_mlx_device_info(
    new_api: bool, info: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pytest_yourai import probe

    monkeypatch.setattr(probe.sys, "platform", "darwin")
    reported = probe.device_info(_fake_core(new_api, info))
    assert reported["backend"] == "metal"
    assert reported["max_recommended_working_set_size"] == info["max_recommended_working_set_size"]
    # What the plugin does with it, end to end through the same pure function.
    memory = metal_memory(reported, 1e12, 1e12)
    assert memory.available_gb == pytest.approx(info["max_recommended_working_set_size"] / GB)


def test_preflight_on_metal_uses_the_working_set(
    bench: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plugin on a (simulated) 16 GB M1: only what MLX reports about Metal is faked."""
    import pytest_yourai.memory as memory_module

    monkeypatch.setattr(memory_module, "detect_backend", lambda: "metal")
    monkeypatch.setattr(memory_module, "_metal_device_info", lambda: dict(M1_16GB))
    monkeypatch.setattr(memory_module, "_DEVICE_INFO", None)
    import pytest_yourai.machine as session_module
    from pytest_yourai.memory import MlxStatus

    monkeypatch.setattr(session_module, "mlx_status", lambda *_: MlxStatus(True, "metal"))
    result = bench.runpytest("-k", "hermes-70b or r1", "--yourai-estimate-only", "-rs")
    result.stdout.fnmatch_lines(["*backend metal (Apple M1)*available = *"])
    records = [
        line
        for line in (bench.path / "benchmark_log.jsonl").read_text().splitlines()
        if '"preflight_check"' in line
    ]
    assert records and all('"backend": "metal"' in line for line in records)
    assert all("available_gb" in line for line in records)
