"""Logits -> predictions: fill-mask (`fill.py`, words of several pieces in `fill_words.py`), pseudo-log-likelihood
scoring (`scoring.py`), and the ONNX export that other runtimes infer with (`onnx_export.py`)."""
