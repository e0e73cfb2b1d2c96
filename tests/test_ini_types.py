"""Every ``yourai_*`` ini key means the same in every place pytest reads configuration:
native TOML values (``[tool.pytest]``, ``pytest.toml``, pytest 9), strings
(``[tool.pytest.ini_options]``, ``pytest.ini``, ``tox.ini``, ``setup.cfg``) and ``-o``.

The resolved settings are compared key by key, on whichever pytest is installed (the
version matrix runs this file on the newest pytest and on the lowest one claimed).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from packaging.version import Version

from pytest_yourai.settings import OPTIONS
from tests.helpers import TINY_LLAMA_CONFIG

PYTEST = Version(pytest.__version__).release
NATIVE = PYTEST >= (9, 0)

# One value per key, as a user writes it natively: booleans, numbers, arrays.
NATIVE_VALUES: dict[str, Any] = {
    "yourai_enable": True,
    "yourai_force": True,
    "yourai_log": "logs/benchmark.jsonl",
    "yourai_presets_file": "presets.toml",
    "yourai_lora_config": ["lora.yaml", "other.yaml"],
    "yourai_presets": ["tiny-llama", "my-model"],
    "yourai_timeout": 120.5,
    "yourai_safety_gb": 1,
    "yourai_max_memory": 8,
    "yourai_probe_command": ["python", "probe.py", "--flag"],
    "yourai_estimate_only": True,
    "yourai_config": "fit",
    "yourai_in_flight": "bounded",
    "yourai_json": "out/results.json",
    "yourai_plot": "out/map.png",
    "yourai_baseline_save": True,
    "yourai_baseline_compare": True,
    "yourai_baseline_require": True,
    "yourai_fail_on_growth": 7.5,
    "yourai_baseline_dir": "baselines",
    "yourai_search": True,
    "yourai_trust_remote_code": True,
    "yourai_forget_machine": True,
}

# The same values as an ini file holds them: strings, lists as a shell splits them (the
# presets' released comma form included).
STRING_VALUES: dict[str, str] = {
    **{key: str(value).lower() for key, value in NATIVE_VALUES.items() if value is True},
    "yourai_log": "logs/benchmark.jsonl",
    "yourai_presets_file": "presets.toml",
    "yourai_lora_config": "lora.yaml other.yaml",
    "yourai_presets": "tiny-llama,my-model",
    "yourai_timeout": "120.5",
    "yourai_safety_gb": "1",
    "yourai_max_memory": "8",
    "yourai_probe_command": "python probe.py --flag",
    "yourai_config": "fit",
    "yourai_in_flight": "bounded",
    "yourai_json": "out/results.json",
    "yourai_plot": "out/map.png",
    "yourai_fail_on_growth": "7.5",
    "yourai_baseline_dir": "baselines",
}

DUMP_CONFTEST = """
import dataclasses, json, os
from pytest_yourai.plugin import SESSION_KEY

def pytest_sessionstart(session):
    settings = session.config.stash[SESSION_KEY].settings
    with open(os.environ["YOURAI_SETTINGS_DUMP"], "w") as out:
        json.dump(dataclasses.asdict(settings), out, default=str)
