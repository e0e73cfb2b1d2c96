"""Options and ini keys, resolved once with one precedence: command line > ini > default.

Every option defaults to None on the command line so that ini values apply; each
validation error names where the bad value came from.
"""

from __future__ import annotations

import importlib.util
import math
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from packaging.version import Version

from pytest_yourai.autoconfig import CONFIG_POLICIES
from pytest_yourai.errors import YouraiUsageError
from pytest_yourai.fields import DEFAULT_LOG, DEFAULT_SAFETY_GB, DEFAULT_TIMEOUT_S, IN_FLIGHT_MODES


@dataclass(frozen=True)
class Option:
    flag: str
    ini: str | None
    help: str
    kind: str  # a key of _INI_TYPES: "bool" | "float" | "percent" | "path" | "choice" | ...
    default: Any = None
    choices: tuple[str, ...] = ()
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def ini_type(self) -> Any:
        """The type pytest checks and converts the ini value to, as this pytest knows them.

        A native ``[tool.pytest]`` table (pytest 9) must then hold a TOML boolean, number or
        array where the key is one, as a user writes it; ini files, ``[tool.pytest.ini_options]``
        and ``-o`` keep giving strings, which pytest converts the same way. Where this pytest
        lacks a type (``float`` before 8.4, unions before 9.2) the key is read as a string
        and converted here, as before.
        """
        return _INI_TYPES[self.kind]


_PYTEST = Version(pytest.__version__).release
_FLOAT = "float" if _PYTEST >= (8, 4) else "string"
# The kinds of OPTIONS, as pytest's ini types. A percent may be written "5%" too, so where
# pytest knows unions it is a number or a string.
_INI_TYPES: dict[str, Any] = {
    "bool": "bool",
    "float": _FLOAT,
    "percent": float | str if _PYTEST >= (9, 2) else _FLOAT,
    "str": "string",
    "path": "string",
    "choice": "string",
    "list": "args",
    "command": "args",
    # pytest 8.0's "paths" fails without an ini file (-o alone); "args" are resolved here alike
    "paths": "paths" if _PYTEST >= (8, 1) else "args",
}


