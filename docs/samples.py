"""The sample outputs that the docs show, made by running the commands they show.

Each sample in a page sits between `<!-- sample: NAME -->` and `<!-- end -->`: a code block that opens with
`$ mlmtune ...` and holds what that command printed. This script runs each command (in this process, offline)
and writes its output into the page; `tests/test_docs.py` checks that the pages hold what it makes.

    python docs/samples.py            # print the samples that differ from the pages
    python docs/samples.py --write    # rewrite them

The samples read builtin:python-docs, the Python Language Reference of the running CPython: another Python
version has other paragraphs, and other block counts. They were made with the Python that
tests/assets/tokenizers/MANIFEST.json names.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import sys
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parent

# page -> sample name -> the command's arguments (after `mlmtune`)
SAMPLES: dict[str, dict[str, list[str]]] = {
    "training.md": {"check": ["check", "--model", "builtin:all-minilm-l6-v2", "--dataset", "builtin:python-docs",
                              "--batch-size", "16", "--epochs", "3", "--no-probe"]},
    "masking.md": {"show-masks": ["check", "--model", "builtin:all-minilm-l6-v2", "--dataset", "builtin:python-docs",
                                  "--masking", "span", "--block-size", "40", "--show-masks", "2"]},
}


def run(args: list[str]) -> str:
    """`$ mlmtune ARGS` and what it printed on stdout, as a code block's text."""
    from mlmtune.cli import main

    out = io.StringIO()
    with tempfile.TemporaryDirectory() as cache, contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(io.StringIO()):
        os.environ["MLMTUNE_CACHE"] = cache  # nothing read from, or left in, the user's block cache
        code = main(args)
    if code != 0:
        sys.exit(f"mlmtune {shlex.join(args)} exited {code}")
    return f"$ mlmtune {shlex.join(args)}\n{out.getvalue().rstrip()}"


def block(name: str, text: str) -> str:
    return f"<!-- sample: {name} -->\n```\n{text}\n```\n<!-- end -->"


def stale(write: bool = False) -> list[str]:
    """The samples whose page text differs from what their command prints (rewritten with `write`)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = []
    for page, samples in SAMPLES.items():
        path = DOCS / page
        text = path.read_text()
        for name, args in samples.items():
            made = block(name, run(args))
            pattern = rf"<!-- sample: {re.escape(name)} -->\n.*?<!-- end -->"
            found = re.search(pattern, text, flags=re.S)
            if found is None or found.group(0) != made:
                out.append(f"{page}: {name}")
                if write:
                    if found is None:
                        sys.exit(f"{page} has no place for the sample {name}")
                    text = text[: found.start()] + made + text[found.end():]
        if write:
            path.write_text(text)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--write", action="store_true", help="rewrite the samples in the pages")
    names = stale(parser.parse_args().write)
    print("\n".join(names) if names else "every sample is what its command prints")
