"""mlx_lm.lora YAML configs: the installed mlx-lm's defaults and merge, read without importing
mlx, and every refusal as one line naming the file, the key and the value.

What mlx-lm itself does is asked of it in a subprocess (which may import mlx; this process
may not)."""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]

from pytest_yourai import lora_config
from pytest_yourai.errors import YouraiUsageError
from pytest_yourai.lora_config import LoraRun, load_lora_config, mlx_lm_config_defaults

EXAMPLE = Path(__file__).parent / "lora_configs" / "mlx_lm_example.yaml"

# mlx_lm.lora's own main() on each file given, its run() replaced by a dump of its args.
MLX_LM_MAIN = """
import json, sys
import mlx_lm.lora as lora
out = {}
for path in sys.argv[1:]:
    lora.run = lambda args: out.__setitem__(path, vars(args))
    sys.argv = ["mlx_lm.lora", "-c", path]
    lora.main()
print("MLX_LM_ARGS " + json.dumps(out))
"""


def in_subprocess(code: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0 and "No module named 'mlx" in done.stderr:
        pytest.skip(f"mlx-lm does not import here: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr
    return done.stdout


def write(directory: Path, text: str, name: str = "lora.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load(tmp_path: Path, text: str) -> LoraRun:
    return load_lora_config(write(tmp_path, text))


def refusal(tmp_path: Path, text: str) -> tuple[Path, str]:
    path = write(tmp_path, text)
    with pytest.raises(YouraiUsageError) as info:
        load_lora_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return path, message


def test_defaults_are_the_installed_mlx_lm_ones(tmp_path: Path) -> None:
    code = "import mlx_lm.lora as l, json; print(json.dumps(l.CONFIG_DEFAULTS))"
    expected = json.loads(in_subprocess(code))
    assert mlx_lm_config_defaults() == expected
    run = load(tmp_path, "train: true\n")
    parameters = expected["lora_parameters"]
    assert (run.model, run.data) == (expected["model"], expected["data"])
    assert (run.fine_tune_type, run.optimizer) == (
        expected["fine_tune_type"],
        expected["optimizer"],
    )
    assert run.optimizer_config == expected["optimizer_config"][expected["optimizer"]]
    assert (run.num_layers, run.batch_size, run.iters) == (
        expected["num_layers"],
        expected["batch_size"],
        expected["iters"],
    )
    assert (run.max_seq_length, run.val_batches, run.steps_per_eval) == (
        expected["max_seq_length"],
        expected["val_batches"],
        expected["steps_per_eval"],
    )
    assert (run.lora_rank, run.lora_scale, run.lora_dropout, run.lora_keys) == (
        parameters["rank"],
        parameters["scale"],
        parameters["dropout"],
        None,
    )
    assert (run.grad_checkpoint, run.mask_prompt) == (
        expected["grad_checkpoint"],
        expected["mask_prompt"],
    )
    assert run.grad_accumulation_steps == expected["grad_accumulation_steps"]
    assert run.raw["learning_rate"] == expected["learning_rate"]


def test_defaults_are_a_copy() -> None:
    mlx_lm_config_defaults()["lora_parameters"]["rank"] = 99
    assert mlx_lm_config_defaults()["lora_parameters"]["rank"] != 99


MERGE_CASES = {
    "minimal": "train: true\n",
    "nulls": "batch_size: null\nlora_parameters: null\nmodel: ~\n",
    "shallow": """
        optimizer: AdamW
        optimizer_config:
          adamw: {weight_decay: 0.05, eps: 1e-6}
        lora_parameters: {rank: 16, scale: 1e1, dropout: 0.1}
        """,
    "ignored": "trust_remote_code: true\nclear_cache_threshold: 1000\nconfig: other.yaml\n",
    "extra": "hf_dataset: {path: billsum, prompt_feature: text}\nchat_feature: conversation\n",
}


@pytest.fixture(scope="module")
def mlx_lm_args(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any]]:
    """What mlx_lm.lora's main() hands run() for each MERGE_CASES file and the example."""
    directory = tmp_path_factory.mktemp("merge")
    paths = {name: write(directory, text, f"{name}.yaml") for name, text in MERGE_CASES.items()}
    paths["example"] = EXAMPLE
    out = in_subprocess(MLX_LM_MAIN, *map(str, paths.values()))
    line = next(x for x in out.splitlines() if x.startswith("MLX_LM_ARGS "))
    found = json.loads(line.removeprefix("MLX_LM_ARGS "))
    return {name: (path, found[str(path)]) for name, path in paths.items()}


@pytest.mark.parametrize("name", [*MERGE_CASES, "example"])
def test_raw_is_what_mlx_lm_lora_hands_run(
    name: str, mlx_lm_args: dict[str, tuple[Path, Any]]
) -> None:
    if name == "ignored" and "trust_remote_code" not in mlx_lm_config_defaults():
        pytest.skip("this mlx-lm reads no trust_remote_code key")
    path, expected = mlx_lm_args[name]
    assert json.loads(json.dumps(dict(load_lora_config(path).raw))) == expected


def test_mlx_lm_example_config_is_accepted() -> None:
    run = load_lora_config(EXAMPLE)
    assert run.model == "mlx-community/Llama-3.2-1B-Instruct-bf16"
    assert run.data == "mlx-community/WikiSQL"
    assert (run.fine_tune_type, run.optimizer, run.optimizer_config) == ("lora", "adamw", {})
    assert (run.num_layers, run.batch_size, run.iters, run.val_batches) == (16, 4, 1000, 25)
    assert (run.steps_per_eval, run.grad_accumulation_steps, run.max_seq_length) == (200, 1, 2048)
    assert run.grad_checkpoint is False
    assert (run.lora_rank, run.lora_scale, run.lora_dropout) == (8, 20.0, 0.0)
    assert run.lora_keys == ("self_attn.q_proj", "self_attn.v_proj")
    assert run.raw["learning_rate"] == 1e-5 and isinstance(run.raw["learning_rate"], float)
    assert (run.raw["train"], run.raw["test"], run.raw["test_batches"]) == (True, False, 100)
    assert (run.raw["seed"], run.raw["adapter_path"], run.raw["save_every"]) == (0, "adapters", 100)


def test_exponents_without_a_dot_are_floats(tmp_path: Path) -> None:
    run = load(
        tmp_path,
        """
        learning_rate: 1e-5
        optimizer: adamw
        optimizer_config: {adamw: {eps: 1e-6}}
        lora_parameters: {rank: 8, scale: 2e1, dropout: 0.0}
        """,
    )
    assert run.raw["learning_rate"] == 1e-5
    assert run.optimizer_config == {"eps": 1e-6}
    assert run.lora_scale == 20.0


def test_blocks_replace_the_defaults_whole(tmp_path: Path) -> None:
    run = load(
        tmp_path,
        """
        optimizer: AdamW
        optimizer_config: {adamw: {weight_decay: 0.05}}
        lora_parameters: {rank: 16, scale: 10.0, dropout: 0.1}
        """,
    )
    assert run.optimizer == "adamw" and run.optimizer_config == {"weight_decay": 0.05}
    assert run.raw["optimizer_config"] == {"adamw": {"weight_decay": 0.05}}
    assert (run.lora_rank, run.lora_scale, run.lora_dropout, run.lora_keys) == (16, 10.0, 0.1, None)
    assert run.raw["lora_parameters"] == {"rank": 16, "scale": 10.0, "dropout": 0.1}


def test_an_optimizer_left_out_of_optimizer_config_gets_no_arguments(tmp_path: Path) -> None:
    run = load(tmp_path, "optimizer: sgd\noptimizer_config: {adamw: {weight_decay: 0.05}}\n")
    assert (run.optimizer, run.optimizer_config) == ("sgd", {})


@pytest.mark.parametrize("missing", ["rank", "scale", "dropout"])
def test_a_lora_parameters_block_needs_rank_scale_and_dropout(tmp_path: Path, missing: str) -> None:
    block = {"rank": 8, "scale": 20.0, "dropout": 0.0}
    del block[missing]
    _, message = refusal(tmp_path, f"lora_parameters: {json.dumps(block)}\n")
    assert f"lora_parameters.{missing}: missing" in message
    assert "needs rank, scale and dropout" in message
    assert repr(block) in message


def test_full_fine_tuning_drops_lora_parameters(tmp_path: Path) -> None:
    run = load(tmp_path, "fine_tune_type: full\nlora_parameters: {rank: 4}\n")
    assert (run.lora_rank, run.lora_scale, run.lora_dropout, run.lora_keys) == (None,) * 4
    assert run.fine_tune_type == "full"


@pytest.mark.parametrize("value", [-1, 1, 64])
def test_num_layers_minus_one_or_positive(tmp_path: Path, value: int) -> None:
    assert load(tmp_path, f"num_layers: {value}\n").num_layers == value


# (YAML, the key the message names, the value it shows)
REFUSED = [
    ("batch_size: four", "batch_size", "four"),
    ("batch_size: 0", "batch_size", 0),
    ("batch_size: true", "batch_size", True),
    ("batch_size: 4.0", "batch_size", 4.0),
    ("grad_accumulation_steps: 0", "grad_accumulation_steps", 0),
    ("max_seq_length: -5", "max_seq_length", -5),
    ("iters: 0", "iters", 0),
    ("steps_per_eval: 0", "steps_per_eval", 0),
    ("steps_per_report: 0", "steps_per_report", 0),
    ("save_every: 0", "save_every", 0),
    ("val_batches: -2", "val_batches", -2),
    ("seed: -1", "seed", -1),
    ("num_layers: 0", "num_layers", 0),
    ("num_layers: -2", "num_layers", -2),
    ("num_layers: sixteen", "num_layers", "sixteen"),
    ("grad_checkpoint: 1", "grad_checkpoint", 1),
    ("mask_prompt: 'yes'", "mask_prompt", "yes"),
    ("train: on!", "train", "on!"),
    ("trust_remote_code: 1", "trust_remote_code", 1),
    ("fine_tune_type: qlora", "fine_tune_type", "qlora"),
    ("fine_tune_type: LoRA", "fine_tune_type", "LoRA"),
    ("optimizer: lion", "optimizer", "lion"),
    ("optimizer: 3", "optimizer", 3),
    ("learning_rate: fast", "learning_rate", "fast"),
    ("model: 7", "model", 7),
    ("model: ''", "model", ""),
    ("data: [a, b]", "data", ["a", "b"]),
    ("lora_parameters: [8, 20.0]", "lora_parameters", [8, 20.0]),
    ("lora_parameters: {rank: 1.5, scale: 20.0, dropout: 0.0}", "lora_parameters.rank", 1.5),
    ("lora_parameters: {rank: 0, scale: 20.0, dropout: 0.0}", "lora_parameters.rank", 0),
    ("lora_parameters: {rank: 8, scale: big, dropout: 0.0}", "lora_parameters.scale", "big"),
    ("lora_parameters: {rank: 8, scale: 2.0, dropout: 1.0}", "lora_parameters.dropout", 1.0),
    ("lora_parameters: {rank: 8, scale: 2.0, dropout: 0, alpha: 16}", "lora_parameters.alpha", 16),
    (
        "lora_parameters: {rank: 8, scale: 2.0, dropout: 0, keys: q_proj}",
        "lora_parameters.keys",
        "q_proj",
    ),
    ("lora_parameters: {rank: 8, scale: 2.0, dropout: 0, keys: []}", "lora_parameters.keys", []),
    ("lora_parameters: {rank: 8, scale: 2.0, dropout: 0, keys: [1]}", "lora_parameters.keys", [1]),
    ("optimizer_config: {AdamW: {eps: 0.1}}", "optimizer_config.AdamW", {"eps": 0.1}),
    ("optimizer_config: {lion: {}}", "optimizer_config.lion", {}),
    ("optimizer_config: {adam: [0.9]}", "optimizer_config.adam", [0.9]),
    ("optimizer_config: {adam: }", "optimizer_config.adam", None),
    ("optimizer_config: adamw", "optimizer_config", "adamw"),
    ("lr_schedule: cosine", "lr_schedule", "cosine"),
    ("hf_dataset: billsum", "hf_dataset", "billsum"),
    ("hf_dataset: [{train_split: train}]", "hf_dataset", [{"train_split": "train"}]),
]


@pytest.mark.parametrize(("text", "key", "value"), REFUSED, ids=[c[0] for c in REFUSED])
def test_refusals_name_file_key_and_value(tmp_path: Path, text: str, key: str, value: Any) -> None:
    path, message = refusal(tmp_path, text + "\n")
    assert message.startswith(f"{path}: {key}: ")
    assert message.endswith(f", got {value!r}")


def test_only_the_chosen_optimizer_needs_arguments(tmp_path: Path) -> None:
    assert load(tmp_path, "optimizer: sgd\noptimizer_config: {adam: }\n").optimizer_config == {}


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("batch_sise: 4", "(did you mean 'batch_size'?), got 4"),
        ("lora_layers: 8", "did you mean 'num_layers'?"),
        ("learningrate: 0.1", "did you mean 'learning_rate'?"),
        ("training_mode: normal", "not a key mlx_lm.lora reads, got 'normal'"),
    ],
)
def test_an_unknown_key_is_refused_with_the_closest_known_one(
    tmp_path: Path, text: str, hint: str
) -> None:
    key = text.split(":")[0]
    _, message = refusal(tmp_path, text + "\n")
    assert f": {key}: not a key mlx_lm.lora reads" in message
    assert hint in message


