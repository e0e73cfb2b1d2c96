"""Model presets: the five models of the original Rust CLI, CPU-sized tiny ones, mixtures of
experts, and user presets (TOML, or the pytest_yourai_presets hook).

A preset carries the architecture fields of its Hugging Face ``config.json``, so that
estimating, auto-configuring and probing a model never needs a download.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
import json
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_yourai.errors import YouraiUsageError
from pytest_yourai.fields import PINNABLE_FIELDS, PROBE_FIELDS

PRESET_META_FIELDS = ("repo", "params", "config", "architecture")
ARCHITECTURE_REQUIRED = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "vocab_size",
)

_LLAMA31_ROPE = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}


@dataclass(frozen=True)
class Preset:
    """One model to benchmark.

    ``architecture`` holds the fields of the model's ``config.json``; ``params`` is the
    human label of its size ("7B"); ``pins`` are run settings fixed by the preset author.
    """

    name: str
    repo: str
    params: str
    architecture: Mapping[str, Any]
    pins: Mapping[str, Any] = field(default_factory=dict)
    source: str = "built-in"
    # An mlx_lm.lora YAML's fine-tune (lora_preset.py): plain JSON values, empty otherwise.
    lora: Mapping[str, Any] = field(default_factory=dict)

    @property
    def parameter_count(self) -> int:
        return count_parameters(self.architecture)

    @property
    def size_billions(self) -> float:
        """Size in billions of parameters, from the label when it parses, else counted."""
        label = parse_params_label(self.params)
        return label if label is not None else self.parameter_count / 1e9

    @property
    def model_type(self) -> str:
        return str(self.architecture["model_type"])


def parse_params_label(label: str) -> float | None:
    """'7B' -> 7.0, '1.5b' -> 1.5, '350M' -> 0.35; None if it is not such a label."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([bBmMkK])\s*", label)
    if not match:
        return None
    scale = {"b": 1.0, "m": 1e-3, "k": 1e-6}[match.group(2).lower()]
    return float(match.group(1)) * scale


def format_params_label(count: int) -> str:
    if count >= 1e9:
        return f"{count / 1e9:.0f}B" if count >= 10e9 else f"{count / 1e9:.1f}B"
    if count >= 1e6:
        return f"{count / 1e6:.0f}M"
    return f"{count / 1e3:.0f}K"


def head_dim(arch: Mapping[str, Any]) -> int:
    explicit = arch.get("head_dim")
    if explicit:
        return int(explicit)
    return int(arch["hidden_size"]) // int(arch["num_attention_heads"])


EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def count_parameters(arch: Mapping[str, Any]) -> int:
    """Parameters of a dense decoder (llama-style block), the way mlx-lm builds it.

    Counts embeddings, the LM head unless tied, attention (with qkv biases where the
    architecture has them), the gated MLP and the norms.
    """
    hidden = int(arch["hidden_size"])
    layers = int(arch["num_hidden_layers"])
    inter = int(arch["intermediate_size"])
    heads = int(arch["num_attention_heads"])
    kv_heads = int(arch.get("num_key_value_heads") or heads)
    vocab = int(arch["vocab_size"])
    hd = head_dim(arch)
    q_out, kv_out = heads * hd, kv_heads * hd
    attention = hidden * q_out + 2 * hidden * kv_out + q_out * hidden
    if qkv_has_bias(arch):
        attention += q_out + 2 * kv_out
    mlp = 3 * hidden * inter
    experts = int(next((arch[k] for k in EXPERT_KEYS if isinstance(arch.get(k), int)), 0))
    if experts:  # a mixture of experts: every expert's MLP (the census counts it exactly)
        expert_inter = int(arch.get("moe_intermediate_size") or inter)
        shared = int(arch.get("shared_expert_intermediate_size") or 0)
        mlp = experts * 3 * hidden * expert_inter + 3 * hidden * shared + hidden * experts
    norms = 2 * hidden
    embed = vocab * hidden
    head = 0 if tie_embeddings(arch) else vocab * hidden
    return embed + head + layers * (attention + mlp + norms) + hidden


# Architectures whose q/k/v projections always carry a bias in mlx-lm.
_QKV_BIAS_MODEL_TYPES = frozenset({"qwen2"})


def qkv_has_bias(arch: Mapping[str, Any]) -> bool:
    return (
        bool(arch.get("attention_bias", False)) or arch.get("model_type") in _QKV_BIAS_MODEL_TYPES
    )


