"""The batches an mlx_lm.lora config's data makes, as the installed mlx-lm forms them.

Memory is set by the longest batch the data makes, not by ``max_seq_length``. The probe's
data errand (``python -m pytest_yourai.probe --data-batches SPEC``) loads the tokenizer and
the data with mlx-lm's own loaders and runs mlx-lm's own ``iterate_batches`` over them once,
recording every batch's shape: mlx-lm's quirks included, and no mlx in this process. The
answer is cached by the content of the data and tokenizer files and the settings that shape
the batches, so a second run costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pytest_yourai.census import Census, EstimateRefused, census_for
from pytest_yourai.errors import YouraiUsageError
from pytest_yourai.estimator import FORMULA_MODEL_TYPES, is_mixture_of_experts
from pytest_yourai.fields import DEFAULT_BITS, DEFAULT_GROUP_SIZE, default_dtype
from pytest_yourai.lora_preset import preset_from_lora_config
from pytest_yourai.presets import Preset
from pytest_yourai.spawn import ask_probe

# Tokenizer files whose content changes how text is tokenized.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
)
DATA_FILES = ("train.jsonl", "valid.jsonl")
# Batches the probe trains on beyond the longest: the next distinct shapes in the order
# mlx-lm meets them, so the allocator's cache over several shapes shows in the footprint.
PROBE_SHAPES = 4
# MLX's peak still rose at mlx_lm.lora's fourth step on a tiny model (by 1.5% over three).
MIN_STEPS = 4
ERRAND_TIMEOUT_S = 600.0


def errand_spec(preset: Preset, trust_remote_code: bool = False) -> dict[str, Any]:
    lora = preset.lora
    return {
        "model": lora["model_dir"],
        "data": lora["data"],
        "batch_size": int(preset.pins["batch_size"]),
        "max_seq_length": int(preset.pins["seq_len"]) + 1,
        "mask_prompt": bool(lora.get("mask_prompt")),
        "trust_remote_code": trust_remote_code,
        **dict(lora.get("features", {})),
    }


def cache_key(spec: Mapping[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
    for folder, names in ((spec["data"], DATA_FILES), (spec["model"], TOKENIZER_FILES)):
        for name in names:
            path = Path(folder) / name
            digest.update(name.encode())
            digest.update(path.read_bytes() if path.is_file() else b"-")
    return digest.hexdigest()[:24]


def probe_shapes(
    shapes: list[list[int]], limit: int = PROBE_SHAPES, accumulation: int = 1
) -> list[list[int]]:
    """The train batches the probe runs. Where mlx-lm meets the longest batch among its first
    ``limit`` steps, after the first optimizer update: those steps, in mlx-lm's order (at
    least MIN_STEPS, the epoch repeating). Otherwise: the steps up to the first optimizer
    update on other shapes (one step, or ``accumulation`` micro-steps), then the longest
    batch, then the next distinct shapes in the order mlx-lm meets them (at least
    MIN_STEPS steps). The longest batch must not come before the first update: after it, the
    optimizer's state (and with accumulation the summed gradients) are alive, and on a tiny
    CPU model MLX's peak was 8% higher there (as in mlx_lm.lora, which met it third) than as
    the first step. The order matters beyond that: on a mixture of experts, the same four
    shapes in another order peaked 3% lower than mlx_lm.lora."""
    if not shapes:
        return []
    longest = max(shapes, key=lambda s: (s[0] * s[1], s[1]))
    first = shapes[: max(limit, accumulation + 1)]
    warm_up = max(1, accumulation)
    if longest in first[warm_up:] and longest not in first[:warm_up]:
        chosen = list(first)
        while len(chosen) < MIN_STEPS:
            chosen.append(shapes[len(chosen) % len(shapes)])
        return chosen
    others = [shape for shape in shapes if shape != longest] or [longest]
    warm = [others[i % len(others)] for i in range(warm_up)]
    chosen = [*warm, longest]
    limit = max(limit, len(chosen))
    for shape in shapes:
        if len(chosen) >= limit:
            break
        if shape not in chosen:
            chosen.append(shape)
    while len(chosen) < MIN_STEPS:
        chosen.append(longest)
    return chosen


def validation_shapes(shapes: list[list[int]], val_batches: int) -> list[list[int]]:
    """mlx-lm's evaluate takes the first ``val_batches`` batches of a pass (-1: all)."""
    return shapes if val_batches < 0 else shapes[:val_batches]


