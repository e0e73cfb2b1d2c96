"""What benchmarks/lora_yaml.py runs mlx_lm.lora on, written at run time into a work
directory (nothing here is committed but this code and grid.yaml's recipes):

- ``WORK/models/NAME``: synthetic weights of the recipe's exact shapes, saved by mlx-lm's own
  save path (``mlx_lm.utils.quantize_model`` as ``mlx_lm.convert`` calls it, then
  ``save_model`` and ``save_config``, so a 4-bit directory carries ``quantization`` in its
  config.json and ``mlx_lm.load`` rebuilds the quantized layers), plus a small WordLevel
  tokenizer (tokenizer.json + tokenizer_config.json with a chat template);
- ``WORK/data/NAME``: train.jsonl and valid.jsonl, seeded: text rows or chat rows.

    python benchmarks/lora_yaml/fixtures.py WORK MODEL_OR_DATA_NAME ... [--config-only]

Imports mlx (run it in a child process: lora_yaml.py does).
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
GRID = HERE / "grid.yaml"
# Another grid (a folder with its own grid.yaml and configs/, as gpu/ is), for the child
# that builds its fixtures; lora_yaml.py's --grid sets it.
GRID_ENV = "LORA_YAML_GRID"

# The tokenizer: whitespace-split words, one token each. Specials first, then WORDS words;
# the model's vocab_size must be at least its size (checked when a model is saved).
SPECIALS = ["<unk>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
WORDS = 500
# Each message renders as "<|role|> words </s>"; the prompt (add_generation_prompt) ends with
# "<|assistant|>", a prefix of the full conversation's tokens, as mask_prompt assumes.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} </s> "
    "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def grid_file() -> Path:
    return Path(os.environ[GRID_ENV]) / "grid.yaml" if os.environ.get(GRID_ENV) else GRID


def grid() -> dict[str, Any]:
    """The grid, each model recipe's ``config`` read from its ``config_file`` (relative to
    the grid) where it names one: a real architecture's config.json."""
    path = grid_file()
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    for recipe in spec["models"].values():
        if "config_file" in recipe:
            loaded = json.loads((path.parent / recipe["config_file"]).read_text("utf-8"))
            recipe["config"] = {**loaded, **(recipe.get("config") or {})}
    return spec


def vocabulary() -> dict[str, int]:
    words = SPECIALS + [f"w{i}" for i in range(WORDS)]
    return {word: index for index, word in enumerate(words)}


def save_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel(vocab=vocabulary(), unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(SPECIALS)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def save_model(
    name: str, recipe: dict[str, Any], directory: Path, config_only: bool = False
) -> None:
    """Build the recipe's model at random, cast it, quantize it as mlx_lm.convert does, and
    save it with mlx-lm's own functions. ``config_only``: config.json (with its
    ``quantization``) and the tokenizer, no weights: the model stays lazy, so a real-size
    one costs no memory (what the estimate reads; ``estimate`` of lora_yaml.py)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes, quantize_model, save_config
    from mlx_lm.utils import save_model as mlx_save_model

    config = dict(recipe["config"])
    if config["vocab_size"] < len(vocabulary()):
        raise ValueError(f"{name}: vocab_size {config['vocab_size']} < the tokenizer's")
    mx.random.seed(0)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    dtype = recipe.get("dtype", "float32")
    model.set_dtype(getattr(mx, dtype))
    if not config_only:
        mx.eval(model.parameters())
    config["torch_dtype"] = dtype
    config["eos_token_id"] = vocabulary()["</s>"]
    bits = int(recipe.get("bits", 16))
    if bits < 16:
        model, config = quantize_model(
            model, config, group_size=int(recipe.get("group_size", 64)), bits=bits
        )
    directory.mkdir(parents=True, exist_ok=True)
    if not config_only:
        mlx_save_model(directory, model, donate_model=True)
    save_config(config, config_path=directory / "config.json")
    save_tokenizer(directory)
    arrays = len(tree_flatten(model.parameters()))
    quantized = f"{bits}-bit" if bits < 16 else "not quantized"
    print(f"saved {name} ({config['model_type']}, {dtype}, {quantized}): {arrays} arrays")


def words(rng: random.Random, count: int) -> str:
    return " ".join(f"w{rng.randrange(WORDS)}" for _ in range(count))


def text_rows(rng: random.Random, recipe: dict[str, Any], rows: int) -> list[dict[str, Any]]:
    """Rows of text; a row of n words is n + 1 tokens once mlx-lm appends the EOS."""
    low, high = recipe["tokens"] if isinstance(recipe["tokens"], list) else [recipe["tokens"]] * 2
    return [{"text": words(rng, rng.randint(low, high) - 1)} for _ in range(rows)]


def chat_rows(rng: random.Random, recipe: dict[str, Any], rows: int) -> list[dict[str, Any]]:
    """system, user, assistant: each message "<|role|> words </s>" is words + 2 tokens."""
    out = []
    for _ in range(rows):
        messages = []
        for role, key in (("system", "system"), ("user", "user"), ("assistant", "assistant")):
            low, high = recipe[key]
            messages.append({"role": role, "content": words(rng, rng.randint(low, high))})
        out.append({"messages": messages})
    return out


def save_data(name: str, recipe: dict[str, Any], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    make = chat_rows if recipe["kind"] == "chat" else text_rows
    for split, seed_offset in (("train", 0), ("valid", 1)):
        rng = random.Random(int(recipe.get("seed", 0)) * 10 + seed_offset)
        rows = make(rng, recipe, int(recipe[f"{split}_rows"]))
        with open(directory / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    print(f"saved data {name}: {recipe['train_rows']} train, {recipe['valid_rows']} valid rows")


# Written last into each built directory: the recipe it was built from, so that a later run
# rebuilds a directory whose recipe changed (or whose build was interrupted).
RECIPE_FILE = ".recipe.json"


def recipe_text(recipe: dict[str, Any]) -> str:
    return json.dumps({"recipe": recipe, "words": WORDS, "specials": SPECIALS}, sort_keys=True)


def main() -> int:
    config_only = "--config-only" in sys.argv
    work, names = Path(sys.argv[1]), [a for a in sys.argv[2:] if a != "--config-only"]
    spec = grid()
    for name in names:
        if name in spec["models"]:
            recipe, directory = spec["models"][name], work / "models" / name
            save_model(name, recipe, directory, config_only)
        elif name in spec["data"]:
            recipe, directory = spec["data"][name], work / "data" / name
            save_data(name, recipe, directory)
        else:
            raise SystemExit(f"{name}: neither a model nor a data set of {grid_file()}")
        (directory / RECIPE_FILE).write_text(recipe_text(recipe))
    return 0


if __name__ == "__main__":
    sys.exit(main())
