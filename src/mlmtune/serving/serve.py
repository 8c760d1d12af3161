"""Fill masks over HTTP: `make_app()` builds the app, `serve()` binds a port.

Concurrent requests are collected for a short window and filled in one forward pass (`batcher.py`); every
request body is checked first by one pure function (`payloads.parse_fill`, `payloads.parse_score`), in a worker
thread, so that a large body never holds the event loop; every limit answers with a 4xx JSON body
`{"error": "..."}` that says what is wrong. What each request passes before it reaches a route (the host, the key,
the body's type, the read timeouts, the counts and the headers of every response) is `guard.py`.

`POST /` and `POST /fill` take mlmtune's `{"text": ...}` and the Inference API's `{"inputs": ...,
"parameters": {...}}`, so `huggingface_hub.InferenceClient(model=URL).fill_mask` works unchanged.
`GET /metrics` is for Prometheus; with an API key every route but `/health` and the playground's page needs it.
"""

from __future__ import annotations

import asyncio
import copy
import errno
import functools
import ipaddress
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from mlmtune.errors import MlmtuneError
from mlmtune.inference.fill import FillMask
from mlmtune.inference.scoring import Scorer
from mlmtune.serving.batcher import Batcher, Stop, Stopped, Turn
from mlmtune.serving.guard import Guard, Metrics, TimedH11Protocol, error, read_body
from mlmtune.serving.payloads import FILL_OPENAPI, SCORE_OPENAPI, BadRequest, Limits, parse_fill, parse_score

KEEP_ALIVE_S = 5  # an idle connection is closed this long after its last response
PAGES = {"/": ("playground.html", "text/html; charset=utf-8"),  # the playground: open without a key, it asks for it
         "/playground.js": ("playground.js", "text/javascript; charset=utf-8"),
         "/playground.css": ("playground.css", "text/css; charset=utf-8")}


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


def default_hosts(host: str) -> list[str]:
    """The Host names a server bound to `host` answers by default: that address and localhost (in its three
    spellings); for a wildcard address (0.0.0.0, ::), this machine's names too."""
    names = ["localhost", "127.0.0.1", "[::1]"]
    if host in ("0.0.0.0", "::", ""):
        names += [socket.gethostname(), socket.getfqdn()]
    else:
        names.append(f"[{host}]" if ":" in host else host)
    return list(dict.fromkeys(n.lower() for n in names))


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
        # bodies are parsed and tokenized here, off the event loop, and apart from the model's threads
        self.parsers = ThreadPoolExecutor(2, thread_name_prefix="mlmtune-parse")

    async def load(self) -> None:
        try:
            if isinstance(self.model, FillMask):
                filler = self.model
            else:
                filler = await asyncio.get_running_loop().run_in_executor(
                    None, lambda: FillMask.from_pretrained(self.model, batch_size=self.max_batch,
                                                           safetensors_only=True))
            filler.vocab  # noqa: B018  built once here, not by the first request
            self.metrics.load_seconds.set(filler.load_seconds or 0.0)
            batcher = Batcher(functools.partial(_fill, filler), max_batch=self.max_batch, window_s=self.window_s,
                              max_queue=self.max_queue, on_batch=self.metrics.batch_texts.observe)
            self.scorer = Scorer(filler.model, filler.tokenizer, batch_size=64, device=filler.device)
            scores = Batcher(self._score, max_batch=self.max_batch, window_s=self.window_s, max_queue=self.max_queue,
                             on_batch=self.metrics.batch_texts.observe, lock=batcher.lock)
            self.metrics.queue_depth.set_function(lambda: batcher.depth() + scores.depth())
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
        self.parsers.shutdown(wait=False, cancel_futures=True)

    def _score(self, items: list[tuple], turn: Turn) -> list:
        """(text, encoding, metric) items -> their scores, the items of each metric in one call (batched)."""
        out: list = [None] * len(items)
        for metric in {m for _, _, m in items}:
            idx = [i for i, item in enumerate(items) if item[2] == metric]
            results = self.scorer.score_encoded([items[i][0] for i in idx], [items[i][1] for i in idx], metric, turn)
            for i, r in zip(idx, results):
                out[i] = r
        return out


def _fill(filler: FillMask, items: list, turn: Turn) -> list:
    with turn:  # one forward pass for the batch
        return filler.fill_batch(items)