def summarize(
    answer: Mapping[str, Any], spec: Mapping[str, Any], val_batches: int, accumulation: int = 1
) -> dict[str, Any]:
    """The errand's answer, with what the pre-flight and the probe use of it."""
    summary: dict[str, Any] = {"train_file": str(Path(spec["data"]) / "train.jsonl")}
    for split in ("train", "valid"):
        part = dict(answer.get(split) or {})
        shapes = [list(map(int, s)) for s in part.get("batch_shapes", [])]
        if split == "train":
            part["probe_shapes"] = probe_shapes(shapes, accumulation=accumulation)
        else:
            part["probe_shapes"] = validation_shapes(shapes, val_batches)
        part["longest"] = max(shapes, key=lambda s: (s[0] * s[1], s[1])) if shapes else None
        part["max_seq_length"] = answer.get("max_seq_length", spec["max_seq_length"])
        summary[split] = part
    return summary


def data_batches(
    preset: Preset, cache_dir: Path | None, where: str, trust_remote_code: bool = False
) -> dict[str, Any]:
    """The batches ``preset``'s data makes (see module doc); a usage error naming the file
    when mlx-lm could not read it. A tokenizer runs code of its own only with
    ``trust_remote_code`` (the plugin's option: a YAML's key alone never turns it on)."""
    spec = errand_spec(preset, trust_remote_code)
    data = Path(spec["data"])
    if not (data / "train.jsonl").is_file():
        raise YouraiUsageError(f"{where}: data: no train.jsonl in {data}")
    val_batches = int(preset.lora["run"].get("val_batches", 25))
    accumulation = int(preset.lora["run"].get("grad_accumulation_steps", 1))
    rule = f"{MIN_STEPS} steps, in mlx-lm's order"  # probe_shapes's; a new rule, a new key
    key = cache_key(
        {**spec, "val_batches": val_batches, "accumulation": accumulation, "probe": rule}
    )
    cached = cache_dir / f"{key}.json" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        return dict(json.loads(cached.read_text()))
    with tempfile.TemporaryDirectory(prefix="yourai-data-") as scratch:
        spec_file = Path(scratch) / "spec.json"
        spec_file.write_text(json.dumps(spec))
        answer, problem = ask_probe(["--data-batches", str(spec_file)], None, ERRAND_TIMEOUT_S)
    if answer is None or answer.get("status") != "ok":
        message = (answer or {}).get("error") or problem
        if "trust_remote_code" in str(message) and not trust_remote_code:
            message = f"{message}; the plugin lets it only with --yourai-trust-remote-code"
        raise YouraiUsageError(f"{where}: data {data}: {message}")
    summary = summarize(answer, spec, val_batches, accumulation)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(summary))
    return summary


def check_built_model(preset: Preset, cache: Any = None) -> None:
    """mlx-lm builds a model from any config.json it can read, silently taking its own
    defaults for fields it looks for elsewhere (a Gemma-4 config with its text fields at the
    top level instead of under ``text_config`` builds the default Gemma-4). Where the
    estimate is taken from what mlx-lm builds (its census), compare that with the config and
    refuse a model that is not the one the config describes."""
    arch = preset.architecture
    run = preset.lora.get("run") or {}
    keys = (run.get("lora_parameters") or {}).get("keys")
    dora = run.get("fine_tune_type") == "dora"
    formula = arch.get("model_type") in FORMULA_MODEL_TYPES and not is_mixture_of_experts(arch)
    if formula and keys is None and not dora:
        return  # the formula's own model types: built from these very fields
    pins = preset.pins
    dtype = str(pins.get("dtype") or default_dtype(arch))
    bits, group = (
        int(pins.get("bits", DEFAULT_BITS)),
        int(pins.get("group_size", DEFAULT_GROUP_SIZE)),
    )
    try:
        census = census_for(arch, bits, group, dtype, cache, linears=keys is not None or dora)
    except EstimateRefused:
        return  # the pre-flight says why it cannot estimate
    if keys is not None and census.has_linears:
        check_keys(preset, census, [str(k) for k in keys])
    if dora and census.has_linears:
        check_dora(preset, census, None if keys is None else [str(k) for k in keys])
    if formula:
        return
    # (The census's hidden_size is its widest embedding's, not always the residual width:
    # Gemma-4's per-layer embeddings are wider. Blocks and vocabulary are exact.)
    built = {
        "num_hidden_layers": sum(kind.count for kind in census.blocks),
        "vocab_size": census.vocab_size,
    }
    differ = [k for k, v in built.items() if v is not None and v != arch.get(k)]
    if differ:
        said = ", ".join(f"{k} {arch.get(k)}" for k in differ)
        made = ", ".join(f"{k} {built[k]}" for k in differ)
        raise YouraiUsageError(
            f"{preset.source}: the model mlx-lm builds from {preset.lora.get('model_dir')} has "
            f"{made}, but its config.json says {said}: mlx-lm reads these fields elsewhere "
            "(e.g. under text_config) and took its defaults; the estimate would be for another "
            "model"
        )


