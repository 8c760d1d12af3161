"""Over HTTP: the request shapes (`payloads.py`), the batcher of concurrent requests (`batcher.py`), what every
request passes (`guard.py`), the app (`serve.py`) and the playground page it serves at /."""
