"""Which model types of the installed mlx-lm the estimator estimates, refuses, or cannot build.

    python benchmarks/model_coverage.py            # print the table
    python benchmarks/model_coverage.py --write    # and put it in docs/estimator.md
    python benchmarks/model_coverage.py --check    # exit 1 when docs/estimator.md is stale
    python benchmarks/model_coverage.py --real benchmarks/configs/*.json
    python benchmarks/model_coverage.py extract PATH/TO/mlx-lm/tests/test_models.py
    python benchmarks/model_coverage.py ship [--check]   # the built-in presets' censuses

For every model module of the installed mlx-lm, a small config from mlx-lm's own tests
(``configs/mlx_lm_test_configs.json``, extracted from its ``tests/test_models.py``) is built
lazily by the probe (``--census-batch``: nothing is allocated), quantized as the probe does
(4-bit, group 64, bfloat16), and estimated:

- **estimated**: the estimate runs; its weights term is the census's (the model's own bytes),
  and for the types the formula knows (FORMULA_MODEL_TYPES) the formula is checked against
  it (within 2%);
- **refused**: the estimator says why (a mixer it has no terms for, a missing field);
- **not buildable**: mlx-lm cannot build the test config here, or no small config exists.

``--real`` does the same for real-size config files.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TEST_CONFIGS = HERE / "configs" / "mlx_lm_test_configs.json"
DOC = ROOT / "docs" / "estimator.md"
START, END = "<!-- coverage:start -->", "<!-- coverage:end -->"
# Modules of mlx_lm.models that are building blocks, not models.
HELPERS = frozenset(
    {
        "activations",
        "base",
        "bitlinear_layers",
        "cache",
        "gated_delta",
        "mla",
        "pipeline",
        "rope_utils",
        "ssm",
        "switch_layers",
    }
)

sys.path.insert(0, str(ROOT))

from pytest_yourai.census import Census, EstimateRefused  # noqa: E402
from pytest_yourai.estimator import (  # noqa: E402
    FORMULA_MODEL_TYPES,
    TrainingShape,
    estimate_training_memory,
    weight_bytes,
)


def model_types() -> list[str]:
    """Every model module of the installed mlx-lm (found without importing mlx)."""
    spec = importlib.util.find_spec("mlx_lm")
    assert spec is not None and spec.origin is not None
    models = Path(spec.origin).parent / "models"
    return sorted(
        p.stem for p in models.glob("*.py") if not p.stem.startswith("_") and p.stem not in HELPERS
    )


def censuses(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One census result per config, from one child Python (the probe)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump([{"config": c, "preset": "coverage"} for c in configs], handle)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest_yourai.probe", "--census-batch", handle.name],
        capture_output=True,
        text=True,
        check=False,
    )
    Path(handle.name).unlink()
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCHMARK_RESULT:")]
    if len(lines) != len(configs):
        raise SystemExit(f"census batch failed: {proc.stderr[-2000:]}")
    return [json.loads(line.split(":", 1)[1]) for line in lines]


def judge(config: dict[str, Any], result: dict[str, Any]) -> tuple[str, str]:
    """(status, detail) of one model type."""
    if result.get("status") != "ok":
        return "not buildable", str(result.get("error", ""))[:120]
    census = Census.from_json(result["census"])
    shape = TrainingShape(bits=4, group_size=64, dtype="bfloat16", lora_layers=2, seq_len=64)
    try:
        estimate_training_memory(config, shape, census)
    except EstimateRefused as exc:
        return "refused", str(exc)
    except (KeyError, TypeError, ValueError) as exc:
        return "refused", f"model type {config['model_type']}: config field {exc} missing"
    kinds = {b.mlp for b in census.blocks}
    detail = ", ".join(sorted(kinds))
    if config.get("model_type") in FORMULA_MODEL_TYPES:
        formula = weight_bytes(config, 4, 64, "bfloat16")
        off = (formula - census.weights_bytes) / census.weights_bytes * 100
        detail += f"; formula {off:+.1f}% of the model's bytes"
        if abs(off) > 2:
            return "wrong", detail
    return "estimated", detail


def coverage() -> list[tuple[str, str, str]]:
    configs = json.loads(TEST_CONFIGS.read_text())["configs"]
    types = model_types()
    found = [t for t in types if t in configs]
    results = dict(zip(found, censuses([configs[t] for t in found]), strict=True))
    rows = []
    for name in types:
        if name not in configs:
            rows.append((name, "not buildable", "no small config in mlx-lm's tests"))
        else:
            rows.append((name, *judge(configs[name], results[name])))
    return rows


def table(rows: list[tuple[str, str, str]]) -> str:
    counts = {s: sum(1 for _, status, _ in rows if status == s) for s in {r[1] for r in rows}}
    lines = [
        f"{len(rows)} model types: " + ", ".join(f"{counts[s]} {s}" for s in sorted(counts)),
        "",
        "| model type | status | detail |",
        "|---|---|---|",
    ]
    lines += [
        f"| `{name}` | {status} | {detail.replace('|', '/')} |" for name, status, detail in rows
    ]
    return "\n".join(lines)


def real(paths: list[Path]) -> int:
    paths = [p for p in paths if "model_type" in json.loads(p.read_text())]
    configs = [json.loads(p.read_text()) for p in paths]
    for path, config, result in zip(paths, configs, censuses(configs), strict=True):
        status, detail = judge(config, result)
        weights = result.get("census", {}).get("weights_bytes")
        shown = f"{weights / 1e9:.2f} GB" if weights else "-"
        print(f"{path.stem:<22} {config.get('model_type'):<14} {status:<12} {shown:>9}  {detail}")
    return 0


def ship(check: bool) -> int:
    """The censuses the built-in presets ship (pytest_yourai/presets_census.json), so that
    estimating them takes no child process; with ``check``, exit 1 when they are stale."""
    from pytest_yourai.autoconfig import BenchmarkConfig
    from pytest_yourai.census import SHIPPED_FILE, census_key, census_to_json, take_census
    from pytest_yourai.preflight import needs_census, training_shape
    from pytest_yourai.presets import builtin_presets

    shipped: dict[str, Any] = {}
    for preset in builtin_presets().values():
        if not needs_census(preset.architecture):
            continue
        shape = training_shape(preset, BenchmarkConfig(1, 1, 1), "cpu")
        arch = preset.architecture
        census = take_census(arch, shape.bits, shape.group_size, shape.dtype)
        key = census_key(arch, shape.bits, shape.group_size, shape.dtype)
        shipped[key] = census_to_json(census)
    text = json.dumps(shipped, indent=1, sort_keys=True) + "\n"
    if check:
        stale = not SHIPPED_FILE.exists() or SHIPPED_FILE.read_text() != text
        print("the shipped censuses are " + ("stale: run ship" if stale else "up to date"))
        return 1 if stale else 0
    SHIPPED_FILE.write_text(text)
    print(f"{len(shipped)} censuses written to {SHIPPED_FILE}")
    return 0


def extract(test_file: Path) -> int:
    """Small configs from mlx-lm's tests: test_all_models' list and each test's ModelArgs."""
    allowed = (
        ast.List,
        ast.Dict,
        ast.Constant,
        ast.BinOp,
        ast.UnaryOp,
        ast.Tuple,
        ast.operator,
        ast.unaryop,
        ast.Load,
    )

    def literal(node: ast.AST) -> Any:
        if not all(isinstance(n, allowed) for n in ast.walk(node)):
            raise ValueError("not a literal")
        code = compile(ast.Expression(node), str(test_file), "eval")  # type: ignore[arg-type]
        return eval(code, {"__builtins__": {}}, {})  # literals and arithmetic only

    found: dict[str, dict[str, Any]] = {}
    tree = ast.parse(test_file.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "test_configs":
            for config in literal(node.value):
                found.setdefault(config["model_type"], config)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "ModelArgs"
            and isinstance(node.func.value, ast.Name)
            and not node.args
        ):
            try:
                config = {k.arg: literal(k.value) for k in node.keywords if k.arg}
            except ValueError:
                continue
            config.setdefault("model_type", node.func.value.id)
            found.setdefault(config["model_type"], config)
    document = {
        "_source": "Small configs of mlx-lm's own tests (ml-explore/mlx-lm tests/test_models.py: "
        "test_all_models and each test's ModelArgs), extracted by benchmarks/model_coverage.py "
        "extract; MIT licensed.",
        "configs": dict(sorted(found.items())),
    }
    TEST_CONFIGS.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    print(f"{len(found)} configs written to {TEST_CONFIGS}")
    return 0


def main() -> int:
    if sys.argv[1:2] == ["extract"]:
        return extract(Path(sys.argv[2]))
    if sys.argv[1:2] == ["ship"]:
        return ship(check="--check" in sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="update docs/estimator.md")
    parser.add_argument("--check", action="store_true", help="exit 1 if the docs are stale")
    parser.add_argument("--real", type=Path, nargs="*", help="real-size config files instead")
    args = parser.parse_args()
    if args.real:
        return real(args.real)
    text = table(coverage())
    doc = DOC.read_text()
    before, rest = doc.split(START, 1)
    _, after = rest.split(END, 1)
    updated = f"{before}{START}\n{text}\n{END}{after}"
    if args.check:
        if updated != doc:
            print("docs/estimator.md's coverage table is stale: run --write")
            return 1
        print("docs/estimator.md's coverage table is up to date")
        return 0
    if args.write:
        DOC.write_text(updated)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
