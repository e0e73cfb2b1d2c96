"""Training as mlx_lm.lora trains: what is made trainable (LoRA or DoRA adapters, or whole
blocks), the optimizer, and mlx-lm's own trainer (``mlx_lm.tuner.trainer.train``) run for the
probe's steps with its validations, each step's seconds and MLX peak recorded.

Without a ``lora_run`` in the spec: LoRA on every linear of the last ``lora_layers`` blocks,
Adam at 1e-5, no validation (what the probe always did). With one, the code paths of
``mlx_lm/lora.py``'s ``train_model`` (mlx-lm 0.32.2, cited by line below).
"""

from __future__ import annotations

import contextlib
import math
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from pytest_yourai.probe.batches import (
    IterateBatches,
    Recorder,
    ValidationRows,
    random_batches,
    shaped_batches,
    text_batches,
    with_validation,
)
from pytest_yourai.probe.build import trainable_parameter_count
from pytest_yourai.probe.shared import MemoryCap, gb, say
from pytest_yourai.probe.spec import OPTIMIZERS
from pytest_yourai.protocol import step_line


def add_lora(model: nn.Module, spec: dict[str, Any]) -> int:
    """mlx-lm's LoRA on the last ``lora_layers`` blocks; the trainable parameter count."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model.freeze()
    num_layers = min(int(spec["lora_layers"]), len(model.layers))
    linear_to_lora_layers(
        model,
        num_layers,
        {"rank": int(spec["lora_rank"]), "scale": float(spec["lora_scale"]), "dropout": 0.0},
    )
    mx.eval(model.parameters())
    return trainable_parameter_count(model)


def make_trainable(model: nn.Module, spec: dict[str, Any]) -> int:
    """What the spec trains made trainable; the trainable parameter count."""
    run = spec.get("lora_run")
    return add_lora(model, spec) if run is None else fine_tune(model, run)


def fine_tune(model: nn.Module, run: dict[str, Any]) -> int:
    """``train_model``'s preparation (mlx_lm/lora.py:232-254): seed, freeze, then whole blocks
    unfrozen (full) or ``linear_to_lora_layers`` with the user's lora_parameters (its keys,
    rank, scale, dropout) on the last num_layers blocks (0 or -1: all of them)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    mx.random.seed(int(run["seed"]))
    model.freeze()
    num_layers, blocks = int(run["num_layers"]), len(model.layers)
    if num_layers > blocks:
        raise ValueError(
            f"Requested to train {num_layers} layers but the model only has {blocks} layers."
        )
    kind = run["fine_tune_type"]
    if kind == "full":
        for layer in model.layers[-max(num_layers, 0) :]:
            layer.unfreeze()
    else:
        parameters = dict(run["lora_parameters"])
        linear_to_lora_layers(model, num_layers, parameters, use_dora=kind == "dora")
    mx.eval(model.parameters())
    return trainable_parameter_count(model)


def optimizer_kwargs(run: dict[str, Any]) -> dict[str, Any]:
    """The chosen optimizer's keyword arguments: ``optimizer_config`` as mlx-lm's YAML has it
    (one entry per optimizer name, lora.py:289) or already that entry."""
    config = dict(run.get("optimizer_config") or {})
    name = str(run["optimizer"]).lower()
    if config and all(key in OPTIMIZERS for key in config):
        return dict(config.get(name) or {})
    return config


def build_optimizer(spec: dict[str, Any]) -> Any:
    """The optimizer as mlx_lm/lora.py:288-303 builds it (inline there, so mirrored here):
    the class for the lowercased name, ``learning_rate`` and the name's optimizer_config."""
    import mlx.optimizers as optim

    run = spec.get("lora_run")
    if run is None:
        return optim.Adam(learning_rate=1e-5)
    classes = {
        "adam": optim.Adam,
        "adamw": optim.AdamW,
        "muon": optim.Muon,
        "sgd": optim.SGD,
        "adafactor": optim.Adafactor,
    }
    name = str(run["optimizer"]).lower()
    if name not in classes:
        raise ValueError(f"Unsupported optimizer: {name}")
    return classes[name](learning_rate=run["learning_rate"], **optimizer_kwargs(run))


@dataclass
class Plan:
    """What the trainer is given: its batches, iterations, validation set and limits."""

    iterate: IterateBatches
    iters: int
    max_seq_length: int
    valid: ValidationRows | None = None
    accumulation: int = 1
    val_batches: int = 25