def check_keys(preset: Preset, census: Census, keys: list[str]) -> None:
    """mlx-lm matches ``lora_parameters.keys`` against each adapted block's module paths
    (``self_attn.q_proj``); keys that match none leave nothing to train, and mlx-lm says so
    only at its first step (``[grad] Must specify at least one argument``)."""
    layers = int(preset.pins.get("lora_layers") or 0)
    paths = {lin.path for kind in census.last(layers) for lin in kind.linears}
    if paths & set(keys):
        return
    known = ", ".join(sorted(paths)[:8]) + (", ..." if len(paths) > 8 else "")
    raise YouraiUsageError(
        f"{preset.source}: lora_parameters.keys {keys} match no layer of the {layers} adapted "
        f"blocks, so nothing would train (mlx-lm fails at its first step); mlx-lm matches "
        f"paths inside a block, e.g. {known}"
    )


def check_dora(preset: Preset, census: Census, keys: list[str] | None) -> None:
    """mlx-lm has no DoRA for a mixture of experts' switch linears: it raises while it
    builds the adapters (tuner/utils.py)."""
    layers = int(preset.pins.get("lora_layers") or 0)
    switch = sorted(
        {
            lin.path
            for kind in census.last(layers)
            for lin in kind.linears
            if lin.experts and (keys is None or lin.path in keys)
        }
    )
    if switch:
        raise YouraiUsageError(
            f"{preset.source}: fine_tune_type: dora on {', '.join(switch)}: mlx-lm has no DoRA "
            "for a mixture of experts' switch linears (\"SwitchLinear doesn't support DoRA "
            'yet"); use lora, or keys that leave the experts out'
        )


def with_data(preset: Preset, cache_dir: Path | None, trust_remote_code: bool = False) -> Preset:
    """``preset`` with its data's batches: the longest batch sets the sequence length the
    estimate and the probe use (the padded length less the one token the model does not
    see), and ``lora["batches"]`` carries the rest."""
    from dataclasses import replace

    if not preset.lora.get("data"):
        return preset
    summary = data_batches(preset, cache_dir, f"{preset.source}: {preset.name}", trust_remote_code)
    longest = summary["train"]["longest"]
    if longest is None:
        raise YouraiUsageError(
            f"{preset.source}: data: {summary['train_file']} makes no batch of "
            f"{preset.pins['batch_size']} rows"
        )
    pins = {**preset.pins, "seq_len": max(1, int(longest[1]) - 1)}
    return replace(preset, pins=pins, lora={**preset.lora, "batches": summary})


def data_record(lora: Mapping[str, Any]) -> dict[str, Any]:
    """The ``preflight_check`` fields of a preset with data (none without)."""
    batches = lora.get("batches")
    if not batches:
        return {}
    train = batches["train"]
    rows, length = train["longest"]
    return {
        "data_rows": train.get("rows"),
        "longest_batch_tokens": [rows, length],
        "truncated_rows": train.get("truncated_rows"),
        "data_file": batches["train_file"],
    }


def data_line(lora: Mapping[str, Any]) -> str | None:
    """'longest batch 4 × 1056 tokens from data/train.jsonl (2 rows truncated at 1024)'."""
    batches = lora.get("batches")
    if not batches or batches["train"].get("longest") is None:
        return None
    rows, length = batches["train"]["longest"]
    line = f"longest batch {rows} × {length} tokens from {batches['train_file']}"
    truncated = int(batches["train"].get("truncated_rows") or 0)
    if truncated:
        limit = batches["train"].get("max_seq_length", "max_seq_length")
        line += f" ({truncated} rows truncated at {limit})"
    return line


def user_cache_dir() -> Path:
    """Where the command lines keep the data's batches ($XDG_CACHE_HOME or ~/.cache); the
    pytest run keeps them in pytest's cache."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pytest-yourai" / "data"


def fine_tune_preset(path: Path, source: str = "", trust_remote_code: bool = False) -> Preset:
    """The command lines' preset for ``mlx_lm.lora -c PATH``: read, its built model held
    against its config, its data's batches (the pytest run does the same in its session)."""
    preset = preset_from_lora_config(path, source=source)
    check_built_model(preset)
    return with_data(preset, user_cache_dir(), trust_remote_code)
