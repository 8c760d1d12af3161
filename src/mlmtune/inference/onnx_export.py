"""Model folder -> ONNX: `mlmtune export` and `train --export onnx`.

Two graphs are written under onnx/, both by torch's dynamo exporter (`torch.onnx.export(dynamo=True)`), batch and
length dynamic:

- `model.onnx`: the tokenizer's inputs -> `logits` (B, T, V), the layout transformers.js and optimum's
  `ORTModelForMaskedLM` read;
- `mlmtune_masked.onnx`: input ids, attention mask and flat `positions` (P,) -> `logits` (P, V), the head at the
  masked positions only, as mlmtune's torch path computes it (`forward.py`); `--runtime onnx` runs this one. The
  head over every position is most of the work of a short text with a large vocabulary.

With `--quantize int8` each gets an int8 copy (`model_quantized.onnx`, `mlmtune_masked_quantized.onnx`:
onnxruntime's dynamic quantization, weights int8 per output channel, activations quantized per batch; per tensor,
a scratch trial on the unadapted MiniLM agreed with fp32 far less often). Before it says done, the export checks itself
on a fixed padded batch: onnxruntime's fp32 logits against PyTorch's (refused above `FP32_TOLERANCE`), and the int8
copies' top-1 agreement with PyTorch at masked positions. Everything is written into a temporary folder
beside the target and renamed into place at the end, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mlmtune.errors import MlmtuneError, say
from mlmtune.model.forward import logits_at_positions
from mlmtune.model.onnx_runtime import (
    FULL_GRAPH,
    FULL_GRAPH_INT8,
    MASKED_GRAPH,
    MASKED_GRAPH_INT8,
    ONNX_DIR,
    OnnxMaskedLM,
    import_onnxruntime,
)

QUANTIZE = ("int8",)
FP32_TOLERANCE = 1e-4  # onnxruntime's logits against PyTorch's: float32 kernels summing in another order
MASK_EVERY = 3  # the int8 check masks every third word piece of each text
# the fixed batch of the self-check: lengths differ, so the batch is padded
CHECK_TEXTS = (
    "The patient was given aspirin for the pain and sent home the same day.",
    "A function returns None when it reaches the end of its body without a return statement.",
    "Paris is the capital of France.",
    "The court held that the contract was void because one party had been misled about its terms.",
    "Rain is expected in the north tomorrow, with lighter winds in the afternoon.",
    "Prices rose by three percent last year.",
)


@dataclass
class ExportReport:
    """What the self-check measured: fp32 logits' largest difference from PyTorch's, per graph; the int8 copies'
    top-1 agreement with PyTorch at `masked` masked positions, per graph."""

    model_type: str
    inputs: list[str]
    fp32_max_diff: dict[str, float] = field(default_factory=dict)
    int8_top1: dict[str, float] = field(default_factory=dict)
    masked: int = 0
    sizes_mb: dict[str, float] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [f"{name}: fp32 logits within {diff:.1e} of PyTorch's on a padded batch of {len(CHECK_TEXTS)} texts "
               f"({self.sizes_mb[name]:.1f} MB)" for name, diff in self.fp32_max_diff.items()]
        out += [f"{name}: int8, top-1 agrees with PyTorch's fp32 at {agree:.1%} of {self.masked} masked positions "
                f"({self.sizes_mb[name]:.1f} MB)" for name, agree in self.int8_top1.items()]
        return out


def check_quantize(quantize: str | None) -> None:
    if quantize is not None and quantize not in QUANTIZE:
        raise MlmtuneError(f"--quantize must be {' or '.join(QUANTIZE)}, got {quantize!r}")


def check_export_target(out: Path) -> None:
    """A new folder, or an empty one: an export never writes over files."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MlmtuneError(f"--output-dir {out} is not empty: give a new folder (an export never writes over files)")


