"""The README and docs/ tell the truth about the project: the commands CI runs, links that resolve, and a CLI
reference that lists every flag of every subcommand."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    return re.findall(r"^(python3 -m venv .*)$", readme, flags=re.M)


def test_ci_runs_the_readme_test_command_then_the_slow_tests_then_the_avx2_kernels():
    quickstart, tests = _commands()[:2]
    assert quickstart.endswith("mlmtune quickstart")
    assert tests.endswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci
    assert ci.index("python -m pytest -m slow") > ci.index(tests)  # what stays long runs in CI too
    assert "pip install torch==2.13.0" in tests  # the CPU build, never the CUDA one from the registry
    # the numerically sensitive tests again, on the kernels an AVX2-only CPU runs (tests/test_kernels.py checks them)
    avx2 = "ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python -m pytest -m numerics"
    assert ci.index(avx2) > ci.index("python -m pytest -m slow")
    # and the first thing it prints is the machine: a failure names its CPU and vector extensions
    first = next(i for i, line in enumerate(ci) if line and not line.startswith(("#", "set ", "cd ")))
    assert ci[first].startswith('echo "CPU: ') and "/proc/cpuinfo" in ci[first] and "avx512f" in ci[first + 1]


def test_the_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_every_relative_link_resolves():
    checked = 0
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code is not links
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.is_file(), f"{page.name}: {target} does not exist"
            if anchor:
                headings = re.findall(r"^#+ (.+)$", file.read_text(), flags=re.M)
                assert anchor in {_slug(h) for h in headings}, f"{page.name}: no heading #{anchor} in {file.name}"
            checked += 1
    assert checked > 20  # the README links every page, and the pages each other


def test_the_cli_reference_is_generated_from_the_parsers():
    from mlmtune.cli import build_parser, reference_markdown

    page = (ROOT / "docs" / "cli.md").read_text()
    assert page == reference_markdown(), "docs/cli.md is stale: python -m mlmtune.cli --reference > docs/cli.md"
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        section = page.split(f"## mlmtune {name}\n", 1)[1].split("\n## ", 1)[0]
        flags = [o for a in command._actions for o in a.option_strings if o.startswith("--")]
        assert flags and all(f in section for f in flags), name


def test_every_published_figure_names_its_machine():
    import json

    results = sorted((ROOT / "benchmarks" / "results").glob("*/*.json"))
    assert results
    for path in results:
        machine = json.loads(path.read_text())["machine"]
        assert {"cpu", "cores", "cpu_class", "cpu_flags", "gpu", "date"} <= machine.keys(), path


def test_the_benchmark_tables_are_the_measured_ones():
    """docs/benchmarks.md's tables are made from benchmarks/results/MACHINE/*.json (python benchmarks/tables.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tables", ROOT / "benchmarks" / "tables.py")
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    assert tables.stale() == [], "run python benchmarks/tables.py --write"


def test_no_flag_names_two_defaults():
    """A command's own default (quickstart's `--head-learning-rate 3e-3`) replaces the one the field's doc names."""
    page = (ROOT / "docs" / "cli.md").read_text()
    flags = re.split(r"\n  (?=-)", page)  # one chunk per flag of every command
    assert len(flags) > 200
    twice = [chunk.split()[0] for chunk in flags if " ".join(chunk.split()).count("(default:") > 1]
    assert twice == []


def test_the_sample_outputs_are_what_their_commands_print():
    """Every `<!-- sample: NAME -->` block of the docs is its command's output, made again by docs/samples.py. They
    read builtin:python-docs, which differs between Python versions: elsewhere the samples are not compared."""
    import importlib.util
    import json

    from mlmtune.data.corpora import python_docs_texts

    manifest = json.loads((ROOT / "tests" / "assets" / "tokenizers" / "MANIFEST.json").read_text())
    spec = importlib.util.spec_from_file_location("make_tokenizers", ROOT / "tests" / "assets" / "make_tokenizers.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    if make.texts_digest(python_docs_texts()) != manifest["texts_sha256"]:
        pytest.skip(f"the samples were made from Python {manifest['python']}'s docs")
    spec = importlib.util.spec_from_file_location("samples", ROOT / "docs" / "samples.py")
    samples = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(samples)
    found = {f"{p.name}: {n}" for p in PAGES for n in re.findall(r"<!-- sample: (\S+) -->", p.read_text())}
    assert found == {f"{page}: {name}" for page, names in samples.SAMPLES.items() for name in names}
    assert samples.stale() == [], "run python docs/samples.py --write"
