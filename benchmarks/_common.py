"""Helpers shared by the benchmark scripts: the machine, a matmul peak, tables, JSON, child processes."""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_flags() -> set[str]:
    """The CPU's feature flags, as /proc/cpuinfo lists them (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_class(flags: set[str]) -> str:
    """The class of CPU that decides mlmtune's speed: whether it has AMX, AVX-512 bf16, or AVX2 only."""
    if {"amx_bf16", "amx_tile"} <= flags:
        return "AMX (AVX-512 bf16 and AMX tiles)"
    if "avx512_bf16" in flags:
        return "AVX-512 bf16, no AMX"
    if "avx512f" in flags:
        return "AVX-512 without bf16"
    return "AVX2 only" if "avx2" in flags else "no AVX2"


def machine() -> dict:
    """What every published figure names: the CPU's model, cores and class, the GPU if any, and the date."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = cpu_flags()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu or platform.processor(), "cores": os.cpu_count(), "cpu_class": cpu_class(flags),
            "cpu_flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}),
            "torch_threads": torch.get_num_threads(), "gpu": gpu, "torch": torch.__version__,
            "python": platform.python_version(), "date": datetime.date.today().isoformat()}


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0, device: str = "cpu") -> float:
    """Achieved FLOP/s of an n x n matmul in `dtype`, the best of repeated timings."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        (a @ b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(script: str, *args: str, timeout: int = 1800) -> dict:
    """Run `python script args` and return the JSON object it prints last."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Markdown table; columns are (key, header, format)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "| " + " | ".join("---" for _ in columns) + " |"
    body = []
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append("n/a" if v is None else format(v, fmt) if fmt else str(v))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *body])


def machine_slug(m: dict) -> str:
    """A folder name for a machine class: its GPU, or its CPU's maker and class (intel-xeon-amx, amd-epyc-avx2)."""
    if m.get("gpu"):
        return "-".join(m["gpu"].lower().replace("nvidia", "nvidia ").split()[:3])
    words = [w for w in m["cpu"].lower().replace("(r)", "").split() if w not in ("processor", "cpu")][:2]
    kind = {"AMX (AVX-512 bf16 and AMX tiles)": "amx", "AVX-512 bf16, no AMX": "avx512-bf16",
            "AVX-512 without bf16": "avx512", "AVX2 only": "avx2"}.get(m["cpu_class"], "other")
    return "-".join([*words, kind])


def write_json(name: str, payload: dict, folder: Path | None = None) -> Path:
    """benchmarks/results/MACHINE/NAME.json (or FOLDER/NAME.json): the machine, then the figures."""
    m = machine()
    folder = folder or RESULTS / machine_slug(m)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"machine": m, **payload}, indent=2) + "\n")
    return path


def corpus_texts(repeat: int = 1) -> list[str]:
    """The built-in Python-docs paragraphs, repeated to size."""
    from mlmtune.data.corpora import python_docs_texts

    return python_docs_texts() * repeat


def quickstart_model_folder() -> Path:
    """The quickstart MiniLM with its head seeded (42), saved to a temporary model folder, so that
    mlmtune and transformers' pipeline load the very same files."""
    import tempfile

    from mlmtune.model.load import load_model

    folder = Path(tempfile.mkdtemp(prefix="mlmtune-bench-model-"))
    torch.manual_seed(42)
    model, tok = load_model("builtin:all-minilm-l6-v2")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
