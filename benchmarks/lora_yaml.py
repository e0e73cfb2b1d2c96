"""On CPU, ``mlx_lm.lora`` itself run from YAML configs, and exactly what it did with each.

    python benchmarks/lora_yaml.py list
    python benchmarks/lora_yaml.py run [--only NAME ...] [--rerun] \
        --out benchmarks/results/cpu-lora-yaml.jsonl --work DIR
    python benchmarks/lora_yaml.py compare --mlx-lm benchmarks/results/cpu-lora-yaml.jsonl \
        --out benchmarks/results/cpu-lora-yaml-plugin.jsonl --work DIR [--only NAME ...]
    python benchmarks/lora_yaml.py report benchmarks/results/cpu-lora-yaml-plugin.jsonl

The grid is ``benchmarks/lora_yaml/configs/*.yaml``: mlx_lm.lora configs, one a file (the
file's stem is the config's name), whose ``model:`` and ``data:`` name recipes of
``benchmarks/lora_yaml/grid.yaml``. ``list`` prints each config and what it covers, and fails
(exit 1) when the grid misses an item this benchmark must cover (``REQUIRED``) or breaks a
rule (tiny shapes, a few iterations).

``run`` builds what the configs name into ``--work`` (default: a directory under /tmp): the
models (synthetic weights saved by mlx-lm's own save path, 4-bit ones with ``quantization``
in config.json, as mlx_lm.convert saves them; a small WordLevel tokenizer with a chat
template) and the data (train.jsonl, valid.jsonl, seeded), with
``benchmarks/lora_yaml/fixtures.py`` in a child process. Nothing of it is committed. Then,
for each config, one at a time, it writes ``WORK/runs/NAME/config.yaml`` (the committed file
with its ``model:`` and ``data:`` lines pointing into WORK, nothing else changed) and runs
``benchmarks/lora_yaml/run_lora.py``, which is ``python -m mlx_lm.lora -c config.yaml`` with
a recorder (see its docstring), in that directory (``adapter_path`` lands there). One JSON
line per config is appended to ``--out`` when it ends (flushed and fsynced): a run that stops
half-way keeps what it measured, and a rerun skips the configs already in the file unless
``--rerun``, which replaces their lines.

A line holds: the config's name, file and hash; its memory-relevant YAML keys as written and
as mlx-lm merged them with its defaults; the model (architecture, dtype, bits, shapes) and
the data shape; mlx-lm's, mlx's and Python's versions; status (ok, error, expected_error,
crashed or timeout) and error; "Peak mem" as mlx-lm reports it (``mlx_peak_gb``: the largest
``peak_memory`` its training callback received, GB of 1e9) and every report; the MLX peak at
the end and before training; the process's peak RSS (VmHWM, ru_maxrss, and the parent's
``wait4`` view of the child); the train and validation batch shapes in order and the longest
training batch (rows, padded length); trainable and total parameters; wall seconds.

``compare`` runs the plugin on the same configs and sets it beside what mlx-lm did (a
results file of ``run``): for each config whose mlx-lm run ended ok or with its expected
error, it writes ``WORK/plugin/NAME/NAME.yaml`` (the same rewriting as ``run``: the preset
is named after the file) and a copy of benchmarks/test_lora_memory.py, and runs
``python -m pytest bench --yourai-lora-config NAME.yaml --yourai-force --yourai-json
plugin.json --yourai-log log.jsonl -p no:cacheprovider`` there, once, in a child process
(``--timeout`` seconds at most). One JSON line per config is appended to ``--out`` (flushed,
fsynced; resumable, ``--rerun`` replaces): the plugin run's status and exit code; its
longest batch (pre-flight's ``longest_batch_tokens``, from mlx-lm's own iterate_batches)
against mlx-lm's longest training batch; the probe's MLX peak against mlx-lm's Peak mem
(target |error| <= 3%); the estimate (base, conservative) against mlx-lm's peak RSS (targets:
base |error| median <= 5%, max <= 10%; conservative >= RSS) or the estimator's refusal; the
probe's footprint against the same RSS; the probe's batch shapes; wall seconds. For the
configs expected to fail, what the plugin said: a usage error before any probe (exit 4 and
its message) or how the probe failed. ``report`` prints the table and each target's count.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from pytest_yourai.lora_config import YAML_LOADER

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from results_io import append_record, read_jsonl  # noqa: E402

FOLDER = HERE / "lora_yaml"
CONFIGS = FOLDER / "configs"
RUNNER = FOLDER / "run_lora.py"
FIXTURES = FOLDER / "fixtures.py"
EXAMPLE = "mlx-lm-example"
TIMEOUT_S = 600
BENCH_TEST = HERE / "test_lora_memory.py"
# The targets compare checks (relative errors).
MLX_PEAK_TARGET = 0.03
BASE_MEDIAN_TARGET = 0.05
BASE_MAX_TARGET = 0.10

# What the grid must cover, from configs that are expected to run to the end.
REQUIRED = [
    "fine_tune_type:lora",
    "fine_tune_type:dora",
    "fine_tune_type:full",
    "full:unquantized",
    "optimizer:adam",
    "optimizer:adamw",
    "optimizer:sgd",
    "optimizer:adafactor",
    "optimizer:muon",
    "keys:default",
    "keys:qkvo",
    "keys:mlp",
    "num_layers:-1",
    "grad_accumulation_steps>=2",
    "grad_checkpoint",
    "model:4-bit",
    "model:16-bit",
    "arch:llama",
    "arch:qwen3",
    "moe",
    "data:equal",
    "data:mixed",
    "data:longer-than-max_seq_length",
    "data:chat+mask_prompt",
    "example:mlx-lm",
]
QKVO = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}
MLP_PREFIXES = ("mlp.", "block_sparse_moe.", "mixer.", "feed_forward.")
# The keys of an mlx_lm.lora config that change what it allocates (or how often it runs).
MEMORY_KEYS = [
    "fine_tune_type",
    "optimizer",
    "optimizer_config",
    "num_layers",
    "batch_size",
    "iters",
    "val_batches",
    "steps_per_eval",
    "steps_per_report",
    "save_every",
    "max_seq_length",
    "grad_checkpoint",
    "grad_accumulation_steps",
    "clear_cache_threshold",
    "mask_prompt",
    "lora_parameters",
    "lr_schedule",
    "seed",
    "test",
    "test_batches",
]
# Where this machine's runs must stay (2 cores, no GPU).
LIMITS = {"hidden_size": 256, "vocab_size": 4096, "num_hidden_layers": 4}
MAX_ITERS = 8
MAX_TOKENS = 320


# mlx_lm.lora's YAML loader (a SafeLoader with its float rule, so 1e-5 is a float), without
# changing yaml.SafeLoader as importing mlx_lm.lora does: the plugin's own.
MlxLoraLoader = YAML_LOADER


def fixtures() -> ModuleType:
    """benchmarks/lora_yaml/fixtures.py, without mlx (it imports mlx only to build)."""
    spec = importlib.util.spec_from_file_location("lora_yaml_fixtures", FIXTURES)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mlx_lm_defaults() -> dict[str, Any]:
    """CONFIG_DEFAULTS of mlx_lm.lora 0.32.2 (the keys this benchmark reads), for ``list``
    without importing mlx-lm; a run records the values mlx-lm actually merged."""
    return {
        "fine_tune_type": "lora",
        "optimizer": "adam",
        "num_layers": 16,
        "batch_size": 4,
        "iters": 1000,
        "max_seq_length": 2048,
        "grad_checkpoint": False,
        "grad_accumulation_steps": 1,
        "mask_prompt": False,
    }


def grid_folder() -> Path:
    """The grid in use: this folder's, or the one --grid names (gpu/: real sizes)."""
    chosen = os.environ.get(fixtures().GRID_ENV)
    return Path(chosen) if chosen else FOLDER


