"""``--data-batches SPEC.json``: the batches ``mlx_lm.lora`` would make of the user's data.

The tokenizer and the data sets are loaded as ``mlx_lm/lora.py``'s ``run`` loads them
(``load_tokenizer`` with ``trust_remote_code``, ``load_dataset`` on a namespace carrying the
YAML's keys, each set wrapped in ``CacheDataset`` as ``train_model`` does), then the installed
mlx-lm's own ``iterate_batches`` makes one pass over the train set and one over the valid set,
the numpy seed set first as ``run`` sets it, so the batches come in the order training meets
them. ``loop`` only repeats the pass with a new permutation: which rows make a batch and its
padded length do not depend on it. No model is built.
"""

from __future__ import annotations

import contextlib
import json
import sys
import traceback
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlx_lm.tuner.datasets import CacheDataset, load_dataset

from pytest_yourai.probe.shared import EXIT_ERROR, EXIT_OK, emit_result

FEATURE_KEYS = ("prompt_feature", "completion_feature", "text_feature", "chat_feature")
SPLITS = ("train", "valid", "test")  # the files mlx-lm reads: {split}.jsonl
REQUIRED = ("model", "data", "batch_size", "max_seq_length")


class DataError(ValueError):
    """The data cannot be batched as asked; the message is the result's one line."""


def data_batches_line(path: Path) -> int:
    """The errand: one result line, ``status`` ok with each set's batches, or an error."""
    try:
        result = data_batches(read_spec(path))
    except Exception as exc:  # every failure is a result line, never a traceback on stdout
        if not isinstance(exc, DataError):
            traceback.print_exc(file=sys.stderr)
        message = " ".join(str(exc).split()) or type(exc).__name__
        emit_result({"status": "error", "error": f"{type(exc).__name__}: {message}"})
        return EXIT_ERROR
    emit_result({"status": "ok", **result})
    return EXIT_OK


def read_spec(path: Path) -> dict[str, Any]:
    try:
        spec = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: {exc}") from exc
    missing = [k for k in REQUIRED if not isinstance(spec, dict) or spec.get(k) is None]
    if missing:
        raise DataError(f"{path}: a JSON object with {', '.join(REQUIRED)} (missing {missing})")
    return dict(spec)


def data_batches(spec: dict[str, Any]) -> dict[str, Any]:
    """Each set's rows, longest row, truncated rows and batch shapes, as mlx-lm makes them."""
    import mlx.core as mx
    import numpy as np

    model, data = Path(str(spec["model"])), Path(str(spec["data"]))
    batch_size, max_seq_length = int(spec["batch_size"]), int(spec["max_seq_length"])
    check_paths(spec, model, data)
    tokenizer = load_tokenizer(model, bool(spec.get("trust_remote_code", False)))
    args = types.SimpleNamespace(
        data=str(data),
        train=True,
        test=False,
        mask_prompt=bool(spec.get("mask_prompt", False)),
        **{key: spec[key] for key in FEATURE_KEYS if spec.get(key) is not None},
    )
    # mlx-lm prints its warnings on stdout; stdout is the protocol's.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            train, valid, _ = load_dataset(args, tokenizer)
        except (json.JSONDecodeError, IndexError) as exc:
            raise DataError(locate_load_error(data, exc)) from exc
        np.random.seed(int(spec.get("seed", 0)))  # lora.py's run(), before anything else
        world = mx.distributed.init()
        found = {
            name: batch_shapes(name, rows, batch_size, max_seq_length, world)
            for name, rows in (("train", train), ("valid", valid))
        }
    return {"batch_size": batch_size, "max_seq_length": max_seq_length, **found}


def check_paths(spec: dict[str, Any], model: Path, data: Path) -> None:
    if spec.get("hf_dataset"):
        raise DataError("hf_dataset: only a local data directory can be read here")
    if not model.is_dir():
        raise DataError(f"model {model}: not a local directory with tokenizer files")
    if not data.is_dir():
        raise DataError(f"data {data}: not a directory (mlx-lm reads train.jsonl, valid.jsonl)")
    if not (data / "train.jsonl").is_file():
        raise DataError(f"data {data}: no train.jsonl (mlx-lm needs a training set)")


