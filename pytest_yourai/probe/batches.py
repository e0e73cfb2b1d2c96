"""Replacements for mlx-lm's ``iterate_batches`` that the trainer calls as its own: random
tokens at full length (the worst case), real text from ``--data``, or random tokens in the
exact (rows, padded length) shapes that mlx-lm's ``iterate_batches`` makes of the user's data
(``batch_shapes``, ``val_batch_shapes``); and a recorder of what was yielded."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

Batch = tuple[mx.array, mx.array]
# The trainer calls iterate_batches(dataset=, batch_size=, max_seq_length=, loop=,
# comm_group=) and evaluate() the same without loop (mlx-lm 0.32: tuner/trainer.py); seed
# is in its signature. Each replacement below takes the dataset and ignores the rest (the
# shapes are the probe's), so whatever a later mlx-lm adds is accepted too.
IterateBatches = Callable[..., Iterator[Batch]]


def random_batches(spec: dict[str, Any], vocab_size: int) -> IterateBatches:
    """An iterate_batches replacement: full-length rows of random tokens, the worst case."""
    batch, seq_len = int(spec["batch_size"]), int(spec["seq_len"])

    def iterate(dataset: Any, *args: Any, **kwargs: Any) -> Iterator[Batch]:
        lengths = mx.array([[0, seq_len]] * batch)
        while True:
            tokens = mx.random.randint(0, vocab_size, (batch, seq_len + 1))
            yield tokens, lengths

    return iterate


def text_batches(spec: dict[str, Any], model_path: Path) -> IterateBatches:
    """Batches of real text from ``--data``, tokenized and cut/padded to seq_len."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tokenizer = load_tokenizer(model_path)
    batch, seq_len = int(spec["batch_size"]), int(spec["seq_len"])
    rows: list[list[int]] = []
    with open(spec["data"], encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                text = json.loads(line).get("text", "")
                rows.append(list(tokenizer.encode(text))[: seq_len + 1])
    if len(rows) < batch:
        raise ValueError(f"--data {spec['data']}: {len(rows)} rows, fewer than batch size {batch}")

    def iterate(dataset: Any, *args: Any, **kwargs: Any) -> Iterator[Batch]:
        index = 0
        while True:
            chosen = [rows[(index + j) % len(rows)] for j in range(batch)]
            index += batch
            width = max(len(r) for r in chosen)
            padded = [r + [0] * (width - len(r)) for r in chosen]
            lengths = [[0, len(r) - 1] for r in chosen]
            yield mx.array(padded), mx.array(lengths)

    return iterate


def shaped(shapes: Sequence[Sequence[int]], vocab_size: int) -> Iterator[Batch]:
    """Random tokens in each (rows, padded length) of ``shapes``, in order, each row's mask
    over all its targets (the model sees padded length - 1 tokens, as from mlx-lm).

    The tokens are made in numpy and handed over, as mlx-lm's iterate_batches hands over its
    padded numpy batch: drawn with mx.random inside the trainer's step they left MLX's peak
    up to 3.7% under mlx_lm.lora's on a tiny float32 model (benchmarks/lora_yaml.py compare)."""
    generator = np.random.default_rng(0)
    for rows, width in shapes:
        tokens = mx.array(generator.integers(0, vocab_size, (rows, width), dtype=np.int32))
        yield tokens, mx.array([[0, width - 1]] * rows)


def shaped_batches(shapes: Sequence[Sequence[int]], vocab_size: int) -> IterateBatches:
    """An iterate_batches replacement: ``shapes`` once, in order (the trainer's steps)."""

    def iterate(dataset: Any, *args: Any, **kwargs: Any) -> Iterator[Batch]:
        yield from shaped(shapes, vocab_size)

    return iterate


class ValidationRows(list[int]):
    """The val_dataset handed to the trainer: truthy, so it validates, and of the length its
    progress bar divides by batch_size; its batches are ``val_batch_shapes``."""


def with_validation(
    train: IterateBatches, valid: Sequence[Sequence[int]], vocab_size: int
) -> IterateBatches:
    """``train`` for the trainer's steps, ``valid``'s shapes for each of its validations
    (which it runs on ``ValidationRows``)."""

    def iterate(dataset: Any, *args: Any, **kwargs: Any) -> Iterator[Batch]:
        if isinstance(dataset, ValidationRows):
            yield from shaped(valid, vocab_size)
        else:
            yield from train(dataset, *args, **kwargs)

    return iterate


class Recorder:
    """Wraps an iterate_batches replacement and keeps the shape of every batch it yields,
    train and validation apart; ``on_validation`` is called when a validation pass starts."""

    def __init__(self, inner: IterateBatches, on_validation: Callable[[], object]) -> None:
        self.inner = inner
        self.on_validation = on_validation
        self.train: list[list[int]] = []
        self.valid: list[list[int]] = []
        self.validations = 0

    def __call__(self, dataset: Any, *args: Any, **kwargs: Any) -> Iterator[Batch]:
        validating = isinstance(dataset, ValidationRows)
        if validating:
            self.validations += 1
            self.on_validation()
        # Every validation yields the same shapes: the first pass's are kept.
        keep = self.train if not validating else self.valid if self.validations == 1 else None
        for tokens, lengths in self.inner(dataset, *args, **kwargs):
            if keep is not None:
                keep.append([int(n) for n in tokens.shape])
            yield tokens, lengths
