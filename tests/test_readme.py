"""The README's commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    return re.findall(r"^(python3 -m venv .*)$", readme, flags=re.M)


def test_ci_runs_the_readme_test_command():
    quickstart, tests = _commands()[:2]
    assert quickstart.endswith("mlmtune quickstart")
    assert tests.endswith("python -m pytest")
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()
    assert "pip install torch==2.13.0" in tests  # the CPU build, never the CUDA one from the registry