def rules(grid: dict[str, Any]) -> dict[str, Any]:
    """What a grid must obey and cover: the grid's own ``rules:`` where it has them (a GPU
    grid's real sizes), else this 2-core machine's (LIMITS, MAX_ITERS, ...)."""
    own = grid.get("rules") or {}
    return {
        "limits": own.get("limits", LIMITS),
        "max_iters": own.get("max_iters", MAX_ITERS),
        "max_tokens": own.get("max_tokens", MAX_TOKENS),
        "min_configs": own.get("min_configs", 20),
        "min_dense_architectures": own.get("min_dense_architectures", 2),
        "required": own.get("required", REQUIRED),
    }


def load_configs() -> dict[str, dict[str, Any]]:
    """Every config of the grid by name: its file, text and parsed YAML."""
    configs = {}
    for path in sorted((grid_folder() / "configs").glob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        configs[path.stem] = {
            "file": str(path.relative_to(ROOT)),
            "text": text,
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "yaml": yaml.load(text, MlxLoraLoader),
        }
    return configs


def keys_kind(config: dict[str, Any]) -> str | None:
    if config.get("fine_tune_type", "lora") == "full":
        return None
    keys = (config.get("lora_parameters") or {}).get("keys")
    if keys is None:
        return "default"
    if set(keys) == QKVO:
        return "qkvo"
    if keys and all(str(k).startswith(MLP_PREFIXES) for k in keys):
        return "mlp"
    return "custom"


def describe(name: str, config: dict[str, Any], grid: dict[str, Any]) -> dict[str, Any]:
    """The model, the data shape and the coverage tags of one config (no mlx)."""
    merged = {**mlx_lm_defaults(), **config}
    recipe = grid["models"][config["model"]]
    arch = recipe["config"]
    bits = int(recipe.get("bits", 16))
    dtype = recipe.get("dtype", "float32")
    experts = arch.get("num_local_experts") or arch.get("num_experts")
    model = {
        "name": config["model"],
        "model_type": arch["model_type"],
        "dtype": dtype,
        "bits": bits,
        "group_size": recipe.get("group_size") if bits < 16 else None,
        "hidden_size": arch["hidden_size"],
        "intermediate_size": arch.get("intermediate_size"),
        "num_hidden_layers": arch["num_hidden_layers"],
        "vocab_size": arch["vocab_size"],
        "experts": experts,
        "experts_per_token": arch.get("num_experts_per_tok") if experts else None,
    }
    data_recipe = grid["data"][config["data"]]
    if data_recipe["kind"] == "chat":
        low = sum(data_recipe[k][0] + 2 for k in ("system", "user", "assistant"))
        high = sum(data_recipe[k][1] + 2 for k in ("system", "user", "assistant"))
    else:
        tokens = data_recipe["tokens"]
        low, high = (tokens, tokens) if isinstance(tokens, int) else tokens
    max_seq = int(merged["max_seq_length"])
    shapes = []
    if data_recipe["kind"] == "chat":
        shapes.append("chat+mask_prompt" if merged["mask_prompt"] else "chat")
    elif low == high:
        shapes.append("equal")
    else:
        shapes.append("mixed")
    if high > max_seq:
        shapes.append("longer-than-max_seq_length")
    data = {
        "name": config["data"],
        "kind": data_recipe["kind"],
        "tokens_per_row": [low, high],
        "train_rows": data_recipe["train_rows"],
        "valid_rows": data_recipe["valid_rows"],
        "shapes": shapes,
    }
    ftt = merged["fine_tune_type"]
    tags = [f"fine_tune_type:{ftt}", f"optimizer:{str(merged['optimizer']).lower()}"]
    if ftt == "full" and bits >= 16:
        tags.append("full:unquantized")
    if (kind := keys_kind(merged)) is not None:
        tags.append(f"keys:{kind}")
    if int(merged["num_layers"]) == -1:
        tags.append("num_layers:-1")
    if int(merged["grad_accumulation_steps"]) >= 2:
        tags.append("grad_accumulation_steps>=2")
    if merged["grad_checkpoint"]:
        tags.append("grad_checkpoint")
    if bits < 16:
        tags.append(f"model:{bits}-bit")
    elif dtype in ("bfloat16", "float16"):
        tags.append("model:16-bit")
    else:
        tags.append("model:float32")
    tags.append(f"arch:{arch['model_type']}")
    if experts:
        tags.append("moe")
    tags += [f"data:{shape}" for shape in shapes]
    if name == EXAMPLE:
        tags.append("example:mlx-lm")
    return {"model": model, "data": data, "covers": tags}


def problems(configs: dict[str, dict[str, Any]], grid: dict[str, Any]) -> list[str]:
    """What is wrong with the grid: a rule broken by a config, or a required item missing."""
    found: list[str] = []
    rule = rules(grid)
    for name in grid.get("expect_error") or {}:
        if name not in configs:
            found.append(f"expect_error names no config: {name}")
    covered: set[str] = set()
    for name, entry in configs.items():
        config = entry["yaml"]
        if config.get("model") not in grid["models"]:
            found.append(f"{name}: model {config.get('model')!r} is no recipe of grid.yaml")
            continue
        if config.get("data") not in grid["data"]:
            found.append(f"{name}: data {config.get('data')!r} is no recipe of grid.yaml")
            continue
        if config.get("train") is not True:
            found.append(f"{name}: train is not true")
        if int(config.get("iters", 1000)) > rule["max_iters"]:
            found.append(f"{name}: iters {config.get('iters')} > {rule['max_iters']}")
        arch = grid["models"][config["model"]]["config"]
        for key, limit in rule["limits"].items():
            if int(arch[key]) > limit:
                found.append(f"{name}: {key} {arch[key]} > {limit}")
        described = describe(name, config, grid)
        if described["data"]["tokens_per_row"][1] > rule["max_tokens"]:
            found.append(f"{name}: rows up to {described['data']['tokens_per_row'][1]} tokens")
        if name not in (grid.get("expect_error") or {}):
            covered.update(described["covers"])
    found += [f"not covered: {item}" for item in rule["required"] if item not in covered]
    dense = {t for t in covered if t.startswith("arch:")} - {
        f"arch:{m['config']['model_type']}"
        for m in grid["models"].values()
        if m["config"].get("num_local_experts") or m["config"].get("num_experts")
    }
    if len(dense) < rule["min_dense_architectures"]:
        found.append(f"too few dense architectures: {sorted(dense)}")
    if len(configs) < rule["min_configs"]:
        found.append(f"only {len(configs)} configs (at least {rule['min_configs']})")
    return found


def summary_of(config: dict[str, Any]) -> str:
    merged = {**mlx_lm_defaults(), **config}
    parts = [
        str(merged["fine_tune_type"]),
        str(merged["optimizer"]),
        f"keys={keys_kind(merged) or '-'}",
        f"layers={merged['num_layers']}",
        f"b={merged['batch_size']}",
        f"it={merged['iters']}",
        f"max_seq={merged['max_seq_length']}",
    ]
    if int(merged["grad_accumulation_steps"]) > 1:
        parts.append(f"accum={merged['grad_accumulation_steps']}")
    if merged["grad_checkpoint"]:
        parts.append("ckpt")
    if merged["mask_prompt"]:
        parts.append("mask_prompt")
    return " ".join(parts)


def list_grid() -> int:
    grid = fixtures().grid()
    configs = load_configs()
    expected = grid.get("expect_error") or {}
    print(f"{'config':42} {'model':13} {'data':6} options / covers")
    for name, entry in configs.items():
        config = entry["yaml"]
        if config.get("model") not in grid["models"] or config.get("data") not in grid["data"]:
            print(f"{name:42} (names an unknown model or data)")
            continue
        described = describe(name, config, grid)
        note = f"  [expected error: {expected[name]}]" if name in expected else ""
        print(f"{name:42} {config['model']:13} {config['data']:6} {summary_of(config)}{note}")
        print(f"{'':42} covers: {', '.join(described['covers'])}")
    found = problems(configs, grid)
    if found:
        print(f"\nTHE GRID IS INCOMPLETE OR BROKEN ({len(found)}):", file=sys.stderr)
        for problem in found:
            print(f"  {problem}", file=sys.stderr)
        return 1
    print(
        f"\n{len(configs)} configs ({len(expected)} expected to fail); every required item "
        f"is covered by a config expected to run: {', '.join(rules(grid)['required'])}"
    )
    return 0


def resolved_yaml(text: str, model_dir: Path, data_dir: Path) -> str:
    """The committed config with its top-level ``model:`` and ``data:`` lines pointing into
    the work directory; every other line as it is."""
    out = []
    seen = {"model": 0, "data": 0}
    for line in text.splitlines():
        match = re.match(r"^(model|data):\s", line)
        if match:
            key = match.group(1)
            seen[key] += 1
            line = f"{key}: {json.dumps(str(model_dir if key == 'model' else data_dir))}"
        out.append(line)
    if seen != {"model": 1, "data": 1}:
        raise ValueError(f"expected one top-level model: and data: line, found {seen}")
    return "\n".join(out) + "\n"


def build_fixtures(names: list[str], grid: dict[str, Any], work: Path) -> None:
    """Build (in a child process, with mlx) the models and data sets that ``work`` lacks or
    holds from another recipe."""
    module = fixtures()
    stale = []
    for name in names:
        kind = "models" if name in grid["models"] else "data"
        marker = work / kind / name / module.RECIPE_FILE
        if not marker.exists() or marker.read_text() != module.recipe_text(grid[kind][name]):
            stale.append(name)
    if stale:
        print(f"building {', '.join(stale)} in {work}", flush=True)
        subprocess.run([sys.executable, str(FIXTURES), str(work), *stale], check=True)


def child_run(argv: list[str], cwd: Path, log: Path, timeout: int) -> tuple[int, Any, bool]:
    """Run argv to its end; its exit code (negative: killed by that signal), the resource
    usage ``wait4`` gives for it alone, and whether the timeout killed it."""
    env = dict(os.environ, NO_COLOR="1", TERM="dumb", COLUMNS="120", TOKENIZERS_PARALLELISM="false")
    with open(log, "w", encoding="utf-8") as handle:
        proc = subprocess.Popen(argv, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT, env=env)
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            proc.kill()

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        code = os.waitstatus_to_exitcode(status)
        proc.returncode = code
    return code, usage, timed_out.is_set()


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("mlx-lm", "mlx"):
        try:
            found[package.replace("-", "_")] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package.replace("-", "_")] = "absent"
    return found