def test_keys_mlx_lm_reads_by_getattr_or_ignores_are_kept(tmp_path: Path) -> None:
    run = load(
        tmp_path,
        """
        hf_dataset: [{path: billsum, prompt_feature: text, completion_feature: summary}]
        prompt_feature: question
        completion_feature: answer
        text_feature: body
        chat_feature: conversation
        wandb: my-project
        report_to: wandb
        lr_schedule: {name: cosine_decay, warmup: 100, arguments: [1e-5, 1000, 1e-7]}
        resume_adapter_file: adapters/old.safetensors
        """,
    )
    assert run.raw["hf_dataset"][0]["path"] == "billsum"
    assert run.raw["chat_feature"] == "conversation" and run.raw["wandb"] == "my-project"
    assert run.raw["lr_schedule"]["arguments"] == [1e-5, 1000, 1e-7]


def test_yaml_cannot_set_trust_remote_code_or_the_cache_threshold(tmp_path: Path) -> None:
    if not {"trust_remote_code", "clear_cache_threshold"} <= set(mlx_lm_config_defaults()):
        pytest.skip("this mlx-lm has neither key")
    run = load(tmp_path, "trust_remote_code: true\nclear_cache_threshold: 1000\n")
    assert run.trust_remote_code_requested is True
    assert run.raw["trust_remote_code"] is False
    assert run.clear_cache_threshold_effective == 0 == run.raw["clear_cache_threshold"]
    assert load(tmp_path, "train: true\n").trust_remote_code_requested is False


