"""CI's second run (.ci/run) simulates an AVX2-only CPU with three settings: ATEN_CPU_CAPABILITY (PyTorch's own
vectorized kernels), ONEDNN_MAX_CPU_ISA (oneDNN: bf16 matmuls) and MKL_ENABLE_INSTRUCTIONS (MKL: fp32 matmuls).
Here, in that run: each setting is honoured, and on a CPU with AVX-512 each changes the last bits of what its
library computes, so the run really sums in an AVX2 machine's order."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}

# the sha256 of one result per library, computed on one thread
PROBE = """
import hashlib, json, torch
torch.manual_seed(0)
h, a, b = torch.randn(64, 384), torch.randn(256, 384), torch.randn(384, 200)
bits = lambda t: hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "aten": bits(torch.softmax(h, -1)),
                  "mkl": bits(a @ b), "onednn": bits((a.bfloat16() @ b.bfloat16()).float())}))
"""


def _probe(env: dict[str, str]) -> dict[str, str]:
    p = subprocess.run([sys.executable, "-c", PROBE], env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout)


@pytest.mark.numerics
@pytest.mark.skipif(os.environ.get("ATEN_CPU_CAPABILITY") != "avx2", reason="for CI's AVX2 run (.ci/run)")
def test_the_avx2_run_runs_other_kernels_than_this_cpus_own():
    assert torch.backends.cpu.get_cpu_capability() == "AVX2"
    own = _probe({k: v for k, v in os.environ.items() if k not in AVX2})
    avx2 = _probe({**os.environ, **AVX2})
    assert avx2["capability"] == "AVX2"
    if not torch.cpu._is_avx512_supported():
        pytest.skip("this CPU has no AVX-512: its own kernels are the AVX2 ones")
    assert own["capability"] == "AVX512"
    assert own["aten"] != avx2["aten"] and own["mkl"] != avx2["mkl"]
    if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():  # bf16 dot products
        assert own["onednn"] != avx2["onednn"]
