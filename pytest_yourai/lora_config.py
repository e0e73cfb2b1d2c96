"""An ``mlx_lm.lora`` YAML config, read the way the installed mlx-lm reads it, without
importing mlx or mlx_lm (``mlx_lm.lora`` imports mlx at import time; the pytest process
never may).

The defaults are the installed mlx-lm's own ``CONFIG_DEFAULTS``, read from its source with
``ast``; the YAML goes through a private copy of the float resolver that mlx-lm adds to the
global ``yaml.SafeLoader``. Where mlx-lm would run a typo silently, crash mid-run or train
something other than what was written, this module refuses with one line that names the
file, the key and the value.
"""

from __future__ import annotations

import ast
import copy
import difflib
import functools
import importlib.util
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped,unused-ignore]

from pytest_yourai.errors import YouraiUsageError

FINE_TUNE_TYPES = ("lora", "dora", "full")  # lora.py's --fine-tune-type choices
OPTIMIZERS = ("adam", "adamw", "muon", "sgd", "adafactor")  # --optimizer choices
LORA_PARAMETER_KEYS = ("rank", "scale", "dropout", "keys")
# Keys mlx-lm reads with getattr (tuner/datasets.py), so no CONFIG_DEFAULTS lists them;
# "wandb" is the key of mlx-lm <= 0.28 that report_to replaced (now kept and ignored).
FEATURE_KEYS = ("prompt_feature", "completion_feature", "text_feature", "chat_feature")
EXTRA_KEYS = ("hf_dataset", *FEATURE_KEYS, "wandb")
# Old names still found in configs, and the key mlx-lm reads now (#903 renamed it).
_RENAMED = {"lora_layers": "num_layers"}
# Flags whose argparse default is not None, so a YAML value never reaches run() (brief: lora.py
# --trust-remote-code is store_true, --clear-cache-threshold defaults to 0).
_FIXED_FLAGS: dict[str, Any] = {"trust_remote_code": False, "clear_cache_threshold": 0}

# mlx_lm/lora.py's resolver, verbatim: YAML 1.1 wants a dot in a float, so without it
# ``1e-5`` would be the string "1e-5".
_MLX_LM_FLOAT = re.compile(
    """^(?:
     [-+]?(?:[0-9][0-9_]*)\\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\\.[0-9_]*
    |[-+]?\\.(?:inf|Inf|INF)
    |\\.(?:nan|NaN|NAN))$""",
    re.X,
)
# A subclass: mlx-lm adds its resolver to yaml.SafeLoader itself, for every pyyaml user.
YAML_LOADER: Any = type("MlxLmLoraLoader", (yaml.SafeLoader,), {})
YAML_LOADER.add_implicit_resolver("tag:yaml.org,2002:float", _MLX_LM_FLOAT, list("-+0123456789."))

# Integer keys and the least value that runs: the trainer raises below 1 accumulation step,
# `it % 0` crashes, -1 batches means the whole set, numpy refuses negative seeds.
_INT_FLOORS = {
    "batch_size": 1,
    "grad_accumulation_steps": 1,
    "max_seq_length": 1,
    "iters": 1,
    "steps_per_eval": 1,
    "steps_per_report": 1,
    "save_every": 1,
    "val_batches": -1,
    "test_batches": -1,
    "seed": 0,
}
_BOOLS = ("train", "test", "grad_checkpoint", "mask_prompt", "trust_remote_code")
_STRINGS = ("model", "data", "adapter_path", "resume_adapter_file", "report_to", "project_name")
_MAPPINGS = ("optimizer_config", "lora_parameters", "lr_schedule")


