"""The probe training what an mlx_lm.lora YAML asks (``lora_run``, ``batch_shapes``), and its
``--data-batches`` errand held against mlx-lm's own ``iterate_batches`` in a real
``mlx_lm.lora`` run: real MLX, tiny float32 models, this CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pytest_yourai.estimator import lora_parameter_count

TINY = dict(
    model_type="llama",
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=128,
    num_attention_heads=2,
    num_key_value_heads=1,
    vocab_size=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=512,
    tie_word_embeddings=True,
    torch_dtype="float32",
)
RUN = dict(
    fine_tune_type="lora",
    optimizer="adam",
    optimizer_config={},
    learning_rate=1e-5,
    lora_parameters={"rank": 4, "scale": 20.0, "dropout": 0.0},
    num_layers=-1,
    grad_accumulation_steps=1,
    grad_checkpoint=False,
    val_batches=25,
    seed=0,
)


def run_probe(*args: str, spec: dict[str, Any] | None = None) -> tuple[dict[str, Any], int]:
    env = {k: v for k, v in os.environ.items() if k != "YOURAI_PROBE_SPEC"}
    if spec is not None:
        env["YOURAI_PROBE_SPEC"] = json.dumps(spec)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest_yourai.probe", *args],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    lines = proc.stdout.strip().splitlines()
    assert lines and lines[-1].startswith("BENCHMARK_RESULT: "), proc.stdout + proc.stderr
    assert all("Traceback" not in line for line in lines)
    return json.loads(lines[-1].split(": ", 1)[1]), proc.returncode


def lora_spec(bits: int = 16, **run: Any) -> dict[str, Any]:
    return {
        "preset": "tiny",
        "config": TINY,
        "bits": bits,
        "dtype": "float32",
        "batch_size": 2,
        "seq_len": 16,
        "steps": 1,
        "weights": "synthetic",
        "lora_run": {**RUN, **run},
    }


# Each fine-tune type and each optimizer, one or two steps each (five runs, not fifteen).
@pytest.mark.parametrize(
    ("kind", "optimizer", "bits", "config"),
    [
        ("lora", "adam", 16, {}),
        ("dora", "adamw", 4, {"adamw": {"weight_decay": 0.05, "betas": [0.9, 0.98]}}),
        ("full", "sgd", 16, {"momentum": 0.9}),
        ("full", "muon", 16, {}),
        ("lora", "adafactor", 16, {"adafactor": {"relative_step": False}}),
    ],
)
def test_fine_tune_types_and_optimizers(
    kind: str, optimizer: str, bits: int, config: dict[str, Any]
) -> None:
    parameters = None if kind == "full" else RUN["lora_parameters"]
    spec = lora_spec(
        bits, fine_tune_type=kind, optimizer=optimizer, optimizer_config=config,
        lora_parameters=parameters, num_layers=1,
    )  # fmt: skip
    result, code = run_probe(spec=spec)
    assert code == 0 and result["status"] == "ok", result
    assert result["fine_tune_type"] == kind and result["optimizer"] == optimizer
    assert result["steps"] == 1 and result["batch_shapes_run"] == [[2, 17]]
    assert result["config"]["lora_run"]["fine_tune_type"] == kind
    trainable = result["trainable_parameters"]
    if kind == "full":  # every parameter of the last block: 2 norms + 7 linears
        h, i, kv = 64, 128, 32
        assert trainable == 2 * h + h * h * 2 + h * kv * 2 + 3 * h * i
    elif kind == "lora":
        assert trainable == lora_parameter_count(TINY, 4, 1)
    else:  # DoRA adds each linear's magnitude vector (its output width)
        assert trainable == lora_parameter_count(TINY, 4, 1) + 64 * 3 + 32 * 2 + 128 * 2


def test_keys_shapes_validation_and_accumulation() -> None:
    """Only the keys' layers are adapted; the batch shapes run in order, cycled to a whole
    number of updates; validation runs at the first and the last iteration."""
    spec = lora_spec(
        lora_parameters={"rank": 4, "scale": 10.0, "dropout": 0.1, "keys": ["self_attn.q_proj"]},
        grad_accumulation_steps=2, grad_checkpoint=True, val_batches=1,
    )  # fmt: skip
    spec["batch_shapes"] = [[2, 33], [1, 17], [2, 17]]
    spec["val_batch_shapes"] = [[2, 49], [2, 17]]
    result, code = run_probe(spec=spec)
    assert code == 0 and result["status"] == "ok", result
    assert result["trainable_parameters"] == 2 * (64 * 4 + 4 * 64)  # q_proj of both blocks
    assert result["trainable_parameters"] < lora_parameter_count(TINY, 4, 2)
    assert result["batch_shapes_run"] == [[2, 33], [1, 17], [2, 17], [2, 33]]
    assert result["steps"] == 4 and result["grad_accumulation_steps"] == 2
    assert result["validations"] == 2 and result["val_batch_shapes_run"] == [[2, 49]]
    assert 0 < result["val_peak_memory_gb"] <= result["train_peak_memory_gb"]
    assert result["step_peak_memory_gb"] <= result["train_peak_memory_gb"]
    assert result["config"]["lora_rank"] == 4 and result["config"]["grad_checkpoint"] is True


def test_full_fine_tuning_of_a_quantized_model_is_refused_before_building() -> None:
    result, code = run_probe(spec=lora_spec(4, fine_tune_type="full", lora_parameters=None))
    assert code == 1 and result["status"] == "error" and result["phase"] == "setup"
    assert "unquantized model (bits 16)" in result["error"]
    assert "QuantizedMatmul::vjp" in result["error"]
    assert "build" not in result.get("phase_started_at", {})


# -- the data errand against mlx_lm.lora itself ------------------------------------------------

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tokenizer(directory: Path) -> None:
    """A byte-level BPE where each word "a" is one token, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(["a a a a b b c"] * 20, trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>",
              "model_max_length": 4096, "chat_template": CHAT_TEMPLATE}  # fmt: skip
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    small = {"hidden_size": 32, "intermediate_size": 64, "vocab_size": 320, "num_hidden_layers": 1}
    (directory / "config.json").write_text(json.dumps({**TINY, **small}))


