"""Save a model directory that ``mlx_lm.lora`` loads: synthetic weights of a grid line's
exact shapes (built as the probe builds them, quantized when ``bits`` < 16), a small
byte-level BPE tokenizer, equal-length training rows and a LoRA config.

    python benchmarks/save_synthetic_model.py '{"preset": "hermes-mistral-7b", ...}' DIR

Used by benchmarks/survival.py (``--lora-reference``) and benchmarks/cpu_lora_rss.py to run
mlx_lm.lora itself (``lora_command``: its command line on such a directory).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def lora_command(entry: dict[str, Any], model_dir: Path) -> list[str]:
    """``python -m mlx_lm lora``: 4 steps of the grid line's batch, adapted layers and
    sequence length on a directory this script saved (its data, adapters and LoRA config)."""
    argv = [
        sys.executable,
        "-m",
        "mlx_lm",
        "lora",
        "--model",
        str(model_dir),
        "--train",
        "--data",
        str(model_dir / "data"),
        "--batch-size",
        str(entry["batch_size"]),
        "--iters",
        "4",
        "--num-layers",
        str(entry["lora_layers"]),
        "--steps-per-report",
        "1",
        "--steps-per-eval",
        "1000",
        "--val-batches",
        "1",
        "--adapter-path",
        str(model_dir / "adapters"),
        "--max-seq-length",
        str(int(entry["seq_len"]) + 1),
        "-c",
        str(model_dir / "lora.yaml"),
    ]
    if entry.get("grad_checkpoint"):
        argv.append("--grad-checkpoint")
    return argv


def main() -> int:
    sys.path.insert(0, str(HERE.parent))
    sys.path.insert(0, str(HERE.parent / "tests" / "scripts"))
    entry, directory = json.loads(sys.argv[1]), Path(sys.argv[2])
    import mlx.core as mx
    from lora_reference import make_data, make_model_dir
    from mlx.utils import tree_flatten
    from results_io import architecture

    from pytest_yourai.probe import MemoryCap, build_model

    config = architecture(entry)
    bits = int(entry.get("bits", 4))
    spec = {
        "config": config,
        "dtype": str(entry.get("dtype") or config.get("torch_dtype") or "bfloat16"),
        "bits": bits,
        "group_size": 64,
        "weights": "synthetic",
    }
    if spec["dtype"] not in ("float32", "bfloat16", "float16"):
        spec["dtype"] = "bfloat16"
    # The tokenizer and config files from the fidelity test's helper, then the real weights.
    make_model_dir({**config, "num_hidden_layers": 1, "vocab_size": 512}, directory / "tiny")
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).write_text((directory / "tiny" / name).read_text())
    model, _ = build_model(spec, MemoryCap(None))
    weights = dict(tree_flatten(model.parameters()))
    shard, size, index = {}, 0, {}
    shards: list[dict[str, mx.array]] = []
    for key, value in weights.items():
        shard[key] = value
        size += value.nbytes
        if size > 4e9:
            shards.append(shard)
            shard, size = {}, 0
    if shard:
        shards.append(shard)
    for number, part in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(directory / file), part)
        index.update({key: file for key in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    saved = dict(config, torch_dtype=spec["dtype"])
    if bits < 16:
        saved["quantization"] = {"group_size": 64, "bits": bits}
    (directory / "config.json").write_text(json.dumps(saved))
    seq_len = int(entry["seq_len"])
    make_data(directory / "data", seq_len - 1, max(8, 2 * int(entry["batch_size"])))
    rank = int(entry["lora_rank"])
    (directory / "lora.yaml").write_text(
        f"lora_parameters:\n  rank: {rank}\n  scale: 20.0\n  dropout: 0.0\n"
    )
    print(f"saved {len(weights)} arrays in {len(shards)} shards to {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