def memory_keys(values: dict[str, Any]) -> dict[str, Any]:
    picked = {key: values[key] for key in MEMORY_KEYS if key in values}
    if isinstance(picked.get("optimizer_config"), dict) and "optimizer" in values:
        name = str(values["optimizer"]).lower()
        picked["optimizer_config"] = {name: picked["optimizer_config"].get(name, {})}
    return picked


def run_one(
    name: str, entry: dict[str, Any], grid: dict[str, Any], work: Path, timeout: int = TIMEOUT_S
) -> dict[str, Any]:
    config = entry["yaml"]
    described = describe(name, config, grid)
    run_dir = work / "runs" / name
    if run_dir.exists():
        for path in sorted(run_dir.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"
    config_path.write_text(
        resolved_yaml(
            entry["text"], work / "models" / config["model"], work / "data" / config["data"]
        )
    )
    record_path, log = run_dir / "record.json", run_dir / "output.log"
    argv = [sys.executable, str(RUNNER), str(record_path), "-c", str(config_path)]
    started = time.perf_counter()
    code, usage, timed_out = child_run(argv, run_dir, log, timeout)
    wall = time.perf_counter() - started
    inner: dict[str, Any] = {}
    if record_path.exists():
        inner = json.loads(record_path.read_text())
    output = log.read_text(encoding="utf-8", errors="replace")
    tail = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", output)[-1500:]
    expected = (grid.get("expect_error") or {}).get(name)
    status = inner.get("status", "crashed")
    if timed_out:
        status = "timeout"
    elif status == "error" and expected and expected in str(inner.get("error")):
        status = "expected_error"
    elif status == "started":
        status = "crashed"
    train = inner.get("train_batches", [])
    valid = inner.get("valid_batches", [])
    record = {
        "name": name,
        "config": entry["file"],
        "config_sha256": entry["sha256"],
        "command": "python -m mlx_lm.lora -c config.yaml (benchmarks/lora_yaml/run_lora.py)",
        "yaml": memory_keys(config),
        "effective": memory_keys(inner.get("args", {})),
        "model": described["model"],
        "data": described["data"],
        "covers": described["covers"],
        "versions": inner.get("versions") or versions(),
        "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "status": status,
        "expected_error": expected,
        "error": inner.get("error"),
        "exit_code": code,
        "mlx_peak_gb": inner.get("mlx_peak_gb"),
        "peak_memory_reports": inner.get("peak_memory_reports", []),
        "mx_peak_end_gb": inner.get("mx_peak_end_gb"),
        "mx_peak_before_train_gb": inner.get("mx_peak_before_train_gb"),
        "mx_active_before_train_gb": inner.get("mx_active_before_train_gb"),
        "peak_rss_gb": inner.get("vm_hwm_gb"),
        # The device footprint (pytest_yourai.footprint, as the probe measures it), where
        # the run had a GPU: what the machine had to hold, per phase.
        "footprint_peak_gb": (inner.get("footprint") or {}).get("footprint_peak_gb"),
        "build_footprint_gb": (inner.get("footprint") or {}).get("build_footprint_gb"),
        "train_footprint_gb": (inner.get("footprint") or {}).get("train_footprint_gb"),
        "footprint_source": (inner.get("footprint") or {}).get("footprint_source"),
        "ru_maxrss_gb": inner.get("ru_maxrss_gb"),
        "wait4_maxrss_gb": round(usage.ru_maxrss * 1024 / 1e9, 6),
        "train_batches": [b["shape"] for b in train],
        "valid_batches": [b["shape"] for b in valid],
        "other_batches": [b["shape"] for b in inner.get("other_batches", [])],
        "train_batch_peak_gb": [b["peak_gb"] for b in train],
        "valid_batch_peak_gb": [b["peak_gb"] for b in valid],
        "longest_train_batch": inner.get("longest_train_batch"),
        "longest_valid_batch": inner.get("longest_valid_batch"),
        "train_rows": inner.get("train_rows"),
        "valid_rows": inner.get("valid_rows"),
        "trainable_parameters": inner.get("trainable_parameters"),
        "total_parameters": inner.get("total_parameters"),
        "train_reports": inner.get("train_reports", []),
        "val_reports": inner.get("val_reports", []),
        "mlx_lm_callback": inner.get("callback_from_mlx_lm"),
        "wall_s": round(wall, 3),
    }
    if status != "ok":
        record["traceback_tail"] = inner.get("traceback_tail")
        record["output_tail"] = tail
    return record


def drop_records(out: Path, names: set[str]) -> None:
    """Rewrite ``out`` without the records of ``names`` (atomically: a temporary file, then
    a rename), so that --rerun replaces them."""
    if not out.exists():
        return
    kept = [r for r in read_jsonl(out) if r.get("name") not in names]
    handle, temporary = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        for record in kept:
            stream.write(json.dumps(record) + "\n")
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, out)