OPTIONS: tuple[Option, ...] = (
    Option(
        "--yourai-force",
        "yourai_force",
        "run presets even when pre-flight says they do not fit, and below the safety threshold",
        "bool",
        False,
    ),
    Option(
        "--yourai-log",
        "yourai_log",
        f"append-only JSONL event log (default: {DEFAULT_LOG} in the invocation directory)",
        "path",
        DEFAULT_LOG,
        metavar="PATH",
    ),
    Option(
        "--yourai-presets-file",
        "yourai_presets_file",
        "TOML file of extra presets, one [presets.NAME] table each",
        "path",
        None,
        metavar="PATH",
    ),
    Option(
        "--yourai-lora-config",
        "yourai_lora_config",
        "an mlx_lm.lora YAML config (model, data, options) to benchmark as a preset named "
        "after the file; repeatable",
        "paths",
        None,
        metavar="PATH",
    ),
    Option(
        "--yourai-trust-remote-code",
        "yourai_trust_remote_code",
        "let the tokenizer of an --yourai-lora-config model run its own code (its "
        "trust_remote_code); a YAML's trust_remote_code alone never does",
        "bool",
        False,
    ),
    Option(
        "--yourai-forget-machine",
        "yourai_forget_machine",
        "start this machine's record afresh: forget what its earlier probes taught the "
        "estimate (the record is kept in pytest's cache; see docs/estimator.md)",
        "bool",
        False,
    ),
    Option(
        "--yourai-presets",
        "yourai_presets",
        "comma-separated preset names to benchmark (default: all)",
        "list",
        None,
        metavar="NAMES",
    ),
    Option(
        "--yourai-timeout",
        "yourai_timeout",
        f"seconds before a probe is killed (default: {DEFAULT_TIMEOUT_S:g})",
        "float",
        DEFAULT_TIMEOUT_S,
        metavar="S",
    ),
    Option(
        "--yourai-safety-gb",
        "yourai_safety_gb",
        f"stop the whole run when available memory is below this (default: {DEFAULT_SAFETY_GB:g})",
        "float",
        DEFAULT_SAFETY_GB,
        metavar="GB",
    ),
    Option(
        "--yourai-max-memory",
        "yourai_max_memory",
        "count at most this many GB as available (rehearse a smaller machine)",
        "float",
        None,
        metavar="GB",
    ),
    Option(
        "--yourai-probe-command",
        "yourai_probe_command",
        "run this command instead of the MLX probe; it gets YOURAI_PROBE_SPEC and must print "
        "a BENCHMARK_RESULT: {json} line",
        "command",
        None,
        metavar="CMD",
    ),
    Option(
        "--yourai-estimate-only",
        "yourai_estimate_only",
        "pre-flight and log every preset, spawn nothing",
        "bool",
        False,
    ),
    Option(
        "--yourai-config",
        "yourai_config",
        "config policy: seed (the original Rust CLI's safe-config table) or fit (largest "
        "batch, rank, layers whose conservative estimate fits)",
        "choice",
        "seed",
        CONFIG_POLICIES,
        metavar="POLICY",
    ),
    Option(
        "--yourai-in-flight",
        "yourai_in_flight",
        "how far MLX may encode ahead of the device, as the fine-tune will run it: mlx "
        "(default: MLX's own limits, what mlx_lm.lora runs) or bounded "
        "(MLX_MAX_OPS_PER_BUFFER=1 MLX_MAX_MB_PER_BUFFER=1: smaller, slower)",
        "choice",
        "mlx",
        IN_FLIGHT_MODES,
        metavar="MODE",
    ),
    Option(
        "--yourai-json",
        "yourai_json",
        "write machine info and per-preset results as JSON to PATH",
        "path",
        None,
        metavar="PATH",
    ),
    Option(
        "--yourai-plot",
        "yourai_plot",
        "plot estimated vs measured peaks against available memory to PATH (.png or .svg; "
        "needs the 'plot' extra)",
        "path",
        None,
        metavar="PATH",
    ),
    Option(
        "--yourai-baseline-save",
        "yourai_baseline_save",
        "store the measured peaks as this machine's baseline",
        "bool",
        False,
    ),
    Option(
        "--yourai-baseline-compare",
        "yourai_baseline_compare",
        "fail presets whose peak grew beyond --yourai-fail-on-growth over the baseline",
        "bool",
        False,
    ),
    Option(
        "--yourai-baseline-require",
        "yourai_baseline_require",
        "with --yourai-baseline-compare: fail a preset that has no baseline for its config, "
        "in-flight mode and machine",
        "bool",
        False,
    ),
    Option(
        "--yourai-fail-on-growth",
        "yourai_fail_on_growth",
        "allowed peak growth over the baseline, in percent, e.g. 5 (default: 5)",
        "percent",
        "5",
        metavar="PCT",
    ),
    Option(
        "--yourai-baseline-dir",
        "yourai_baseline_dir",
        "where baselines live (default: .yourai/baselines under the rootdir)",
        "path",
        None,
        metavar="DIR",
    ),
    Option(
        "--yourai-search",
        "yourai_search",
        "find each preset's largest batch size, then rank, then layers that fits "
        "(the estimator proposes, the probe confirms)",
        "bool",
        False,
    ),
)


@dataclass(frozen=True)
class Settings:
    force: bool
    log_path: Path
    presets_file: Path | None
    lora_configs: tuple[Path, ...]
    trust_remote_code: bool
    forget_machine: bool
    preset_names: tuple[str, ...] | None
    timeout_s: float
    safety_gb: float
    max_memory_gb: float | None
    probe_command: tuple[str, ...] | None
    estimate_only: bool
    config_policy: str
    in_flight: str
    json_path: Path | None
    plot_path: Path | None
    baseline_save: bool
    baseline_compare: bool
    baseline_require: bool
    fail_on_growth: float  # a fraction: 0.05 for 5%
    baseline_dir: Path
    search: bool
    # Where each value came from ("--yourai-log", "ini yourai_log", "default"), by dest.
    sources: dict[str, str]

    def source(self, dest: str) -> str:
        return self.sources.get(dest, dest)


