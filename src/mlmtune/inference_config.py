"""The configs of the commands that use a model: `fill`, `score` and `serve` (`config.py` has those that make
one). Like those, frozen dataclasses validated in `__post_init__`, each field's docstring its `--help`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mlmtune.config import DEFAULT_MODEL, DataConfig
from mlmtune.errors import require

FILL_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
RUNTIMES = ("torch", "onnx")  # onnx_runtime.RUNTIMES


def _check_fill_precision(precision: str) -> None:
    require(precision in FILL_PRECISIONS,
            f"--precision must be one of {', '.join(FILL_PRECISIONS)}, got {precision!r}")


MAX_PIECES = 5  # words of more pieces than this: a beam search that runs for minutes (the server's cap too)


def _check_runtime(runtime: str, quantized: bool, device: str | None, precision: str = "auto") -> None:
    require(runtime in RUNTIMES, f"--runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    require(not quantized or runtime == "onnx", "--quantized picks the int8 ONNX graph: add --runtime onnx")
    require(runtime == "torch" or device in (None, "cpu"), f"--runtime onnx runs on the CPU; drop --device {device}")
    require(runtime == "torch" or precision in ("auto", "fp32"),
            "--runtime onnx runs the exported fp32 graph (or its int8 copy with --quantized); drop --precision")



@dataclass(frozen=True)
class FillConfig:
    """`mlmtune fill`: top-k predictions for each mask, as `pipeline("fill-mask")` gives them."""

    model: str = DEFAULT_MODEL
    """The model that fills: a Hub id or a model folder."""
    top_k: int = 5
    """Predictions per mask."""
    targets: list[str] | None = None
    """Restrict candidates to these words (comma-separated on the command line)."""
    max_pieces: int = 1
    """Also propose words of up to this many pieces (at most 5) for a mask (beam search over pieces, ranked by the
    whole word's probability); 1 proposes single pieces, as the pipeline does."""
    joint: bool = False
    """Fill all the masks of a text together: the best joint fillings (a beam search, re-ranked by the filled
    text's pseudo-log-likelihood) instead of each mask on its own."""
    beam_size: int = 8
    """Beams of --joint and --max-pieces."""
    batch_size: int = 32
    """Texts per forward pass."""
    device: str | None = None
    """cpu, cuda or cuda:N (default: the GPU when there is one)."""
    precision: str = "auto"
    """auto (bf16 on a GPU that runs it fast, Ampere and newer; else fp32), fp32 (scores equal the pipeline's), or
    bf16 / fp16: the weights cast for half the memory and faster GPU passes; scores then differ from the
    pipeline's in the third digit, and near-ties may swap."""
    runtime: str = "torch"
    """torch (the model's weights in PyTorch), or onnx: the graphs of a folder made by `mlmtune export`
    (onnxruntime on the CPU; the same answers, scores within 1e-4)."""
    quantized: bool = False
    """With --runtime onnx: run the int8 copy (`mlmtune export --quantize int8`)."""

    def __post_init__(self):
        _check_fill_precision(self.precision)
        _check_runtime(self.runtime, self.quantized, self.device, self.precision)
        require(1 <= self.max_pieces <= MAX_PIECES,
                f"--max-pieces must be 1 to {MAX_PIECES} (words of more pieces than that are rare, and their search "
                f"takes minutes), got {self.max_pieces}")
        require(self.beam_size >= 1, f"--beam-size must be at least 1, got {self.beam_size}")
        require(self.top_k >= 1, f"--top-k must be a positive integer, got {self.top_k}")
        require(self.batch_size >= 1, f"--batch-size must be a positive integer, got {self.batch_size}")
        require(self.targets is None or len(self.targets) > 0, "--targets must name at least one word")


SCORE_METRICS = ("within-word-l2r", "original")  # scoring.METRICS


@dataclass(frozen=True)
class ScoreConfig:
    """`mlmtune score`: the pseudo-log-likelihood of texts (each token masked in turn), by word and in all."""

    model: str = DEFAULT_MODEL
    """The model that scores: a Hub id or a model folder."""
    data: DataConfig = field(default_factory=DataConfig)
    metric: str = "within-word-l2r"
    """within-word-l2r: with each token, the pieces of its word to its right are masked too, so a word of many
    pieces is not given away by its own pieces (Kauf & Ivanova, 2023); original: one token at a time (Salazar
    et al., 2020). A word of one piece scores the same under both."""
    per_word: bool = False
    """Print each word's share of the score too."""
    max_texts: int | None = None
    """With --dataset: score at most this many records (default: all)."""
    batch_size: int = 64
    """Masked copies per forward pass."""
    device: str | None = None
    """cpu, cuda or cuda:N (default: the GPU when there is one)."""
    precision: str = "auto"
    """auto (bf16 on a GPU that runs it fast, Ampere and newer; else fp32), fp32, bf16 or fp16: the weights cast;
    log-probabilities are taken in fp32 from the cast logits (bf16 moves a text's score in the third digit)."""
    runtime: str = "torch"
    """torch (the model's weights in PyTorch), or onnx: the graphs of a folder made by `mlmtune export`
    (onnxruntime on the CPU; the same answers, scores within 1e-4)."""
    quantized: bool = False
    """With --runtime onnx: run the int8 copy (`mlmtune export --quantize int8`)."""

    def __post_init__(self):
        _check_fill_precision(self.precision)
        _check_runtime(self.runtime, self.quantized, self.device, self.precision)
        require(self.metric in SCORE_METRICS, f"--metric must be one of {', '.join(SCORE_METRICS)}, "
                f"got {self.metric!r}")
        require(self.batch_size >= 1, f"--batch-size must be a positive integer, got {self.batch_size}")
        require(self.max_texts is None or self.max_texts >= 1, "--max-texts must be >= 1")


@dataclass(frozen=True)
class ServeConfig:
    """`mlmtune serve`: fill-mask over HTTP, requests batched into shared forward passes."""

    model: str = DEFAULT_MODEL
    """The model to serve: a Hub id or a model folder (safetensors weights only)."""
    host: str = "127.0.0.1"
    """Address to bind; the default answers this machine only."""
    port: int = 8000
    """Port to bind; 0 picks a free one (the server prints it)."""
    device: str | None = None
    """cpu, cuda or cuda:N (default: the GPU when there is one)."""
    precision: str = "auto"
    """auto (bf16 on a GPU that runs it fast, Ampere and newer; else fp32), fp32 (scores equal the pipeline's), or
    bf16 / fp16: the weights cast for half the memory and faster GPU passes; scores then differ from the
    pipeline's in the third digit, and near-ties may swap."""
    max_batch: int = 32
    """Most texts in one forward pass (1 turns batching off)."""
    batch_window_ms: float = 5.0
    """How long the first request of a batch waits for others."""
    max_queue: int = 256
    """Requests waiting beyond this get 503 at once."""
    api_key: str | None = None
    """Require 'Authorization: Bearer KEY' on every route but /health (default: $MLMTUNE_API_KEY; the
    environment keeps the key out of the process list)."""
    insecure: bool = False
    """Serve a non-loopback --host with no API key."""
    max_body_bytes: int = 64_000
    """Largest request body; a larger one gets 413 with a JSON error as soon as it is announced or passes the
    limit, and the rest is not read."""
    max_work: int = 4096
    """Most rows (copies of a text) one request may run through the model: a word fill's targets x pieces, its
    masks x beams and the beams' pieces, a score's tokens. Beyond it, a 422 that says the count."""
    request_timeout: float = 30.0
    """Seconds from a request's arrival to its answer: checked before each forward pass, so a request that runs
    long stops there, frees the model and gets 503."""
    read_timeout: float = 10.0
    """Seconds a connection has to send a request's headers, and again its body; then it is dropped (408)."""
    limit_concurrency: int = 512
    """Requests in flight (being read, waiting or running) beyond this get 503 at once."""
    allowed_hosts: list[str] | None = None
    """Host names the server answers to (comma-separated; *.example.com allowed); others get 400, so a web page
    cannot reach it by a name of its own (DNS rebinding). Default: the --host address and localhost (for 0.0.0.0,
    this machine's names too). Add the name clients use behind a reverse proxy."""
    docs: bool = False
    """Serve Swagger UI at /docs (the browser fetches its script and style from a CDN, each checked against a
    pinned hash); /openapi.json is always served."""
    runtime: str = "torch"
    """torch (the model's weights in PyTorch), or onnx: the graphs of a folder made by `mlmtune export`
    (onnxruntime on the CPU; the same answers, scores within 1e-4). /health names it."""
    quantized: bool = False
    """With --runtime onnx: run the int8 copy (`mlmtune export --quantize int8`)."""

    def __post_init__(self):
        _check_fill_precision(self.precision)
        _check_runtime(self.runtime, self.quantized, self.device, self.precision)
        require(0 <= self.port <= 65535, f"--port must be in 0..65535, got {self.port}")
        require(self.max_batch >= 1, "--max-batch must be >= 1")
        require(self.batch_window_ms >= 0, "--batch-window-ms must be >= 0")
        require(self.max_queue >= 1, "--max-queue must be >= 1")
        require(self.max_body_bytes >= 1024, "--max-body-bytes must be at least 1024")
        require(self.max_work >= 1, "--max-work must be >= 1")
        require(self.request_timeout > 0, f"--request-timeout must be positive, got {self.request_timeout}")
        require(self.read_timeout > 0, f"--read-timeout must be positive, got {self.read_timeout}")
        require(self.limit_concurrency >= 1, "--limit-concurrency must be >= 1")
        require(self.allowed_hosts is None or all(h == "*" or "*" not in h[1:] and (not h.startswith("*")
                                                                                   or h.startswith("*."))
                                                  for h in self.allowed_hosts),
                f"--allowed-hosts: write names (example.com), patterns like *.example.com, or *; got "
                f"{','.join(self.allowed_hosts or [])}")


EXPORT_QUANTIZE = ("int8",)  # onnx_export.QUANTIZE


@dataclass(frozen=True)
class ExportConfig:
    """`mlmtune export`: a model folder with its ONNX graphs (onnx/model.onnx, and the int8 copy), checked."""

    model: str = DEFAULT_MODEL
    """The model to export: a model folder or a Hub id."""
    output_dir: str = "mlmtune-export"
    """A new or empty folder: the model folder (config, tokenizer, weights, card) with onnx/ in it."""
    quantize: str | None = None
    """int8: also write int8 copies of the graphs (onnxruntime's dynamic quantization; model_quantized.onnx)."""

    def __post_init__(self):
        require(self.quantize is None or self.quantize in EXPORT_QUANTIZE,
                f"--quantize must be {' or '.join(EXPORT_QUANTIZE)}, got {self.quantize!r}")