def text(words: int) -> dict[str, Any]:
    return {"text": " ".join(["a"] * words)}  # words + 1 tokens: mlx-lm appends the EOS


def chat(user: int, assistant: int, **extra: Any) -> dict[str, Any]:
    messages = [
        {"role": "user", "content": " ".join(["a"] * user)},
        {"role": "assistant", "content": " ".join(["b"] * assistant)},
    ]
    return {"messages": messages, **extra}


# name: (train rows, valid rows, batch size, max_seq_length, mask_prompt)
CASES: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]], int, int, bool]] = {
    "equal": ([text(20)] * 8, [text(20)] * 4, 2, 64, False),
    "mixed": (
        [text(n) for n in (5, 40, 12, 70, 3, 33, 31, 8, 50)],
        [text(n) for n in (10, 60, 20, 30, 45)],
        2, 128, False,
    ),
    "truncated": (
        [text(n) for n in (10, 60, 38, 39, 41, 100, 5, 20)],
        [text(n) for n in (70, 3)],
        2, 40, False,
    ),
    "chat": (
        [chat(3, 9), chat(30, 2, id=1), chat(5, 40), chat(12, 12, id=2), chat(2, 2), chat(8, 50)],
        [chat(4, 4), chat(20, 30)],
        2, 96, True,
    ),
}  # fmt: skip
TRUNCATED_ROWS = {"equal": 0, "mixed": 0, "truncated": 3, "chat": 0}

# A real mlx_lm.lora run (its own YAML path) per case, mlx-lm's iterate_batches wrapped to
# record each batch's shape: the trainer's pass (one iteration per batch) and the first
# validation (the whole valid set: val_batches -1).
REFERENCE = r"""
import importlib, json, sys
from pathlib import Path
import mlx.core as mx
from mlx.utils import tree_flatten
import mlx_lm.lora as lora
import mlx_lm.tuner.trainer as trainer

model_dir = Path(sys.argv[1])
config = json.loads((model_dir / "config.json").read_text())
module = importlib.import_module("mlx_lm.models." + config["model_type"])
model = module.Model(module.ModelArgs.from_dict(config))
mx.save_safetensors(str(model_dir / "model.safetensors"), dict(tree_flatten(model.parameters())))

original = trainer.iterate_batches
seen = {"train": [], "valid": [], "validations": 0}

def recording(*args, **kwargs):
    into = "train" if kwargs.get("loop") else "valid"
    if into == "valid":
        seen["validations"] += 1
    for batch, lengths in original(*args, **kwargs):
        if into == "train" or seen["validations"] == 1:
            seen[into].append(list(batch.shape))
        yield batch, lengths

trainer.iterate_batches = recording
# train() and evaluate() took the original as a default argument when they were defined.
for function in (trainer.train, trainer.evaluate):
    function.__defaults__ = tuple(
        recording if d is original else d for d in function.__defaults__
    )
results = {}
for name, yaml_path in json.loads(sys.argv[2]).items():
    seen.update(train=[], valid=[], validations=0)
    sys.argv = ["mlx_lm.lora", "-c", yaml_path]
    lora.main()
    results[name] = {"train": seen["train"], "valid": seen["valid"]}
print("REFERENCE: " + json.dumps(results), flush=True)
"""


