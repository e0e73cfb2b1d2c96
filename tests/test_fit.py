"""The fit map (``yourai fit``): every cell is the pre-flight's own decision for a machine of
that size, ``--need`` is the pre-flight's conservative figure, and the README's map is fresh."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from pytest_yourai.fit import MAC_SIZES_GB, available_for, fit_map
from pytest_yourai.memory import detect_backend, metal_working_set_gb
from pytest_yourai.presets import builtin_presets
from tests.helpers import events, read_log

ROOT = Path(__file__).parent.parent
CONFIG_FIELDS = ("batch_size", "lora_rank", "lora_layers", "seq_len", "estimated_conservative_gb")


def yourai_fit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_yourai.fit", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def preflight_records(bench: pytest.Pytester, *args: str) -> dict[str, dict[str, Any]]:
    """The pre-flight's decisions, as its log records them, for an estimate-only run."""
    log = bench.path / f"log-{len(list(bench.path.glob('log-*')))}.jsonl"
    result = bench.runpytest(
        "--yourai-estimate-only", "--yourai-timeout", "1e9", "--yourai-log", str(log), *args
    )
    assert result.ret == 0, result.stdout.str()[-2000:]
    return {r["preset"]: r for r in events(read_log(log), "preflight_check")}


def assert_cell_is_the_preflight(cell: dict[str, Any], record: dict[str, Any]) -> None:
    assert cell["fits"] == (record["decision"] == "run"), (cell, record)
    for name in CONFIG_FIELDS:
        expected = record[name] if cell["fits"] else None
        assert cell[name] == expected, (name, cell, record)


def test_every_cell_is_the_preflights_decision(bench: pytest.Pytester) -> None:
    """For machines this one can stand in for (``--yourai-max-memory`` only lowers what is
    available), each preset's cell is what the pre-flight decides with the fit policy."""
    free_gb = psutil.virtual_memory().available / 1e9
    sizes = [s for s in (3.0, 4.5, 6.0, 9.0, 12.0, 16.0) if s < free_gb - 1.0]
    assert len(sizes) >= 3, f"only {free_gb:.1f} GB free here"
    document = fit_map(list(builtin_presets().values()), sizes, "cpu", "mlx", 2.0)
    fitting = 0
    for size in sizes:
        records = preflight_records(
            bench, "--yourai-config", "fit", "--yourai-max-memory", f"{size:g}"
        )
        assert set(records) == set(builtin_presets())
        for cell in (c for c in document["cells"] if c["memory_gb"] == size):
            assert_cell_is_the_preflight(cell, records[cell["preset"]])
            fitting += cell["fits"]
    # The sizes cross real boundaries: some cells fit and some do not.
    assert 0 < fitting < len(document["cells"])


def test_a_cell_follows_the_safety_margin_and_in_flight_mode(bench: pytest.Pytester) -> None:
    document = fit_map([builtin_presets()["r1-distill-14b"]], [16.0], "cpu", "bounded", 5.0)
    (cell,) = document["cells"]
    records = preflight_records(
        bench,
        "--yourai-config", "fit", "--yourai-max-memory", "16",
        "--yourai-safety-gb", "5", "--yourai-in-flight", "bounded",
        "-k", "r1-distill-14b",
    )  # fmt: skip
    assert_cell_is_the_preflight(cell, records["r1-distill-14b"])


