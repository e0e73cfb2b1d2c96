"""``yourai check lora.yaml``: will this mlx_lm.lora fine-tune fit this machine?

One answer for the person about to fine-tune, the pre-flight's own (preflight.memory_decision
on the preset the YAML makes, its data's longest batch included), estimated in seconds:

    yourai check lora.yaml [--memory GB] [--backend cpu|cuda|metal] [--in-flight mlx|bounded]
                           [--safety-gb GB] [--json]

When it does not fit, the nearest config that does, as the YAML lines to change: a smaller
batch first, then fewer layers, then a lower rank, then a shorter max_seq_length, and
``grad_checkpoint: true``. Exit codes: 0 fits, 1 does not (or cannot be estimated: the reason
is printed), 4 a usage error (the YAML, its model or its data).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from pytest_yourai.errors import YouraiUsageError
from pytest_yourai.fields import (
    BACKENDS,
    DEFAULT_SAFETY_GB,
    IN_FLIGHT_MODES,
    non_negative_float,
    positive_float,
)
from pytest_yourai.lora_data import data_line, fine_tune_preset
from pytest_yourai.machine_record import add_cache_dir_flag, learner_of, this_machine
from pytest_yourai.preflight import RUN, Preflight, memory_decision
from pytest_yourai.presets import Preset

EXIT_FITS, EXIT_DOES_NOT_FIT, EXIT_USAGE = 0, 1, 4


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="yourai check",
        description="Will this mlx_lm.lora config fit this machine? Exit 0 fits, 1 does not, "
        "4 a usage error.",
    )
    p.add_argument("config", type=Path, help="the mlx_lm.lora YAML config (mlx_lm.lora -c)")
    p.add_argument(
        "--memory", type=positive_float, metavar="GB",
        help="the GB available to the fine-tune (default: what this machine has free now, "
        "read as the pre-flight reads it)",
    )  # fmt: skip
    p.add_argument("--backend", choices=BACKENDS, help="default: this machine's")
    p.add_argument("--in-flight", choices=IN_FLIGHT_MODES, default="mlx")
    p.add_argument("--safety-gb", type=non_negative_float, default=DEFAULT_SAFETY_GB)
    p.add_argument(
        "--trust-remote-code", action="store_true",
        help="let the model's tokenizer run its own code to read the data (a YAML's "
        "trust_remote_code alone never does)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    add_cache_dir_flag(p)
    return p


def decide(preset: Preset, memory_gb: float, backend: str, args: argparse.Namespace) -> Preflight:
    """The pre-flight's decision, with this machine's record of its probes where the
    question is about this machine's backend (as the pre-flight would use it)."""
    return memory_decision(
        preset, memory_gb, backend, policy="seed", in_flight=args.in_flight,
        safety_gb=args.safety_gb, learner_of=args.learner_of,
    )  # fmt: skip


def _pinned(preset: Preset, **pins: Any) -> Preset:
    return replace(preset, pins={**preset.pins, **pins})


def relaxations(preset: Preset) -> Iterator[tuple[dict[str, Any], Preset]]:
    """Candidate changes, nearest first: (the YAML lines, the preset they make)."""
    pins = preset.pins
    batch, layers, seq = int(pins["batch_size"]), int(pins["lora_layers"]), int(pins["seq_len"])
    for smaller in range(batch - 1, 0, -1):
        yield {"batch_size": smaller}, _pinned(preset, batch_size=smaller)
    for fewer in range(layers - 1, 0, -1):
        yield {"num_layers": fewer}, _pinned(preset, lora_layers=fewer)
    rank = pins.get("lora_rank")
    if rank is not None:
        for lower in (r for r in (64, 32, 16, 8, 4, 2, 1) if r < int(rank)):
            yield {"lora_parameters.rank": lower}, _pinned(preset, lora_rank=lower)
    length = seq + 1
    while length > 64:
        length //= 2
        yield {"max_seq_length": length}, _pinned(preset, seq_len=min(seq, length - 1))
    if not pins.get("grad_checkpoint"):
        yield {"grad_checkpoint": True}, _pinned(preset, grad_checkpoint=True)


def nearest_fit(
    preset: Preset, memory_gb: float, backend: str, args: argparse.Namespace
) -> tuple[dict[str, Any], Preflight] | None:
    for change, candidate in relaxations(preset):
        result = decide(candidate, memory_gb, backend, args)
        if result.decision == RUN:
            return change, result
    return None


def yaml_lines(change: dict[str, Any]) -> list[str]:
    lines = []
    for key, value in change.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        if key.startswith("lora_parameters."):
            lines.append(f"lora_parameters:\n  {key.split('.', 1)[1]}: {text}")
        else:
            lines.append(f"{key}: {text}")
    return lines


def answer(preset: Preset, result: Preflight, memory_gb: float, args: argparse.Namespace) -> str:
    e = result.estimate
    head = f"{preset.name}: {preset.params} {preset.repo}, {result.config.describe()}, "
    head += f"seq {result.shape.seq_len}, {result.shape.bits}-bit, in flight {args.in_flight}"
    lines = [head]
    data = data_line(preset.lora)
    if data:
        lines.append(f"  data: {data}")
    if result.refused:
        lines.append(f"  cannot estimate: {result.reason}")
        return "\n".join(lines)
    spare = memory_gb - args.safety_gb - e.estimated_conservative_gb
    verdict = "fits" if result.decision == RUN else "does not fit"
    lines.append(
        f"  {verdict}: needs {e.estimated_base_gb:.2f}-{e.estimated_conservative_gb:.2f} GB "
        f"(MLX peak {e.mlx_peak_gb:.2f} GB) of {memory_gb:g} GB available, keeping "
        f"{args.safety_gb:g} GB free: {spare:+.2f} GB to spare"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from pytest_yourai.memory import detect_backend, read_machine_memory

    args = parser().parse_args(argv)
    backend = args.backend or ("metal" if sys.platform == "darwin" else detect_backend())
    try:
        preset = fine_tune_preset(args.config, trust_remote_code=args.trust_remote_code)
    except YouraiUsageError as exc:
        sys.stderr.write(f"yourai check: error: {exc}\n")
        return EXIT_USAGE
    memory = args.memory if args.memory is not None else read_machine_memory(backend).available_gb
    args.learner_of = learner_of(this_machine(args.cache_dir, backend))  # read once
    result = decide(preset, memory, backend, args)
    fits = result.decision == RUN and not result.refused
    nearest = None if fits or result.refused else nearest_fit(preset, memory, backend, args)
    if args.json:
        record = {**result.record(), "fits": fits, "memory_gb": memory}
        if nearest is not None:
            record["nearest"] = {"change": nearest[0], **nearest[1].record()}
        print(json.dumps(record))
    else:
        print(answer(preset, result, memory, args))
        if nearest is not None:
            print("  nearest config that fits, change in the YAML:")
            for line in yaml_lines(nearest[0]):
                print("    " + line.replace("\n", "\n    "))
        elif not fits and not result.refused:
            print("  no nearer config fits this memory")
    return EXIT_FITS if fits else EXIT_DOES_NOT_FIT


if __name__ == "__main__":
    sys.exit(main())
