"""A held-out sequence on one host: the plugin learning as it goes, then each run again at
its learned go threshold with the rest of the memory held by another process (issue 29).

    python benchmarks/learning_sequence.py benchmarks/plans/learning_sequence_cuda.jsonl \
        --out benchmarks/results/h100-learning-sequence.jsonl --work /root/work/sequence
    python benchmarks/learning_sequence.py report benchmarks/results/h100-learning-sequence.jsonl

Each grid line (survival.py's form: a model's config and a pinned config, MLX's defaults
unless its ``in_flight`` says otherwise) is taken in order, with one pytest cache for all of
them (``--work``): the machine record the plugin keeps there is what it learns from.

1. ``learn``: nothing held. The plugin runs the preset: pre-flight, then probe. Its
   ``preflight_check`` is the estimate made before this probe from the probes before it:
   today's figures (what the pre-flight uses for a run not probed here) and the learned
   ones (``learned_correction``), and the predicted time; the probe's row is what the run
   measured.
2. ``go``: the plugin's estimate-only pre-flight for the same preset, now probed here, so
   its figures are the learned ones: its go threshold is ``estimated_conservative_gb`` +
   ``--yourai-safety-gb``. Another process then holds the device's memory so that exactly
   that much stays free (survival.Holder), and the plugin runs the preset again, not
   forced. It must pass: no out-of-memory, no safety stop.

On a machine without a GPU (``--backend cpu``) the other process holds RAM, which is what
the pre-flight reads there (psutil's available memory), and the grid's models are tiny:
``benchmarks/grids/learning_sequence_cpu.jsonl`` checks the machinery end to end.

Each attempt is one JSON line in ``--out``; lines already there are skipped on a rerun
(with the same ``--work``, whose record then still holds the probes before them).

``report``: for each ``learn`` line whose record held at least K (2) probes of its mode, the
learned and today's footprint estimate against what it measured, the conservative figure
over the footprint and the measured time over the predicted one, against issue 29's
targets; then the ``go`` runs: how many passed and how many died.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from replay_learning import TARGETS, K, errors, ratios, time_figures
from results_io import append_record, canonical, read_grid, read_jsonl, read_records
from survival import TOLERANCE_GB, Holder, run_plugin, write_preset

LEARNED = ("estimated_base_gb", "estimated_conservative_gb", "mlx_peak_gb")


def default_backend() -> str:
    return "cuda" if shutil.which("nvidia-smi") else "cpu"


def plugin(presets_file: Path, name: str, mode: str, work: Path, *extra: str) -> dict[str, Any]:
    """survival.run_plugin, with the scratch directory's path in its output named WORK (no
    path of the machine that ran it goes into a results file)."""
    outcome = run_plugin(presets_file, name, mode, work, *extra)
    outcome["output_tail"] = str(outcome["output_tail"]).replace(str(work), "WORK")
    return outcome


def learn(entry: dict[str, Any], holder: Holder | None, work: Path) -> dict[str, Any]:
    """The plugin on the preset with nothing held: the estimate before, what it measured."""
    presets_file, name = write_preset(entry, work)
    if holder is not None:
        holder.release()
    outcome = plugin(presets_file, name, str(entry["in_flight"]), work)
    return {"name": name, "grid": entry, "level": "learn", **outcome}


def go(entry: dict[str, Any], holder: Holder, work: Path) -> dict[str, Any]:
    """The plugin on the preset with exactly its (learned) go threshold left free."""
    presets_file, name = write_preset(entry, work)
    mode = str(entry["in_flight"])
    holder.release()
    check = plugin(presets_file, name, mode, work, "--yourai-estimate-only")["preflight"]
    record: dict[str, Any] = {"name": name, "grid": entry, "level": "go"}
    if not check or check.get("estimated_conservative_gb") is None:
        return {**record, "error": "no estimate-only pre-flight", "survived": False}
    threshold = float(check["estimated_conservative_gb"]) + float(check["safety_gb"])
    target, tries = threshold + 0.5 * TOLERANCE_GB, 0
    while True:
        tries += 1
        free_before = holder.leave_free(target)
        outcome = plugin(presets_file, name, mode, work)
        seen = (outcome["preflight"] or {}).get("available_gb")
        # On CPU the pytest process itself takes RAM before its pre-flight reads what is
        # available: leave that much more, until the pre-flight sees its go threshold.
        if holder.backend != "cpu" or seen is None or seen >= threshold or tries == 3:
            break
        target += threshold - float(seen) + TOLERANCE_GB
    holder.release()
    row = outcome["row"] or {}
    return {
        **record,
        "go_threshold_gb": round(threshold, 3),
        "threshold_learned_from": check.get("learned_from"),
        "threshold_applied": (check.get("learned_correction") or {}).get("applied", False),
        "free_before_gb": round(free_before, 3),
        "preflight_available_gb": seen,
        "tries": tries,
        **outcome,
        "verdict": row.get("verdict"),
        "survived": row.get("verdict") == "Pass",
    }


def run(args: argparse.Namespace) -> int:
    entries = read_grid(args.grid)
    earlier = read_jsonl(args.out) if args.out.exists() else []
    done = {canonical([r["grid"], r["level"]]) for r in earlier}
    levels = [level.strip() for level in args.levels.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="yourai-sequence-"))
    work.mkdir(parents=True, exist_ok=True)
    holder = Holder(args.backend) if "go" in levels else None
    started = time.monotonic()
    try:
        for entry in entries:
            for level in levels:
                if canonical([entry, level]) in done:
                    continue
                if args.stop_after and time.monotonic() - started > args.stop_after:
                    print(f"stopped after {args.stop_after:g} s: rerun to go on", flush=True)
                    return 0
                if level == "learn":
                    record = learn(entry, holder, work)
                else:
                    assert holder is not None
                    record = go(entry, holder, work)
                append_record(args.out, record)
                print(summary_line(record), flush=True)
    finally:
        if holder is not None:
            holder.close()
    return 0


def summary_line(record: dict[str, Any]) -> str:
    row = record.get("row") or {}
    check = record.get("preflight") or {}
    learned = check.get("learned_correction") or {}
    text = (
        f"{record['name']} {record['level']}: {row.get('verdict')} footprint "
        f"{row.get('footprint_peak_gb')} GB, MLX peak {row.get('train_peak_memory_gb')} GB, "
        f"{row.get('elapsed_s')} s | before it: today {check.get('estimated_base_gb')}-"
        f"{check.get('estimated_conservative_gb')} GB, learned "
        f"{learned.get('estimated_base_gb')}-{learned.get('estimated_conservative_gb')} GB "
        f"from {check.get('learned_from')}, predicted {check.get('predicted_seconds')} s"
    )
    if record["level"] == "go":
        text += f" | free {record.get('free_before_gb')} GB (go {record.get('go_threshold_gb')})"
    return text


# -- report -------------------------------------------------------------------------------


def scored(records: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """The learn lines after the first ``k`` probes of their mode: today's and the learned
    estimate made before each, what it measured, the time predicted and taken."""
    out = []
    for record in records:
        check, row = record.get("preflight") or {}, record.get("row") or {}
        learned = check.get("learned_correction") or {}
        footprint = row.get("footprint_peak_gb")
        if record["level"] != "learn" or int(check.get("learned_from") or 0) < k:
            continue
        if not isinstance(footprint, int | float) or row.get("verdict") != "Pass":
            continue
        # Today's figures are the event's unless the learned ones were applied (a run probed
        # here before): then only the learned ones are known, and today's is left out.
        today = None if learned.get("applied") else [check[f] for f in LEARNED]
        out.append(
            {
                "name": record["name"],
                "footprint": float(footprint),
                "peak": float(row["train_peak_memory_gb"]),
                "learned": [float(learned[f]) for f in LEARNED],
                "today": today,
                "took_s": float(row["elapsed_s"]),
                "predicted_s": check.get("predicted_seconds"),
            }
        )
    return out


def figures(pairs: list[tuple[list[float], float]]) -> dict[str, Any]:
    """The typical figure's error and the conservative one over the measured, as the replay
    scores them (benchmarks/replay_learning.py)."""
    if not pairs:
        return {}
    return {
        "lines": len(pairs),
        **errors([(est[0], m) for est, m in pairs]),
        **ratios([(est[1], m) for est, m in pairs]),
    }


def verdicts(fig: dict[str, Any]) -> str:
    if not fig:
        return "nothing scored"
    met = {
        "median": fig["median_abs_error_pct"] <= TARGETS["footprint_median_pct"],
        "max": fig["max_abs_error_pct"] <= TARGETS["footprint_max_pct"],
        "never under": fig["conservative_under"] == 0,
        "conservative at most 1.25x": fig["conservative_most"] <= TARGETS["conservative_most"],
    }
    return ", ".join(f"{name} {'met' if ok else 'NOT met'}" for name, ok in met.items())


def report(paths: list[Path], k: int = K) -> int:
    records = list(read_records(paths))
    rows = scored(records, k)
    print(f"{'run':<40} {'footprint':>9} {'learned':>15} {'today':>15} {'took/pred s':>14}")
    for r in rows:
        today = "-" if r["today"] is None else f"{r['today'][0]:.2f}-{r['today'][1]:.2f}"
        pred = r["predicted_s"]
        print(
            f"{r['name'][:40]:<40} {r['footprint']:>9.2f} "
            f"{r['learned'][0]:>7.2f}-{r['learned'][1]:<7.2f} {today:>15} "
            f"{r['took_s']:>6.1f}/{pred if pred is not None else '-':>6}"
        )
    learned = figures([(r["learned"], r["footprint"]) for r in rows])
    today = figures([(r["today"], r["footprint"]) for r in rows if r["today"] is not None])
    timed = time_figures([(r["took_s"], r["predicted_s"]) for r in rows])
    print(f"\nafter the first {k} probes, {len(rows)} runs (footprint):")
    print(f"  learning: {learned} -> {verdicts(learned)}")
    print(f"  today:    {today} -> {verdicts(today)}")
    if timed:
        print(
            f"  time within {TARGETS['time_factor']}x: {timed['time_within']}/{timed['time_lines']}"
        )
    gos = [r for r in records if r["level"] == "go"]
    verdicts_of = [(r["name"], (r.get("row") or {}).get("verdict")) for r in gos]
    passed = sum(v == "Pass" for _, v in verdicts_of)
    not_run = [n for n, v in verdicts_of if v in (None, "Skipped")]
    died = [n for n, v in verdicts_of if v not in (None, "Skipped", "Pass")]
    print(
        f"go runs at the learned threshold: {len(gos)}, passed {passed}, died {died}, "
        f"not run (the pre-flight skipped it, or no result) {not_run}"
    )
    # The learned conservative figure the go run was let through on, over what it then held.
    held = [
        (float(r["preflight"]["estimated_conservative_gb"]), float(r["row"]["footprint_peak_gb"]))
        for r in gos
        if (r.get("row") or {}).get("footprint_peak_gb") and r.get("preflight")
    ]
    if held:
        over = ratios(held)
        print(
            f"  their learned conservative figure over the footprint they held: "
            f"{over['conservative_least']:.2f}-{over['conservative_most']:.2f}, "
            f"under {over['conservative_under']}"
        )
    return 0


def main() -> int:
    if sys.argv[1:2] == ["report"]:
        parser = argparse.ArgumentParser(prog="learning_sequence.py report")
        parser.add_argument("results", type=Path, nargs="+")
        parser.add_argument("--k", type=int, default=K)
        args = parser.parse_args(sys.argv[2:])
        return report(args.results, args.k)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--work", type=Path, help="scratch directory, kept: its pytest cache is the record"
    )
    parser.add_argument("--levels", default="learn,go", help="comma-separated: learn, go")
    parser.add_argument("--backend", choices=("cuda", "cpu"), default=default_backend())
    parser.add_argument(
        "--stop-after",
        type=float,
        help="start no attempt after this many seconds (a lent machine's call limit); "
        "a rerun with the same --out and --work goes on where it stopped",
    )
    args = parser.parse_args()
    unknown = {level.strip() for level in args.levels.split(",")} - {"learn", "go"}
    if unknown:
        parser.error(f"--levels: unknown {', '.join(sorted(unknown))} (learn, go)")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