@dataclass(frozen=True)
class LoraRun:
    """What ``mlx_lm.lora --config FILE`` would train, in the terms the estimate needs.

    ``optimizer`` is lowercased and ``optimizer_config`` holds the keyword arguments of that
    optimizer alone, as mlx-lm applies them. The ``lora_*`` fields are None for ``full``
    (mlx-lm drops ``lora_parameters`` then); ``lora_keys`` None means every linear of a
    block. ``raw`` is the namespace mlx-lm's ``run()`` would get, with no other flag.
    """

    source: Path
    model: str
    data: str
    fine_tune_type: str
    optimizer: str
    optimizer_config: Mapping[str, Any]
    num_layers: int
    batch_size: int
    max_seq_length: int
    lora_rank: int | None
    lora_scale: float | None
    lora_dropout: float | None
    lora_keys: tuple[str, ...] | None
    grad_checkpoint: bool
    grad_accumulation_steps: int
    mask_prompt: bool
    val_batches: int
    steps_per_eval: int
    iters: int
    # mlx-lm 0.32 never hands its threshold to the trainer, which then clears every step.
    clear_cache_threshold_effective: int
    # mlx-lm ignores the YAML key (the flag's default is not None): later code decides.
    trust_remote_code_requested: bool
    raw: Mapping[str, Any]


def _mlx_lm_lora_py() -> Path:
    try:  # a top-level find_spec locates the package without running it
        spec = importlib.util.find_spec("mlx_lm")
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(folder) / "lora.py").is_file():
            return Path(folder) / "lora.py"
    raise YouraiUsageError(
        "mlx-lm is not installed (no mlx_lm/lora.py): an mlx_lm.lora config takes its "
        "defaults from it; pip install mlx-lm"
    )


@functools.cache
def _installed_defaults() -> Mapping[str, Any]:
    """CONFIG_DEFAULTS, read from the installed lora.py's source (importing it imports mlx)."""
    source = _mlx_lm_lora_py()
    try:
        tree = ast.parse(source.read_bytes(), filename=str(source))
    except (OSError, SyntaxError, ValueError) as exc:
        raise YouraiUsageError(f"{source}: cannot parse mlx-lm's lora.py: {exc}") from None
    for node in tree.body:
        names: list[ast.expr]
        if isinstance(node, ast.Assign):
            names, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            names, value = [node.target], node.value
        else:
            continue
        if any(isinstance(name, ast.Name) and name.id == "CONFIG_DEFAULTS" for name in names):
            try:
                defaults = ast.literal_eval(value)
            except (ValueError, TypeError, SyntaxError):
                defaults = None
            if isinstance(defaults, dict):
                return types.MappingProxyType(defaults)
    raise YouraiUsageError(f"{source}: no literal CONFIG_DEFAULTS dict in mlx-lm's lora.py")


def mlx_lm_config_defaults() -> dict[str, Any]:
    """A copy of the installed mlx-lm's ``CONFIG_DEFAULTS``, read from its source."""
    return copy.deepcopy(dict(_installed_defaults()))