def tie_embeddings(arch: Mapping[str, Any]) -> bool:
    # mlx-lm's llama and qwen2 default to tied embeddings when the field is absent.
    return bool(arch.get("tie_word_embeddings", True))


def _arch(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"rms_norm_eps": 1e-5, "tie_word_embeddings": False}
    base.update(fields)
    return base


BUILTIN_PRESETS: tuple[Preset, ...] = (
    Preset(
        name="tiny-llama",
        repo="(synthetic) tiny llama",
        params="4M",
        architecture=_arch(
            model_type="llama",
            hidden_size=256,
            num_hidden_layers=4,
            intermediate_size=512,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=4096,
            rope_theta=10000.0,
            torch_dtype="float32",
        ),
        pins={"seq_len": 128, "lora_rank": 8, "batch_size": 2},
    ),
    Preset(
        name="tiny-qwen2",
        repo="(synthetic) tiny qwen2",
        params="2M",
        architecture=_arch(
            model_type="qwen2",
            hidden_size=192,
            num_hidden_layers=3,
            intermediate_size=512,
            num_attention_heads=3,
            num_key_value_heads=1,
            vocab_size=4096,
            rope_theta=1000000.0,
            tie_word_embeddings=True,
            torch_dtype="float32",
        ),
        pins={"seq_len": 128, "lora_rank": 8, "batch_size": 2},
    ),
    Preset(
        name="hermes-mistral-7b",
        repo="NousResearch/Hermes-2-Pro-Mistral-7B",
        params="7B",
        architecture=_arch(
            model_type="mistral",
            hidden_size=4096,
            num_hidden_layers=32,
            intermediate_size=14336,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=32032,
            rope_theta=10000.0,
            max_position_embeddings=32768,
            torch_dtype="bfloat16",
        ),
    ),
    Preset(
        name="dolphin-8b",
        repo="cognitivecomputations/dolphin-2.9-llama3-8b",
        params="8B",
        architecture=_arch(
            model_type="llama",
            hidden_size=4096,
            num_hidden_layers=32,
            intermediate_size=14336,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128258,
            rope_theta=500000.0,
            max_position_embeddings=8192,
            torch_dtype="bfloat16",
        ),
    ),
    Preset(
        name="llama-8b",
        repo="mlabonne/Meta-Llama-3.1-8B-Instruct-abliterated",
        params="8B",
        architecture=_arch(
            model_type="llama",
            hidden_size=4096,
            num_hidden_layers=32,
            intermediate_size=14336,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            rope_theta=500000.0,
            rope_scaling=dict(_LLAMA31_ROPE),
            max_position_embeddings=131072,
            torch_dtype="bfloat16",
        ),
    ),
    Preset(
        name="r1-distill-14b",
        repo="huihui-ai/DeepSeek-R1-Distill-Qwen-14B-abliterated-v2",
        params="14B",
        architecture=_arch(
            model_type="qwen2",
            hidden_size=5120,
            num_hidden_layers=48,
            intermediate_size=13824,
            num_attention_heads=40,
            num_key_value_heads=8,
            vocab_size=152064,
            rope_theta=1000000.0,
            max_position_embeddings=131072,
            torch_dtype="bfloat16",
        ),
    ),
    Preset(
        name="hermes-70b",
        repo="NousResearch/Hermes-3-Llama-3.1-70B",
        params="70B",
        architecture=_arch(
            model_type="llama",
            hidden_size=8192,
            num_hidden_layers=80,
            intermediate_size=28672,
            num_attention_heads=64,
            num_key_value_heads=8,
            vocab_size=128256,
            rope_theta=500000.0,
            rope_scaling=dict(_LLAMA31_ROPE),
            max_position_embeddings=131072,
            torch_dtype="bfloat16",
        ),
    ),
)


_MIXTURES: tuple[Preset, ...] = (
    Preset(
        name="qwen3-30b-a3b",
        repo="Qwen/Qwen3-30B-A3B",
        params="30B",
        architecture=_arch(
            model_type="qwen3_moe",
            hidden_size=2048,
            num_hidden_layers=48,
            intermediate_size=6144,
            moe_intermediate_size=768,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            num_experts=128,
            num_experts_per_tok=8,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            vocab_size=151936,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            max_position_embeddings=40960,
            torch_dtype="bfloat16",
        ),
    ),
    Preset(
        name="mixtral-8x7b",
        repo="mistralai/Mixtral-8x7B-v0.1",
        params="47B",
        architecture=_arch(
            model_type="mixtral",
            hidden_size=4096,
            num_hidden_layers=32,
            intermediate_size=14336,
            num_attention_heads=32,
            num_key_value_heads=8,
            num_local_experts=8,
            num_experts_per_tok=2,
            vocab_size=32000,
            rope_theta=1000000.0,
            max_position_embeddings=32768,
            torch_dtype="bfloat16",
        ),
    ),
)


