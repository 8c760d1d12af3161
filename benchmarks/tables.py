"""The tables of docs/benchmarks.md, made from benchmarks/results/MACHINE/*.json: one row per variant and machine.

    python benchmarks/tables.py            # print every table
    python benchmarks/tables.py --write    # put them into their pages, between their markers
    python benchmarks/tables.py --check    # exit 1 when a page holds other figures

docs/benchmarks.md (docs/masking.md and docs/fill.md for theirs, and the README for its few figures) holds each table
between `<!-- table: NAME -->` and `<!-- end -->`; the test suite checks that they are these, so a
figure in the docs is always one a script measured and wrote.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
README = Path(__file__).resolve().parents[1] / "README.md"


def _runs(name: str) -> list[dict]:
    """Every machine's result of one benchmark, newest machine first."""
    runs = [json.loads(p.read_text()) for p in RESULTS.glob(f"*/{name}.json")]
    return sorted(runs, key=lambda r: r["machine"]["date"], reverse=True)


_SHORT_CLASS = {"AMX (AVX-512 bf16 and AMX tiles)": "AMX", "AVX-512 bf16, no AMX": "AVX-512 bf16",
                "AVX-512 without bf16": "AVX-512", "AVX2 only": "AVX2 only"}


def _machine(m: dict) -> str:
    """A short name for a table row: Intel Xeon (AMX), AMD EPYC (AVX-512 bf16), or the GPU."""
    if m.get("gpu"):
        return m["gpu"]
    cpu = " ".join(w for w in m["cpu"].replace("(R)", "").split() if w not in ("Processor", "CPU"))
    return f"{cpu} ({_SHORT_CLASS.get(m['cpu_class'], m['cpu_class'])})"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def machines() -> str:
    seen = {}
    for path in sorted(RESULTS.glob("*/*.json")):
        m = json.loads(path.read_text())["machine"]
        _, names, dates = seen.setdefault(path.parent.name, (m, [], []))
        names.append(path.stem)
        dates.append(m["date"])

    def span(dates: list[str]) -> str:  # when the folder's figures were measured: the first and the latest
        return min(dates) if min(dates) == max(dates) else f"{min(dates)} to {max(dates)}"

    rows = [[f"`{folder}`", m["gpu"] or m["cpu"], str(m["cores"]), m["cpu_class"], span(dates),
             ", ".join(sorted(names))] for folder, (m, names, dates) in sorted(seen.items())]
    return _table(["folder", "CPU / GPU", "cores", "class", "measured", "benchmarks"], rows)


def train_throughput() -> str:
    rows = []
    for r in _runs("train_throughput"):
        peak = r["matmul_peak_tflops"]
        for v in r["rows"]:
            rows.append([_machine(r["machine"]), v["variant"], f"{v['tokens_per_s']:,.0f}", f"{v['vs_guide']:.2f}",
                         f"{v['vs_trainer_bf16']:.2f}", f"{v['peak_rss_gb']:.2f}",
                         f"{v['mfu_bf16']:.1%} of {peak['bf16']:.2f}"])
    return _table(["machine", "variant", "tokens/s", "x guide", "x Trainer bf16", "peak RSS GB",
                   "MFU (of the bf16 matmul peak, TFLOP/s)"], rows)


def parity() -> str:
    rows = []
    for r in _runs("train_throughput"):
        p = r["parity"]
        same, shipped = p.get("mlmtune_same_recipe_eval_loss"), p.get("mlmtune_as_shipped_eval_loss")
        rows.append([_machine(r["machine"]), str(p["steps"]), f"{p['start_eval_loss']:.4f}",
                     f"{p['guide_fp32_eval_loss']:.4f}",
                     "not run" if same is None else f"{same:.4f} ({p['relative_difference']:+.2%})",
                     "not run" if shipped is None else f"{shipped:.4f} ({p['as_shipped_relative_difference']:+.2%})"])
    return _table(["machine", "steps", "eval loss at start", "the guide (fp32)", "mlmtune, the guide's recipe",
                   "mlmtune as shipped"], rows)


def preprocess() -> str:
    rows = []
    for r in _runs("preprocess"):
        for v in r["rows"]:
            rows.append([_machine(r["machine"]), v["pipeline"], f"{v['tokens']:,}", f"{v['tokenize_s']:.2f}",
                         f"{v['group_s']:.3f}", f"{v['total_s']:.2f}", f"{v['dropped']:,}"])
    return _table(["machine", "pipeline", "tokens", "tokenize s", "group s", "total s", "tokens dropped"], rows)


def fill_throughput() -> str:
    rows = []
    for r in _runs("fill_throughput"):
        for v in r["rows"]:
            rows.append([_machine(r["machine"]), v["method"], f"{v['seconds']:.2f}", f"{v['texts_per_s']:,.0f}",
                         f"{v['vs_pipeline']:.1f}"])
        rows[-1][1] += (f" (top-5 differs in {r['topk_mismatches']} of {r['n']}; scores within "
                        f"{r['max_score_diff']:.1e})")
    return _table(["machine", "method", "seconds", "texts/s", "x pipeline"], rows)