def run(only: list[str], out: Path, work: Path, rerun: bool, timeout: int = TIMEOUT_S) -> int:
    grid = fixtures().grid()
    configs = load_configs()
    found = problems(configs, grid)
    if found:
        print("the grid is incomplete or broken (see `list`):", *found, sep="\n  ")
        return 1
    unknown = [name for name in only if name not in configs]
    if unknown:
        print(f"no such config: {', '.join(unknown)}", file=sys.stderr)
        return 2
    selected = only or list(configs)
    if rerun:
        drop_records(out, set(selected))
    done = {r.get("name") for r in read_jsonl(out)} if out.exists() else set()
    todo = [name for name in selected if name not in done]
    skipped = len(selected) - len(todo)
    print(f"{len(todo)} configs to run, {skipped} already in {out}; work in {work}", flush=True)
    if not todo:
        return 0
    work.mkdir(parents=True, exist_ok=True)
    needed = sorted(
        {configs[n]["yaml"]["model"] for n in todo} | {configs[n]["yaml"]["data"] for n in todo}
    )
    build_fixtures(needed, grid, work)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    unexpected = 0
    for number, name in enumerate(todo, start=1):
        record = run_one(name, configs[name], grid, work, timeout)
        append_record(out, record)
        unexpected += record["status"] not in ("ok", "expected_error")
        longest = record["longest_train_batch"]
        print(
            f"[{number}/{len(todo)}] {name}: {record['status']}, mlx peak "
            f"{record['mlx_peak_gb']} GB, peak RSS {record['peak_rss_gb']} GB, longest "
            f"train batch {longest}, {record['wall_s']:.1f} s"
            + (f" ({record['error']})" if record["error"] else ""),
            flush=True,
        )
    print(f"{len(todo)} configs in {time.perf_counter() - started:.1f} s", flush=True)
    return 1 if unexpected else 0


def relative(value: Any, reference: Any) -> float | None:
    """(value - reference) / reference, or None when either is missing (or reference is 0)."""
    if value is None or not reference:
        return None
    return round((float(value) - float(reference)) / float(reference), 5)