def test_a_mac_size_is_what_macos_gives_the_gpu(
    bench: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ "16 GB" on Metal is a 16 GB Mac: the pre-flight on a (simulated) 16 GB Mac whose MLX
    reports no working set decides as the map's 16 GB column does."""
    if psutil.virtual_memory().available < 12 * 2**30:
        pytest.skip("needs more free memory than a 16 GB Mac's working set")
    import pytest_yourai.machine as session_module
    import pytest_yourai.memory as memory_module
    from pytest_yourai.memory import MlxStatus

    monkeypatch.setattr(memory_module, "detect_backend", lambda: "metal")
    monkeypatch.setattr(memory_module, "_metal_device_info", lambda: {"memory_size": 16 * 2**30})
    monkeypatch.setattr(memory_module, "_DEVICE_INFO", None)
    monkeypatch.setattr(session_module, "mlx_status", lambda *_: MlxStatus(True, "metal"))
    records = preflight_records(bench, "--yourai-config", "fit")
    assert available_for(16, "metal") == metal_working_set_gb(16)
    document = fit_map(list(builtin_presets().values()), [16.0], "metal", "mlx", 2.0)
    for cell in document["cells"]:
        record = records[cell["preset"]]
        assert record["available_gb"] == pytest.approx(metal_working_set_gb(16), abs=1e-3)
        assert_cell_is_the_preflight(cell, record)


def test_json_contract() -> None:
    proc = yourai_fit("--backend", "cuda", "--json", "--memory", "24,80")
    assert proc.returncode == 0, proc.stderr
    document = json.loads(proc.stdout)
    assert set(document) == {"backend", "in_flight", "safety_gb", "cells"}
    settings = (document["backend"], document["in_flight"], document["safety_gb"])
    assert settings == ("cuda", "mlx", 2.0)
    fields = {"preset", "memory_gb", "fits", *CONFIG_FIELDS}
    assert len(document["cells"]) == 2 * len(builtin_presets())
    assert all(set(c) == fields for c in document["cells"])
    assert {c["fits"] for c in document["cells"]} == {True, False}
    for c in document["cells"]:
        if not c["fits"]:
            assert all(c[name] is None for name in CONFIG_FIELDS)
        else:
            assert c["estimated_conservative_gb"] <= c["memory_gb"] - 2.0


def test_backend_defaults_to_this_machines() -> None:
    """Without --backend: metal on a Mac, elsewhere the backend the plugin infers for this
    machine (memory.detect_backend, as a run with a custom probe sees it); --backend wins."""
    expected = "metal" if sys.platform == "darwin" else detect_backend()
    default = yourai_fit("--json", "--memory", "24,80", "--presets", "tiny-llama,llama-8b")
    assert default.returncode == 0, default.stderr
    document = json.loads(default.stdout)
    assert document["backend"] == expected
    explicit = yourai_fit(
        "--json", "--memory", "24,80", "--presets", "tiny-llama,llama-8b", "--backend", expected
    )
    assert json.loads(explicit.stdout) == document
    other = next(b for b in ("cuda", "cpu") if b != expected)
    chosen = yourai_fit("--json", "--memory", "24", "--backend", other)
    assert chosen.returncode == 0, chosen.stderr
    assert json.loads(chosen.stdout)["backend"] == other


def test_default_sizes_and_markdown() -> None:
    proc = yourai_fit("--backend", "metal")
    assert proc.returncode == 0, proc.stderr
    header = proc.stdout.splitlines()[0]
    assert header.count(" GB") == len(MAC_SIZES_GB)
    assert all(f"| `{name}` |" in proc.stdout for name in builtin_presets())
    gpu = yourai_fit("--backend", "cuda", "--presets", "llama-8b")
    assert "| 80 GB |" in gpu.stdout.splitlines()[0]


def test_more_memory_never_fits_less() -> None:
    """A preset that fits a size fits every larger one (the configs may trade batch for
    layers, but what fits stays fitting)."""
    document = fit_map(list(builtin_presets().values()), MAC_SIZES_GB, "metal", "mlx", 2.0)
    for name in builtin_presets():
        row = [c["fits"] for c in document["cells"] if c["preset"] == name]
        assert row == sorted(row), (name, row)


@pytest.mark.parametrize("mode", ["mlx", "bounded"])
def test_need_is_the_preflights_conservative_figure(bench: pytest.Pytester, mode: str) -> None:
    config = {**builtin_presets()["dolphin-8b"].architecture}
    (bench.path / "config.json").write_text(json.dumps(config))
    (bench.path / "presets.toml").write_text(
        '[presets.mine]\nconfig = "config.json"\nbatch_size = 2\nlora_rank = 16\n'
        "lora_layers = 8\nseq_len = 1024\n"
    )
    proc = yourai_fit(
        "--need", "--config", str(bench.path / "config.json"), "--backend", "cpu", "--json",
        "--batch-size", "2", "--lora-rank", "16", "--lora-layers", "8", "--seq-len", "1024",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    needs = {n["in_flight"]: n for n in json.loads(proc.stdout)["needs"]}
    assert set(needs) == {"mlx", "bounded"}
    record = preflight_records(
        bench, "--yourai-presets-file", "presets.toml", "--yourai-presets", "mine",
        "--yourai-in-flight", mode,
    )["mine"]  # fmt: skip
    for name in ("estimated_base_gb", "estimated_conservative_gb", "batch_size", "seq_len"):
        assert needs[mode][name] == record[name], name
    text = yourai_fit(
        "--need", "--config", str(bench.path / "config.json"), "--backend", "cpu",
        "--batch-size", "2", "--lora-rank", "16", "--lora-layers", "8", "--seq-len", "1024",
    ).stdout  # fmt: skip
    assert f"conservative {record['estimated_conservative_gb']:.2f} GB" in text


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--memory", "16,lots"], 4, "--memory '16,lots'"),
        (["--memory", "-8"], 4, "--memory '-8'"),
        (["--memory", ""], 4, "--memory ''"),
        (["--presets-file", "missing.toml"], 4, "missing.toml"),
        (["--presets", "no-such-model"], 4, "no-such-model"),
        (["--plot", "/no/such/dir/map.png"], 4, "/no/such/dir"),
        (["--plot", "map.jpeg"], 4, "map.jpeg"),
        (["--safety-gb", "nan"], 2, "'nan'"),
        (["--batch-size", "0"], 2, "'0'"),
        (["--need"], 2, "--need takes one --preset"),
    ],
)
def test_bad_input_is_one_line(args: list[str], code: int, message: str) -> None:
    proc = yourai_fit("--backend", "cpu", *args)
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_heat_map_is_an_image(tmp_path: Path) -> None:
    if importlib.util.find_spec("matplotlib") is None:  # drawn in a child: not imported here
        pytest.skip("matplotlib is not installed (the plot extra)")
    for suffix, magic in ((".png", b"\x89PNG"), (".svg", b"<?xml")):
        path = tmp_path / f"map{suffix}"
        proc = yourai_fit("--backend", "metal", "--plot", str(path))
        assert proc.returncode == 0, proc.stderr
        assert path.read_bytes().startswith(magic)


def test_the_readme_fit_map_is_generated() -> None:
    readme = (ROOT / "README.md").read_text()
    start, end = "<!-- fit-map:start -->\n", "<!-- fit-map:end -->"
    shown = readme.split(start, 1)[1].split(end, 1)[0]
    command = re.search(r"`(yourai fit [^`]*)`", readme.split(start, 1)[0])
    assert command is not None
    fresh = yourai_fit(*shlex.split(command.group(1))[2:])
    assert fresh.returncode == 0, fresh.stderr
    assert shown == fresh.stdout, "README's fit map is stale: rerun the command above it"
