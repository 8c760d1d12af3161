"""How fast a run trains and how much of the device it uses: tokens per second, model FLOPs utilisation (MFU) and
peak memory, for the log lines and metrics.json.

MFU is the model's training FLOPs per token (6 x its matmul parameters, plus attention's scores; the head only at
the masked positions when it runs only there) times tokens per second, over the device's dense peak from its
datasheet. Recomputation (--gradient-checkpointing) is not model FLOPs and is not counted. Only a CUDA device
whose name is in the table has a known peak; elsewhere MFU is left out rather than guessed. A CPU has no
per-model memory figure either: what it reports is the whole process's peak resident memory, named so.
"""

from __future__ import annotations

import resource
import sys
from typing import Any

import torch

from mlmtune.model.forward import encoder_layers, has_sparse_head

# dense tensor-core peaks from NVIDIA's datasheets, TFLOP/s without sparsity: (bf16, tf32). The first part of the
# table that the device name contains wins, so the longer names come first.
DATASHEET_TFLOPS: dict[str, tuple[float, float]] = {
    "H200": (989.0, 494.0),
    "H100 SXM": (989.0, 494.0),
    "H100 80GB HBM3": (989.0, 494.0),  # the SXM part's name in torch.cuda.get_device_name
    "H100 NVL": (835.0, 418.0),
    "H100 PCIe": (756.0, 378.0),
    "H100": (756.0, 378.0),  # an H100 of unknown form: the lower, PCIe peak
    "A100": (312.0, 156.0),
    "L40S": (362.0, 183.0),
    "L4": (121.0, 60.0),
    "A10G": (70.0, 35.0),
    "A10": (125.0, 62.5),
}


def datasheet_peak(device_name: str | None, precision: str) -> float | None:
    """The device's dense peak in FLOP/s for `precision` (bf16; fp32 runs on TF32 tensor cores), or None when the
    device is not in the table (fp16 uses the bf16 figure, which the datasheets give alike)."""
    for part, (bf16, tf32) in DATASHEET_TFLOPS.items():
        if device_name and part in device_name:
            return (tf32 if precision == "fp32" else bf16) * 1e12
    return None


def flops_per_token(model: torch.nn.Module, block_size: int, mlm_probability: float) -> float:
    """Training FLOPs per token (forward and backward, 3 x the forward's 2 per multiply-add).

    The encoder's layers: 6 x their parameters, plus attention's scores and weighted sum, 12 x layers x block x
    hidden. The head (its transform and the vocabulary projection, tied or not) at every position, or at the masked
    share only when mlmtune runs it sparsely.
    """
    layers = encoder_layers(model)
    encoder = sum(p.numel() for layer in layers for p in layer.parameters())
    vocab, hidden = model.get_input_embeddings().weight.shape
    prefix = model.base_model_prefix + "."
    head = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(prefix))
    if model.get_output_embeddings() is not None and _tied(model):  # the decoder: not a parameter of its own
        head += vocab * hidden
    attention = 12 * len(layers) * block_size * hidden
    share = mlm_probability if has_sparse_head(model) else 1.0
    return 6 * encoder + attention + 6 * head * share


def _tied(model: torch.nn.Module) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def device_figures(
    device: torch.device, precision: str, flops: float, tokens_per_second: float | None, world: int = 1
) -> dict[str, Any]:
    """metrics.json's device figures: MFU (CUDA devices in the table only; `tokens_per_second` is the whole job's,
    shared by `world` devices) and peak memory (this rank's)."""
    if device.type != "cuda":
        # no MFU on a CPU; ru_maxrss: KiB on Linux, bytes on macOS
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return {"process_peak_rss_gb": round(rss / 2**30, 3)}
    name = torch.cuda.get_device_name(device)
    peak = datasheet_peak(name, precision)
    figures: dict[str, Any] = {
        "gpu": name,
        "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 3),
    }
    if peak is None:
        figures["mfu"] = None
        figures["mfu_note"] = f"unknown: {name} is not in mlmtune's table of datasheet peaks"
    elif tokens_per_second:
        figures["mfu"] = round(flops * tokens_per_second / world / peak, 4)
        figures["model_flops_per_token"] = flops
        figures["peak_flops"] = peak
    return figures


def log_figures(
    device: torch.device, precision: str, flops: float, tokens_per_second: float | None, world: int = 1
) -> dict[str, str]:
    """The same, short, for the progress bar's log line: tokens/s, and on CUDA the MFU and peak memory."""
    out = {} if tokens_per_second is None else {"tok/s": f"{tokens_per_second:,.0f}"}
    if device.type == "cuda":
        peak = datasheet_peak(torch.cuda.get_device_name(device), precision)
        if peak is not None and tokens_per_second:
            out["MFU"] = f"{flops * tokens_per_second / world / peak:.1%}"
        out["mem"] = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}GB"
    return out