def events_of(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    events = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


def last_event(events: list[dict[str, Any]], *names: str) -> dict[str, Any] | None:
    found = [e for e in events if e.get("event") in names]
    return found[-1] if found else None


def result_fields(preview: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """Fields of the probe's BENCHMARK_RESULT line found in a (possibly cut) output preview:
    each key's value decoded where it starts, so a preview that lost the line's head still
    gives the keys it holds."""
    decoder = json.JSONDecoder()
    found: dict[str, Any] = {}
    for key in keys:
        at = preview.rfind(f'"{key}": ')
        if at < 0:
            continue
        try:
            found[key], _ = decoder.raw_decode(preview, at + len(key) + 4)
        except json.JSONDecodeError:
            continue
    return found


def refusal_of(reason: str) -> str | None:
    """What the estimator refused to model, from pre-flight's reason."""
    match = re.search(r"no estimate: (.*?)(?:; --yourai-force|$)", reason or "")
    return match.group(1) if match else None


def plugin_option() -> list[str]:
    """``-p pytest_yourai.plugin`` where the package is on the path but not installed (the
    GPU machine), nothing where its entry point loads it already."""
    points = metadata.entry_points(group="pytest11")
    return [] if any("pytest_yourai" in p.value for p in points) else ["-p", "pytest_yourai.plugin"]


def compare_one(
    name: str,
    entry: dict[str, Any],
    mlx: dict[str, Any],
    work: Path,
    timeout: int,
) -> dict[str, Any]:
    config = entry["yaml"]
    run_dir = work / "plugin" / name
    if run_dir.exists():
        for path in sorted(run_dir.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
    (run_dir / "bench").mkdir(parents=True, exist_ok=True)
    (run_dir / "bench" / BENCH_TEST.name).write_text(BENCH_TEST.read_text(encoding="utf-8"))
    config_path = run_dir / f"{name}.yaml"
    config_path.write_text(
        resolved_yaml(
            entry["text"], work / "models" / config["model"], work / "data" / config["data"]
        )
    )
    results, log, output = run_dir / "plugin.json", run_dir / "log.jsonl", run_dir / "output.log"
    argv = [
        sys.executable, "-m", "pytest", "bench", *plugin_option(),
        "--yourai-lora-config", str(config_path),
        "--yourai-force",
        "--yourai-json", str(results),
        "--yourai-log", str(log),
        "-p", "no:cacheprovider",
        "--rootdir", str(run_dir),
    ]  # fmt: skip
    started = time.perf_counter()
    code, _, timed_out = child_run(argv, run_dir, output, timeout)
    wall = time.perf_counter() - started
    text = re.sub(
        r"\x1b\[[0-9;]*[A-Za-z]", "", output.read_text(encoding="utf-8", errors="replace")
    )
    events = events_of(log)
    preflight = last_event(events, "preflight_check") or {}
    probe_end = (
        last_event(events, "subprocess_completed", "subprocess_failed", "subprocess_timeout") or {}
    )
    row: dict[str, Any] = {}
    if results.exists():
        rows = json.loads(results.read_text()).get("results") or []
        row = next((r for r in rows if r.get("preset") == name), rows[0] if rows else {})
    usage = next((line for line in text.splitlines() if line.startswith("ERROR:")), None)
    probe_started = last_event(events, "subprocess_start") is not None
    if timed_out:
        status = "timeout"
    elif code == 4:
        status = "usage_error"
    elif probe_end.get("event") == "subprocess_completed" and probe_end.get("exit_code") == 0:
        status = "ok" if code == 0 else "failed"
    elif probe_end.get("event") == "subprocess_failed":
        status = "probe_error"
    elif probe_end.get("event") == "subprocess_timeout":
        status = "probe_timeout"
    else:
        status = "failed"
    shapes = result_fields(
        str(probe_end.get("stdout_preview") or ""),
        ("batch_shapes_run", "val_batch_shapes_run", "steps", "trainable_parameters"),
    )
    longest = preflight.get("longest_batch_tokens")
    mlx_longest = mlx.get("longest_train_batch")
    probe_peak = row.get("peak_memory_gb", probe_end.get("peak_memory_gb"))
    if status != "ok":
        probe_peak = None
    base = preflight.get("estimated_base_gb")
    conservative = preflight.get("estimated_conservative_gb")
    # What mlx_lm.lora's process held: its device footprint where it had a GPU, else its
    # peak RSS (on CPU the footprint is the resident set).
    rss = mlx.get("footprint_peak_gb") or mlx.get("peak_rss_gb")
    footprint = row.get("footprint_peak_gb", probe_end.get("footprint_peak_gb"))
    if status != "ok":
        footprint = None
    refused = refusal_of(str(preflight.get("reason") or "")) if conservative is None else None
    record: dict[str, Any] = {
        "name": name,
        "config": entry["file"],
        "config_sha256": entry["sha256"],
        "same_config_as_mlx_lm_run": entry["sha256"] == mlx.get("config_sha256"),
        "command": "python -m pytest bench --yourai-lora-config NAME.yaml --yourai-force "
        "--yourai-json plugin.json --yourai-log log.jsonl -p no:cacheprovider",
        "mlx_lm_status": mlx.get("status"),
        "mlx_lm_error": mlx.get("error"),
        "status": status,
        "exit_code": code,
        "verdict": row.get("verdict"),
        "probe_started": probe_started,
        "usage_error": usage,
        "probe_error": probe_end.get("reason") if status == "probe_error" else None,
        "preflight_decision": preflight.get("decision"),
        "longest_batch": longest,
        "mlx_lm_longest_train_batch": mlx_longest,
        "longest_batch_equal": (
            list(longest) == list(mlx_longest) if longest and mlx_longest else None
        ),
        "truncated_rows": preflight.get("truncated_rows"),
        "probe_mlx_peak_gb": probe_peak,
        "probe_train_peak_gb": row.get("train_peak_memory_gb") if status == "ok" else None,
        "mlx_lm_peak_gb": mlx.get("mlx_peak_gb"),
        "mlx_peak_error": relative(probe_peak, mlx.get("mlx_peak_gb")),
        "estimated_base_gb": base,
        "estimated_conservative_gb": conservative,
        "estimate_refused": refused,
        "mlx_lm_peak_rss_gb": rss,
        "mlx_lm_reference": "device footprint" if mlx.get("footprint_peak_gb") else "peak RSS",
        "base_error": relative(base, rss),
        "conservative_error": relative(conservative, rss),
        "conservative_covers_rss": (conservative >= rss) if conservative and rss else None,
        "probe_footprint_gb": footprint,
        "footprint_error": relative(footprint, rss),
        "probe_steps": shapes.get("steps"),
        "probe_batch_shapes": shapes.get("batch_shapes_run"),
        "probe_val_batch_shapes": shapes.get("val_batch_shapes_run"),
        "mlx_lm_train_batches": mlx.get("train_batches"),
        "mlx_lm_valid_batches": mlx.get("valid_batches"),
        "probe_trainable_parameters": shapes.get("trainable_parameters"),
        "mlx_lm_trainable_parameters": mlx.get("trainable_parameters"),
        "probe_elapsed_s": probe_end.get("elapsed_s"),
        "wall_s": round(wall, 3),
    }
    if status != "ok":
        record["output_tail"] = text[-1500:]
    return record


def compare(mlx_lm: Path, only: list[str], out: Path, work: Path, rerun: bool, timeout: int) -> int:
    grid = fixtures().grid()
    configs = load_configs()
    measured = {r["name"]: r for r in read_jsonl(mlx_lm)}
    unknown = [name for name in only if name not in configs or name not in measured]
    if unknown:
        print(f"no such config in the grid and {mlx_lm}: {', '.join(unknown)}", file=sys.stderr)
        return 2
    usable = [
        name for name in configs if measured.get(name, {}).get("status") in ("ok", "expected_error")
    ]
    left = sorted(set(measured) - set(usable))
    if left:
        print(f"not compared (mlx-lm's run did not end ok or as expected): {', '.join(left)}")
    selected = [name for name in usable if not only or name in only]
    changed = [n for n in selected if configs[n]["sha256"] != measured[n].get("config_sha256")]
    if changed:
        print(f"warning: changed since mlx-lm's run: {', '.join(changed)}", file=sys.stderr)
    if rerun:
        drop_records(out, set(selected))
    done = {r.get("name") for r in read_jsonl(out)} if out.exists() else set()
    todo = [name for name in selected if name not in done]
    print(
        f"{len(todo)} configs to compare, {len(selected) - len(todo)} already in {out}; "
        f"work in {work}",
        flush=True,
    )
    if not todo:
        return 0
    needed = sorted(
        {configs[n]["yaml"]["model"] for n in todo} | {configs[n]["yaml"]["data"] for n in todo}
    )
    work.mkdir(parents=True, exist_ok=True)
    build_fixtures(needed, grid, work)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for number, name in enumerate(todo, start=1):
        record = compare_one(name, configs[name], measured[name], work, timeout)
        append_record(out, record)
        detail = (
            f"mlx peak {record['probe_mlx_peak_gb']} vs {record['mlx_lm_peak_gb']} GB "
            f"({percent(record['mlx_peak_error'])}), longest {record['longest_batch']} vs "
            f"{record['mlx_lm_longest_train_batch']}, estimate {record['estimated_base_gb']}"
            f" vs RSS {record['mlx_lm_peak_rss_gb']} GB ({percent(record['base_error'])})"
        )
        if record["status"] != "ok":
            detail = record["usage_error"] or record["probe_error"] or record["status"]
        print(
            f"[{number}/{len(todo)}] {name}: {record['status']} (exit {record['exit_code']}), "
            f"{detail}, {record['wall_s']:.1f} s",
            flush=True,
        )
    print(f"{len(todo)} configs in {time.perf_counter() - started:.1f} s", flush=True)
    return 0


def percent(value: float | None, signed: bool = True) -> str:
    if value is None:
        return "-"
    return f"{value * 100:+.1f}%" if signed else f"{value * 100:.1f}%"


def gb(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def report(path: Path) -> int:
    records = read_jsonl(path)
    compared = [r for r in records if r.get("mlx_lm_status") == "ok"]
    expected = [r for r in records if r.get("mlx_lm_status") != "ok"]
    header = (
        f"{'config':40} {'status':11} {'longest':9} {'=':1} {'probe pk':8} {'mlx-lm pk':9} "
        f"{'err':6} {'base':6} {'cons':6} {'RSS':6} {'b err':6} {'c>=R':4} "
        f"{'footpr':6} {'f err':6} {'wall s':6}"
    )
    print(header)
    print("-" * len(header))
    for r in compared:
        longest = "x".join(map(str, r["longest_batch"])) if r.get("longest_batch") else "-"
        equal = {True: "=", False: "!", None: "?"}[r.get("longest_batch_equal")]
        covers = {True: "yes", False: "NO", None: "-"}[r.get("conservative_covers_rss")]
        print(
            f"{r['name']:40} {r['status']:11} {longest:9} {equal:1} "
            f"{gb(r['probe_mlx_peak_gb']):8} {gb(r['mlx_lm_peak_gb']):9} "
            f"{percent(r['mlx_peak_error']):6} {gb(r['estimated_base_gb'])[:6]:6} "
            f"{gb(r['estimated_conservative_gb'])[:6]:6} {gb(r['mlx_lm_peak_rss_gb'])[:6]:6} "
            f"{percent(r['base_error']):6} {covers:4} {gb(r['probe_footprint_gb'])[:6]:6} "
            f"{percent(r['footprint_error']):6} {r['wall_s']:6.1f}"
        )
    n = len(compared)
    ok = [r for r in compared if r["status"] == "ok"]
    peaks = [r for r in compared if r.get("mlx_peak_error") is not None]
    within = [r for r in peaks if abs(r["mlx_peak_error"]) <= MLX_PEAK_TARGET]
    equal = [r for r in compared if r.get("longest_batch_equal")]
    estimated = [r for r in compared if r.get("base_error") is not None]
    refused = [r for r in compared if r.get("estimate_refused")]
    under = [r for r in estimated if r.get("conservative_covers_rss") is False]
    print(f"\n{n} configs that mlx-lm ran to the end; the plugin's run ok: {len(ok)}/{n}")
    for r in compared:
        if r["status"] != "ok":
            print(f"  not ok: {r['name']}: {r['status']} (exit {r['exit_code']})")
    print(
        f"MLX peak, probe vs mlx-lm's Peak mem, |error| <= {MLX_PEAK_TARGET:.0%}: "
        f"{len(within)}/{n}"
        + (
            f" (median |error| {percent(median([abs(r['mlx_peak_error']) for r in peaks]), False)}"
            f", max {percent(max([abs(r['mlx_peak_error']) for r in peaks]), False)})"
            if peaks
            else ""
        )
    )
    for r in peaks:
        if r not in within:
            print(f"  off: {r['name']}: {percent(r['mlx_peak_error'])}")
    print(f"longest batch equal to mlx-lm's longest training batch: {len(equal)}/{n}")
    for r in compared:
        if not r.get("longest_batch_equal"):
            print(
                f"  differs: {r['name']}: {r.get('longest_batch')} vs "
                f"{r.get('mlx_lm_longest_train_batch')}"
            )
    if estimated:
        errors = [abs(r["base_error"]) for r in estimated]
        signed = median([r["base_error"] for r in estimated])
        median_met = "met" if median(errors) <= BASE_MEDIAN_TARGET else "NOT met"
        max_met = "met" if max(errors) <= BASE_MAX_TARGET else "NOT met"
        print(
            f"estimate vs mlx-lm's peak RSS ({len(estimated)} configs with an estimate): base "
            f"|error| median {percent(median(errors), False)} (target <= "
            f"{BASE_MEDIAN_TARGET:.0%}: {median_met}"
            f"; signed median {percent(signed)}), max {percent(max(errors), False)} (target <= "
            f"{BASE_MAX_TARGET:.0%}: {max_met}); "
            f"conservative under the RSS: {len(under)}/{len(estimated)}"
        )
        for r in estimated:
            if abs(r["base_error"]) > BASE_MAX_TARGET or r in under:
                print(
                    f"  {r['name']}: base {percent(r['base_error'])}, conservative "
                    f"{percent(r['conservative_error'])}"
                )
    print(f"estimate refused ({len(refused)}):")
    for r in refused:
        print(f"  {r['name']}: {r['estimate_refused']}")
    footprints = [
        abs(r["footprint_error"]) for r in compared if r.get("footprint_error") is not None
    ]
    if footprints:
        print(
            f"probe footprint (RSS) vs mlx-lm's peak RSS: median |error| "
            f"{percent(median(footprints), False)}, max {percent(max(footprints), False)}"
        )
    if expected:
        print(f"\nconfigs mlx-lm fails as expected ({len(expected)}): what the plugin did")
        for r in expected:
            said = r.get("usage_error") or r.get("probe_error") or r["status"]
            when = "before any probe" if not r.get("probe_started") else "in the probe"
            print(f"  {r['name']}: {r['status']} (exit {r['exit_code']}, {when}): {said}")
            print(f"    mlx-lm: {r.get('mlx_lm_error')}")
    total = sum(r.get("wall_s") or 0 for r in records)
    print(f"\n{len(records)} plugin runs, {total:.1f} s in all")
    return 0


def estimate(
    mlx_lm: Path, out: Path, work: Path, backend: str, in_flight: str, available_gb: float
) -> int:
    """The plugin's estimate (no probe: ``python -m pytest_yourai.estimate --lora-config``)
    of each config mlx-lm ran, beside what mlx-lm's process held (its device footprint where
    it had a GPU, else its peak RSS) and its Peak mem. For runs made on another machine: the
    models are built here as config.json and tokenizer alone (``--config-only``: what the
    estimate reads), the data in full."""
    configs = load_configs()
    measured = [r for r in read_jsonl(mlx_lm) if r.get("status") == "ok" and r["name"] in configs]
    names = sorted({configs[r["name"]]["yaml"]["model"] for r in measured})
    data = sorted({configs[r["name"]]["yaml"]["data"] for r in measured})
    env = dict(os.environ)
    env[fixtures().GRID_ENV] = str(grid_folder())
    subprocess.run(
        [sys.executable, str(FIXTURES), str(work), *names, *data, "--config-only"],
        check=True,
        env=env,
    )
    out.unlink(missing_ok=True)
    rows = []
    for mlx in measured:
        name = mlx["name"]
        entry = configs[name]
        run_dir = work / "estimate" / name
        run_dir.mkdir(parents=True, exist_ok=True)
        config_path = run_dir / f"{name}.yaml"
        config_path.write_text(
            resolved_yaml(
                entry["text"],
                work / "models" / entry["yaml"]["model"],
                work / "data" / entry["yaml"]["data"],
            )
        )
        argv = [sys.executable, "-m", "pytest_yourai.estimate", "--lora-config", str(config_path),
                "--backend", backend, "--in-flight", in_flight, "--available-gb",
                str(available_gb), "--json"]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
        answer = json.loads(done.stdout) if done.stdout.strip().startswith("{") else {}
        held = mlx.get("footprint_peak_gb") or mlx.get("peak_rss_gb")
        row = {
            "name": name,
            "config_sha256": entry["sha256"],
            "same_config_as_mlx_lm_run": entry["sha256"] == mlx.get("config_sha256"),
            "command": " ".join(
                ["python -m pytest_yourai.estimate --lora-config NAME.yaml", *argv[6:]]
            ),
            "exit_code": done.returncode,
            "error": None if answer else (done.stderr or done.stdout)[-500:],
            "estimated_base_gb": answer.get("estimated_base_gb"),
            "estimated_conservative_gb": answer.get("estimated_conservative_gb"),
            "estimated_mlx_peak_gb": answer.get("mlx_peak_gb"),
            "reason": answer.get("reason"),
            "mlx_lm_held_gb": held,
            "mlx_lm_reference": "device footprint" if mlx.get("footprint_peak_gb") else "peak RSS",
            "mlx_lm_peak_gb": mlx.get("mlx_peak_gb"),
            "base_error": relative(answer.get("estimated_base_gb"), held),
            "conservative_error": relative(answer.get("estimated_conservative_gb"), held),
            "conservative_covers": (
                answer["estimated_conservative_gb"] >= held
                if answer.get("estimated_conservative_gb") and held
                else None
            ),
            "mlx_peak_error": relative(answer.get("mlx_peak_gb"), mlx.get("mlx_peak_gb")),
        }
        append_record(out, row)
        rows.append(row)
        print(f"{name:46} base {gb(row['estimated_base_gb'])} cons "
              f"{gb(row['estimated_conservative_gb'])} vs held {gb(held)} "
              f"({percent(row['base_error'])}); mlx peak {gb(row['estimated_mlx_peak_gb'])} vs "
              f"{gb(mlx.get('mlx_peak_gb'))} ({percent(row['mlx_peak_error'])})"
              + (f" {row['error'] or row['reason']}" if row["error"] or row["reason"] else ""),
              flush=True)  # fmt: skip
    summarize_estimates(rows)
    return 0


def summarize_estimates(rows: list[dict[str, Any]]) -> None:
    estimated = [r for r in rows if r.get("base_error") is not None]
    if not estimated:
        print("no estimates")
        return
    errors = [abs(r["base_error"]) for r in estimated]
    under = [r["name"] for r in estimated if r.get("conservative_covers") is False]
    print(
        f"{len(estimated)}/{len(rows)} estimated: base |error| median "
        f"{percent(median(errors), False)}, max {percent(max(errors), False)} (targets "
        f"{BASE_MEDIAN_TARGET:.0%}, {BASE_MAX_TARGET:.0%}); conservative under what mlx-lm "
        f"held: {len(under)}" + (f" ({', '.join(under)})" if under else "")
    )


AGREE_SIZES_GB = (2.1, 2.3, 8.0)


def agree_one(config_path: Path, size: float, run_dir: Path) -> dict[str, Any]:
    """`yourai check` and the pytest pre-flight on one YAML at one memory size."""
    check = subprocess.run(
        [sys.executable, "-m", "pytest_yourai.check", str(config_path), "--memory", str(size),
         "--backend", "cpu", "--json"],
        capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
    )  # fmt: skip
    answer = json.loads(check.stdout) if check.stdout.strip() else {}
    log = run_dir / f"agree-{size:g}.jsonl"
    log.unlink(missing_ok=True)
    plugin = subprocess.run(
        [sys.executable, "-m", "pytest", "bench", "--yourai-lora-config", str(config_path),
         "--yourai-estimate-only", "--yourai-max-memory", str(size), "--yourai-log", str(log),
         "--rootdir", str(run_dir), "-q"],
        cwd=run_dir, capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
    )  # fmt: skip
    preflight = last_event(events_of(log), "preflight_check") or {}
    keys = ("decision", "estimated_base_gb", "estimated_conservative_gb", "batch_size", "seq_len")
    same = bool(preflight) and all(answer.get(k) == preflight.get(k) for k in keys)
    fits_exit = 0 if answer.get("decision") == "run" else 1
    # A config both refuse as a usage error (exit 4, before any estimate) agrees too.
    both_refuse = check.returncode == plugin.returncode == 4
    return {
        "name": config_path.stem,
        "memory_gb": size,
        "check_exit": check.returncode,
        "pytest_exit": plugin.returncode,
        "check": {k: answer.get(k) for k in keys},
        "preflight": {k: preflight.get(k) for k in keys},
        "preflight_available_gb": preflight.get("available_gb"),
        "agree": both_refuse or (same and check.returncode == fits_exit),
    }


def agree(work: Path, out: Path) -> int:
    """`yourai check` against the pre-flight on every YAML `compare` wrote, at AGREE_SIZES_GB."""
    configs = sorted((work / "plugin").glob("*/*.yaml"))
    if not configs:
        print(f"no YAML under {work / 'plugin'}: run compare first", file=sys.stderr)
        return 1
    out.unlink(missing_ok=True)
    rows = []
    for config_path in configs:
        for size in AGREE_SIZES_GB:
            row = agree_one(config_path, size, config_path.parent)
            append_record(out, row)
            rows.append(row)
            print(f"{row['name']} @ {size:g} GB: check {row['check']['decision']} "
                  f"(exit {row['check_exit']}), pre-flight {row['preflight']['decision']}: "
                  f"{'agree' if row['agree'] else 'DISAGREE'}", flush=True)  # fmt: skip
    agreed = sum(row["agree"] for row in rows)
    print(f"{agreed}/{len(rows)} agree ({len(configs)} configs x {len(AGREE_SIZES_GB)} sizes)")
    return 0 if agreed == len(rows) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--grid",
        type=Path,
        help="another grid folder (grid.yaml and configs/), e.g. benchmarks/lora_yaml/gpu",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the grid, what each config covers, and the coverage check")

    def runs_configs(command: argparse.ArgumentParser, work: str, rerun: str) -> None:
        command.add_argument("--only", nargs="+", default=[], metavar="NAME")
        command.add_argument("--out", type=Path, required=True)
        command.add_argument(
            "--work",
            type=Path,
            default=Path(tempfile.gettempdir()) / "yourai-lora-yaml",
            help=f"{work} (default: %(default)s)",
        )
        command.add_argument("--rerun", action="store_true", help=rerun)
        command.add_argument(
            "--timeout", type=int, default=TIMEOUT_S, help="seconds per config (%(default)s)"
        )

    runs_configs(
        sub.add_parser("run", help="run the configs, one JSON line each"),
        "where models, data and runs are written",
        "run (and replace) configs in --out",
    )
    compare_p = sub.add_parser("compare", help="run the plugin on the configs mlx-lm ran")
    compare_p.add_argument("--mlx-lm", type=Path, required=True, help="a results file of run")
    runs_configs(compare_p, "the work directory of run", "compare (and replace) again")
    agree_p = sub.add_parser(
        "agree", help="yourai check against the pre-flight on compare's YAML files, 3 sizes"
    )
    agree_p.add_argument("--out", type=Path, required=True)
    agree_p.add_argument(
        "--work", type=Path, default=Path(tempfile.gettempdir()) / "yourai-lora-yaml"
    )
    estimate_p = sub.add_parser(
        "estimate", help="the estimate alone (no probe) of each config of a run file"
    )
    estimate_p.add_argument("--mlx-lm", type=Path, required=True, help="a results file of run")
    estimate_p.add_argument("--out", type=Path, required=True)
    estimate_p.add_argument(
        "--work", type=Path, default=Path(tempfile.gettempdir()) / "yourai-lora-yaml-estimate"
    )
    estimate_p.add_argument("--backend", default="cpu", choices=("cpu", "cuda", "metal"))
    estimate_p.add_argument("--in-flight", default="mlx", choices=("mlx", "bounded"))
    estimate_p.add_argument(
        "--available-gb", type=float, default=139.0, help="the machine's free memory"
    )
    report_p = sub.add_parser("report", help="a table and the targets of a compare file")
    report_p.add_argument("path", type=Path)
    args = parser.parse_args()
    if args.grid is not None:
        os.environ[fixtures().GRID_ENV] = str(args.grid.resolve())
    if args.command == "list":
        return list_grid()
    if args.command == "compare":
        return compare(
            args.mlx_lm, args.only, args.out, args.work.resolve(), args.rerun, args.timeout
        )
    if args.command == "report":
        return report(args.path)
    if args.command == "estimate":
        return estimate(
            args.mlx_lm, args.out, args.work.resolve(), args.backend, args.in_flight,
            args.available_gb,
        )  # fmt: skip
    if args.command == "agree":
        return agree(args.work.resolve(), args.out)
    return run(args.only, args.out, args.work.resolve(), args.rerun, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