def preset_records(presets: Iterable[Preset]) -> str:
    """Presets as the xdist controller hands them to its workers (JSON text): a worker
    then needs neither the presets file nor transformers' defaults."""
    return json.dumps(
        [
            {"name": p.name, "repo": p.repo, "params": p.params, "source": p.source,
             "architecture": dict(p.architecture), "pins": dict(p.pins), "lora": dict(p.lora)}
            for p in presets
        ]
    )  # fmt: skip


def presets_from_records(text: str) -> list[Preset]:
    return [Preset(**record) for record in json.loads(text)]


def builtin_presets() -> dict[str, Preset]:
    return {preset.name: preset for preset in (*BUILTIN_PRESETS, *_MIXTURES)}


# Builds a preset from a ``[presets.NAME] lora_config = PATH`` table: (path, name, where).
LoraTable = Callable[[Path, str, str], Preset]


def catalog(
    presets_file: Path | None, source: str, lora_table: LoraTable | None = None
) -> dict[str, Preset]:
    """The built-in presets, and a presets file's on top (``source`` names where its path
    came from, for errors)."""
    presets = builtin_presets()
    if presets_file is not None:
        presets.update(load_presets_file(presets_file, source, lora_table))
    return presets


def pick(presets: Mapping[str, Preset], names: Iterable[str], source: str) -> list[Preset]:
    """The named presets, in the order given; an unknown name is an error naming ``source``."""
    wanted = list(names)
    unknown = [name for name in wanted if name not in presets]
    if unknown or not wanted:
        raise YouraiUsageError(
            f"{source}: unknown preset(s) {', '.join(unknown) or '(none given)'}; "
            f"known: {', '.join(sorted(presets))}"
        )
    return [presets[name] for name in wanted]


def sort_smallest_first(presets: Iterable[Preset]) -> list[Preset]:
    return sorted(presets, key=lambda p: (p.parameter_count, p.name))


def mlx_lm_model_types() -> frozenset[str] | None:
    """The model types the installed mlx-lm builds (its models/ modules and the names it
    maps onto them), found without importing it; None when mlx-lm is not installed."""
    spec = importlib.util.find_spec("mlx_lm")
    if spec is None or spec.origin is None:
        return None
    package = Path(spec.origin).parent
    types = {p.stem for p in (package / "models").glob("*.py") if not p.stem.startswith("_")}
    try:
        tree = ast.parse((package / "utils.py").read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        return frozenset(types)
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and getattr(node.targets[0], "id", "") == "MODEL_REMAPPING"
            and isinstance(node.value, ast.Dict)
        ):
            types |= {
                k.value
                for k in node.value.keys
                if isinstance(k, ast.Constant) and isinstance(k.value, str)
            }
    return frozenset(types)


_DEFAULTS: dict[str, dict[str, Any]] = {}


def transformers_defaults(model_type: str) -> dict[str, Any]:
    """The defaults transformers gives a config of this model type: what a Hugging Face
    config.json leaves out when it equals them (and mlx-lm's model classes may require)."""
    if model_type not in _DEFAULTS:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        try:
            from transformers import CONFIG_MAPPING  # type: ignore[import-not-found,unused-ignore]

            defaults = dict(CONFIG_MAPPING[model_type]().to_dict())
        except KeyError:  # a model type transformers does not know
            defaults = {}
        except Exception:  # no transformers here: nothing to fill, nothing remembered
            return {}
        _DEFAULTS[model_type] = {
            k: v
            for k, v in defaults.items()
            if not k.startswith("_")
            and isinstance(v, int | float | str | bool | list | dict)
            and k not in ("architectures", "transformers_version", "auto_map", "model_type")
        }
    return _DEFAULTS[model_type]


def with_defaults(arch: Mapping[str, Any]) -> dict[str, Any]:
    """The architecture with transformers' defaults for the fields it leaves out.

    A default that transformers derives from other fields is derived from this config's
    own: Llama's and Mistral's ``head_dim`` is hidden size / heads (64 for SmolLM2, not the
    128 of a default-sized config), where Qwen3's and Gemma's is a constant."""
    model_type = str(arch.get("model_type"))
    defaults = transformers_defaults(model_type)
    merged = {**defaults, **arch}
    for key in _DERIVED:
        if key in defaults and key not in arch:
            derived = _transformers_derived(
                model_type, arch.get("hidden_size"), arch.get("num_attention_heads")
            ).get(key)
            if derived is None:
                merged.pop(key)
            else:
                merged[key] = derived
    return merged


