"""mlmtune: masked-language-model fine-tuning, perplexity and fill-mask, offline-first.

The stages, in the data's order: `data` (text), `blocks` and `prepare` (tokens -> blocks),
`masking` and `feed` (blocks -> masked batches), `model` (loading), `forward` (model -> logits ->
loss), `train` (one run, with an engine: `torch_engine`, `keras.engine`), `evaluate` (perplexity),
`fill` (logits -> predictions), `serve` (over HTTP). `cli` drives them from the shell;
docs/development.md maps every module.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