def test_model_and_data_beside_the_yaml_are_found_there(tmp_path: Path) -> None:
    (tmp_path / "configs" / "data").mkdir(parents=True)
    (tmp_path / "configs" / "tiny-model").mkdir()
    path = write(tmp_path / "configs", "model: tiny-model\ndata: data\n")
    run = load_lora_config(path)
    assert run.model == str(tmp_path / "configs" / "tiny-model")
    assert run.data == str(tmp_path / "configs" / "data")
    assert run.raw["model"] == "tiny-model"  # what mlx-lm itself would get


def test_other_model_and_data_values_stay_as_written(tmp_path: Path) -> None:
    absolute = str(tmp_path / "elsewhere")
    run = load(tmp_path, f"model: mlx-community/Qwen3-0.6B-4bit\ndata: {absolute}\n")
    assert (run.model, run.data) == ("mlx-community/Qwen3-0.6B-4bit", absolute)
    (tmp_path / "mlx-community" / "WikiSQL").mkdir(parents=True)
    assert load(tmp_path, "train: true\n").data == "mlx-community/WikiSQL"  # a default


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("batch_size: [4\n", "not valid YAML (line 2)"),
        ("a: b: c\n", "not valid YAML (line 1)"),
        ("- batch_size: 4\n", "expected a mapping of mlx_lm.lora keys, got [{'batch_size': 4}]"),
        ("", "expected a mapping of mlx_lm.lora keys, got None"),
        ("just text\n", "expected a mapping of mlx_lm.lora keys, got 'just text'"),
        ("a: 1\n---\nb: 2\n", "not valid YAML"),
        ("model: !!python/name:os.system\n", "not valid YAML (line 1)"),
    ],
)
def test_a_file_that_is_not_a_yaml_mapping(tmp_path: Path, text: str, problem: str) -> None:
    path, message = refusal(tmp_path, text)
    assert message.startswith(f"{path}: {problem}")


