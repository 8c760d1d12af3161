"""The default test suite's wall time: `python -m pytest` as the README runs it, and its slowest tests.

    python benchmarks/test_suite.py [--durations 10]
    python benchmarks/test_suite.py --slow      # `python -m pytest -m slow`, CI's second stage: test_suite_slow.json

Writes benchmarks/results/MACHINE/test_suite.json: the tests pytest counted (passed, failed, skipped), its own
wall time, the slowest tests, pyproject's pytest options (the pytest-xdist workers among them), and the load
average before and after. A 1-minute load above half the cores before the run means other work was running, and the
time is then longer than on a quiet machine: the JSON says so (`contended`).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from _common import write_json

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--durations", type=int, default=10)
    parser.add_argument("--slow", action="store_true", help="the slow tests (-m slow) instead of the default suite")
    args = parser.parse_args()
    marker = ["-m", "slow"] if args.slow else []
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *marker,
                        f"--durations={args.durations}"], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()
    out = p.stdout
    summary = out.strip().splitlines()[-1]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)", summary)}
    seconds = float(re.search(r" in ([\d.]+)s", summary).group(1))
    slowest = [{"seconds": float(s), "phase": ph, "test": t}
               for s, ph, t in re.findall(r"^([\d.]+)s (call|setup|teardown)\s+(\S+)$", out, flags=re.M)]
    cores = os.cpu_count() or 1
    addopts = re.search(r'^addopts = "(.*)"$', (ROOT / "pyproject.toml").read_text(), flags=re.M).group(1)
    payload = {"command": " ".join(["python -m pytest", *marker]), "pyproject_addopts": addopts,
               "exit_code": p.returncode, "counts": counts,
               "pytest_seconds": seconds, "wall_seconds": round(wall, 1), "slowest": slowest,
               "load_average_before": [round(x, 2) for x in load_before],
               "load_average_after": [round(x, 2) for x in load_after],
               "contended": load_before[0] > cores / 2,
               "note": "pytest's own count and time; 'contended': the 1-minute load before the run exceeded half the "
                       "cores, so other work was running as it began (the suite itself keeps every core busy, so "
                       "the load after it says nothing of other work)"}
    path = write_json("test_suite_slow" if args.slow else "test_suite", payload)
    print(f"{summary}\n{path}")


if __name__ == "__main__":
    main()