def write_case(root: Path, name: str, model: Path) -> tuple[Path, Path]:
    """The case's data directory, its mlx_lm.lora YAML and the errand's spec."""
    train, valid, batch_size, max_seq_length, mask_prompt = CASES[name]
    data = root / name
    data.mkdir()
    for split, rows in (("train", train), ("valid", valid)):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = {
        "model": str(model), "train": True, "data": str(data), "batch_size": batch_size,
        "iters": len(train) // batch_size, "val_batches": -1, "steps_per_report": 100,
        "steps_per_eval": 100, "save_every": 100, "num_layers": 1,
        "max_seq_length": max_seq_length, "mask_prompt": mask_prompt,
        "adapter_path": str(root / "adapters" / name), "seed": 3,
    }  # fmt: skip
    yaml_path = root / f"{name}.yaml"
    yaml_path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in settings.items()))
    errand = {key: settings[key] for key in ("model", "data", "batch_size", "max_seq_length")}
    spec_path = root / f"{name}.json"
    spec_path.write_text(json.dumps({**errand, "mask_prompt": mask_prompt, "seed": 3}))
    return yaml_path, spec_path


def test_data_errand_matches_mlx_lm_lora(tmp_path: Path) -> None:
    model = tmp_path / "model"
    write_tokenizer(model)
    paths = {name: write_case(tmp_path, name, model) for name in CASES}
    reference = subprocess.Popen(
        [sys.executable, "-c", REFERENCE, str(model),
         json.dumps({name: str(p[0]) for name, p in paths.items()})],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        found = {name: run_probe("--data-batches", str(p[1])) for name, p in paths.items()}
        stdout, stderr = reference.communicate(timeout=300)
    finally:
        reference.kill()
    assert reference.returncode == 0, stderr[-3000:]
    expected = json.loads(stdout.split("REFERENCE: ", 1)[1])
    for name, (result, code) in found.items():
        assert code == 0 and result["status"] == "ok", (name, result)
        train, valid, batch_size, _, _ = CASES[name]
        assert result["train"]["batch_shapes"] == expected[name]["train"], name
        assert result["valid"]["batch_shapes"] == expected[name]["valid"], name
        assert result["train"]["rows"] == len(train) and result["valid"]["rows"] == len(valid)
        assert result["train"]["truncated_rows"] == TRUNCATED_ROWS[name], name
        assert result["train"]["rows_in_batches"] == len(train) // batch_size * batch_size
    assert found["truncated"][0]["train"]["token_lengths_max"] == 101
    assert found["truncated"][0]["valid"]["truncated_rows"] == 1


def test_data_errand_errors_are_one_line(tmp_path: Path) -> None:
    model = tmp_path / "model"
    write_tokenizer(model)
    data = tmp_path / "data"
    data.mkdir()
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"model": str(model), "data": str(data), "batch_size": 1,
                                "max_seq_length": 64}))  # fmt: skip
    result, code = run_probe("--data-batches", str(spec))
    assert code == 1 and result["status"] == "error" and "no train.jsonl" in result["error"]

    (data / "train.jsonl").write_text('{"text": "a"}\n{"text": "a"}\n')
    (data / "valid.jsonl").write_text('{"text": "a"}\n{"text": "a", }\n')
    result, code = run_probe("--data-batches", str(spec))
    assert code == 1 and f"{data / 'valid.jsonl'} line 2:" in result["error"], result

    (data / "valid.jsonl").unlink()
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="MyTokenizer", auto_map={"AutoTokenizer": ["mine.Mine", None]})
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    result, code = run_probe("--data-batches", str(spec))
    assert code == 1 and "needs trust_remote_code" in result["error"], result
    assert "\n" not in result["error"]