def make_app(model: str | FillMask, limits: Limits | None = None, max_batch: int = 32, window_ms: float = 5.0,
             max_queue: int = 256, api_key: str | None = None, request_timeout: float = 30.0,
             read_timeout: float = 10.0, allowed_hosts: list[str] | None = None,
             limit_concurrency: int | None = None, docs: bool = False):
    """The HTTP app. With a model name, the model loads in the background after start-up and
    /health says 503 until it is ready; with a FillMask it is ready at once.

    Args:
        api_key: when set, every route but /health and the playground's page needs `Authorization: Bearer API_KEY`
            (401 otherwise).
        request_timeout: seconds from a request's arrival to its answer; checked before each forward pass.
        read_timeout: seconds for a request's body to arrive (`serve` gives its headers as long).
        allowed_hosts: the Host names answered (`default_hosts`); None answers any.
        limit_concurrency: requests in flight beyond this get 503; None: no limit.
        docs: serve Swagger UI at /docs (its script and style come from a CDN, pinned by their hashes).

    Example:
        >>> app = make_app("path/to/model")  # doctest: +SKIP
        >>> serve(app, "127.0.0.1", 8000)  # doctest: +SKIP
    """
    limits = limits or Limits()
    metrics = Metrics(max_batch)
    slot = ModelSlot(model, max_batch, window_ms, max_queue, metrics)
    app = FastAPI(title="mlmtune", summary="Fill masks: mlmtune's own shape and the Inference API's",
                  lifespan=slot.lifespan, docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.mlmtune, app.state.metrics = slot, metrics

    @app.exception_handler(HTTPException)  # Starlette's 404 and 405, in the shape of every other error
    async def http_error(request: Request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail), **(exc.headers or {}))

    app.add_middleware(Guard, metrics=metrics, api_key=api_key, allowed_hosts=allowed_hosts,
                       limit_concurrency=limit_concurrency, open_paths=tuple(PAGES))
    _add_routes(app, slot, metrics, limits, request_timeout, read_timeout)
    if docs:
        _add_docs(app)
    return app


# Swagger UI, pinned: the browser checks each file against its hash (from the npm package swagger-ui-dist 5.35.0)
SWAGGER = "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5.35.0/"
SWAGGER_JS = "sha384-gjRm0bEPMeTmMh5jT2cHccIwCUZSTd8YC+j0d0sXw0MdGEfScduGpSyF3ZSSLkX9"
SWAGGER_CSS = "sha384-WlYgdmXYOOBWL5apwjDEZwN+U3HmXSSu5R6V5aGxEcf7z+KuRNwBhoxKVN1i3D5I"


def _add_docs(app: FastAPI) -> None:
    """GET /docs: Swagger UI over /openapi.json. Its script and style come from a CDN, each pinned by its hash;
    the page's own script is a file of ours (the policy allows no inline script)."""
    policy = (f"default-src 'self'; script-src 'self' {SWAGGER}; style-src 'self' {SWAGGER}; "
              f"img-src 'self' data:")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>mlmtune API</title>'
                f'<link rel="stylesheet" href="{SWAGGER}swagger-ui.css" integrity="{SWAGGER_CSS}" '
                f'crossorigin="anonymous"></head><body><div id="swagger-ui"></div>'
                f'<script src="{SWAGGER}swagger-ui-bundle.js" integrity="{SWAGGER_JS}" crossorigin="anonymous">'
                f'</script><script src="/docs.js"></script></body></html>')
        return HTMLResponse(page, headers={"Content-Security-Policy": policy})

    @app.get("/docs.js", include_in_schema=False)
    async def docs_js():
        return Response('SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});\n',
                        media_type="text/javascript; charset=utf-8", headers={"Content-Security-Policy": policy})


def _add_routes(app: FastAPI, slot: ModelSlot, metrics: Metrics, limits: Limits, request_timeout: float,
                read_timeout: float) -> None:
    _add_status_routes(app, slot, metrics, limits, request_timeout, read_timeout)
    _add_work_routes(app, slot, limits, request_timeout, read_timeout)


def _add_status_routes(app: FastAPI, slot: ModelSlot, metrics: Metrics, limits: Limits, request_timeout: float,
                       read_timeout: float) -> None:
    """GET /health, /info, /metrics, and the playground's page."""
    @app.get("/health")
    async def health():
        if slot.batcher is not None:
            return {"status": "ok", "runtime": slot.filler.runtime}
        if slot.error:
            return error(500, slot.error)
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/info")
    async def info():
        if slot.batcher is None:
            return error(503, "the model is still loading")
        f = slot.filler
        return {"model": slot.name, "model_type": f.model.config.model_type, "mask_token": f.tokenizer.mask_token,
                "max_length": f.max_length, "device": str(f.device), "precision": f.precision, "runtime": f.runtime,
                "max_batch": slot.max_batch, "limits": limits.__dict__,
                "request_timeout_s": request_timeout, "read_timeout_s": read_timeout}

    @app.get("/metrics", include_in_schema=False)
    async def scrape():
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    for path, (name, media_type) in PAGES.items():
        def page(name=name, media_type=media_type):
            return Response(resources.files("mlmtune.serving").joinpath(name).read_bytes(), media_type=media_type)

        app.get(path, include_in_schema=False)(page)


