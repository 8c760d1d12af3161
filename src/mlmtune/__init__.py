"""mlmtune: masked-language-model fine-tuning, perplexity and fill-mask, offline-first.

The stages, in the data's order: `data` (text -> tokens -> blocks), `masking` (blocks ->
masked batches), `model` (loading), `train` (the loop), `evaluate` (perplexity), `fill`
(logits -> predictions). `cli` drives them from the shell.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
