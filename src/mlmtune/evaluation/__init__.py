"""What a model is measured with: perplexity on fixed masks (`perplexity.py`), what it forgot (`forgetting.py`),
the domain cloze (`cloze.py`), the embedding check (`embedding.py`), the downstream probe (`task.py`, `probe.py`,
`downstream.py`); the one list a run and `mlmtune eval` walk (`measurements.py`), and `mlmtune eval`
(`evaluate.py`)."""
