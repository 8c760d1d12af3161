"""Fill masks over HTTP: `make_app()` builds the app, `serve()` binds a port.

Concurrent requests are collected for a short window and filled in one forward pass (a
`Batcher` feeding the model from a bounded queue: when it is full a request gets 503 at once,
so memory cannot grow without bound). The model runs in a worker thread, never on the event
loop. Every input limit answers with a 4xx JSON body `{"error": "..."}` that says what is wrong.
"""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import sys
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from mlmtune.errors import MlmtuneError
from mlmtune.fill import FillMask


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 64_000
    max_texts: int = 64
    max_chars: int = 2_000
    max_masks: int = 8
    max_top_k: int = 100


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_request(body: bytes, limits: Limits) -> tuple[list[str], bool, int, list[str] | None]:
    """Validate a /fill body: (texts, whether `text` was a list, top_k, targets), or BadRequest."""
    if len(body) > limits.max_body_bytes:
        raise BadRequest(413, f"request body is {len(body):,} bytes; the limit is {limits.max_body_bytes:,}")
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(400, f"malformed JSON: {e}") from None
    except RecursionError:  # `[[[[...` deeper than the parser's stack
        raise BadRequest(400, "malformed JSON: nested too deeply") from None
    if not isinstance(payload, dict):
        raise BadRequest(400, 'the body must be a JSON object like {"text": "Paris is the <mask> of France."}')
    unknown = set(payload) - {"text", "top_k", "targets"}
    if unknown:
        raise BadRequest(422, f"unknown field(s): {', '.join(sorted(unknown))}; known: text, top_k, targets")
    text = payload.get("text")
    is_list = isinstance(text, list)
    texts = text if is_list else [text]
    if text is None or not texts or not all(isinstance(t, str) for t in texts):
        raise BadRequest(422, '"text" must be a string or a non-empty list of strings')
    if len(texts) > limits.max_texts:
        raise BadRequest(422, f'"text" holds {len(texts)} texts; the limit is {limits.max_texts}')
    top_k = payload.get("top_k", 5)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= limits.max_top_k:
        raise BadRequest(422, f'"top_k" must be an integer from 1 to {limits.max_top_k}, got {top_k!r}')
    targets = payload.get("targets")
    if targets is not None and (not isinstance(targets, list) or not targets
                                or not all(isinstance(t, str) and t for t in targets)):
        raise BadRequest(422, '"targets" must be a non-empty list of words')
    for n, t in enumerate(texts, 1):
        where = f"text {n}" if is_list else "the text"
        if len(t) > limits.max_chars:
            raise BadRequest(413, f"{where} is {len(t):,} characters; the limit is {limits.max_chars:,}")
    return texts, is_list, top_k, targets


@dataclass
class _Job:
    encoded: list  # token ids per text
    top_k: int
    target_ids: Any
    future: asyncio.Future


class Batcher:
    """Collects jobs for up to `window_s` (or `max_batch` texts) and fills them in one forward pass."""

    def __init__(self, filler: FillMask, max_batch: int = 32, window_s: float = 0.005, max_queue: int = 256):
        self.filler = filler
        self.max_batch = max_batch
        self.window_s = window_s
        self.queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=max_queue)
        self.lock = threading.Lock()  # one forward pass at a time, whatever calls it
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()

    def submit(self, encoded: list, top_k: int, target_ids) -> asyncio.Future:
        """Queue a job; raises asyncio.QueueFull when the bound is reached."""
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(_Job(encoded, top_k, target_ids, future))
        return future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            size = len(jobs[0].encoded)
            deadline = loop.time() + self.window_s
            while size < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self.queue.get(), timeout)
                except TimeoutError:
                    break
                jobs.append(job)
                size += len(job.encoded)
            try:
                results = await loop.run_in_executor(None, self._fill, jobs)
                for job, result in zip(jobs, results):
                    if not job.future.done():
                        job.future.set_result(result)
            except Exception as e:  # a failure answers every job of the batch, never hangs them
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(e)

    def _fill(self, jobs: list[_Job]) -> list[list]:
        encoded = [ids for job in jobs for ids in job.encoded]
        with self.lock:
            logits = self.filler.mask_logits(encoded)
        out, i = [], 0
        for job in jobs:
            part = []
            for ids in job.encoded:
                part.append(self.filler.predictions(ids, logits[i], job.top_k, job.target_ids))
                i += 1
            out.append(part)
        return out