def known_keys() -> frozenset[str]:
    """The top-level keys the installed mlx_lm.lora reads."""
    return frozenset(_installed_defaults()) | frozenset(EXTRA_KEYS)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _bad(path: Path, key: Any, problem: str, value: Any) -> YouraiUsageError:
    return YouraiUsageError(f"{path}: {key}: {problem}, got {_show(value)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _read_yaml(path: Path) -> dict[Any, Any]:
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise YouraiUsageError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        document = yaml.load(text, Loader=YAML_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise YouraiUsageError(f"{path}: not valid YAML{where}: {problem}") from None
    if not isinstance(document, dict):
        raise YouraiUsageError(
            f"{path}: expected a mapping of mlx_lm.lora keys, got {_show(document)}"
        )
    return document


def _check_key(path: Path, key: Any, value: Any, known: frozenset[str]) -> None:
    if key in known:
        return
    close = _RENAMED.get(str(key)) or next(
        iter(difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)), None
    )
    hint = f" (did you mean {close!r}?)" if close else ""
    raise _bad(path, key, f"not a key mlx_lm.lora reads{hint}", value)


def _check_value(path: Path, key: str, value: Any) -> None:
    """One YAML value against what the installed mlx-lm does with it."""
    if key in _INT_FLOORS and not (_is_int(value) and value >= _INT_FLOORS[key]):
        least = _INT_FLOORS[key]
        kind = "a positive integer" if least == 1 else f"an integer >= {least}"
        raise _bad(path, key, f"must be {kind}", value)
    if key in _BOOLS and not isinstance(value, bool):
        raise _bad(path, key, "must be true or false", value)
    if key in (*_STRINGS, *FEATURE_KEYS) and not (isinstance(value, str) and value):
        raise _bad(path, key, "must be a non-empty string", value)
    if key in _MAPPINGS and not isinstance(value, dict):
        raise _bad(path, key, "must be a mapping", value)
    if key == "learning_rate" and not _is_number(value):
        raise _bad(path, key, "must be a number", value)
    if key == "num_layers" and not (_is_int(value) and (value == -1 or value >= 1)):
        problem = "must be -1 (all layers) or a positive integer (mlx-lm also trains all"
        raise _bad(path, key, f"{problem} layers for 0 and other negatives: write -1)", value)
    if key == "fine_tune_type" and value not in FINE_TUNE_TYPES:
        raise _bad(path, key, f"must be one of {', '.join(FINE_TUNE_TYPES)}", value)
    if key == "optimizer" and not (isinstance(value, str) and value.lower() in OPTIMIZERS):
        raise _bad(path, key, f"must be one of {', '.join(OPTIMIZERS)}", value)
    if key == "hf_dataset":
        entries = value if isinstance(value, list) else [value]
        if not entries or not all(isinstance(e, dict) and "path" in e for e in entries):
            raise _bad(path, key, "must be a mapping with a 'path', or a list of them", value)


def _lora_parameters(
    path: Path, block: Mapping[Any, Any], needed: bool
) -> tuple[int | None, float | None, float | None, tuple[str, ...] | None]:
    """rank, scale, dropout and keys; ``needed`` for lora and dora, where mlx-lm indexes
    all three (a YAML block replaces the default one whole, dropout included). For full
    mlx-lm drops the block: only the values written are checked, and all four are None."""
    for key, value in block.items():
        if key not in LORA_PARAMETER_KEYS:
            hint = " (mlx-lm's LoRA uses scale, not alpha)" if key == "alpha" else ""
            known = ", ".join(LORA_PARAMETER_KEYS)
            raise _bad(path, f"lora_parameters.{key}", f"not one of {known}{hint}", value)
    for key in ("rank", "scale", "dropout") if needed else ():
        if key not in block:
            problem = "missing: mlx-lm needs rank, scale and dropout, and a lora_parameters"
            problem += " block replaces its defaults whole"
            raise _bad(path, f"lora_parameters.{key}", problem, dict(block))
    rank: Any = block.get("rank", 8)
    scale: Any = block.get("scale", 20.0)
    dropout: Any = block.get("dropout", 0.0)
    if not (_is_int(rank) and rank >= 1):
        raise _bad(path, "lora_parameters.rank", "must be a positive integer", rank)
    if not _is_number(scale):
        raise _bad(path, "lora_parameters.scale", "must be a number", scale)
    if not (_is_number(dropout) and 0 <= dropout < 1):
        raise _bad(path, "lora_parameters.dropout", "must be a number in [0, 1)", dropout)
    keys = block.get("keys")
    if keys is not None and not (
        isinstance(keys, list) and keys and all(isinstance(k, str) and k for k in keys)
    ):
        raise _bad(path, "lora_parameters.keys", "must be a non-empty list of module paths", keys)
    if not needed:
        return None, None, None, None
    return rank, float(scale), float(dropout), None if keys is None else tuple(keys)


def _optimizer_kwargs(path: Path, name: str, table: Mapping[Any, Any]) -> Mapping[str, Any]:
    """The chosen optimizer's entry of optimizer_config, which mlx-lm splats into it (by
    the lowercased name: an ``AdamW:`` entry would be ignored)."""
    for key, value in table.items():
        where = f"optimizer_config.{key}"
        if key not in OPTIMIZERS:
            hint = " (mlx-lm looks up lowercase names)" if str(key).lower() in OPTIMIZERS else ""
            raise _bad(path, where, f"not one of {', '.join(OPTIMIZERS)}{hint}", value)
        if key == name and value is None:
            raise _bad(path, where, f"must be a mapping of {name} arguments", value)
        if not isinstance(value, dict | None) or not all(isinstance(k, str) for k in value or {}):
            raise _bad(path, where, f"must be a mapping of {key} arguments", value)
    return types.MappingProxyType(dict(table.get(name) or {}))


def _local_or_given(value: str | None, base: Path) -> str | None:
    """A YAML path beside the YAML when it exists there, else as written (None: not given)."""
    if value is None or Path(value).is_absolute():
        return value
    try:
        return str(base / value) if (base / value).exists() else value
    except (OSError, ValueError):  # a name no file system has: a repo id
        return value


def load_lora_config(path: Path) -> LoraRun:
    """Read an ``mlx_lm.lora`` YAML config as ``mlx_lm.lora --config PATH`` would: a YAML
    value where it is given and not null, else the installed mlx-lm's default (a shallow
    merge, as mlx-lm's). Every problem is a one-line YouraiUsageError.

    mlx-lm opens a relative ``model`` or ``data`` from its working directory. A plugin
    reads the file from anywhere, so a relative value that exists beside the YAML becomes
    that path; anything else (a Hugging Face repo id, a path from the working directory)
    stays as written. Whether ``num_layers`` fits the model is checked with the model.
    """
    document = _read_yaml(path)
    defaults = _installed_defaults()
    known = known_keys()
    for key, value in document.items():
        _check_key(path, key, value, known)
        if value is not None:  # mlx-lm takes null for "not given"
            _check_value(path, key, value)
    # mlx_lm.lora -c PATH: every flag is None but these, so the YAML cannot set them.
    # (Flags an older mlx-lm lacks are not added: raw is what that mlx-lm's run() gets.)
    merged: dict[str, Any] = {"config": str(path)}
    merged.update({k: v for k, v in _FIXED_FLAGS.items() if k in defaults})
    for key, value in [*document.items(), *copy.deepcopy(dict(defaults)).items()]:
        if merged.get(key) is None:
            merged[key] = value
    tune = merged["fine_tune_type"]
    optimizer = str(merged["optimizer"]).lower()
    rank, scale, dropout, keys = _lora_parameters(path, merged["lora_parameters"], tune != "full")
    base = path.absolute().parent
    return LoraRun(
        source=path,
        model=_local_or_given(document.get("model"), base) or merged["model"],
        data=_local_or_given(document.get("data"), base) or merged["data"],
        fine_tune_type=tune,
        optimizer=optimizer,
        optimizer_config=_optimizer_kwargs(path, optimizer, merged["optimizer_config"]),
        num_layers=merged["num_layers"],
        batch_size=merged["batch_size"],
        max_seq_length=merged["max_seq_length"],
        lora_rank=rank,
        lora_scale=scale,
        lora_dropout=dropout,
        lora_keys=keys,
        grad_checkpoint=merged["grad_checkpoint"],
        grad_accumulation_steps=merged.get("grad_accumulation_steps", 1),
        mask_prompt=merged["mask_prompt"],
        val_batches=merged["val_batches"],
        steps_per_eval=merged["steps_per_eval"],
        iters=merged["iters"],
        clear_cache_threshold_effective=0,
        trust_remote_code_requested=document.get("trust_remote_code") is True,
        raw=types.MappingProxyType(merged),
    )
