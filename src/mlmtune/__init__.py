"""mlmtune: masked-language-model fine-tuning, perplexity and fill-mask, offline-first.

The stages, in the data's order: `data` (text), `blocks` and `prepare` (tokens -> blocks),
`masking` and `feed` (blocks -> masked batches), `model` (loading), `forward` (model -> logits ->
loss), `train` (one run, with an engine: `torch_engine`, `keras.engine`), `evaluate` (perplexity),
`fill` (logits -> predictions), `serve` (over HTTP). `cli` drives them from the shell;
docs/development.md maps every module.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "score"]


def __getattr__(name: str):
    """`mlmtune.score(model, texts, metric=...)`, imported on first use: it brings torch and transformers, which
    `mlmtune --help` must not wait for."""
    if name == "score":
        from mlmtune.scoring import score

        return score
    raise AttributeError(f"module 'mlmtune' has no attribute {name!r}")
