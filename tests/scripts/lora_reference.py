"""What ``mlx_lm.lora`` itself allocates: the reference for the probe's fidelity test.

    python tests/scripts/lora_reference.py CONFIG_JSON WORKDIR --batch-size 2 --lora-layers 2

Builds a local model directory (config.json, float32 safetensors, a WordLevel tokenizer made
with the tokenizers package) and a data set of equal-length examples, runs mlx_lm.lora's own
``run`` in this process, and prints ``LORA_TRAIN_PEAK_BYTES: N``: mx.get_peak_memory() over the
training, reset once the model is loaded and LoRA is attached (as the probe does).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten


def make_model_dir(config: dict[str, object], directory: Path) -> None:
    from mlx_lm.utils import _get_classes
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    directory.mkdir(parents=True, exist_ok=True)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(directory / "model.safetensors"), weights)
    (directory / "config.json").write_text(json.dumps(config))
    # A byte-level BPE (what transformers builds for qwen2 and others from tokenizer.json,
    # whatever tokenizer_class says), trained so that each word "a" is one token.
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(["a a a a b b c"] * 20, trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "</s>",
                "model_max_length": 4096,
            }
        )
    )


def make_data(directory: Path, words: int, rows: int) -> None:
    """Rows of exactly ``words`` tokens ("a a a …"); mlx-lm appends the EOS."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("train", "valid"):
        with open(directory / f"{name}.jsonl", "w") as handle:
            for _ in range(rows):
                handle.write(json.dumps({"text": " ".join(["a"] * words)}) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", type=Path)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lora-layers", type=int, default=2)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64, help="model inputs per row")
    parser.add_argument("--iters", type=int, default=4)
    args = parser.parse_args()
    config = json.loads(args.config.read_text())
    model_dir, data_dir = args.workdir / "model", args.workdir / "data"
    make_model_dir(config, model_dir)
    # seq_len inputs = seq_len tokens + the EOS mlx-lm appends, padded to 1 + 32·k.
    make_data(data_dir, args.seq_len - 1, max(8, args.batch_size * 2))
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    length = len(load_tokenizer(model_dir).encode(" ".join(["a"] * (args.seq_len - 1))))
    assert length == args.seq_len - 1, f"tokenizer gives {length} tokens, not {args.seq_len - 1}"

    import mlx_lm.lora as lora

    real_train = lora.train
    peaks: list[int] = []

    def train_with_reset(*a: object, **k: object) -> object:
        mx.eval(k["model"].parameters())  # type: ignore[union-attr]
        mx.reset_peak_memory()
        out = real_train(*a, **k)
        peaks.append(mx.get_peak_memory())
        return out

    lora.train = train_with_reset
    cli = lora.build_parser().parse_args(
        [
            "--model",
            str(model_dir),
            "--train",
            "--data",
            str(data_dir),
            "--batch-size",
            str(args.batch_size),
            "--iters",
            str(args.iters),
            "--num-layers",
            str(args.lora_layers),
            "--steps-per-report",
            "1",
            "--val-batches",
            "1",
            "--steps-per-eval",
            "1000",
            "--adapter-path",
            str(args.workdir / "adapters"),
            "--max-seq-length",
            str(args.seq_len + 1),
        ]
    )
    defaults = lora.CONFIG_DEFAULTS
    for key, value in defaults.items():
        if getattr(cli, key, None) is None:
            setattr(cli, key, value)
    cli.lora_parameters = {"rank": args.lora_rank, "dropout": 0.0, "scale": 20.0}
    lora.run(cli)
    print(f"LORA_TRAIN_PEAK_BYTES: {peaks[0]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