def test_a_file_that_cannot_be_read(tmp_path: Path) -> None:
    for path in (tmp_path / "missing.yaml", tmp_path):
        with pytest.raises(YouraiUsageError, match=r"cannot read") as info:
            load_lora_config(path)
        assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"model: \xff\xfe\x00x\n")
    with pytest.raises(YouraiUsageError, match=r"not valid YAML"):
        load_lora_config(binary)


def test_the_global_safe_loader_is_left_alone(tmp_path: Path) -> None:
    before = copy.deepcopy(yaml.SafeLoader.yaml_implicit_resolvers)
    load(tmp_path, "learning_rate: 1e-5\n")
    assert yaml.SafeLoader.yaml_implicit_resolvers == before


CLEAN_PROCESS = """
import sys, yaml
from pathlib import Path
from pytest_yourai.lora_config import load_lora_config
run = load_lora_config(Path(sys.argv[1]))
assert run.raw["learning_rate"] == 1e-5, run.raw
assert yaml.safe_load("a: 1e-5") == {"a": "1e-5"}
print(sorted(m for m in sys.modules if m.split(".")[0] in ("mlx", "mlx_lm")))
"""


def test_reading_a_config_imports_neither_mlx_nor_mlx_lm() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CLEAN_PROCESS, str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parent.parent,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.fixture
def no_mlx_lm(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    lora_config._installed_defaults.cache_clear()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    yield
    lora_config._installed_defaults.cache_clear()


@pytest.mark.usefixtures("no_mlx_lm")
def test_without_mlx_lm_the_error_says_so(tmp_path: Path) -> None:
    with pytest.raises(YouraiUsageError, match=r"mlx-lm is not installed"):
        load(tmp_path, "train: true\n")


def test_optimizer_names_are_lowercased_but_optimizer_config_keys_are_not(tmp_path: Path) -> None:
    assert load(tmp_path, "optimizer: SGD\n").optimizer == "sgd"
    _, message = refusal(tmp_path, "optimizer: AdamW\noptimizer_config: {AdamW: {eps: 0.1}}\n")
    assert "(mlx-lm looks up lowercase names)" in message
