"""What people read, rendered from the result rows: the per-model console lines and the
summary table of the original Rust CLI, with its recommendation; the results JSON, the
Markdown step summary and the plot, written by ``write_outputs``. Rendering only: the rows
come from results.py."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pytest_yourai.results import NOT_RUN, ResultRow, Verdict


def gb_number(value: float) -> str:
    """1 decimal for real models, 3 significant figures for tiny ones (0.0493)."""
    return f"{value:.1f}" if value >= 1 else f"{value:.3g}"


def _gb(value: object) -> str:
    return f"{gb_number(float(value))} GB" if isinstance(value, int | float) else "-"


def measured_gb(row: ResultRow) -> object:
    """What the run held on its device at its worst (the footprint), or, from a probe that
    does not report one, MLX's peak."""
    footprint = row.get("footprint_peak_gb")
    return footprint if isinstance(footprint, int | float) else row.get("peak_memory_gb")


def config_text(row: ResultRow) -> str:
    if row.get("batch_size") is None:
        return "-"
    batch, rank, layers = row.get("batch_size"), row.get("lora_rank"), row.get("lora_layers")
    return f"batch={batch}, rank={rank}, layers={layers}"


def estimate_text(row: ResultRow) -> str:
    base, conservative = row.get("estimated_base_gb"), row.get("estimated_conservative_gb")
    if base is None or conservative is None:
        return "-"
    return f"~{gb_number(float(base))}-{gb_number(float(conservative))}GB"


def item_lines(row: ResultRow, index: int, total: int | None) -> list[str]:
    """The console block for one model (the Rust CLI's)."""
    of = f"{index}/{total}" if total else str(index)
    lines = [f"[{of}] {row.get('preset', row.nodeid)} ({row.get('params', '?')})"]
    available = row.get("available_gb")
    if available is not None:
        warn = " ⚠" if row.get("insufficient") else ""
        lines.append(
            f"  Pre-flight: Available={gb_number(float(available))}GB, "
            f"Required={estimate_text(row)}{warn}"
        )
        if row.get("insufficient"):
            lines.append("  ⚠️  WARNING: Available memory may be insufficient")
        lines.append(f"  Config: {config_text(row)}")
        if row.get("data"):
            lines.append(f"  Data: {row.get('data')}")
    search = row.get("search")
    if search:
        found = json.loads(search)
        lines.append(
            f"  Search: batch={found['batch_size']}, rank={found['lora_rank']}, "
            f"layers={found['lora_layers']} fits {found['budget_gb']:.3g} GB "
            f"after {found['probes']} probes"
        )
    verdict = row.verdict
    if verdict in NOT_RUN:
        reason = row.get("reason") or ""
        lines.append(f"  {verdict}{': ' + reason if reason else ''}")
    else:
        mark = Verdict(verdict).mark if verdict in set(Verdict) else "?"
        peak = measured_gb(row)
        detail = f" ({gb_number(float(peak))} GB peak)" if isinstance(peak, int | float) else ""
        lines.append(f"  Testing... {mark} {verdict}{detail}")
    return lines


def preset_label(row: ResultRow, rows: Sequence[ResultRow]) -> str:
    """The preset, and the test's name when several tests benchmark the same preset."""
    preset = str(row.get("preset", row.nodeid))
    if sum(1 for r in rows if r.get("preset") == row.get("preset")) > 1:
        test = row.nodeid.rsplit("::", 1)[-1].split("[", 1)[0]
        return f"{preset} ({test})"
    return preset


