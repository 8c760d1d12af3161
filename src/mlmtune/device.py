"""Where a model runs and in what arithmetic: `--device` and `--precision` turned into a torch device and
an autocast dtype (bf16 where the hardware runs it fast, fp16 with a gradient scaler on GPUs before
Ampere, else fp32)."""

from __future__ import annotations

import contextlib
import os

import torch

from mlmtune.errors import MlmtuneError


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`--device`: None picks the GPU when there is one; a CUDA device that is not here is an error."""
    if device is None or device == "auto":
        return pick_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise MlmtuneError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise MlmtuneError(f"--device {device}: no such CUDA device here ({torch.cuda.device_count()} visible); "
                           f"use --device cpu")
    return dev


# oneDNN's instruction sets without bf16 dot products: capped at one of these (ONEDNN_MAX_CPU_ISA), oneDNN runs
# a CPU's bf16 matmuls without AVX-512 bf16 or AMX, 4 to 25x slower than fp32 (measured on a Xeon with AMX)
_ONEDNN_ISAS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run fast here: Ampere+ GPUs, CPUs with AVX-512 bf16 or AMX that oneDNN may use (not
    capped below them by ONEDNN_MAX_CPU_ISA, as an AVX2-only machine is simulated)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported() and torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
        if cap.upper() in _ONEDNN_ISAS_WITHOUT_BF16:
            return False
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for training, or None for plain fp32.

    `auto`: bf16 where it runs fast; fp16 (with a gradient scaler) on GPUs before Ampere (V100, T4);
    fp32 on CPUs without fast bf16.
    """
    if precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or fast_bf16(device):
        return torch.bfloat16
    return torch.float16 if device.type == "cuda" else None


PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

def inference_precision(choice: str, device: torch.device) -> str:
    """fill, score and serve `--precision`: auto is bf16 on a CUDA GPU that runs it fast (Ampere and newer), fp32
    elsewhere (a CPU's results stay the pipeline's); fp32, bf16 and fp16 are taken as given."""
    if choice != "auto":
        return choice
    return "bf16" if device.type == "cuda" and fast_bf16(device) else "fp32"


# fill and serve --precision: the dtype the weights are cast to
WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def tf32_matmuls(device: torch.device):
    """TF32 for the fp32 matmuls of training steps on a GPU (Ampere and newer), and the setting put back after:
    evaluation, fills and anything else the process runs stay true fp32."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
