"""The model: loading it with its tokenizer and checking they belong together (`load.py`), running it to logits
and a loss with the head only where a prediction is needed (`forward.py`), a sentence-transformers model's own
modules (`sentence.py`), and its ONNX export behind the same calls (`onnx_runtime.py`)."""