def memory() -> str:
    rows = []
    for r in _runs("memory"):
        for v in r["rows"]:
            rows.append([_machine(r["machine"]), v["run"], f"{v['peak_rss_mb']:,.0f}", f"{v['peak_anon_mb']:,.0f}",
                         f"{v['file_at_peak_mb']:,.0f}", f"{v['seconds']:.0f}"])
    return _table(["machine", "run", "peak RSS MB", "peak anonymous MB", "mapped file MB at peak", "seconds"], rows)


def streaming_memory() -> str:
    rows = []
    for r in _runs("streaming_memory"):
        for v in r["rows"]:
            rows.append([_machine(r["machine"]), f"{v['corpus_mb']} MB", v["path"], f"{v['blocks']:,}",
                         f"{v['peak_rss_mb']:,.0f}", f"{v['peak_anon_mb']:,.0f}", f"{v['seconds']:.0f}"])
    return _table(["machine", "corpus", "path", "blocks", "peak RSS MB", "peak anonymous MB", "seconds"], rows)


def serve_load() -> str:
    rows = []
    for r in _runs("serve_load"):
        for v in r["rows"]:
            rows.append([_machine(r["machine"]), v["server"], f"{v['requests_per_s']:.1f}", f"{v['p50_ms']:.0f}",
                         f"{v['p99_ms']:.0f}", str(v["errors"])])
    return _table(["machine", "server", "req/s", "p50 ms", "p99 ms", "errors"], rows)


def serve_burst() -> str:
    rows = []
    for r in _runs("serve_load"):
        b = r["burst"]
        rows.append([_machine(r["machine"]), f"{b['requests']} at once, --max-queue {b['max_queue']}",
                     str(b["statuses"].get("200", 0)), str(b["statuses"].get("503", 0)),
                     "yes" if b["healthy_after"] else "no"])
    return _table(["machine", "burst", "200", "503", "healthy after"], rows)


def serve_abuse() -> str:
    rows = []
    for r in _runs("serve_abuse"):
        for v in r["rows"]:
            heavy = ", ".join(f"{k}: {n}" for k, n in sorted(v["heavy"].items())) or "none"
            rows.append([_machine(r["machine"]), v["code"], v["beside"], f"{v['small_fills']:,}",
                         f"{v['p50_ms']:,.0f}", f"{v['p99_ms']:,.0f}", str(v["small_errors"]), heavy])
    return _table(["machine", "code", "small fills beside", "small fills", "p50 ms", "p99 ms", "errors",
                   "heavy fills answered"], rows)


def scaling() -> str:
    rows = []
    for r in _runs("scaling"):
        for v in r["rows"]:
            rows.append([_machine(r["machine"]), str(v["processes"]), str(v["threads_each"]), v["precision"],
                         f"{v['tokens_per_s']:,.0f}", f"{v['vs_one']:.2f}"])
    return _table(["machine", "processes", "threads each", "precision", "tokens/s", "x one process"], rows)


def masking() -> str:
    rows = []
    for r in _runs("masking"):
        for v in r["rows"]:
            rows.append([_machine(r["machine"]), v["scheme"], f"{v['ms_per_batch']:.2f}", f"{v['vs_token']:.1f}",
                         f"{v['chosen_share']:.1%}"])
    return _table(["machine", "--masking", "ms per 64 x 128 micro-batch (median, 1 thread)", "x token",
                   "tokens chosen"], rows)


def schemes() -> str:
    rows = []
    for r in _runs("schemes"):
        for v in r["rows"]:
            rows.append([_machine(r["machine"]), v["scheme"], str(r["steps"]),
                         f"{v['perplexity_before']:,.1f} -> {v['perplexity_after']:,.1f}",
                         f"{math.exp(v['token_eval_loss_before']):,.1f} -> {math.exp(v['token_eval_loss_after']):,.1f}",
                         f"{v['train_seconds']:.0f}"])
    return _table(["machine", "--masking", "steps", "perplexity on its own masks", "perplexity on token masks",
                   "training s"], rows)


def modernbert() -> str:
    rows = []
    for r in _runs("modernbert"):
        for v in r["rows"]:
            rows.append([_machine(r["machine"]), v["variant"], f"{v['tokens_per_s']:,.0f}", f"{v['vs_dense']:.2f}",
                         f"{v['peak_rss_gb']:.2f}", f"{v['eval_loss_before']:.4f} -> {v['eval_loss_after']:.4f}"])
    return _table(["machine", "variant", "tokens/s", "x dense", "peak RSS GB", "eval loss"], rows)


def score() -> str:
    rows = []
    for r in _runs("score"):
        for v in r["rows"]:
            rows.append([_machine(r["machine"]), v["method"], f"{v['texts_per_s']:,.1f}", f"{v['tokens_per_s']:,.0f}",
                         f"{v['vs_loop']:.1f}"])
        rows[-1][1] += f" (PLL within {r['max_pll_diff']:.0e} of the loop's, {r['texts']} texts)"
    return _table(["machine", "method", "texts/s", "scored tokens/s", "x loop"], rows)