def plan(spec: dict[str, Any], weights_source: str) -> Plan:
    """The batches: ``batch_shapes`` (one step each) or the probe's own (full-length random
    rows, or text from ``--data``); ``val_batch_shapes`` for the validations, else none.
    With gradient accumulation the steps run to a whole number of updates (mlx-lm updates
    when the iteration divides by the accumulation steps), cycling through the shapes."""
    run = spec.get("lora_run") or {}
    accumulation = int(run.get("grad_accumulation_steps", 1))
    vocab = int(spec["config"]["vocab_size"])
    batch, seq_len = int(spec["batch_size"]), int(spec["seq_len"])
    shapes = [list(s) for s in spec.get("batch_shapes") or []]
    if shapes:
        iters = math.ceil(len(shapes) / accumulation) * accumulation
        shapes = [shapes[i % len(shapes)] for i in range(iters)]
        iterate = shaped_batches(shapes, vocab)
    else:
        iters = math.ceil(int(spec["steps"]) / accumulation) * accumulation
        if spec.get("data") and weights_source != "synthetic":
            iterate = text_batches(spec, Path(weights_source))
        else:
            iterate = random_batches(spec, vocab)
    valid_shapes = [list(s) for s in spec.get("val_batch_shapes") or []]
    widths = [w for _, w in shapes + valid_shapes]
    result = Plan(iterate, iters, max([seq_len + 1, *widths]), accumulation=accumulation)
    result.val_batches = int(run.get("val_batches", -1))
    if valid_shapes:
        result.valid = ValidationRows([0] * batch * len(valid_shapes))
        result.iterate = with_validation(iterate, valid_shapes, vocab)
    return result


@dataclass
class Trained:
    """What the steps measured: each step's seconds and MLX peak (the steps' running
    maximum), the peak over validations and over the whole phase, the shapes run."""

    step_seconds: list[float] = field(default_factory=list)
    step_peaks: list[int] = field(default_factory=list)
    val_peak: int = 0
    before_reset: int = 0  # the phase's peak up to MLX's last reset_peak_memory
    batch_shapes: list[list[int]] = field(default_factory=list)
    val_batch_shapes: list[list[int]] = field(default_factory=list)
    validations: int = 0

    def phase_peak(self) -> int:
        return max(self.before_reset, int(mx.get_peak_memory()))

    def fold(self) -> int:
        """Close a stretch: its peak joins the phase's, and MLX's counter restarts."""
        peak = int(mx.get_peak_memory())
        self.before_reset = max(self.before_reset, peak)
        mx.reset_peak_memory()
        return peak


class Finished(Exception):
    """Raised after the last step's report: what follows in mlx-lm's trainer is saving the
    adapters (whole blocks for full fine-tuning), which a measurement does not need."""


def callback(trained: Trained, iters: int, cap: MemoryCap, stop_at_end: bool) -> Any:
    """A TrainingCallback that records each step and each validation."""
    from mlx_lm.tuner.callbacks import TrainingCallback

    class Progress(TrainingCallback):  # type: ignore[misc]
        def on_train_loss_report(self, info: dict[str, Any]) -> None:
            peak = max([*trained.step_peaks[-1:], int(mx.get_peak_memory())])
            trained.step_peaks.append(peak)
            trained.step_seconds.append(1.0 / float(info["iterations_per_second"]))
            seconds = trained.step_seconds[-1]
            say(step_line(info["iteration"], iters, info["train_loss"], gb(peak), seconds))
            cap.check(trained.phase_peak())
            if stop_at_end and info["iteration"] == iters:
                raise Finished

        def on_val_loss_report(self, info: dict[str, Any]) -> None:
            trained.val_peak = max(trained.val_peak, trained.fold())
            say(f"validation at step {info['iteration']}: loss={info['val_loss']:.4f} "
                f"peak={gb(trained.val_peak):.3f} GB time={info['val_time']:.2f} s")  # fmt: skip
            cap.check(trained.before_reset)

    return Progress()


def train_steps(
    model: nn.Module, spec: dict[str, Any], cap: MemoryCap, weights_source: str
) -> Trained:
    """mlx-lm's own trainer for the planned steps, with the validations the plan asks."""
    from mlx_lm.tuner.trainer import TrainingArgs, train

    chosen = plan(spec, weights_source)
    trained = Trained()
    recorder = Recorder(chosen.iterate, on_validation=trained.fold)
    run = spec.get("lora_run")
    with tempfile.TemporaryDirectory(prefix="yourai-probe-") as scratch:
        args = TrainingArgs(
            batch_size=int(spec["batch_size"]),
            iters=chosen.iters,
            val_batches=chosen.val_batches,
            steps_per_report=1,
            # Validation (when there is a set) at the first and the last iteration only.
            steps_per_eval=chosen.iters + 1,
            steps_per_save=chosen.iters + 1,
            max_seq_length=chosen.max_seq_length,
            adapter_file=str(Path(scratch) / "adapters.safetensors"),
            grad_checkpoint=bool(spec["grad_checkpoint"]),
            grad_accumulation_steps=chosen.accumulation,
        )
        progress = callback(trained, chosen.iters, cap, stop_at_end=run is not None)
        # mlx-lm's trainer draws its progress UI on stdout; keep stdout for our protocol.
        with contextlib.redirect_stdout(sys.stderr), contextlib.suppress(Finished):
            train(
                model, build_optimizer(spec), [0] * int(spec["batch_size"]), chosen.valid,
                args=args, iterate_batches=recorder, training_callback=progress,
            )  # fmt: skip
    trained.batch_shapes, trained.val_batch_shapes = recorder.train, recorder.valid
    trained.validations = recorder.validations
    return trained