def export_folder(model_name: str, output_dir: str | Path, quantize: str | None = None) -> ExportReport:
    """`mlmtune export`: a complete model folder (config, tokenizer, safetensors weights, the model card) with
    onnx/ beside it.

    Args:
        model_name: a model folder or Hub id (what `fill --model` takes).
        output_dir: a new or empty folder.
        quantize: None, or int8 for int8 copies of the graphs.

    Returns:
        The self-check's figures (also printed and written into the model card).

    Raises:
        MlmtuneError: no model there, the target not empty, an unknown --quantize, an architecture the exporter
            cannot export, or onnxruntime's logits too far from PyTorch's. Nothing is left written.
    """
    from mlmtune.model.load import load_model, resolve_model_path

    out = Path(output_dir)
    check_quantize(quantize)
    check_export_target(out)
    import_onnxruntime()
    model, tokenizer = load_model(model_name, safetensors_only=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source, local = resolve_model_path(model_name)
        card = Path(source) / "README.md"
        if local and card.is_file():  # mlmtune's card of the run, or the model's own
            shutil.copyfile(card, tmp / "README.md")
        report = export_graphs(model, tokenizer, tmp / ONNX_DIR, quantize)
        write_card_section(tmp, report)
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # ours: made above
        raise
    return report


def export_into_run(folder: Path, model, tokenizer, quantize: str | None = "int8") -> ExportReport:
    """`train --export onnx`: onnx/ added to a finished run's folder (renamed into place when checked), and the
    figures added to its model card."""
    target = folder / ONNX_DIR
    if target.exists():
        raise MlmtuneError(f"{target} exists already: the export would write over it")
    tmp = Path(tempfile.mkdtemp(prefix=".onnx.partial-", dir=folder))
    try:
        report = export_graphs(model, tokenizer, tmp, quantize)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_card_section(folder, report)
    return report


def input_names(model, tokenizer) -> list[str]:
    """The inputs of `model.onnx`: what the tokenizer gives that the model takes (BERT's token_type_ids too)."""
    import inspect

    takes = inspect.signature(model.forward).parameters
    names = [n for n in tokenizer.model_input_names if n in takes]
    return ["input_ids", "attention_mask"] + [n for n in names if n not in ("input_ids", "attention_mask")]


class _AtPositions(torch.nn.Module):
    """The masked graph: (input ids, attention mask, flat positions) -> (P, V) logits (`forward.py`)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, positions):
        return logits_at_positions(self.model, input_ids, positions, attention_mask)


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's notes (torchvision absent, dynamic-shape renames) are not the user's business."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    loggers.append(logging.getLogger())  # onnxruntime's quantizer advises pre-processing on the root logger
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _example(tokenizer, names: list[str]) -> dict[str, torch.Tensor]:
    """Two texts of different lengths, padded: batch and length both above 1, so the exporter keeps them dynamic."""
    enc = tokenizer(list(CHECK_TEXTS[:2]), padding=True, return_tensors="pt")
    return {n: enc[n] if n in enc else torch.zeros_like(enc["input_ids"]) for n in names}


def _export(model, args: tuple, kwargs: dict, names: list[str], dims: dict, path: Path, arch: str) -> None:
    batch, length = torch.export.Dim("batch"), torch.export.Dim("sequence")
    shapes = {n: {0: batch, 1: length} for n in names if n != "positions"}
    shapes.update(dims)
    try:
        with _quiet_exporter():
            torch.onnx.export(model, args, str(path), kwargs=kwargs, input_names=names, output_names=["logits"],
                              dynamic_shapes=shapes if kwargs else tuple(shapes[n] for n in names),
                              dynamo=True, external_data=False, verbose=False)
    except ImportError as e:
        raise MlmtuneError(f'the ONNX export needs {e.name or "onnxscript"}: pip install "mlmtune[onnx]"') from None
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise MlmtuneError(f"{arch} does not export to ONNX with torch {torch.__version__}'s exporter "
                           f"({type(e).__name__}: {first})") from None


def export_graphs(model, tokenizer, folder: Path, quantize: str | None) -> ExportReport:
    """Both graphs (and their int8 copies) into `folder`, then the self-check; returns its figures."""
    model = model.float().eval().cpu()
    folder.mkdir(parents=True, exist_ok=True)
    names = input_names(model, tokenizer)
    example = _example(tokenizer, names)
    say(f"exporting {type(model).__name__} to ONNX (inputs {', '.join(names)}) ...")
    _export(model, (), example, names, {}, folder / FULL_GRAPH, type(model).__name__)
    positions = torch.tensor([1, 3, example["input_ids"].shape[1] + 2])
    _export(_AtPositions(model), (example["input_ids"], example["attention_mask"], positions), {},
            ["input_ids", "attention_mask", "positions"], {"positions": {0: torch.export.Dim("positions")}},
            folder / MASKED_GRAPH, type(model).__name__)
    if quantize == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        for src, dst in ((FULL_GRAPH, FULL_GRAPH_INT8), (MASKED_GRAPH, MASKED_GRAPH_INT8)):
            with _quiet_exporter():
                quantize_dynamic(folder / src, folder / dst, weight_type=QuantType.QInt8, per_channel=True)
    report = check_graphs(model, tokenizer, folder, names)
    for line in report.lines():
        say(line)
    return report


def check_batch(tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The self-check's fixed batch: CHECK_TEXTS padded (ids, attention, (B, T)), and the same with every
    MASK_EVERY-th word piece masked (the masked ids)."""
    enc = tokenizer(list(CHECK_TEXTS), padding=True, return_tensors="pt", return_special_tokens_mask=True)
    ids, attention = enc["input_ids"], enc["attention_mask"]
    maskable = (enc["special_tokens_mask"] == 0) & attention.bool()
    rank = maskable.long().cumsum(1)
    masked = ids.clone()
    masked[maskable & (rank % MASK_EVERY == 1)] = tokenizer.mask_token_id
    return ids, attention, masked


@torch.inference_mode()
def check_graphs(model, tokenizer, folder: Path, names: list[str]) -> ExportReport:
    """onnxruntime against PyTorch on `check_batch`: fp32 logits at every real position (refused above
    FP32_TOLERANCE); the int8 copies' top-1 at the masked positions."""
    ids, attention, masked = check_batch(tokenizer)
    report = ExportReport(model.config.model_type, names)
    real = torch.nonzero(attention.reshape(-1)).squeeze(1)
    at_masks = torch.nonzero((masked == tokenizer.mask_token_id).reshape(-1)).squeeze(1)
    report.masked = len(at_masks)
    reference = logits_at_positions(model, ids, real, attention).float()  # (P, V)
    reference_top1 = logits_at_positions(model, masked, at_masks, attention).argmax(-1)
    for name in (FULL_GRAPH, MASKED_GRAPH, FULL_GRAPH_INT8, MASKED_GRAPH_INT8):
        path = folder / name
        if not path.is_file():
            continue
        report.sizes_mb[name] = path.stat().st_size / 1e6
        runtime = OnnxMaskedLM(path, model.config)
        if "quantized" in name:
            top1 = runtime.logits_at_positions(masked, at_masks, attention).argmax(-1)
            report.int8_top1[name] = float((top1 == reference_top1).float().mean())
            continue
        diff = float((runtime.logits_at_positions(ids, real, attention) - reference).abs().max())
        report.fp32_max_diff[name] = diff
        if not diff <= FP32_TOLERANCE:  # NaN fails too
            raise MlmtuneError(f"the exported {name} gives logits {diff:.2e} away from PyTorch's (more than "
                               f"{FP32_TOLERANCE:.0e}): {type(model).__name__} does not export faithfully; "
                               f"nothing was written")
    return report


def write_card_section(folder: Path, report: ExportReport) -> None:
    """The export's figures as a section of the model card (README.md; a new card when there is none)."""
    card = folder / "README.md"
    text = card.read_text() if card.is_file() else f"# {folder.name}\n"
    card.write_text(text.rstrip("\n") + "\n" + onnx_section(report))


def onnx_section(report: ExportReport) -> str:
    """The model card's section on the ONNX export : its graphs and its self-check."""
    rows = [f"| `onnx/{name}` | {report.sizes_mb[name]:.1f} MB | logits within {diff:.1e} of PyTorch's |"
            for name, diff in report.fp32_max_diff.items()]
    rows += [f"| `onnx/{name}` | {report.sizes_mb[name]:.1f} MB | top-1 agrees with PyTorch at {agree:.1%} of "
             f"{report.masked} masked positions |" for name, agree in report.int8_top1.items()]
    return f"""
## ONNX

Exported by `mlmtune export` (torch's dynamo exporter; inputs {', '.join(f'`{n}`' for n in report.inputs)},
output `logits`, batch and length dynamic) and checked with onnxruntime on a fixed padded batch of texts:

| graph | size | check |
| --- | --- | --- |
{chr(10).join(rows)}

`model.onnx` and `model_quantized.onnx` are what transformers.js and optimum's `ORTModelForMaskedLM` read;
`mlmtune_masked*.onnx` compute the head at the masked positions only (`mlmtune fill --runtime onnx`).
"""