def _page() -> str:
    return resources.files("mlmtune").joinpath("playground.html").read_text(encoding="utf-8")


def make_app(model: str | FillMask, limits: Limits = Limits(), max_batch: int = 32, window_ms: float = 5.0,
             max_queue: int = 256):
    """The HTTP app. With a model name, the model loads in the background after start-up and
    /health says 503 until it is ready; with a FillMask it is ready at once.

    Example:
        >>> app = make_app("path/to/model")  # doctest: +SKIP
        >>> serve(app, "127.0.0.1", 8000)  # doctest: +SKIP
    """
    state: dict[str, Any] = {"batcher": None, "error": None}
    name = model if isinstance(model, str) else getattr(model.model, "name_or_path", "")

    async def load() -> None:
        try:
            filler = model if isinstance(model, FillMask) else await asyncio.get_running_loop().run_in_executor(
                None, lambda: FillMask.from_pretrained(model, batch_size=max_batch, safetensors_only=True))
            batcher = Batcher(filler, max_batch=max_batch, window_s=window_ms / 1000, max_queue=max_queue)
            batcher.start()
            state["batcher"] = batcher
        except MlmtuneError as e:
            state["error"] = str(e)
        except Exception as e:  # a task that dies silently would leave /health at "loading" for ever
            state["error"] = f"the model failed to load: {type(e).__name__}: {e}"

    @asynccontextmanager
    async def lifespan(app):
        if isinstance(model, FillMask):
            await load()  # ready before the first request
            loader = None
        else:  # the port answers at once; /health says "loading" until the model is in
            loader = asyncio.get_running_loop().create_task(load())
        yield
        if loader:
            loader.cancel()
        if state["batcher"]:
            await state["batcher"].stop()

    app = FastAPI(title="mlmtune", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.mlmtune = state

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.get("/health")
    async def health():
        if state["batcher"] is not None:
            return {"status": "ok"}
        if state["error"]:
            return error(500, state["error"])
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/info")
    async def info():
        batcher = state["batcher"]
        if batcher is None:
            return error(503, "the model is still loading")
        f = batcher.filler
        return {"model": name, "model_type": f.model.config.model_type, "mask_token": f.tokenizer.mask_token,
                "max_length": f.max_length, "device": str(f.device), "precision": f.precision, "max_batch": max_batch,
                "limits": limits.__dict__}

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return _page()

    @app.post("/fill")
    async def fill(request: Request):
        batcher = state["batcher"]
        if batcher is None:
            return error(503, "the model is still loading; retry when GET /health says ok")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
            return error(413, f"request body is {int(declared):,} bytes; the limit is {limits.max_body_bytes:,}")
        try:
            texts, is_list, top_k, targets = parse_request(await request.body(), limits)
            filler = batcher.filler
            encoded = filler.encode(texts)
            for n, ids in enumerate(encoded, 1):
                masks = int((ids == filler.tokenizer.mask_token_id).sum())
                if masks > limits.max_masks:
                    where = f"text {n}" if is_list else "the text"
                    raise BadRequest(422, f"{where} has {masks} masks; the limit is {limits.max_masks}")
            filler.check_top_k(top_k, targets)
            target_ids = filler.target_ids(targets) if targets else None
        except BadRequest as e:
            return error(e.status, str(e))
        except MlmtuneError as e:
            return error(422, str(e))
        try:
            future = batcher.submit(encoded, top_k, target_ids)
        except asyncio.QueueFull:
            return error(503, f"the server is busy ({batcher.queue.maxsize} requests waiting); retry shortly")
        results = await future
        # exactly what pipeline("fill-mask") returns: a list of one text gives that text's result
        return results if is_list and len(results) > 1 else results[0]

    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port), or MlmtuneError saying why not (port in use, bad address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        hint = "; pass another --port, or --port 0 for a free one" if e.errno == errno.EADDRINUSE else ""
        raise MlmtuneError(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}") from None
    except (OverflowError, socket.gaierror) as e:
        sock.close()
        raise MlmtuneError(f"cannot listen on {host}:{port}: {e}") from None
    return sock


def serve(app, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Bind the port (failing with one line when it cannot) and serve until interrupted."""
    import uvicorn

    sock = bind(host, port)
    bound = sock.getsockname()
    print(f"mlmtune serve: http://{host}:{bound[1]}/ (Ctrl-C stops)", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info"))
    server.run(sockets=[sock])