def load_tokenizer(model: Path, trust_remote_code: bool) -> Any:
    """The tokenizer as lora.py's ``load(..., tokenizer_config={"trust_remote_code": ...})``
    makes it: ``load_tokenizer`` with the config's eos_token_id (utils.py ``load``)."""
    from mlx_lm.utils import load_config, load_tokenizer

    eos = load_config(model).get("eos_token_id") if (model / "config.json").is_file() else None
    try:
        return load_tokenizer(model, {"trust_remote_code": trust_remote_code}, eos_token_ids=eos)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise DataError(
                f"the tokenizer in {model} runs custom code: it needs trust_remote_code "
                "(mlx_lm.lora's --trust-remote-code flag; a YAML trust_remote_code is ignored)"
            ) from exc
        raise


def locate_load_error(data: Path, exc: Exception) -> str:
    """mlx-lm's JSON error names neither the file nor the line; find them (it reads
    train, valid, test in turn, ``json.loads`` on every line, blank ones included)."""
    for split in SPLITS:
        path = data / f"{split}.jsonl"
        if not path.is_file():
            continue
        with open(path, encoding="utf-8") as handle:
            lines = 0
            for lines, line in enumerate(handle, start=1):
                try:
                    json.loads(line)
                except json.JSONDecodeError as bad:
                    if not line.strip():
                        return f"{path} line {lines} is blank: mlx-lm parses every line as JSON"
                    return f"{path} line {lines}: {bad.msg} (column {bad.colno})"
        if lines == 0:
            return f"{path} is empty: mlx-lm fails on an empty file (IndexError: list index)"
    return f"{type(exc).__name__}: {exc}"


def batch_shapes(
    name: str, rows: Any, batch_size: int, max_seq_length: int, world: Any
) -> dict[str, Any]:
    """One pass of mlx-lm's ``iterate_batches`` over the set, as CacheDataset: the shape of
    each batch in the order it yields them, and which rows it truncates (it keeps the first
    max_seq_length tokens of a longer row and warns)."""
    from mlx_lm.tuner.trainer import iterate_batches

    dataset = RecordingDataset(rows)
    shapes: list[list[int]] = []
    truncated = truncated_batches = 0
    if dataset:  # the trainer skips an empty validation set (an empty one is falsy)
        batches = iterate_batches(
            dataset=dataset, batch_size=batch_size, max_seq_length=max_seq_length,
            loop=False, comm_group=world,
        )  # fmt: skip
        for tokens, _ in dataset.rows_of(name, batches):
            shapes.append([int(n) for n in tokens.shape])
            longer = [i for i in dataset.last if dataset.length(name, i) > max_seq_length]
            truncated += len(longer)
            truncated_batches += bool(longer)
    lengths = [dataset.length(name, i) for i in range(len(dataset))]
    return {
        "rows": len(dataset),
        "token_lengths_max": max(lengths, default=0),
        "truncated_rows": truncated,
        "truncated_batches": truncated_batches,
        "rows_in_batches": sum(shape[0] for shape in shapes),
        "batch_shapes": shapes,
    }


class RecordingDataset(CacheDataset):  # type: ignore[misc]
    """mlx-lm's CacheDataset (iterate_batches sorts it by ``itemlen``, as in training),
    noting which rows each batch reads."""

    def __init__(self, data: Any) -> None:
        super().__init__(data)
        self.last: list[int] = []
        self.current: list[int] = []

    def __getitem__(self, idx: int) -> Any:
        self.current.append(idx)
        return super().__getitem__(idx)

    def length(self, name: str, idx: int) -> int:
        try:
            return len(super().__getitem__(idx)[0])
        except Exception as exc:
            raise DataError(row_problem(name, idx, exc)) from exc

    def rows_of(self, name: str, batches: Iterator[Any]) -> Iterator[Any]:
        """The batches; after each, ``last`` holds the rows it read."""
        while True:
            self.current = []
            try:
                batch = next(batches)
            except StopIteration:
                return
            except Exception as exc:
                if not self.current:  # before any row: "Dataset must have at least ..."
                    raise DataError(f"{name}.jsonl: {exc}") from exc
                raise DataError(row_problem(name, self.current[-1], exc)) from exc
            self.last = self.current
            yield batch


def row_problem(name: str, idx: int, exc: Exception) -> str:
    message = " ".join(str(exc).split()) or type(exc).__name__
    what = f"{type(exc).__name__}: {message}"
    return f"{name}.jsonl line {idx + 1}: mlx-lm cannot tokenize this row ({what})"