DISABLE_FLAG, ENABLE_INI = "--yourai-disable", "yourai_enable"


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("yourai", "yourai: MLX LoRA memory benchmarks")
    group.addoption(
        DISABLE_FLAG,
        action="store_true",
        default=False,
        dest="yourai_disable",
        help="turn the plugin off: benchmark tests are skipped, nothing is logged "
        "(ini: yourai_enable = false)",
    )
    parser.addini(ENABLE_INI, "false turns pytest-yourai off", type="bool", default=None)
    for option in OPTIONS:
        action = {"bool": "store_true", "paths": "append"}.get(option.kind, "store")
        shown = {} if option.kind == "bool" else {"metavar": option.metavar}
        group.addoption(
            option.flag, action=action, default=None, dest=option.dest, help=option.help, **shown
        )
        if option.ini is not None:
            # default None: an unset key is told apart from one set to the default.
            parser.addini(option.ini, option.help, type=option.ini_type, default=None)


def disabled(config: pytest.Config) -> bool:
    """--yourai-disable, or ini yourai_enable = false (checked before anything else)."""
    if config.getoption("yourai_disable", False):
        return True
    value = _ini(config, ENABLE_INI)
    return value is not None and not _as_bool(value, f"ini {ENABLE_INI}")


def _ini(config: pytest.Config, key: str) -> Any:
    """The ini value as pytest converted it to the key's type; None when it is not set.

    pytest's own type errors (a TOML string where a boolean belongs, "maybe" for a bool)
    become usage errors that name the key.
    """
    try:
        value = config.getini(key)
    except (pytest.UsageError, TypeError, ValueError) as exc:
        raise YouraiUsageError(f"ini {key}: {exc}") from None
    return None if value in (None, "", []) else value


def _raw(config: pytest.Config, option: Option) -> tuple[Any, str]:
    """The option's raw value and where it came from."""
    value = config.getoption(option.dest, None)
    if value is not None:
        return value, option.flag
    if option.ini is not None:
        ini_value = _ini(config, option.ini)
        if ini_value is not None:
            return ini_value, f"ini {option.ini}"
    return option.default, "default"


def _as_float(value: Any, source: str, *, allow_zero: bool = True) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise YouraiUsageError(f"{source}: expected a number, got {value!r}") from None
    if math.isnan(number) or math.isinf(number) or number < 0 or (number == 0 and not allow_zero):
        what = "a non-negative" if allow_zero else "a positive"
        raise YouraiUsageError(f"{source}: expected {what} number, got {value!r}")
    return number