# Fields transformers derives from hidden size and heads where a config leaves them out (a
# default-sized config's value would be wrong): head_dim (Llama, Mistral) and the key/value
# heads (most types: as many as the attention heads; Gemma's is a constant).
_DERIVED = ("head_dim", "num_key_value_heads")


@functools.cache
def _transformers_derived(model_type: str, hidden: Any, heads: Any) -> dict[str, int]:
    """The _DERIVED fields transformers gives a config of this type, hidden size and heads."""
    try:
        from transformers import CONFIG_MAPPING  # type: ignore[import-not-found,unused-ignore]

        make: Any = CONFIG_MAPPING[model_type]
        config = make(hidden_size=hidden, num_attention_heads=heads)
    except Exception:  # no transformers, or a config it will not make: mlx-lm derives them
        return {}
    values = {key: getattr(config, key, None) for key in _DERIVED}
    return {k: v for k, v in values.items() if isinstance(v, int) and not isinstance(v, bool)}


def validate_architecture(arch: Mapping[str, Any], where: str) -> None:
    known = mlx_lm_model_types()
    model_type = arch.get("model_type")
    if known is not None and model_type is not None and model_type not in known:
        close = difflib.get_close_matches(str(model_type), sorted(known), n=3, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise YouraiUsageError(f"{where}: model type {model_type!r} is not one mlx-lm builds{hint}")
    missing = [name for name in ARCHITECTURE_REQUIRED if name not in arch]
    if missing:
        raise YouraiUsageError(f"{where}: missing architecture field(s) {', '.join(missing)}")
    for name in ARCHITECTURE_REQUIRED[1:]:
        value = arch[name]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise YouraiUsageError(f"{where}: {name} must be a positive integer, got {value!r}")


def _validate_pin(name: str, value: Any, where: str) -> None:
    if name == "bits":
        if value not in (2, 3, 4, 5, 6, 8, 16):
            raise YouraiUsageError(f"{where}: bits must be one of 2,3,4,5,6,8,16, got {value!r}")
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise YouraiUsageError(f"{where}: {name} must be a positive integer, got {value!r}")


def load_config_json(path: Path, where: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise YouraiUsageError(f"{where}: config file not found: {path}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise YouraiUsageError(f"{where}: cannot read config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise YouraiUsageError(f"{where}: config {path} is not a JSON object")
    # Multimodal configs nest the language model's fields.
    text_config = data.get("text_config")
    if isinstance(text_config, dict) and "hidden_size" not in data:
        merged = dict(text_config)
        merged.setdefault("model_type", data.get("model_type"))
        return merged
    return data


def preset_from_table(name: str, table: Mapping[str, Any], base_dir: Path, source: str) -> Preset:
    """Build a Preset from one ``[presets.NAME]`` TOML table."""
    where = f"{source}: [presets.{name}]"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise YouraiUsageError(f"{where}: preset names use letters, digits, '.', '_' and '-'")
    known = set(PINNABLE_FIELDS) | set(PROBE_FIELDS) | set(PRESET_META_FIELDS)
    config_ref = table.get("config")
    if config_ref is not None:
        if not isinstance(config_ref, str):
            raise YouraiUsageError(f"{where}: config must be a path string, got {config_ref!r}")
        config_path = Path(config_ref)
        if not config_path.is_absolute():
            config_path = base_dir / config_path
        architecture = load_config_json(config_path, where)
        unknown = sorted(set(table) - known)
    else:
        inline = table.get("architecture")
        if isinstance(inline, Mapping):
            architecture = dict(inline)
            unknown = sorted(set(table) - known)
        else:
            # Fields inline: the architecture keys sit beside the preset's own keys.
            architecture = {k: v for k, v in table.items() if k not in known}
            unknown = sorted(
                k
                for k in architecture
                if k not in ARCHITECTURE_REQUIRED and k not in _KNOWN_ARCH_OPTIONAL
            )
    if unknown:
        raise YouraiUsageError(f"{where}: unknown field(s) {', '.join(unknown)}")
    validate_architecture(architecture, where)
    architecture = with_defaults(architecture)
    pins: dict[str, Any] = {}
    for key in (*PINNABLE_FIELDS, *PROBE_FIELDS):
        if key in table:
            value = table[key]
            if key in PINNABLE_FIELDS:
                _validate_pin(key, value, where)
            pins[key] = value
    params = table.get("params")
    count = count_parameters(architecture)
    if params is None:
        params = format_params_label(count)
    elif not isinstance(params, str) or parse_params_label(params) is None:
        raise YouraiUsageError(f"{where}: params must be a label like '7B', got {params!r}")
    repo = table.get("repo", "")
    if not isinstance(repo, str):
        raise YouraiUsageError(f"{where}: repo must be a string, got {repo!r}")
    return Preset(
        name=name,
        repo=repo,
        params=params,
        architecture=architecture,
        pins=pins,
        source=source,
    )


# Architecture keys beyond the required ones that inline tables may carry.
_KNOWN_ARCH_OPTIONAL = frozenset(
    {
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "rope_theta",
        "rope_scaling",
        "rope_traditional",
        "tie_word_embeddings",
        "max_position_embeddings",
        "attention_bias",
        "mlp_bias",
        "torch_dtype",
        "sliding_window",
        "layer_norm_eps",
        "hidden_act",
    }
)


def load_presets_file(
    path: Path, source: str, lora_table: LoraTable | None = None
) -> dict[str, Preset]:
    """Read a presets TOML file; every problem is a YouraiUsageError naming the bad value."""
    where = f"{source} {path}"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise YouraiUsageError(f"{where}: file not found") from None
    except OSError as exc:
        raise YouraiUsageError(f"{where}: cannot read: {exc.strerror}") from None
    try:
        document = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise YouraiUsageError(f"{where}: invalid TOML: {exc}") from None
    extra = sorted(set(document) - {"presets"})
    if extra:
        raise YouraiUsageError(f"{where}: unknown top-level key(s) {', '.join(extra)}")
    tables = document.get("presets", {})
    if not isinstance(tables, dict):
        raise YouraiUsageError(f"{where}: 'presets' must be a table of [presets.NAME] tables")
    presets: dict[str, Preset] = {}
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise YouraiUsageError(f"{where}: presets.{name} must be a table")
        if "lora_config" in table:
            presets[name] = _lora_table(name, table, path.parent, where, lora_table)
        else:
            presets[name] = preset_from_table(name, table, path.parent, where)
    return presets


def _lora_table(
    name: str, table: Mapping[str, Any], base_dir: Path, where: str, build: LoraTable | None
) -> Preset:
    """``[presets.NAME] lora_config = "lora.yaml"``: the YAML is the whole preset."""
    here = f"{where}: [presets.{name}]"
    extra = sorted(set(table) - {"lora_config"})
    if extra:
        raise YouraiUsageError(
            f"{here}: a lora_config preset takes nothing else (the YAML sets the run); "
            f"got {', '.join(extra)}"
        )
    value = table["lora_config"]
    if not isinstance(value, str) or not value:
        raise YouraiUsageError(f"{here}: lora_config must be a path string, got {value!r}")
    if build is None:
        raise YouraiUsageError(f"{here}: lora_config presets are not read here")
    config_path = Path(value).expanduser()
    return build(config_path if config_path.is_absolute() else base_dir / config_path, name, here)


def preset_from_config_json(path: Path, name: str | None = None) -> Preset:
    architecture = load_config_json(path, f"--config {path}")
    validate_architecture(architecture, f"--config {path}")
    architecture = with_defaults(architecture)
    count = count_parameters(architecture)
    return Preset(
        name=name or path.parent.name or "config",
        repo=str(path.parent),
        params=format_params_label(count),
        architecture=architecture,
        source=str(path),
    )


def presets_from_hook(items: Any, base_dir: Path, source: str) -> dict[str, Preset]:
    """What a ``pytest_yourai_presets`` implementation returned: Preset objects, or dicts of
    a presets file's table fields plus ``name`` (a relative ``config`` from ``base_dir``)."""
    if items is None:
        return {}
    if isinstance(items, Preset | Mapping) or not isinstance(items, Iterable):
        raise YouraiUsageError(f"{source}: expected a list of presets, got {items!r:.80}")
    presets: dict[str, Preset] = {}
    for item in items:
        if isinstance(item, Preset):
            presets[item.name] = item
            continue
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
            raise YouraiUsageError(
                f"{source}: a preset must be a Preset or a dict with a 'name', got {item!r:.80}"
            )
        table = {k: v for k, v in item.items() if k != "name"}
        presets[item["name"]] = preset_from_table(item["name"], table, base_dir, source)
    return presets
