"""What people read: the seed's per-model lines and the summary table with its recommendation."""

from __future__ import annotations

from collections.abc import Sequence

from pytest_yourai.session import ResultRow

VERDICT_MARKS = {"Pass": "✓", "OOM": "✗", "Timeout": "✗", "Error": "✗", "Fail": "✗"}


def gb_number(value: float) -> str:
    """1 decimal for real models, 3 significant figures for tiny ones (0.0493)."""
    return f"{value:.1f}" if value >= 1 else f"{value:.3g}"


def _gb(value: object) -> str:
    return f"{gb_number(float(value))} GB" if isinstance(value, int | float) else "-"


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
    """The seed's console block for one model."""
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
    verdict = row.verdict
    if verdict in ("Skipped", "Stopped", "Estimated"):
        reason = row.get("reason") or ""
        lines.append(f"  {verdict}{': ' + reason if reason else ''}")
    else:
        mark = VERDICT_MARKS.get(verdict, "?")
        peak = row.get("peak_memory_gb")
        detail = f" ({gb_number(float(peak))} GB peak)" if isinstance(peak, int | float) else ""
        lines.append(f"  Testing... {mark} {verdict}{detail}")
    return lines


def summary_table(rows: Sequence[ResultRow]) -> list[str]:
    headers = ("preset", "params", "config", "estimate", "available", "peak", "verdict")
    body = [
        (
            str(r.get("preset", r.nodeid)),
            str(r.get("params", "?")),
            config_text(r),
            estimate_text(r),
            _gb(r.get("available_gb")),
            _gb(r.get("peak_memory_gb")),
            r.verdict or "-",
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(headers)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return [fmt(headers), fmt(["-" * w for w in widths]), *(fmt(b) for b in body)]


def recommendation(rows: Sequence[ResultRow]) -> str:
    """The seed's advice: the largest preset that fits this machine."""
    measured = [r for r in rows if r.verdict == "Pass"]
    if measured:
        best = max(measured, key=lambda r: float(r.get("param_count", 0)))
        return (
            f"Largest preset that fits: {best.get('preset')} ({best.get('params')}), "
            f"{_gb(best.get('peak_memory_gb'))} peak at {config_text(best)}"
        )
    estimated = [r for r in rows if r.verdict == "Estimated" and r.get("decision") == "run"]
    if estimated:
        best = max(estimated, key=lambda r: float(r.get("param_count", 0)))
        return (
            f"Largest preset that should fit (estimate only): {best.get('preset')} "
            f"({best.get('params')}), needs {estimate_text(best)} at {config_text(best)}"
        )
    return "No preset fits this machine at its safe config."