"""

PRESETS = """
[presets.my-model]
model_type = "llama"
hidden_size = 64
num_hidden_layers = 2
intermediate_size = 128
num_attention_heads = 2
vocab_size = 256
seq_len = 32
"""


def toml_value(value: Any) -> str:
    return json.dumps(value)  # JSON's scalars and arrays of strings are TOML too


def ini_lines(values: dict[str, Any], render: Any = str) -> str:
    return "".join(f"{key} = {render(value)}\n" for key, value in values.items())


LAYOUTS: dict[str, tuple[str, str]] = {
    "native [tool.pytest]": (
        "pyproject.toml",
        "[tool.pytest]\n" + ini_lines(NATIVE_VALUES, toml_value),
    ),
    "native pytest.toml": ("pytest.toml", "[pytest]\n" + ini_lines(NATIVE_VALUES, toml_value)),
    "[tool.pytest.ini_options]": (
        "pyproject.toml",
        "[tool.pytest.ini_options]\n" + ini_lines(STRING_VALUES, toml_value),
    ),
    "pytest.ini": ("pytest.ini", "[pytest]\n" + ini_lines(STRING_VALUES)),
    "tox.ini": ("tox.ini", "[pytest]\n" + ini_lines(STRING_VALUES)),
    "setup.cfg": ("setup.cfg", "[tool:pytest]\n" + ini_lines(STRING_VALUES)),
    "-o": ("", ""),
}


def resolved(pytester: pytest.Pytester, layout: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    pytester.makeconftest(DUMP_CONFTEST)
    pytester.path.joinpath("presets.toml").write_text(PRESETS)
    (pytester.path / "model").mkdir(exist_ok=True)
    pytester.path.joinpath("model", "config.json").write_text(json.dumps(TINY_LLAMA_CONFIG))
    for name in ("lora.yaml", "other.yaml"):
        pytester.path.joinpath(name).write_text("model: model\nbatch_size: 1\nnum_layers: 2\n")
    pytester.makepyfile(test_nothing="def test_nothing():\n    pass\n")
    dump = pytester.path / "settings.json"
    monkeypatch.setenv("YOURAI_SETTINGS_DUMP", str(dump))
    name, text = LAYOUTS[layout]
    args = ["--co", "-q", "-p", "no:cacheprovider"]
    if name:
        pytester.path.joinpath(name).write_text(text)
    else:
        for key, value in STRING_VALUES.items():
            args += ["-o", f"{key}={value}"]
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.OK, result.stdout.str() + result.stderr.str()
    return json.loads(dump.read_text())


def test_the_tables_cover_every_ini_key() -> None:
    keys = {option.ini for option in OPTIONS if option.ini} | {"yourai_enable"}
    assert keys == set(NATIVE_VALUES) == set(STRING_VALUES)


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "native [tool.pytest]"])
def test_every_key_resolves_the_same_in_every_format(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, layout: str
) -> None:
    if "native" in layout and not NATIVE:
        pytest.skip(f"pytest {pytest.__version__} reads no native TOML configuration")
    # The reference: native values where this pytest reads them, else pytest.ini's strings.
    reference_layout = "native [tool.pytest]" if NATIVE else "pytest.ini"
    if layout == reference_layout:
        pytest.skip("the reference itself")
    other = resolved(pytester, layout, monkeypatch)
    for name in list(pytester.path.iterdir()):
        if name.name in ("pyproject.toml", "pytest.toml", "pytest.ini", "tox.ini", "setup.cfg"):
            name.unlink()
    reference = resolved(pytester, reference_layout, monkeypatch)
    assert set(other) == set(reference)
    for key in reference:
        assert other[key] == reference[key], (
            f"{key}: {layout} {other[key]!r}, {reference_layout} {reference[key]!r}"
        )
    # and every value came from the configuration, not from a default
    assert all(source.startswith("ini ") for source in reference["sources"].values())


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("yourai_force", '"yes"', "*ini yourai_force:*"),
        ("yourai_timeout", "true", "*ini yourai_timeout:*"),
        ("yourai_presets", "3", "*ini yourai_presets:*"),
    ],
)
def test_a_native_value_of_the_wrong_type_names_the_key(
    pytester: pytest.Pytester, key: str, value: str, expected: str
) -> None:
    if not NATIVE:
        pytest.skip(f"pytest {pytest.__version__} reads no native TOML configuration")
    pytester.makepyfile(test_nothing="def test_nothing():\n    pass\n")
    pytester.path.joinpath("pyproject.toml").write_text(f"[tool.pytest]\n{key} = {value}\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([expected])
    assert "Traceback" not in result.stderr.str()


def test_a_bad_ini_boolean_names_the_key(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_nothing="def test_nothing():\n    pass\n")
    pytester.makeini("[pytest]\nyourai_force = maybe\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*ini yourai_force:*maybe*"])
    assert "Traceback" not in result.stderr.str()
