"""Fill masks over HTTP: `make_app()` builds the app, `serve()` binds a port.

Concurrent requests are collected for a short window and filled in one forward pass (a
`Batcher` feeding the model from a bounded queue: when it is full a request gets 503 at once,
so memory cannot grow without bound). The model runs in a worker thread, never on the event
loop. Every input limit answers with a 4xx JSON body `{"error": "..."}` that says what is wrong.

`POST /` and `POST /fill` take mlmtune's `{"text": ...}` and the Inference API's `{"inputs": ...,
"parameters": {...}}`, so `huggingface_hub.InferenceClient(model=URL).fill_mask` works unchanged.
`GET /metrics` is for Prometheus; with an API key every route but `/health` needs it.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import ipaddress
import json
import socket
import sys
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

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


def _check_fields(payload: dict, known: set[str], where: str = "") -> None:
    unknown = set(payload) - known
    if unknown:
        raise BadRequest(422, f"unknown field(s){where}: {', '.join(sorted(unknown))}; "
                              f"known: {', '.join(sorted(known))}")


def parse_request(body: bytes, limits: Limits) -> tuple[list[str], bool, int, list[str] | None]:
    """Validate a fill body: (texts, whether the texts came as a list, top_k, targets), or BadRequest.

    Two shapes are accepted: mlmtune's `{"text": ..., "top_k": 5, "targets": [...]}` and the
    Inference API's `{"inputs": ..., "parameters": {"top_k": 5, "targets": [...]}}`, which is what
    `huggingface_hub.InferenceClient.fill_mask` sends.
    """
    if len(body) > limits.max_body_bytes:
        raise BadRequest(413, f"request body is {len(body):,} bytes; the limit is {limits.max_body_bytes:,}")
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(400, f"malformed JSON: {e}") from None
    except RecursionError:  # `[[[[...` deeper than the parser's stack
        raise BadRequest(400, "malformed JSON: nested too deeply") from None
    if not isinstance(payload, dict):
        raise BadRequest(400, 'the body must be a JSON object like {"text": "Paris is the <mask> of France."} '
                              'or {"inputs": "Paris is the <mask> of France."}')
    if "inputs" in payload:  # the Inference API shape
        _check_fields(payload, {"inputs", "parameters", "options"})
        field_name, text = "inputs", payload["inputs"]
        params = payload.get("parameters") or {}
        if not isinstance(params, dict):
            raise BadRequest(422, '"parameters" must be an object like {"top_k": 5}')
        _check_fields(params, {"top_k", "targets"}, " in parameters")
    else:
        _check_fields(payload, {"text", "top_k", "targets"})
        field_name, text, params = "text", payload.get("text"), payload
    is_list = isinstance(text, list)
    texts = text if is_list else [text]
    if text is None or not texts or not all(isinstance(t, str) for t in texts):
        raise BadRequest(422, f'"{field_name}" must be a string or a non-empty list of strings')
    if len(texts) > limits.max_texts:
        raise BadRequest(422, f'"{field_name}" holds {len(texts)} texts; the limit is {limits.max_texts}')
    top_k = params.get("top_k")
    top_k = 5 if top_k is None else top_k  # the client sends null for a parameter it was not given
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= limits.max_top_k:
        raise BadRequest(422, f'"top_k" must be an integer from 1 to {limits.max_top_k}, got {top_k!r}')
    targets = params.get("targets")
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

    def __init__(self, filler: FillMask, max_batch: int = 32, window_s: float = 0.005, max_queue: int = 256,
                 on_batch: Callable[[int], None] | None = None):
        self.filler = filler
        self.on_batch = on_batch  # told the number of texts of every forward pass
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
        if self.on_batch:
            self.on_batch(len(encoded))
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


class Metrics:
    """What Prometheus scrapes from GET /metrics; one registry per app, so apps never share counts."""

    ROUTES = ("/", "/fill", "/health", "/info", "/metrics", "/docs", "/openapi.json")

    def __init__(self, max_batch: int):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("mlmtune_requests", "HTTP requests by route, method and status code",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("mlmtune_request_duration_seconds", "Time from request to response, fill routes",
                                 ["route"], registry=self.registry,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        sizes = sorted({1 << i for i in range(max_batch.bit_length())} | {max_batch})
        self.batch_texts = Histogram("mlmtune_batch_texts", "Texts per forward pass", registry=self.registry,
                                     buckets=sizes)
        self.queue_depth = Gauge("mlmtune_queue_depth", "Requests waiting for a forward pass", registry=self.registry)
        self.load_seconds = Gauge("mlmtune_model_load_seconds", "Seconds the model took to load",
                                  registry=self.registry)

    def route(self, path: str) -> str:
        return path if path in self.ROUTES else "other"  # a bounded label set, whatever clients ask for

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, api_key: str | None, insecure: bool) -> None:
    """Refuse to serve a non-loopback address with no key, unless told so with --insecure."""
    if api_key is not None and not api_key.strip():
        raise MlmtuneError("the API key is empty; set --api-key (or MLMTUNE_API_KEY) to a secret, or leave it unset")
    if not is_loopback(host) and api_key is None and not insecure:
        raise MlmtuneError(f"--host {host} lets other machines reach the model, and no API key is set: set "
                           f"MLMTUNE_API_KEY (or --api-key), or pass --insecure to serve it to anyone who can connect")


_PREDICTION = {"type": "object", "properties": {
    "score": {"type": "number"}, "token": {"type": "integer"}, "token_str": {"type": "string"},
    "sequence": {"type": "string"}}}
_TEXTS = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
_PARAMS = {"top_k": {"type": "integer", "minimum": 1, "default": 5},
           "targets": {"type": "array", "items": {"type": "string"}, "description": "score only these words"}}
FILL_OPENAPI = {
    "requestBody": {"required": True, "content": {"application/json": {
        "schema": {"oneOf": [
            {"title": "mlmtune", "type": "object", "required": ["text"],
             "properties": {"text": _TEXTS, **_PARAMS}},
            {"title": "Inference API", "type": "object", "required": ["inputs"],
             "properties": {"inputs": _TEXTS, "parameters": {"type": "object", "properties": _PARAMS}}},
        ]},
        "examples": {
            "mlmtune": {"value": {"text": "Paris is the <mask> of France.", "top_k": 3}},
            "inference_api": {"summary": "Inference API (huggingface_hub.InferenceClient.fill_mask)",
                              "value": {"inputs": "Paris is the <mask> of France.",
                                        "parameters": {"top_k": 3, "targets": ["capital", "city"]}}},
            "batch": {"value": {"text": ["A <mask> is defined.", "The <mask> keyword."], "top_k": 2}},
        }}}},
    "responses": {
        "200": {"description": "What pipeline('fill-mask') returns: a list of predictions for a text with one mask, "
                               "a list of such lists for several masks, and a list per text when the input is a list.",
                "content": {"application/json": {"schema": {"type": "array", "items": {
                    "oneOf": [_PREDICTION, {"type": "array", "items": _PREDICTION}, {"type": "array"}]}},
                    "example": [{"score": 0.91, "token": 812, "token_str": " capital",
                                 "sequence": "Paris is the capital of France."}]}}},
        "4XX": {"description": "Bad input: {\"error\": \"what is wrong\"}",
                "content": {"application/json": {"schema": {"type": "object",
                                                            "properties": {"error": {"type": "string"}}}}}},
        "503": {"description": "Loading, or the queue is full: retry"},
    },
}


def make_app(model: str | FillMask, limits: Limits = Limits(), max_batch: int = 32, window_ms: float = 5.0,
             max_queue: int = 256, api_key: str | None = None):
    """The HTTP app. With a model name, the model loads in the background after start-up and
    /health says 503 until it is ready; with a FillMask it is ready at once.

    Args:
        api_key: when set, every route but /health needs `Authorization: Bearer API_KEY` (401 otherwise).

    Example:
        >>> app = make_app("path/to/model")  # doctest: +SKIP
        >>> serve(app, "127.0.0.1", 8000)  # doctest: +SKIP
    """
    state: dict[str, Any] = {"batcher": None, "error": None}
    name = model if isinstance(model, str) else getattr(model.model, "name_or_path", "")
    metrics = Metrics(max_batch)
    expected = f"Bearer {api_key}".encode() if api_key is not None else None

    async def load() -> None:
        try:
            if isinstance(model, FillMask):
                filler = model
            else:
                filler = await asyncio.get_running_loop().run_in_executor(
                    None, lambda: FillMask.from_pretrained(model, batch_size=max_batch, safetensors_only=True))
            metrics.load_seconds.set(filler.load_seconds or 0.0)
            batcher = Batcher(filler, max_batch=max_batch, window_s=window_ms / 1000, max_queue=max_queue,
                              on_batch=metrics.batch_texts.observe)
            metrics.queue_depth.set_function(batcher.queue.qsize)
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

    app = FastAPI(title="mlmtune", summary="Fill masks: mlmtune's own shape and the Inference API's",
                  lifespan=lifespan, docs_url="/docs", redoc_url=None, openapi_url="/openapi.json")
    app.state.mlmtune = state
    app.state.metrics = metrics

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.middleware("http")
    async def count_and_guard(request: Request, call_next):
        t0 = time.perf_counter()
        route = metrics.route(request.url.path)
        if expected is not None and request.url.path != "/health" and not hmac.compare_digest(
                request.headers.get("authorization", "").encode(), expected):
            response = JSONResponse({"error": "missing or wrong API key: send the header 'Authorization: Bearer KEY'"},
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
        else:
            response = await call_next(request)
        metrics.requests.labels(route, request.method, str(response.status_code)).inc()
        if request.method == "POST" and route in ("/", "/fill"):
            metrics.latency.labels(route).observe(time.perf_counter() - t0)
        return response

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

    @app.get("/metrics", include_in_schema=False)
    async def scrape():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground():
        return _page()

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

    for path in ("/fill", "/"):  # POST / is where Inference API clients send, given the server's URL
        app.post(path, summary="Fill the masks of one text or a list of texts", openapi_extra=FILL_OPENAPI)(fill)
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