def summary_table(rows: Sequence[ResultRow]) -> list[str]:
    headers = (
        "preset",
        "params",
        "config",
        "estimate",
        "available",
        "footprint",
        "mlx peak",
        "verdict",
    )
    body = [
        (
            preset_label(r, rows),
            str(r.get("params", "?")),
            config_text(r),
            estimate_text(r),
            _gb(r.get("available_gb")),
            _gb(measured_gb(r)),
            _gb(r.get("peak_memory_gb")),
            r.verdict or "-",
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(headers)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return [fmt(headers), fmt(["-" * w for w in widths]), *(fmt(b) for b in body)]


def baseline_lines(rows: Sequence[ResultRow]) -> list[str]:
    """Presets compared with no stored baseline: said, not passed over."""
    missing = [str(r.get("preset", r.nodeid)) for r in rows if r.get("baseline") == "missing"]
    if not missing:
        return []
    return [
        f"No baseline for {', '.join(missing)} at this config, in-flight mode and machine: "
        "nothing was compared (--yourai-baseline-save stores one)"
    ]


def crash_lines(crashes: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per ``worker_crashed``: where, what was running, what was last heard."""
    lines = []
    for crash in crashes:
        last = crash.get("last_event") or {}
        running = f"while running {crash['preset']}" if crash.get("preset") else "between tests"
        heard = f"; last event from it: {last.get('event')}" if last else ""
        lines.append(
            f"worker {crash.get('worker')} on {crash.get('host') or 'an unknown host'} "
            f"crashed {running}{heard} (python -m pytest_yourai.log says more)"
        )
    return lines


def recommendation(rows: Sequence[ResultRow]) -> str:
    """The Rust CLI's advice: the largest preset that fits this machine."""
    measured = [r for r in rows if r.verdict == Verdict.PASS]
    if measured:
        best = max(measured, key=lambda r: float(r.get("param_count", 0)))
        return (
            f"Largest preset that fits: {best.get('preset')} ({best.get('params')}), "
            f"{_gb(measured_gb(best))} peak at {config_text(best)}"
        )
    estimated = [r for r in rows if r.verdict == Verdict.ESTIMATED and r.get("decision") == "run"]
    if estimated:
        best = max(estimated, key=lambda r: float(r.get("param_count", 0)))
        return (
            f"Largest preset that should fit (estimate only): {best.get('preset')} "
            f"({best.get('params')}), needs {estimate_text(best)} at {config_text(best)}"
        )
    return "No preset fits this machine at its safe config."


# -- machine-readable results -------------------------------------------------------------

RESULT_FIELDS = (
    "preset",
    "params",
    "param_count",
    "backend",
    "host",
    "worker",
    "machine_id",
    "batch_size",
    "lora_rank",
    "lora_layers",
    "seq_len",
    "bits",
    "dtype",
    "in_flight",
    "estimated_base_gb",
    "estimated_conservative_gb",
    "available_gb",
    "predicted_seconds",
    "peak_memory_gb",
    "footprint_peak_gb",
    "build_footprint_gb",
    "train_footprint_gb",
    "footprint_source",
    "train_peak_memory_gb",
    "load_peak_memory_gb",
    "resident_memory_gb",
    "process_peak_rss_gb",
    "probe_peak_rss_gb",
    "step_seconds_median",
    "tokens_per_second",
    "total_parameters",
    "trainable_parameters",
    "elapsed_s",
    "reason",
    "baseline_peak_gb",
    "search",
)


def package_versions() -> dict[str, str | None]:
    """Versions of the stack, read from package metadata (mlx is never imported here)."""
    import importlib.metadata

    from pytest_yourai import __version__

    versions: dict[str, str | None] = {"pytest-yourai": __version__}
    for name in ("mlx", "mlx-lm", "mlx-metal", "mlx-cpu", "mlx-cuda-13", "pytest"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def result_entry(row: ResultRow) -> dict[str, object]:
    """One benchmark as the results JSON (and the pytest_yourai_result hook) has it."""
    entry: dict[str, object] = {"nodeid": row.nodeid, "verdict": str(row.verdict)}
    if row.get("baseline") == "missing":
        entry["baseline"] = None
    elif isinstance(row.get("baseline_peak_gb"), int | float):
        entry["baseline"] = {"peak_memory_gb": row.get("baseline_peak_gb")}
    for name in RESULT_FIELDS:
        value = row.get(name)
        if value is not None:
            entry[name] = json.loads(value) if name == "search" else value
    return entry


def results_document(rows: Sequence[ResultRow], machine: dict[str, object]) -> dict[str, object]:
    results = [result_entry(row) for row in rows]
    return {"machine": machine, "versions": package_versions(), "results": results}


def markdown_table(rows: Sequence[ResultRow]) -> str:
    """The summary table as GitHub-flavoured Markdown (for GITHUB_STEP_SUMMARY)."""
    lines = [
        "### pytest-yourai: LoRA memory benchmark",
        "",
        "| preset | params | config | estimate | available | footprint | mlx peak | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {preset_label(r, rows)} | {r.get('params', '?')} | {config_text(r)} | "
            f"{estimate_text(r)} | {_gb(r.get('available_gb'))} | {_gb(measured_gb(r))} | "
            f"{_gb(r.get('peak_memory_gb'))} "
            f"| {r.verdict or '-'} |"
        )
    lines += ["", recommendation(rows), ""]
    return "\n".join(lines)


def _measured_bars(ax: Any, shown: Sequence[ResultRow], bottom: float) -> None:
    """Each preset's measured footprint beside its estimate, or why there is none."""
    labelled = False
    for x, row in enumerate(shown):
        value = measured_gb(row)
        if isinstance(value, int | float):
            label = None if labelled else "measured footprint"
            labelled = True
            ax.bar(x + 0.2, value, width=0.4, color="#31a354", label=label)
            ax.annotate(
                gb_number(float(value)), (x + 0.2, value), ha="center", va="bottom", fontsize=8
            )
        else:  # skipped or failed: say why where the bar would be
            ax.annotate(
                row.verdict or "-", (x + 0.2, bottom), ha="center", va="bottom", fontsize=8,
                rotation=90,
            )  # fmt: skip


def plot(rows: Sequence[ResultRow], path: Path) -> None:
    """Per preset: the estimate range, the measured peak, and the available-memory line."""
    import matplotlib  # type: ignore[import-not-found,unused-ignore]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]

    shown = [r for r in rows if r.get("estimated_base_gb") is not None]
    names = [str(r.get("preset")) for r in shown]
    base = [float(r.get("estimated_base_gb")) for r in shown]
    conservative = [float(r.get("estimated_conservative_gb")) for r in shown]
    xs = range(len(shown))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(shown) + 2), 4.8))
    ax.bar([x - 0.2 for x in xs], base, width=0.4, color="#9ecae1", label="estimate (base)")
    ax.bar(
        [x - 0.2 for x in xs],
        [c - b for b, c in zip(base, conservative, strict=True)],
        bottom=base,
        width=0.4,
        color="#deebf7",
        hatch="//",
        edgecolor="#6baed6",
        label="estimate (up to conservative)",
    )
    _measured_bars(ax, shown, min(base))
    available = [r.get("available_gb") for r in shown if r.get("available_gb") is not None]
    if available:
        line = min(float(a) for a in available)
        ax.axhline(line, color="#e6550d", linestyle="--", label=f"available ({gb_number(line)} GB)")
    ax.set_xticks(list(xs), names, rotation=20, ha="right")
    ax.set_ylabel("GB (1e9 bytes)")
    values = [v for v in base + conservative if v > 0]
    values += [float(a) for a in available]
    if values and max(values) / min(values) > 50:  # tiny presets next to 70B, or to the RAM line
        ax.set_yscale("log")
        ax.set_ylim(bottom=min(values) / 4)  # room below the smallest bar on a log axis
    ax.set_title("pytest-yourai: estimated vs measured LoRA training footprint")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(
    rows: Sequence[ResultRow],
    machine: dict[str, object],
    json_path: Path | None,
    plot_path: Path | None,
    step_summary: str | None,
) -> list[str]:
    """The results JSON, the step summary (GITHUB_STEP_SUMMARY) and the plot; lines for the
    terminal saying what was written."""
    written: list[str] = []
    if not rows:
        return written
    if json_path is not None:
        document = results_document(rows, machine)
        json_path.write_text(json.dumps(document, indent=1), encoding="utf-8")
        written.append(f"results JSON: {json_path}")
    if step_summary:
        with open(step_summary, "a", encoding="utf-8") as handle:
            handle.write(markdown_table(rows) + "\n")
        written.append(f"step summary: {step_summary}")
    if plot_path is not None:
        plot(rows, plot_path)
        written.append(f"plot: {plot_path}")
    return written
