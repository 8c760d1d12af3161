"""The quickstart's recipe, measured: each variant's held-out perplexity and Python-keyword cloze after a timed run.

Every row is `mlmtune quickstart` with the variant's flags, run for several seeds (a short run's noise is
large): the seed changes the split, the new head and the masks. The cloze is the quickstart's own measure
(`mlmtune.evaluation.cloze`, Python keywords and built-ins on the held-out split).

`--avx2-proxy` runs each quickstart as a 2-core AVX2-only CPU would: fp32, PyTorch's and oneDNN's AVX2 kernels
only, one thread per run (a full step then takes about as long as on the 2-core AVX2 Xeon the budget was
first measured on; the table says how long). `--parallel 2` runs two at once, one per core.

    python benchmarks/quickstart_recipe.py --avx2-proxy --parallel 2 --seeds 1 2 3 --variants default mask40
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_json  # noqa: E402

# name -> flags over the quickstart's defaults
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "mask40": ["--mlm-probability", "0.4"],
    "freeze2": ["--freeze-layers", "2"],
    "lr3e-4": ["--learning-rate", "3e-4"],
    "no-head-phase": ["--head-warmup-steps", "0"],
    "block64": ["--block-size", "64"],
}
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
            "OMP_NUM_THREADS": "1"}


def run_one(variant: str, seed: int, budget: str, proxy: bool, core: int | None, work: Path) -> dict:
    out = work / f"{variant}-s{seed}"
    cmd = [sys.executable, "-m", "mlmtune.cli", "quickstart", "--output-dir", str(out), "--seed", str(seed),
           "--time-budget", budget, "--general-eval", "none", *VARIANTS[variant]]
    env = dict(os.environ)
    if proxy:
        env.update(AVX2_ENV)
        cmd += ["--precision", "fp32"]
        if core is not None:
            cmd = ["taskset", "-c", str(core), *cmd]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{variant} seed {seed} failed:\n{done.stderr[-2000:]}")
    m = json.loads((out / "metrics.json").read_text())
    return {"variant": variant, "seed": seed, "perplexity_after": m["perplexity_after"],
            "cloze_top1": m.get("cloze_top1_after"), "cloze_top3": m.get("cloze_top3_after"),
            "cloze_cases": m.get("cloze_cases"), "steps": m["train_steps"], "head_steps": m["head_warmup_steps"],
            "train_seconds": m["train_seconds"], "full_step_seconds": m.get("full_step_seconds")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--time-budget", default="3m")
    p.add_argument("--avx2-proxy", action="store_true")
    p.add_argument("--parallel", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    jobs = [(v, s) for v in args.variants for s in args.seeds]
    cores: queue.Queue = queue.Queue()  # each run holds a core of its own while it lasts
    for core in range(args.parallel):
        cores.put(core)

    def on_a_core(variant: str, seed: int, work: Path) -> dict:
        core = cores.get()
        try:
            return run_one(variant, seed, args.time_budget, args.avx2_proxy, core if args.parallel > 1 else None,
                           work)
        finally:
            cores.put(core)

    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.parallel) as pool:
        runs = list(pool.map(lambda job: on_a_core(*job, Path(tmp)), jobs))
    rows = [summary(v, [r for r in runs if r["variant"] == v]) for v in args.variants]
    print(table(rows, [("variant", "variant", ""), ("flags", "flags", ""), ("steps", "steps", ".0f"),
                       ("perplexity", "perplexity", ".1f"), ("top1", "cloze top-1", ".1%"),
                       ("top3", "cloze top-3", ".1%"), ("per_seed", "top-3 per seed", "")]))
    payload = {"avx2_proxy": AVX2_ENV if args.avx2_proxy else None, "time_budget": args.time_budget,
               "seeds": args.seeds, "rows": rows, "runs": runs}
    print(write_json(args.out or "quickstart_recipe", payload))


def summary(variant: str, mine: list[dict]) -> dict:
    """A variant's means over its seeds."""
    def mean(key: str) -> float:
        return statistics.fmean(r[key] for r in mine)

    return {"variant": variant, "flags": " ".join(VARIANTS[variant]) or "(the quickstart's defaults)",
            "steps": mean("steps"), "perplexity": mean("perplexity_after"), "top1": mean("cloze_top1"),
            "top3": mean("cloze_top3"), "per_seed": " / ".join(f"{r['cloze_top3']:.0%}" for r in mine)}

if __name__ == "__main__":
    main()
