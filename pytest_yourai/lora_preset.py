"""A preset made from an ``mlx_lm.lora`` YAML config: the user's own fine-tune.

The YAML (lora_config.py reads it as the installed mlx-lm does) names the model, a local
directory or a Hugging Face repo id found in the local Hugging Face cache (nothing is
downloaded); the architecture comes from that model's ``config.json`` and the quantization
from its ``quantization`` entry, as mlx-lm's loader applies it. The YAML's ``batch_size``,
``num_layers``, ``lora_parameters.rank``, ``max_seq_length`` and ``grad_checkpoint`` are the
preset's pins; what the trainer is asked to do beyond them travels in ``Preset.lora`` (plain
JSON, so xdist workers get it) to the probe, which runs it with mlx-lm's own code.

What the estimator does not model yet is listed by name in ``lora["unmodeled"]``: the
pre-flight then refuses to estimate (a skip that says why; ``--yourai-force`` runs it and
the probe measures), never a silent guess.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pytest_yourai.errors import YouraiUsageError
from pytest_yourai.lora_config import LoraRun, load_lora_config, mlx_lm_config_defaults
from pytest_yourai.presets import (
    Preset,
    catalog,
    count_parameters,
    format_params_label,
    load_config_json,
    validate_architecture,
)


def model_directory(model: str, where: str) -> Path:
    """The model as mlx-lm would load it: a local directory, or a repo id's snapshot in the
    local Hugging Face cache (HF_HUB_CACHE / HF_HOME, as huggingface_hub resolves them)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise YouraiUsageError(f"{where}: model: {model!r} is a file, not a model directory")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:  # pragma: no cover - mlx-lm depends on it
        raise YouraiUsageError(f"{where}: model: no directory {model!r}") from None
    try:
        return Path(snapshot_download(model, local_files_only=True))
    except Exception:
        raise YouraiUsageError(
            f"{where}: model: {model!r} is neither a directory nor in the Hugging Face cache "
            f"{HF_HUB_CACHE} (nothing is downloaded: fetch it first, e.g. "
            f"'huggingface-cli download {model}')"
        ) from None


def quantization_bits(config: Mapping[str, Any], where: str) -> tuple[int, int | None]:
    """(bits, group_size) as mlx-lm's loader quantizes the model (16: not quantized)."""
    quantization = config.get("quantization") or config.get("quantization_config")
    if not isinstance(quantization, Mapping):
        return 16, None
    per_layer = sorted(k for k, v in quantization.items() if isinstance(v, Mapping | bool))
    if per_layer:
        raise YouraiUsageError(
            f"{where}: per-layer quantization ({per_layer[0]}, ...) is not modeled yet; "
            "the estimate would not be this model's"
        )
    bits, group_size = quantization.get("bits"), quantization.get("group_size", 64)
    if not isinstance(bits, int) or not isinstance(group_size, int):
        raise YouraiUsageError(f"{where}: quantization: expected integer bits and group_size")
    return bits, group_size


def data_directory(run: LoraRun, where: str) -> str | None:
    """The YAML's local data directory; None where it names none (mlx-lm's default, a hub
    data set: the estimate is then for ``max_seq_length``, as without data)."""
    if Path(run.data).expanduser().is_dir():
        return str(Path(run.data).expanduser())
    if run.data == mlx_lm_config_defaults().get("data"):
        return None
    raise YouraiUsageError(
        f"{where}: data: no directory {run.data!r} (a local directory with train.jsonl and "
        "valid.jsonl; Hugging Face data sets are not read, nothing is downloaded)"
    )


def unmodeled(run: LoraRun) -> list[str]:
    """The YAML's memory-relevant choices the estimator has no term for yet, by name."""
    found = []
    if run.optimizer == "adafactor" and run.optimizer_config.get("beta_1") is not None:
        found.append("optimizer_config.adafactor.beta_1 (a first moment)")
    return found


