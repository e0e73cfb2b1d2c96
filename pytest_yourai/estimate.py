"""``python -m pytest_yourai.estimate`` (also ``yourai estimate``): what a preset or a
config.json needs, its config resolved exactly as the plugin's pre-flight resolves it (its pins,
then the safe-config table or the fit policy, at the memory available), so the two
never disagree.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from pytest_yourai.autoconfig import CONFIG_POLICIES
from pytest_yourai.errors import YouraiUsageError
from pytest_yourai.estimator import estimate_training_memory, format_breakdown
from pytest_yourai.fields import (
    BACKENDS,
    DEFAULT_IN_FLIGHT,
    DEFAULT_SAFETY_GB,
    add_run_flags,
    non_negative_float,
    positive_float,
    run_pins,
)
from pytest_yourai.learning import MachineRecord
from pytest_yourai.lora_data import fine_tune_preset
from pytest_yourai.machine_record import add_cache_dir_flag, explain, learner_of, this_machine
from pytest_yourai.preflight import Preflight, memory_decision
from pytest_yourai.presets import Preset, catalog, pick, preset_from_config_json


def estimate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pytest_yourai.estimate",
        description="Estimate what an MLX LoRA fine-tune needs free on its device, resolving "
        "the config as the plugin's pre-flight does.",
    )
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--config", type=Path, help="a Hugging Face config.json")
    model.add_argument("--preset", help="a preset name (built in, or from --presets-file)")
    model.add_argument("--table", action="store_true", help="every preset, as a Markdown table")
    model.add_argument(
        "--lora-config", type=Path, metavar="YAML",
        help="an mlx_lm.lora config: its model, data and options (as --yourai-lora-config)",
    )  # fmt: skip
    parser.add_argument("--presets-file", type=Path, help="a presets TOML file")
    add_run_flags(parser, in_flight_default=DEFAULT_IN_FLIGHT)
    parser.add_argument(
        "--backend", choices=BACKENDS, help="default: the one MLX would use on this machine"
    )
    parser.add_argument(
        "--available-gb",
        type=positive_float,
        help="memory available to the run (default: what this machine has free); picks the "
        "safe-config table's row and decides whether it fits",
    )
    parser.add_argument(
        "--safety-gb",
        type=non_negative_float,
        default=DEFAULT_SAFETY_GB,
        help=f"kept free (default {DEFAULT_SAFETY_GB:g})",
    )
    parser.add_argument("--policy", choices=CONFIG_POLICIES, default="seed")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument(
        "--explain",
        action="store_true",
        help="print the estimate's terms, and what this machine's own probes taught it: the "
        "correction and the probes it came from",
    )
    add_cache_dir_flag(parser)
    return parser


def pinned(preset: Preset, args: argparse.Namespace) -> Preset:
    """The command line's run settings pin the preset, as a presets file would."""
    return replace(preset, pins={**preset.pins, **run_pins(args)})


def resolve(
    preset: Preset,
    args: argparse.Namespace,
    backend: str,
    available: float,
    record: tuple[MachineRecord, str] | None = None,
) -> Preflight:
    """The pre-flight's own resolution of the preset's config and estimate (corrected by
    this machine's ``record`` of its probes, where given)."""
    return memory_decision(
        preset,
        available,
        backend,
        policy=args.policy,
        in_flight=args.in_flight,
        safety_gb=args.safety_gb,
        learner_of=learner_of(record),
    )


def explained(result: Preflight, record: tuple[MachineRecord, str] | None) -> str:
    """``--explain``: today's terms, then what the record changed."""
    shape, arch = result.shape, dict(result.preset.architecture)
    today = estimate_training_memory(arch, shape, result.census)
    lines = [f"preset: {result.preset.name}", describe(result), format_breakdown(today)]
    if record is None:
        lines.append("learned: nothing (the estimate is for another backend than this machine's)")
    else:
        lines.append(explain(record[0], record[1], shape, arch, result.census, today))
    return "\n".join(lines)


def describe(result: Preflight) -> str:
    s = result.shape
    checkpoint = ", gradient checkpointing" if s.grad_checkpoint else ""
    return (
        f"config: {result.config.describe()}, seq {s.seq_len}, {s.bits}-bit {s.dtype}"
        f"{checkpoint}, in flight {s.in_flight}, backend {s.backend}, "
        f"{result.available_gb:g} GB available ({result.decision})"
    )


def table(results: Sequence[Preflight]) -> str:
    lines = [
        "| preset | config | needs free (footprint) | MLX peak | fits |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        e = r.estimate
        needs = (
            "refused"
            if r.refused
            else (f"{e.estimated_base_gb:.1f}–{e.estimated_conservative_gb:.1f} GB")
        )
        peak = "-" if r.refused else f"{e.mlx_peak_gb:.1f} GB"
        config = f"{r.config.describe()}, seq {r.shape.seq_len}, {r.shape.bits}-bit"
        lines.append(
            f"| `{r.preset.name}` | {config} | {needs} | {peak} | "
            f"{'yes' if r.decision == 'run' else 'no'} |"
        )
    return "\n".join(lines)


def estimate_main(argv: Sequence[str] | None = None) -> int:
    from pytest_yourai.memory import detect_backend, read_machine_memory

    parser = estimate_parser()
    args = parser.parse_args(argv)
    backend = args.backend or detect_backend()
    try:
        presets = catalog(args.presets_file, "--presets-file")
        chosen = [preset_from_config_json(args.config)] if args.config else list(presets.values())
        if args.lora_config is not None:
            chosen = [fine_tune_preset(args.lora_config, "--lora-config")]
    except YouraiUsageError as exc:
        parser.exit(4, f"{parser.prog}: error: {exc}\n")
    if args.preset is not None:
        try:
            chosen = pick(presets, [args.preset], "--preset")
        except YouraiUsageError as exc:
            parser.error(str(exc))
    available = args.available_gb
    if available is None:
        available = read_machine_memory(backend).available_gb
    record = this_machine(args.cache_dir, backend)
    results = [resolve(pinned(p, args), args, backend, available, record) for p in chosen]
    if args.table:
        print(table(results))
        return 0
    (result,) = results
    if result.refused:
        parser.exit(3, f"{parser.prog}: cannot estimate: {result.reason}\n")
    if args.json:
        line: dict[str, Any] = {**result.estimate.to_json(), "config": result.record()}
        print(json.dumps(line))
    elif args.explain:
        print(explained(result, record))
    else:
        print(describe(result))
        print(format_breakdown(result.estimate))
    return 0


if __name__ == "__main__":
    sys.exit(estimate_main())
