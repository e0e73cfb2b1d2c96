"""Command lines: ``python -m pytest_yourai.estimate`` and the ``yourai`` console script.

``yourai estimate|probe|log|compare|fit`` run the same code as
``python -m pytest_yourai.estimate``, ``python -m pytest_yourai.probe``,
``python -m pytest_yourai.log``, ``python -m pytest_yourai.compare`` and
``python -m pytest_yourai.fit``.

The estimate resolves a preset's config exactly as the pre-flight does (its pins, then the
seed's safe-config table or the fit policy, at the memory available) and prints it with the
estimate, so the two never disagree.
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
from pytest_yourai.estimate import BACKENDS, DTYPE_BYTES, IN_FLIGHT_MODES, format_breakdown
from pytest_yourai.preflight import Preflight, memory_decision
from pytest_yourai.presets import (
    Preset,
    builtin_presets,
    load_presets_file,
    preset_from_config_json,
)

PIN_FLAGS = ("batch_size", "lora_rank", "lora_layers", "seq_len", "bits")
PROBE_FLAGS = ("dtype", "group_size", "grad_checkpoint")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


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
    parser.add_argument("--presets-file", type=Path, help="a presets TOML file")
    parser.add_argument("--bits", type=int, choices=(2, 3, 4, 5, 6, 8, 16))
    parser.add_argument("--group-size", type=positive_int)
    parser.add_argument(
        "--dtype", choices=tuple(DTYPE_BYTES), help="default: the config's, else bfloat16"
    )
    parser.add_argument("--batch-size", type=positive_int)
    parser.add_argument("--seq-len", type=positive_int)
    parser.add_argument("--lora-rank", type=positive_int)
    parser.add_argument("--lora-layers", type=positive_int)
    parser.add_argument("--grad-checkpoint", action="store_true", default=None)
    parser.add_argument(
        "--backend", choices=BACKENDS, help="default: the one MLX would use on this machine"
    )
    parser.add_argument(
        "--available-gb",
        type=_positive_float,
        help="memory available to the run (default: what this machine has free); picks the "
        "seed table's row and decides whether it fits",
    )
    parser.add_argument("--safety-gb", type=float, default=2.0, help="kept free (default 2)")
    parser.add_argument("--policy", choices=CONFIG_POLICIES, default="seed")
    parser.add_argument(
        "--in-flight",
        choices=IN_FLIGHT_MODES,
        default="mlx",
        help="mlx (default): MLX's own command-buffer limits, what mlx_lm.lora runs, with "
        "the in-flight window in framework_overhead_gb; bounded: one op in flight "
        "(MLX_MAX_OPS_PER_BUFFER=1 MLX_MAX_MB_PER_BUFFER=1)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    return parser


def _pinned(preset: Preset, args: argparse.Namespace) -> Preset:
    """The command line's run settings pin the preset, as a presets file would."""
    pins = dict(preset.pins)
    for name in (*PIN_FLAGS, *PROBE_FLAGS):
        value = getattr(args, name)
        if value is not None:
            pins[name] = value
    return replace(preset, pins=pins)


def resolve(preset: Preset, args: argparse.Namespace, backend: str, available: float) -> Preflight:
    """The pre-flight's own resolution of the preset's config and estimate."""
    return memory_decision(
        preset,
        available,
        backend,
        policy=args.policy,
        in_flight=args.in_flight,
        safety_gb=args.safety_gb,
    )


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
        presets = builtin_presets()
        if args.presets_file is not None:
            presets.update(load_presets_file(args.presets_file, "--presets-file"))
        if args.config is not None:
            chosen = [preset_from_config_json(args.config)]
        elif args.preset is not None:
            if args.preset not in presets:
                parser.error(f"unknown preset {args.preset!r}; known: {', '.join(presets)}")
            chosen = [presets[args.preset]]
        else:
            chosen = list(presets.values())
    except YouraiUsageError as exc:
        parser.exit(4, f"{parser.prog}: error: {exc}\n")
    available = args.available_gb
    if available is None:
        available = read_machine_memory(backend).available_gb
    results = [resolve(_pinned(p, args), args, backend, available) for p in chosen]
    if args.table:
        print(table(results))
        return 0
    (result,) = results
    if result.refused:
        parser.exit(3, f"{parser.prog}: cannot estimate: {result.reason}\n")
    if args.json:
        record: dict[str, Any] = {**result.estimate.to_json(), "config": result.record()}
        print(json.dumps(record))
    else:
        print(describe(result))
        print(format_breakdown(result.estimate))
    return 0


def _log_main(argv: list[str]) -> int:
    from pytest_yourai.log import main as log_main

    return log_main(argv)


def _probe_main(argv: list[str]) -> int:
    from pytest_yourai.probe import main as probe_main  # imports mlx: only in this command

    return probe_main(argv)


def _compare_main(argv: list[str]) -> int:
    from pytest_yourai.compare import main as compare_main

    return compare_main(argv)


def _fit_main(argv: list[str]) -> int:
    from pytest_yourai.fit import main as fit_main

    return fit_main(argv)


SUBCOMMANDS = {
    "estimate": estimate_main,
    "probe": _probe_main,
    "log": _log_main,
    "compare": _compare_main,
    "fit": _fit_main,
}


def main(argv: Sequence[str] | None = None) -> int:
    """``yourai SUBCOMMAND ...``: the package's command lines under one name."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in SUBCOMMANDS:
        names = ", ".join(SUBCOMMANDS)
        sys.stderr.write(f"usage: yourai {{{names}}} [options]  (yourai SUBCOMMAND --help)\n")
        return 2
    return SUBCOMMANDS[args[0]](args[1:])