def _add_work_routes(app: FastAPI, slot: ModelSlot, limits: Limits, request_timeout: float,
                     read_timeout: float) -> None:
    """POST /fill (and /, where Inference API clients send) and POST /score."""
    async def answer(request: Request, parse, run):
        """The one sequence of a work route: read the body, parse it in a worker thread, run it with a deadline and
        a watch on the client, answer."""
        stop = Stop(request_timeout)
        try:
            body = await read_body(request, limits, read_timeout)
            req = await asyncio.get_running_loop().run_in_executor(slot.parsers, parse, body)
        except BadRequest as e:  # a body refused before its end is not read: the connection closes
            return error(e.status, str(e), **({"Connection": "close"} if e.status in (408, 413, 499) else {}))
        watch = asyncio.get_running_loop().create_task(_watch_client(request, stop))
        try:
            return await run(req, stop)
        except asyncio.QueueFull:
            return error(503, f"the server is busy ({slot.max_queue} requests waiting); retry shortly")
        except Stopped as e:
            return error(499 if e.client_left else 503, str(e))
        except MlmtuneError as e:  # what parsing could not see before the model ran
            return error(422, str(e))
        finally:
            watch.cancel()

    async def fill(request: Request):
        batcher, f = slot.batcher, slot.filler
        if batcher is None:
            return error(503, "the model is still loading; retry when GET /health says ok")

        def run_words(req, turn):
            return [f.fill_words(t, ids, req.top_k, req.targets, req.max_pieces, req.joint, req.beam_size,
                                 req.pieces[n] if req.pieces else None, turn)
                    for n, (t, ids) in enumerate(zip(req.texts, req.encoded))]

        async def run(req, stop):
            if req.words:  # several forward passes (a beam search, whole words), each between the batches
                results = await batcher.run_alone(functools.partial(run_words, req), stop)
            else:  # the batch's top-k come back to the host at once, already the pipeline's answers
                results = await batcher.submit([(ids, req.top_k, req.target_ids) for ids in req.encoded],
                                               lambda answers: answers, stop)
            # exactly what pipeline("fill-mask") returns: a list of one text gives that text's result
            return results if req.is_list and len(results) > 1 else results[0]

        return await answer(request, functools.partial(parse_fill, limits=limits, filler=f), run)

    @app.post("/score", summary="Pseudo-log-likelihood of one text or a list of texts",
              openapi_extra=SCORE_OPENAPI)
    async def score(request: Request):
        scores = slot.scores
        if scores is None:
            return error(503, "the model is still loading; retry when GET /health says ok")

        async def run(req, stop):
            results = await scores.submit([(t, enc, req.metric) for t, enc in zip(req.texts, req.encodings)],
                                          lambda outs: [r.as_dict(req.per_word) for r in outs], stop)
            return results if req.is_list else results[0]

        return await answer(request, functools.partial(parse_score, limits=limits, scorer=slot.scorer), run)

    for path in ("/fill", "/"):  # POST / is where Inference API clients send, given the server's URL
        app.post(path, summary="Fill the masks of one text or a list of texts", openapi_extra=FILL_OPENAPI)(fill)


async def _watch_client(request: Request, stop: Stop) -> None:
    """Set `stop.left` when the client's connection closes (the body is read by now: what comes next is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    stop.left.set()


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


def server_config(app, read_timeout: float = 10.0, log_level: str = "info") -> uvicorn.Config:
    """uvicorn's settings for `app`: HTTP/1.1 with a deadline for each request's headers (`read_timeout`), idle
    connections closed after `KEEP_ALIVE_S`, no WebSockets, and mlmtune's own log lines in uvicorn's format."""
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["loggers"]["mlmtune"] = {"handlers": ["default"], "level": "INFO"}
    return uvicorn.Config(app, http=functools.partial(TimedH11Protocol, header_timeout=read_timeout), ws="none",
                          timeout_keep_alive=KEEP_ALIVE_S, timeout_graceful_shutdown=5, log_level=log_level,
                          log_config=log_config)


def serve(app, host: str = "127.0.0.1", port: int = 8000, read_timeout: float = 10.0) -> None:
    """Bind the port (failing with one line when it cannot) and serve until interrupted."""
    sock = bind(host, port)
    bound = sock.getsockname()
    print(f"mlmtune serve: http://{host}:{bound[1]}/ (Ctrl-C stops)", file=sys.stderr, flush=True)
    uvicorn.Server(server_config(app, read_timeout)).run(sockets=[sock])
