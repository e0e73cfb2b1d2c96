"""The GitHub Actions workflow: valid against GitHub's schema, and it runs what the docs say.

actionlint cannot be installed here (its package downloads a binary at build time), so the
workflow is validated with check-jsonschema's bundled GitHub workflow schema."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "benchmarks.yml"


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.github-workflows",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )


def test_workflow_validates() -> None:
    proc = validate(WORKFLOW)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_check_catches_a_broken_workflow(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text(WORKFLOW.read_text().replace("runs-on: macos-14", "runs_on: macos-14"))
    assert validate(broken).returncode != 0


def test_jobs_do_what_the_docs_promise() -> None:
    yaml = pytest.importorskip("yaml")
    workflow = yaml.safe_load(WORKFLOW.read_text())
    mac, linux = workflow["jobs"]["apple-silicon"], workflow["jobs"]["linux-cpu"]
    assert mac["runs-on"].startswith("macos-1") and int(mac["runs-on"].split("-")[1]) >= 14
    steps = " ".join(str(step.get("run", "")) + str(step.get("uses", "")) for step in mac["steps"])
    assert 'pip install -e ".[test]"' in steps
    assert 'pytest benchmarks/ -k "tiny or 7b"' in steps
    assert "--junitxml=" in steps and "--yourai-json=" in steps
    assert "actions/upload-artifact" in steps and "pytest_yourai.log" in steps
    assert any("bash .ci/run" in str(step.get("run", "")) for step in linux["steps"])