def readme() -> str:
    """The README's figures: one row per claim, one column per machine that measured it."""
    names = {}
    for bench in ("train_throughput", "fill_throughput", "preprocess"):
        for r in _runs(bench):
            names.setdefault(_machine(r["machine"]), {})[bench] = r
    columns = sorted(names, key=lambda k: max(r["machine"]["date"] for r in names[k].values()), reverse=True)

    def cell(machine: str, bench: str, fmt) -> str:
        r = names[machine].get(bench)
        return fmt(r) if r else "not measured"

    def train(r, baseline: int) -> str:
        ours, base = r["rows"][-1]["tokens_per_s"], r["rows"][baseline]["tokens_per_s"]
        return f"{ours / base:.2f}x ({ours:,.0f} vs {base:,.0f} tokens/s)"

    def fill(r) -> str:
        ours, pipe = r["rows"][-1]["texts_per_s"], r["rows"][0]["texts_per_s"]
        same = r["n"] - r["topk_mismatches"]
        return f"{ours / pipe:.1f}x ({ours:,.0f} vs {pipe:,.0f} texts/s), same top-5 in {same:,} of {r['n']:,}"

    def group(r) -> str:
        return f"{r['rows'][0]['group_s'] / r['rows'][1]['group_s']:.0f}x"

    rows = [["training: mlmtune (bf16, sparse head) against the guide as written (fp32 Trainer)",
             *[cell(m, "train_throughput", lambda r: train(r, 0)) for m in columns]],
            ["training: against the guide's Trainer with `bf16=True`",
             *[cell(m, "train_throughput", lambda r: train(r, 1)) for m in columns]],
            ["fill-mask: `mlmtune fill` against `pipeline(\"fill-mask\")`",
             *[cell(m, "fill_throughput", fill) for m in columns]],
            ["grouping a corpus into blocks, against the guide's `group_texts`",
             *[cell(m, "preprocess", group) for m in columns]]]
    return _table(["measured (2 CPU cores)", *columns], rows)


def serve_runtimes() -> str:
    """`serve` by runtime (benchmarks/serve_runtimes.py), one row per machine, runtime and client count."""
    rows = []
    for r in _runs("serve_runtimes"):
        for row in r["rows"]:
            rows.append([_machine(r["machine"]), row["runtime"], str(row["clients"]), f"{row['requests_per_s']:,.1f}",
                         f"{row['p50_ms']:,.0f}", f"{row['p99_ms']:,.0f}", f"{row['peak_rss_mb']:,.0f}"])
        a = r["agreement"]
        rows.append([_machine(r["machine"]), "top-1 agreement with torch fp32", f"{a['masked_positions']:,} masks",
                     f"onnx fp32 {a['onnx fp32']:.1%}, onnx int8 {a['onnx int8']:.1%}", "", "", ""])
    return _table(["machine", "runtime", "clients", "req/s", "p50 ms", "p99 ms", "peak RSS MB"], rows)


TABLES = {f.__name__: f for f in (machines, train_throughput, parity, modernbert, preprocess, fill_throughput,
                                  memory, streaming_memory, serve_load, serve_burst, scaling)}


PAGES = {DOCS: TABLES, DOCS.parent / "masking.md": {"masking": masking, "schemes": schemes},
         DOCS.parent / "fill.md": {"score": score}, DOCS.parent / "serving.md": {"serve_abuse": serve_abuse,
                                                                                "serve_runtimes": serve_runtimes},
         README: {"readme": readme}}


def stale() -> list[str]:
    """The tables of docs/benchmarks.md and the README that differ from the JSON (or are missing from the page)."""
    out = []
    for path, tables in PAGES.items():
        page = path.read_text()
        for name, make in tables.items():
            m = re.search(rf"<!-- table: {name} -->\n(.*?)\n<!-- end -->", page, flags=re.S)
            if m is None or m.group(1) != make():
                out.append(f"{path.name}: {name}")
    return out


def write() -> None:
    """Replace each table of docs/benchmarks.md and the README, between its markers, with the one the JSON makes."""
    for path, tables in PAGES.items():
        page = path.read_text()
        for name, make in tables.items():
            block = f"<!-- table: {name} -->\n{make()}\n<!-- end -->"
            page, n = re.subn(rf"<!-- table: {name} -->\n.*?<!-- end -->", lambda _, block=block: block, page,
                              flags=re.S)
            if n != 1:
                sys.exit(f"{path.name} has {n} places for the table {name}")
        path.write_text(page)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/benchmarks.md is stale")
    args = parser.parse_args()
    if args.write:
        write()
        return
    if args.check:
        names = stale()
        if names:
            sys.exit(f"docs/benchmarks.md: stale tables: {', '.join(names)}")
        return
    for path, tables in PAGES.items():
        for name, make in tables.items():
            print(f"<!-- {path.name} -->\n<!-- table: {name} -->\n{make()}\n<!-- end -->\n")


if __name__ == "__main__":
    main()
