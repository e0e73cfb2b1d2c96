"""Compare two results files of the plugin (``--yourai-json``): what each preset needed then
and now.

    python -m pytest_yourai.compare OLD.json NEW.json [--fail-on-growth 5]

Presets are matched by their name and run (config, in-flight mode); the footprint and MLX's
peak are printed side by side with the growth. Exit status 1 when a preset's MLX peak grew by
more than ``--fail-on-growth`` percent (the rule of ``--yourai-baseline-compare``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pytest_yourai.baseline import KEY_FIELDS, growth_failure, run_key


def _rows(path: Path) -> dict[str, dict[str, Any]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    return {
        run_key(str(r.get("preset")), *(r.get(k) for k in KEY_FIELDS)): r
        for r in data.get("results", [])
    }


def _gb(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) else "-"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_yourai.compare", description=__doc__)
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--fail-on-growth", type=float, default=5.0, help="percent (default 5)")
    args = parser.parse_args(argv)
    try:
        old, new = _rows(args.old), _rows(args.new)
    except (OSError, json.JSONDecodeError) as exc:
        parser.exit(4, f"{parser.prog}: error: {exc}\n")
    failures = 0
    print(f"{'preset / run':<60} {'footprint old':>13} {'new':>8} {'mlx peak old':>12} {'new':>8}")
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, {}), new.get(key, {})
        print(
            f"{key:<60} {_gb(a.get('footprint_peak_gb')):>13} {_gb(b.get('footprint_peak_gb')):>8}"
            f" {_gb(a.get('peak_memory_gb')):>12} {_gb(b.get('peak_memory_gb')):>8}"
        )
        before, after = a.get("peak_memory_gb"), b.get("peak_memory_gb")
        if isinstance(before, int | float) and isinstance(after, int | float):
            failure = growth_failure(key, before, after, args.fail_on_growth / 100)
            if failure:
                failures += 1
                print(f"  {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