def probe_run(run: LoraRun) -> dict[str, Any]:
    """What the probe is asked to run (YOURAI_PROBE_SPEC's ``lora_run``)."""
    parameters = (
        None
        if run.fine_tune_type == "full"
        else {
            "rank": run.lora_rank,
            "scale": run.lora_scale,
            "dropout": run.lora_dropout,
            **({"keys": list(run.lora_keys)} if run.lora_keys is not None else {}),
        }
    )
    return {
        "fine_tune_type": run.fine_tune_type,
        "optimizer": run.optimizer,
        "optimizer_config": dict(run.optimizer_config),
        "learning_rate": run.raw.get("learning_rate", 1e-5),
        "lora_parameters": parameters,
        "num_layers": run.num_layers,
        "grad_accumulation_steps": run.grad_accumulation_steps,
        "grad_checkpoint": bool(run.grad_checkpoint),
        "val_batches": run.val_batches,
        "seed": run.raw.get("seed", 0),
    }


def check_fine_tune_type(run: LoraRun, bits: int, where: str) -> None:
    """The fine-tune types mlx-lm fails on at its first step with a model of ``bits``."""
    if run.fine_tune_type == "full" and bits != 16:
        raise YouraiUsageError(
            f"{where}: fine_tune_type: full on a {bits}-bit model: mlx-lm cannot train "
            "quantized weights (it fails at the first step: [QuantizedMatmul::vjp] no gradient "
            "wrt the quantized weights); use lora or dora, or an unquantized model"
        )
    if run.fine_tune_type == "dora" and bits != 16 and 32 % bits:
        raise YouraiUsageError(
            f"{where}: fine_tune_type: dora on a {bits}-bit model: mlx-lm sizes DoRA's "
            f"adapters with input_dims *= 32 // bits (mlx_lm/tuner/dora.py), wrong for {bits} "
            "bits, and its first step fails ([matmul] shapes differ); use lora, or a 2-, 4- or "
            "8-bit model"
        )


def preset_from_lora_config(path: Path, name: str | None = None, source: str = "") -> Preset:
    """The preset for ``mlx_lm.lora -c PATH``; every problem is a one-line usage error."""
    where = f"{source + ': ' if source else ''}{path}"
    run = load_lora_config(path)
    model_dir = model_directory(run.model, where)
    config = load_config_json(model_dir / "config.json", where)
    validate_architecture(config, where)
    # As mlx-lm loads it: the config's own fields and mlx-lm's defaults for the rest (not a
    # default-sized transformers config's, which can disagree: Qwen2's 32 key/value heads).
    architecture = dict(config)
    bits, group_size = quantization_bits(config, where)
    check_fine_tune_type(run, bits, where)
    layers = int(architecture["num_hidden_layers"])
    if run.num_layers > layers:
        raise YouraiUsageError(
            f"{where}: num_layers: requested to train {run.num_layers} layers but the model "
            f"only has {layers} layers (mlx-lm refuses this too)"
        )
    pins: dict[str, Any] = {
        "batch_size": run.batch_size,
        "lora_layers": layers if run.num_layers == -1 else run.num_layers,
        # mlx-lm pads a batch to at most max_seq_length tokens; the model sees one less.
        "seq_len": max(1, run.max_seq_length - 1),
        "bits": bits,
        "grad_checkpoint": bool(run.grad_checkpoint),
    }
    if run.lora_rank is not None:
        pins["lora_rank"] = run.lora_rank
    if group_size is not None:
        pins["group_size"] = group_size
    lora = {
        "config_file": str(path),
        "model_dir": str(model_dir),
        "data": data_directory(run, where),
        "run": probe_run(run),
        "unmodeled": unmodeled(run),
        "mask_prompt": bool(run.mask_prompt),
        "features": {k: run.raw[k] for k in ("prompt_feature", "completion_feature",
                                             "text_feature", "chat_feature") if k in run.raw},
    }  # fmt: skip
    return Preset(
        name=name or path.stem,
        repo=run.model,
        params=format_params_label(count_parameters(architecture)),
        architecture=architecture,
        pins=pins,
        source=where,
        lora=lora,
    )


def lora_catalog(
    presets_file: Path | None,
    source: str,
    lora_configs: Iterable[Path] = (),
    lora_source: str = "--yourai-lora-config",
) -> dict[str, Preset]:
    """presets.catalog, with ``lora_config`` tables and each YAML of ``lora_configs`` (a
    preset named after its file) on top."""
    presets = catalog(
        presets_file, source, lambda path, name, where: preset_from_lora_config(path, name, where)
    )
    for path in lora_configs:
        preset = preset_from_lora_config(path, source=lora_source)
        presets[preset.name] = preset
    return presets
