"""The fit map: which model, at which settings, fits which machine.

    yourai fit [--backend metal|cuda|cpu] [--memory 16,24,...] [--json] [--plot map.png]
    yourai fit --need --preset hermes-70b --batch-size 1 --lora-rank 16 --lora-layers 8
    python -m pytest_yourai.fit ...

For each preset and memory size it finds what the pre-flight's ``fit`` policy would run on a
machine with that much available (``--yourai-max-memory N``): the largest batch, then rank,
then LoRA layers whose conservative footprint fits by the go rule (with ``--safety-gb``
kept free), with the preset's pins and its sequence length. The map and the pre-flight call
the same function (preflight.memory_decision over preflight.plan), so they cannot drift apart.

On Metal a size is the Mac's RAM, turned into what macOS lets the GPU use by the rule the
pre-flight falls back on (memory.metal_working_set_gb, where the sources are cited); a Mac's
own pre-flight reads the real figure from MLX.

Without ``--backend`` the map is for Macs on a Mac and, elsewhere, for this machine's backend
as the plugin infers it (memory.detect_backend).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from pytest_yourai.errors import YouraiUsageError
from pytest_yourai.fields import (
    BACKENDS,
    DEFAULT_IN_FLIGHT,
    DEFAULT_SAFETY_GB,
    IN_FLIGHT_MODES,
    add_run_flags,
    non_negative_float,
    run_pins,
)
from pytest_yourai.lora_data import fine_tune_preset
from pytest_yourai.memory import detect_backend, metal_working_set_gb
from pytest_yourai.preflight import RUN, Preflight, memory_decision
from pytest_yourai.presets import Preset, catalog, pick, preset_from_config_json

MAC_SIZES_GB = (8, 16, 18, 24, 32, 36, 48, 64, 96, 128, 192)
GPU_SIZES_GB = (24, 48, 80)
UNLIMITED_GB = 1e6


def available_for(memory_gb: float, backend: str) -> float:
    """What a machine of that size makes available to the run: on Metal, the working set
    macOS lets the GPU use (memory.metal_working_set_gb, the pre-flight's own fallback)."""
    return metal_working_set_gb(memory_gb) if backend == "metal" else memory_gb


def place(
    preset: Preset,
    memory_gb: float,
    backend: str,
    in_flight: str,
    safety_gb: float,
) -> Preflight:
    """The pre-flight's decision for the preset on a machine of ``memory_gb`` (fit policy)."""
    return memory_decision(
        preset,
        available_for(memory_gb, backend),
        backend,
        policy="fit",
        in_flight=in_flight,
        safety_gb=safety_gb,
    )


def cell(result: Preflight, memory_gb: float) -> dict[str, Any]:
    fits = result.decision == RUN
    config = result.config if fits else None
    return {
        "preset": result.preset.name,
        "memory_gb": memory_gb,
        "fits": fits,
        "batch_size": config.batch_size if config else None,
        "lora_rank": config.lora_rank if config else None,
        "lora_layers": config.lora_layers if config else None,
        "seq_len": result.shape.seq_len if config else None,
        "estimated_conservative_gb": round(result.estimate.estimated_conservative_gb, 3)
        if fits
        else None,
    }


def fit_map(
    presets: Sequence[Preset],
    sizes: Sequence[float],
    backend: str,
    in_flight: str,
    safety_gb: float,
) -> dict[str, Any]:
    """The JSON contract: backend, in_flight, safety_gb and one cell per preset and size."""
    cells = [
        cell(place(p, size, backend, in_flight, safety_gb), size) for p in presets for size in sizes
    ]
    return {"backend": backend, "in_flight": in_flight, "safety_gb": safety_gb, "cells": cells}


def markdown(document: dict[str, Any]) -> str:
    sizes = sorted({c["memory_gb"] for c in document["cells"]})
    presets = list(dict.fromkeys(c["preset"] for c in document["cells"]))
    by = {(c["preset"], c["memory_gb"]): c for c in document["cells"]}
    lines = [
        "| preset | " + " | ".join(f"{s:g} GB" for s in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for name in presets:
        row = []
        for size in sizes:
            c = by[(name, size)]
            row.append(
                f"b{c['batch_size']} r{c['lora_rank']} L{c['lora_layers']}" if c["fits"] else "–"
            )
        lines.append(f"| `{name}` | " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(document: dict[str, Any], path: Path) -> None:
    """A heat map: presets by memory, each cell coloured by how much fits (batch x rank x
    layers, log scale), with the config written in it; grey where nothing fits."""
    import math

    import matplotlib  # type: ignore[import-not-found,unused-ignore]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]

    sizes = sorted({c["memory_gb"] for c in document["cells"]})
    presets = list(dict.fromkeys(c["preset"] for c in document["cells"]))
    by = {(c["preset"], c["memory_gb"]): c for c in document["cells"]}

    def amount(c: dict[str, Any]) -> float:
        return math.log2(c["batch_size"] * c["lora_rank"] * c["lora_layers"]) if c["fits"] else -1

    values = [[amount(by[(p, s)]) for s in sizes] for p in presets]
    top = max([v for row in values for v in row] + [1.0])
    fig, ax = plt.subplots(figsize=(1.05 * len(sizes) + 3.5, 0.6 * len(presets) + 2.0))
    cmap = plt.get_cmap("YlGn").copy()
    cmap.set_under("#e6e6e6")
    image = ax.imshow(values, cmap=cmap, vmin=0.0, vmax=top, aspect="auto")
    for i, p in enumerate(presets):
        for j, s in enumerate(sizes):
            c = by[(p, s)]
            dark = c["fits"] and values[i][j] > 0.6 * top
            text = (
                f"b{c['batch_size']} r{c['lora_rank']}\nL{c['lora_layers']}" if c["fits"] else "–"
            )
            ax.text(
                j, i, text, ha="center", va="center", fontsize=8.5,
                color="white" if dark else "#222222",
            )  # fmt: skip
    metal = document["backend"] == "metal"
    ax.set_xticks(range(len(sizes)), [f"{s:g} GB" for s in sizes])
    ax.set_yticks(range(len(presets)), presets)
    ax.set_xlabel(
        "Mac RAM (macOS gives the GPU 2/3 up to 32 GB, 3/4 above)" if metal else "memory available"
    )
    ax.set_title(
        f"What fits for a LoRA fine-tune: batch b, rank r, LoRA layers L "
        f"({document['backend']}, in flight {document['in_flight']}, "
        f"{document['safety_gb']:g} GB kept free; – = does not fit)",
        fontsize=10,
    )
    bar = fig.colorbar(image, ax=ax, fraction=0.025, pad=0.015)
    bar.set_label("how much fits: batch × rank × layers (log scale)")
    bar.set_ticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def need(preset: Preset, backend: str, safety_gb: float) -> list[Preflight]:
    """What a machine needs for the preset at its config, in each in-flight mode: the
    config is the preset's pins (the command line's flags), the rest the pre-flight's
    default (the safe-config table) on a machine with room for anything."""
    return [
        memory_decision(
            preset, UNLIMITED_GB, backend, policy="seed", in_flight=mode, safety_gb=safety_gb
        )
        for mode in IN_FLIGHT_MODES
    ]


NEED_OMITS = ("available_gb", "predicted_seconds", "decision", "reason")


def need_record(result: Preflight) -> dict[str, Any]:
    """The pre-flight's record, less what a machine of unlimited size makes meaningless;
    ``refused`` carries the reason when the model cannot be estimated."""
    record = {k: v for k, v in result.record().items() if k not in NEED_OMITS}
    return {**record, "refused": result.reason if result.refused else None}


def need_text(result: Preflight) -> str:
    mode = result.shape.in_flight
    if result.refused:
        return f"in flight {mode}: {result.reason}"
    e, s = result.estimate, result.shape
    return (
        f"in flight {mode}: {result.config.describe()}, seq {s.seq_len}, {s.bits}-bit "
        f"{s.dtype}: footprint {e.estimated_base_gb:.2f} GB, conservative "
        f"{e.estimated_conservative_gb:.2f} GB (MLX peak {e.mlx_peak_gb:.2f} GB); a machine "
        f"needs {e.estimated_conservative_gb + result.safety_gb:.2f} GB available "
        f"({result.safety_gb:g} GB kept free)"
    )


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="yourai fit",
        description="Which preset fits which machine, and at what settings: for each preset "
        "and memory size, the largest batch, then rank, then LoRA layers that the pre-flight "
        "(--yourai-config fit) would run on a machine with that much available.",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        help="metal, cuda or cpu (default: metal on a Mac; elsewhere this machine's backend, "
        "inferred as the plugin does without importing MLX: cuda where MLX's CUDA build and "
        "nvidia-smi are installed, else cpu)",
    )
    parser.add_argument(
        "--memory",
        metavar="GB,GB,...",
        help="machine sizes in GB (default: Macs of 8-192 GB and, off Metal, GPUs of 24, 48 "
        "and 80 GB); on Metal a size is the Mac's RAM, of which macOS gives the GPU 2/3-3/4",
    )
    parser.add_argument(
        "--safety-gb",
        type=non_negative_float,
        default=DEFAULT_SAFETY_GB,
        help=f"GB kept free, as --yourai-safety-gb (default: {DEFAULT_SAFETY_GB:g})",
    )
    parser.add_argument("--presets", metavar="NAMES", help="comma-separated (default: all)")
    parser.add_argument("--presets-file", type=Path, help="a presets TOML file")
    parser.add_argument("--config", type=Path, help="a Hugging Face config.json, as one preset")
    parser.add_argument(
        "--lora-config", type=Path, action="append", metavar="YAML",
        help="an mlx_lm.lora config as a preset (its model, data and options; repeatable); "
        "its own batch size, layers and rank are pins, so a cell says whether it fits",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    parser.add_argument("--plot", type=Path, metavar="PATH", help="draw a heat map (.png, .svg)")
    parser.add_argument(
        "--need", action="store_true", help="what a machine needs for one --preset's config"
    )
    parser.add_argument("--preset", help="the preset for --need")
    add_run_flags(parser, in_flight_default=DEFAULT_IN_FLIGHT)
    return parser


def memory_sizes(text: str | None, backend: str) -> list[float]:
    if text is None:
        return list(MAC_SIZES_GB if backend == "metal" else (*MAC_SIZES_GB, *GPU_SIZES_GB))
    try:
        sizes = [float(s) for s in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or not all(0 < s < float("inf") for s in sizes):
        raise YouraiUsageError(f"--memory {text!r}: expected sizes in GB, e.g. 16,24,64")
    return sorted(set(sizes))


def chosen_presets(args: argparse.Namespace) -> list[Preset]:
    presets = catalog(args.presets_file, "--presets-file")
    if args.config is not None:
        found = preset_from_config_json(args.config)
        presets = {found.name: found}
    if args.lora_config:
        fine_tunes = [fine_tune_preset(path, "--lora-config") for path in args.lora_config]
        presets = {preset.name: preset for preset in fine_tunes}
    names = args.presets or args.preset
    if not names:
        return list(presets.values())
    option = "--presets" if args.presets else "--preset"
    return pick(presets, [n.strip() for n in names.split(",") if n.strip()], option)


def check_plot_path(path: Path) -> None:
    """Before any work: the heat map's path can be written, and matplotlib is there."""
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise YouraiUsageError(f"--plot {str(path)!r}: expected a .png, .svg or .pdf path")
    if not path.parent.is_dir():
        raise YouraiUsageError(f"--plot {str(path)!r}: no directory {str(path.parent)!r}")
    try:
        import matplotlib  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        raise YouraiUsageError(
            "--plot needs matplotlib: pip install 'pytest-yourai[plot]'"
        ) from None


def default_backend(chosen: str | None) -> str:
    """``--backend`` when given; on a Mac, metal (the map is for Macs one may not own yet);
    elsewhere the backend the pytest run infers for this machine (memory.detect_backend,
    which reads installed distributions and never imports mlx)."""
    if chosen is not None:
        return chosen
    return "metal" if sys.platform == "darwin" else detect_backend()


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: 0, 2 for a malformed command line (argparse), 4 for a bad value (a
    presets file, a size, a preset name, a plot path), as the plugin's usage errors."""
    args = parser().parse_args(argv)
    prog = "yourai fit"
    backend = default_backend(args.backend)
    if args.need and args.presets:
        parser().error("--need takes one --preset (or --config), not --presets")
    try:
        chosen = chosen_presets(args)
        sizes = memory_sizes(args.memory, backend)
        if args.plot is not None:
            check_plot_path(args.plot)
    except YouraiUsageError as exc:
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return 4
    if args.need and len(chosen) != 1:
        parser().error("--need takes one --preset (or --config)")
    chosen = [replace(p, pins={**p.pins, **run_pins(args)}) for p in chosen]
    if args.need:
        results = need(chosen[0], backend, args.safety_gb)
        if args.json:
            records = [need_record(r) for r in results]
            print(json.dumps({"backend": backend, "safety_gb": args.safety_gb, "needs": records}))
        else:
            print("\n".join(need_text(r) for r in results))
        return 0
    document = fit_map(chosen, sizes, backend, args.in_flight, args.safety_gb)
    print(json.dumps(document) if args.json else markdown(document))
    if args.plot is not None:
        plot(document, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