def _as_bool(value: Any, source: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise YouraiUsageError(f"{source}: expected true or false, got {value!r}")


def _as_names(value: Any, source: str) -> tuple[str, ...]:
    text = ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise YouraiUsageError(f"{source}: expected preset names, got {value!r}")
    return names


def _as_command(value: Any, source: str) -> tuple[str, ...]:
    if isinstance(value, list | tuple):  # an ini value, split by pytest ("args")
        value = shlex.join(map(str, value))
    try:
        argv = tuple(shlex.split(str(value)))
    except ValueError as exc:
        raise YouraiUsageError(f"{source}: cannot parse command {value!r}: {exc}") from None
    if not argv:
        raise YouraiUsageError(f"{source}: empty command")
    return argv


def _as_percent(value: Any, source: str) -> float:
    text = str(value).strip()
    number = _as_float(text[:-1] if text.endswith("%") else text, source)
    return number / 100


def _as_positive(value: Any, source: str) -> float:
    return _as_float(value, source, allow_zero=False)


class _Reader:
    """Each option's value, from the command line or the ini file, converted so that an
    error names where it came from."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.by_dest = {option.dest: option for option in OPTIONS}
        self.invocation = Path(config.invocation_params.dir)
        # Paths from an ini file are relative to that file, as pytest's own "paths" ini type.
        inipath = config.inipath
        self.ini_dir = Path(inipath).parent if inipath is not None else self.invocation

    def get(self, dest: str, convert: Callable[[Any, str], Any]) -> Any:
        value, source = _raw(self.config, self.by_dest[dest])
        return None if value is None else convert(value, source)

    def path(self, value: Any, source: str) -> Path:
        text = str(value).strip()
        if not text:
            raise YouraiUsageError(f"{source}: expected a path, got an empty value")
        path = Path(text).expanduser()
        base = self.ini_dir if source.startswith("ini ") else self.invocation
        return path if path.is_absolute() else base / path

    def paths(self, value: Any, source: str) -> tuple[Path, ...]:
        # pytest's "paths" ini type gives them relative to the ini file already
        return tuple(self.path(item, source) for item in value)

    def plot(self, value: Any, source: str) -> Path:
        path = self.path(value, source)
        if path.suffix.lower() not in (".png", ".svg"):
            raise YouraiUsageError(f"{source}: plot file must end in .png or .svg, got {value!r}")
        if importlib.util.find_spec("matplotlib") is None:
            raise YouraiUsageError(
                f"{source}: plotting needs matplotlib: pip install 'pytest-yourai[plot]'"
            )
        return path

    def choice(self, dest: str) -> str:
        choices = self.by_dest[dest].choices

        def convert(value: Any, source: str) -> str:
            text = str(value).strip()
            if text not in choices:
                raise YouraiUsageError(
                    f"{source}: unknown value {text!r}; expected one of {', '.join(choices)}"
                )
            return text

        return str(self.get(dest, convert))


def resolve(config: pytest.Config) -> Settings:
    read = _Reader(config)
    get = read.get
    baseline_dir = get("yourai_baseline_dir", read.path)
    return Settings(
        force=bool(get("yourai_force", _as_bool)),
        log_path=get("yourai_log", read.path),
        presets_file=get("yourai_presets_file", read.path),
        lora_configs=get("yourai_lora_config", read.paths) or (),
        trust_remote_code=bool(get("yourai_trust_remote_code", _as_bool)),
        forget_machine=bool(get("yourai_forget_machine", _as_bool)),
        preset_names=get("yourai_presets", _as_names),
        timeout_s=get("yourai_timeout", _as_positive),
        safety_gb=get("yourai_safety_gb", _as_float),
        max_memory_gb=get("yourai_max_memory", _as_positive),
        probe_command=get("yourai_probe_command", _as_command),
        estimate_only=bool(get("yourai_estimate_only", _as_bool)),
        config_policy=read.choice("yourai_config"),
        in_flight=read.choice("yourai_in_flight"),
        json_path=get("yourai_json", read.path),
        plot_path=get("yourai_plot", read.plot),
        baseline_save=bool(get("yourai_baseline_save", _as_bool)),
        baseline_compare=bool(get("yourai_baseline_compare", _as_bool)),
        baseline_require=bool(get("yourai_baseline_require", _as_bool)),
        fail_on_growth=get("yourai_fail_on_growth", _as_percent),
        baseline_dir=baseline_dir or Path(config.rootpath) / ".yourai" / "baselines",
        search=bool(get("yourai_search", _as_bool)),
        sources={option.dest: _raw(config, option)[1] for option in OPTIONS},
    )


# -- the yourai marker -----------------------------------------------------------------

MARKER_KEYWORDS = ("max_peak_gb",)
MARKER_HELP = (
    "yourai(max_peak_gb=None): a pytest-yourai benchmark; max_peak_gb fails a preset whose "
    "measured peak exceeds it"
)


def check_marker(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str | None:
    """What is wrong with a ``@pytest.mark.yourai(...)``, as the rest of the error line."""
    unknown = sorted(set(kwargs) - set(MARKER_KEYWORDS))
    if args or unknown:
        what = ", ".join(unknown) if unknown else "positional arguments"
        return f": unknown {what}; it takes {', '.join(MARKER_KEYWORDS)}"
    budget = kwargs.get("max_peak_gb")
    if budget is not None and (
        not isinstance(budget, int | float) or isinstance(budget, bool) or budget <= 0
    ):
        return f"(max_peak_gb={budget!r}): expected a positive number of GB"
    return None
