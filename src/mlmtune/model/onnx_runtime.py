"""An exported folder's ONNX graphs -> logits, behind the call surface the rest of mlmtune uses.

`fill`, the word fills, `score` and `serve` reach the model only through `forward.logits_at_positions`
(the vocabulary head at the wanted positions) and a few attributes (`config`, `to`, `eval`,
`get_output_embeddings`). `OnnxMaskedLM` has those, so `FillMask` and `Scorer` take it in place of a
PyTorch model and nothing else changes: `--runtime onnx` is a different object, not a different code path.

It runs `onnx/mlmtune_masked.onnx` (the encoder, then the head at the positions given: what mlmtune's own
torch path computes), or, in a folder exported by another tool, the stock `onnx/model.onnx` (the head at
every position, then the positions picked). `--quantized` picks the int8 copy of either.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from mlmtune.errors import MlmtuneError

ONNX_DIR = "onnx"
FULL_GRAPH = "model.onnx"  # transformers.js and optimum read these two names
FULL_GRAPH_INT8 = "model_quantized.onnx"
MASKED_GRAPH = "mlmtune_masked.onnx"  # the head at the masked positions only; the stock readers ignore it
MASKED_GRAPH_INT8 = "mlmtune_masked_quantized.onnx"
RUNTIMES = ("torch", "onnx")


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise MlmtuneError('--runtime onnx needs onnxruntime: pip install "mlmtune[onnx]"') from None
    return onnxruntime


def graph_path(folder: Path, quantized: bool, graph: str = "auto") -> Path:
    """The graph `--runtime onnx` runs from a model folder: the masked-positions graph when there is one (`graph`
    auto or masked), else the stock full-logits one; the int8 copy with `quantized`.

    Raises:
        MlmtuneError: the folder has no onnx/ (or not the graph asked for), naming `mlmtune export`.
    """
    onnx_dir = folder / ONNX_DIR
    if not onnx_dir.is_dir():
        raise MlmtuneError(f"{folder} has no {ONNX_DIR}/ folder for --runtime onnx: export it first with "
                           f"`mlmtune export --model {folder} --output-dir DIR` and use DIR")
    masked, full = (MASKED_GRAPH_INT8, FULL_GRAPH_INT8) if quantized else (MASKED_GRAPH, FULL_GRAPH)
    names = {"auto": (masked, full), "masked": (masked,), "full": (full,)}[graph]
    for name in names:
        if (onnx_dir / name).is_file():
            return onnx_dir / name
    how = " --quantize int8" if quantized else ""
    raise MlmtuneError(f"{onnx_dir} has no {' or '.join(names)}: export the model again with "
                       f"`mlmtune export --model {folder} --output-dir DIR{how}`")


class OnnxMaskedLM:
    """A masked-LM run by onnxruntime (CPU), with the surface of a transformers model that mlmtune uses.

    Example:
        >>> model = OnnxMaskedLM.from_folder("exported-model", quantized=True)  # doctest: +SKIP
        >>> FillMask(model, load_tokenizer("exported-model"), device="cpu")("The <mask> sat.")  # doctest: +SKIP
    """

    def __init__(self, path: Path, config, threads: int | None = None):
        ort = import_onnxruntime()
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.at_positions = "positions" in self.inputs  # the masked graph: the head at the positions only
        self.path, self.config = path, config
        self.name_or_path = str(path.parent.parent)
        self.runtime = "onnx-int8" if "quantized" in path.name else "onnx"

    @classmethod
    def from_folder(cls, folder: str | Path, quantized: bool = False, graph: str = "auto",
                    threads: int | None = None) -> OnnxMaskedLM:
        """The runtime of an exported model folder (`mlmtune export`): its config and its onnx/ graph."""
        from transformers import AutoConfig

        folder = Path(folder)
        path = graph_path(folder, quantized, graph)
        return cls(path, AutoConfig.from_pretrained(folder), threads)

    def logits_at_positions(self, input_ids: torch.Tensor, positions: torch.Tensor,
                            attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(P, V) logits at flat positions of the (B, T) batch, as `forward.logits_at_positions` returns them."""
        ids = input_ids.cpu().numpy().astype(np.int64)
        mask = np.ones_like(ids) if attention_mask is None else attention_mask.cpu().numpy().astype(np.int64)
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.inputs:  # as the torch path runs BERT: every token of segment 0
            feed["token_type_ids"] = np.zeros_like(ids)
        flat = positions.cpu().numpy().astype(np.int64)
        if self.at_positions:
            feed["positions"] = flat
            return torch.from_numpy(self.session.run(["logits"], feed)[0])  # (P, V)
        logits = self.session.run(["logits"], feed)[0]  # (B, T, V)
        return torch.from_numpy(logits.reshape(-1, logits.shape[-1])[flat])

    def to(self, device=None, dtype=None) -> OnnxMaskedLM:
        """Stays on the CPU in float32 (int8 weights with --quantized); anything else is refused."""
        if device is not None and torch.device(device).type != "cpu":
            raise MlmtuneError(f"--runtime onnx runs on the CPU; drop --device {device}")
        if dtype not in (None, torch.float32):
            raise MlmtuneError("--runtime onnx runs the exported float32 graph (or its int8 copy with --quantized); "
                               "drop --precision")
        return self

    def eval(self) -> OnnxMaskedLM:
        return self

    def get_output_embeddings(self):
        return SimpleNamespace(out_features=self.config.vocab_size)  # what FillMask.check_top_k reads


def load_runtime(name: str, quantized: bool = False, graph: str = "auto"):
    """(OnnxMaskedLM, tokenizer) of an exported model folder, for `--runtime onnx`.

    Raises:
        MlmtuneError: not a local folder, or one without onnx/ (the message names `mlmtune export`).
    """
    from mlmtune.model.load import load_tokenizer, resolve_model_path

    path, local = resolve_model_path(name)
    if not local:
        raise MlmtuneError(f"--runtime onnx reads an exported model folder, and {name} is not a local folder: "
                           f"export it with `mlmtune export --model {name} --output-dir DIR` and use DIR")
    graph_path(Path(path), quantized, graph)  # before the tokenizer loads: the likely error first
    tokenizer = load_tokenizer(path)
    if tokenizer.mask_token_id is None:
        raise MlmtuneError(f"the tokenizer of {name} has no mask token, so it cannot do masked-LM")
    return OnnxMaskedLM.from_folder(path, quantized, graph), tokenizer


def load_for(name: str, runtime: str = "torch", quantized: bool = False, safetensors_only: bool = False):
    """(model, tokenizer) for `--runtime`: a transformers model (torch) or an `OnnxMaskedLM` (onnx)."""
    if runtime == "onnx":
        return load_runtime(name, quantized)
    from mlmtune.model.load import load_model

    return load_model(name, safetensors_only=safetensors_only)
