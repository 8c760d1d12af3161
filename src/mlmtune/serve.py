"""Fill masks over HTTP: `make_app()` builds the app, `serve()` binds a port.

Concurrent requests are collected for a short window and filled in one forward pass (`batcher.py`);
every request is checked first by one pure function (`api.parse_fill`), and every limit answers
with a 4xx JSON body `{"error": "..."}` that says what is wrong.

`POST /` and `POST /fill` take mlmtune's `{"text": ...}` and the Inference API's `{"inputs": ...,
"parameters": {...}}`, so `huggingface_hub.InferenceClient(model=URL).fill_mask` works unchanged.
`GET /metrics` is for Prometheus; with an API key every route but `/health` needs it.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import ipaddress
import socket
import sys
import time
from contextlib import asynccontextmanager
from importlib import resources

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from mlmtune.api import FILL_OPENAPI, SCORE_OPENAPI, BadRequest, Limits, parse_fill, parse_score
from mlmtune.batcher import Batcher
from mlmtune.errors import MlmtuneError
from mlmtune.fill import FillMask
from mlmtune.scoring import Scorer


class Metrics:
    """What Prometheus scrapes from GET /metrics; one registry per app, so apps never share counts."""

    ROUTES = ("/", "/fill", "/score", "/health", "/info", "/metrics", "/docs", "/openapi.json")
    WORK = ("/", "/fill", "/score")  # the routes whose latency is measured

    def __init__(self, max_batch: int):
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


DRAIN_LIMIT = 64 * 2**20  # a body over the limit is read and dropped up to this, so the client reads the 413


async def read_body(request: Request, limits: Limits) -> bytes:
    """The request body, read as it streams in; BadRequest(413) once it passes the limit (declared or not).

    The rest of a body over the limit is read and dropped (up to `DRAIN_LIMIT`) before the answer: a server
    that answers and closes while the client is still sending makes the client see a reset connection, not
    the 413. Memory holds at most the limit."""
    declared = request.headers.get("content-length")
    size = int(declared) if declared and declared.isdigit() else None
    chunks, seen, over = [], 0, size is not None and size > limits.max_body_bytes
    if not (over and size >= DRAIN_LIMIT):
        async for chunk in request.stream():
            seen += len(chunk)
            over = over or seen > limits.max_body_bytes
            if over and seen >= DRAIN_LIMIT:
                break
            if not over:
                chunks.append(chunk)
    if over:
        raise BadRequest(413, f"request body is {size or seen:,} bytes{'' if size else ' or more'}; the limit is "
                              f"{limits.max_body_bytes:,}")
    return b"".join(chunks)


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


class ModelSlot:
    """The server's model: loading (in the background, when given a name), ready (a `Batcher` in front of
    it), or failed (and why); `/health` reports which."""

    def __init__(self, model: str | FillMask, max_batch: int, window_ms: float, max_queue: int, metrics: Metrics):
        self.model, self.max_batch, self.window_s, self.max_queue = model, max_batch, window_ms / 1000, max_queue
        self.metrics = metrics
        self.batcher: Batcher | None = None  # fills
        self.scores: Batcher | None = None  # scores, sharing the fills' lock: one forward pass at a time
        self.filler: FillMask | None = None
        self.scorer: Scorer | None = None
        self.error: str | None = None
        self.name = model if isinstance(model, str) else getattr(model.model, "name_or_path", "")

    async def load(self) -> None:
        try:
            if isinstance(self.model, FillMask):
                filler = self.model
            else:
                filler = await asyncio.get_running_loop().run_in_executor(
                    None, lambda: FillMask.from_pretrained(self.model, batch_size=self.max_batch,
                                                           safetensors_only=True))
            self.metrics.load_seconds.set(filler.load_seconds or 0.0)
            batcher = Batcher(filler.fill_batch, max_batch=self.max_batch, window_s=self.window_s,
                              max_queue=self.max_queue, on_batch=self.metrics.batch_texts.observe)
            self.scorer = Scorer(filler.model, filler.tokenizer, batch_size=64, device=filler.device)
            scores = Batcher(self._score, max_batch=self.max_batch, window_s=self.window_s, max_queue=self.max_queue,
                             on_batch=self.metrics.batch_texts.observe, lock=batcher.lock)
            self.metrics.queue_depth.set_function(lambda: batcher.queue.qsize() + scores.queue.qsize())
            batcher.start()
            scores.start()
            self.filler, self.batcher, self.scores = filler, batcher, scores
        except MlmtuneError as e:
            self.error = str(e)
        except Exception as e:  # a task that dies silently would leave /health at "loading" for ever
            self.error = f"the model failed to load: {type(e).__name__}: {e}"

    @asynccontextmanager
    async def lifespan(self, app):
        if isinstance(self.model, FillMask):
            await self.load()  # ready before the first request
            loader = None
        else:  # the port answers at once; /health says "loading" until the model is in
            loader = asyncio.get_running_loop().create_task(self.load())
        yield
        if loader:
            loader.cancel()
        for batcher in (self.batcher, self.scores):
            if batcher:
                await batcher.stop()

    def _score(self, items: list[tuple]) -> list:
        """(text, encoding, metric) items -> their scores, the items of each metric in one call (batched)."""
        out: list = [None] * len(items)
        for metric in {m for _, _, m in items}:
            idx = [i for i, item in enumerate(items) if item[2] == metric]
            results = self.scorer.score_encoded([items[i][0] for i in idx], [items[i][1] for i in idx], metric)
            for i, r in zip(idx, results):
                out[i] = r
        return out


def make_app(model: str | FillMask, limits: Limits | None = None, max_batch: int = 32, window_ms: float = 5.0,
             max_queue: int = 256, api_key: str | None = None):
    """The HTTP app. With a model name, the model loads in the background after start-up and
    /health says 503 until it is ready; with a FillMask it is ready at once.

    Args:
        api_key: when set, every route but /health needs `Authorization: Bearer API_KEY` (401 otherwise).

    Example:
        >>> app = make_app("path/to/model")  # doctest: +SKIP
        >>> serve(app, "127.0.0.1", 8000)  # doctest: +SKIP
    """
    limits = limits or Limits()
    metrics = Metrics(max_batch)
    slot = ModelSlot(model, max_batch, window_ms, max_queue, metrics)
    app = FastAPI(title="mlmtune", summary="Fill masks: mlmtune's own shape and the Inference API's",
                  lifespan=slot.lifespan, docs_url="/docs", redoc_url=None, openapi_url="/openapi.json")
    app.state.mlmtune, app.state.metrics = slot, metrics
    expected = f"Bearer {api_key}".encode() if api_key is not None else None

    @app.middleware("http")
    async def count_and_guard(request: Request, call_next):
        t0 = time.perf_counter()
        route = metrics.route(request.url.path)
        if expected is not None and request.url.path != "/health" and not hmac.compare_digest(
                request.headers.get("authorization", "").encode(), expected):
            response = _error(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                              **{"WWW-Authenticate": "Bearer"})
        else:
            response = await call_next(request)
        metrics.requests.labels(route, request.method, str(response.status_code)).inc()
        if request.method == "POST" and route in Metrics.WORK:
            metrics.latency.labels(route).observe(time.perf_counter() - t0)
        return response

    _add_routes(app, slot, metrics, limits)
    return app


def _add_routes(app: FastAPI, slot: ModelSlot, metrics: Metrics, limits: Limits) -> None:
    @app.get("/health")
    async def health():
        if slot.batcher is not None:
            return {"status": "ok"}
        if slot.error:
            return _error(500, slot.error)
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/info")
    async def info():
        if slot.batcher is None:
            return _error(503, "the model is still loading")
        f = slot.filler
        return {"model": slot.name, "model_type": f.model.config.model_type, "mask_token": f.tokenizer.mask_token,
                "max_length": f.max_length, "device": str(f.device), "precision": f.precision,
                "max_batch": slot.max_batch, "limits": limits.__dict__}

    @app.get("/metrics", include_in_schema=False)
    async def scrape():
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground():
        return resources.files("mlmtune").joinpath("playground.html").read_text(encoding="utf-8")

    async def fill(request: Request):
        batcher = slot.batcher
        if batcher is None:
            return _error(503, "the model is still loading; retry when GET /health says ok")
        try:
            req = parse_fill(await read_body(request, limits), limits, slot.filler)
        except BadRequest as e:
            return _error(e.status, str(e))
        if req.words:  # several forward passes (a beam search, whole words): between the batches
            f = slot.filler
            results = await batcher.run_alone(lambda: [
                f.fill_words(t, ids, req.top_k, req.targets, req.max_pieces, req.joint, req.beam_size)
                for t, ids in zip(req.texts, req.encoded)])
        else:
            try:  # the batch's top-k come back to the host at once, already the pipeline's answers
                results = await batcher.submit([(ids, req.top_k, req.target_ids) for ids in req.encoded],
                                               lambda answers: answers)
            except asyncio.QueueFull:
                return _error(503, f"the server is busy ({batcher.queue.maxsize} requests waiting); retry shortly")
        # exactly what pipeline("fill-mask") returns: a list of one text gives that text's result
        return results if req.is_list and len(results) > 1 else results[0]

    @app.post("/score", summary="Pseudo-log-likelihood of one text or a list of texts",
              openapi_extra=SCORE_OPENAPI)
    async def score(request: Request):
        scores = slot.scores
        if scores is None:
            return _error(503, "the model is still loading; retry when GET /health says ok")
        try:
            req = parse_score(await read_body(request, limits), limits, slot.scorer)
        except BadRequest as e:
            return _error(e.status, str(e))
        try:
            results = await scores.submit([(t, enc, req.metric) for t, enc in zip(req.texts, req.encodings)],
                                          lambda outs: [r.as_dict(req.per_word) for r in outs])
        except asyncio.QueueFull:
            return _error(503, f"the server is busy ({scores.queue.maxsize} requests waiting); retry shortly")
        return results if req.is_list else results[0]

    for path in ("/fill", "/"):  # POST / is where Inference API clients send, given the server's URL
        app.post(path, summary="Fill the masks of one text or a list of texts", openapi_extra=FILL_OPENAPI)(fill)


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
    sock = bind(host, port)
    bound = sock.getsockname()
    print(f"mlmtune serve: http://{host}:{bound[1]}/ (Ctrl-C stops)", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info"))
    server.run(sockets=[sock])
