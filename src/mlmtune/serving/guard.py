"""What every request to `mlmtune serve` passes through before a route sees it, and on its way out.

In: a connection has `read_timeout` seconds to send each request's headers (`TimedH11Protocol`) and again its
body (`read_body`, which also refuses a body over the limit as soon as it is announced or passes it); then
`Guard` refuses, in this order, a request beyond `limit_concurrency` in flight (503), a Host header not allowed
(400, through Starlette's `TrustedHostMiddleware`: a page on another site that rebinds its name to this address
gets nothing), a missing or wrong API key (401, compared in constant time), and a POST whose body is not
`application/json` (415: a page on another site can send a form or `text/plain` without asking, but never JSON).

Out: every response carries `SECURITY_HEADERS`; every error is `{"error": "..."}` JSON (a plain-text one from a
middleware is rewritten), an exception a route did not catch is a JSON 500 and one line in the log that names
its type and place, never the client's input; and every response is counted in `Metrics`, whose labels come
from fixed sets only, so that no client can add series.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import traceback

import h11
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from mlmtune.serving.payloads import BadRequest, Limits

log = logging.getLogger("mlmtune.serving.serve")

SECURITY_HEADERS = [(b"content-security-policy", b"default-src 'self'"), (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY")]
METHODS = ("GET", "POST", "HEAD", "OPTIONS")  # any other method is counted as "other"


def error(status: int, message: str, **headers: str) -> JSONResponse:
    """The one shape of every error: `{"error": message}`."""
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


class Metrics:
    """What Prometheus scrapes from GET /metrics; one registry per app, so apps never share counts."""

    ROUTES = ("/", "/fill", "/score", "/health", "/info", "/metrics", "/docs", "/docs.js", "/openapi.json",
              "/playground.js", "/playground.css")
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


def _is_json(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == "application/json"


class Guard:
    """The ASGI middleware around the app: the refusals, the headers, the JSON errors, the counts.

    Args:
        api_key: when set, every route but `open_paths` (GET) and /health needs `Authorization: Bearer KEY`.
        allowed_hosts: the Host names the server answers to (`*.example.com` patterns allowed); None: any.
        limit_concurrency: requests in flight beyond this get 503 at once; None: no limit.
        open_paths: pages a browser must load without a key (the playground: it asks for the key itself).
    """

    def __init__(self, app, metrics: Metrics, api_key: str | None = None, allowed_hosts: list[str] | None = None,
                 limit_concurrency: int | None = None, open_paths: tuple[str, ...] = ()):
        self.app, self.metrics, self.limit, self.open_paths = app, metrics, limit_concurrency, open_paths
        self.expected = f"Bearer {api_key}".encode() if api_key is not None else None
        self.hosts = TrustedHostMiddleware(self._admit, allowed_hosts=list(allowed_hosts or ["*"]), www_redirect=False)
        self.in_flight = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        route = self.metrics.route(scope["path"])
        method = scope["method"] if scope["method"] in METHODS else "other"
        out = _Out(send, scope)
        self.in_flight += 1
        try:
            if self.limit is not None and self.in_flight > self.limit:
                busy = f"the server is busy (--limit-concurrency {self.limit} requests in flight); retry shortly"
                await error(503, busy)(scope, receive, out.send)
            else:
                await self.hosts(scope, receive, out.send)
        except ClientDisconnect:  # the client left (mid-body, or before its answer): nobody to answer, one line
            log.info("%s %s: the client left before its answer", method, route)
            out.status = 499
        except Exception as e:  # a bug, not the client's fault: one line, without the client's input
            where = traceback.extract_tb(e.__traceback__)[-1]
            log.error("%s %s answered 500: %s at %s:%d", method, route, type(e).__name__, where.filename, where.lineno)
            if not out.started:
                await error(500, "internal error; the server's log says where")(scope, receive, out.send)
            out.status = 500
        finally:
            self.in_flight -= 1
            self.metrics.requests.labels(route, method, str(out.status)).inc()
            if scope["method"] == "POST" and route in Metrics.WORK:
                self.metrics.latency.labels(route).observe(time.perf_counter() - t0)

    async def _admit(self, scope, receive, send) -> None:
        """After the Host check: the key, then the body's type."""
        headers = {k: v for k, v in scope["headers"]}
        path, method = scope["path"], scope["method"]
        is_open = path == "/health" or (method in ("GET", "HEAD") and path in self.open_paths)
        if self.expected is not None and not is_open and not hmac.compare_digest(
                headers.get(b"authorization", b""), self.expected):
            await error(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                        **{"WWW-Authenticate": "Bearer"})(scope, receive, send)
        elif method == "POST" and not _is_json(headers.get(b"content-type", b"").decode("latin-1")):
            await error(415, "the body must be JSON, sent with the header 'Content-Type: application/json'",
                        **{"Connection": "close"})(scope, receive, send)
        else:
            await self.app(scope, receive, send)


class _Out:
    """The response on its way out: the security headers added, a plain-text error rewritten as JSON, the status
    kept for the count."""

    def __init__(self, send, scope):
        self._send, self.scope = send, scope
        self.status, self.started = 500, False
        self._held: dict | None = None  # the start of a plain-text error, until its body is in
        self._body = b""

    async def send(self, message) -> None:
        if message["type"] == "http.response.start":
            self.started, self.status = True, message["status"]
            headers = list(message.get("headers", []))
            names = {k.lower() for k, _ in headers}
            headers += [(k, v) for k, v in SECURITY_HEADERS if k not in names]
            message = {**message, "headers": headers}
            content_type = dict((k.lower(), v) for k, v in headers).get(b"content-type", b"")
            if self.status >= 400 and not content_type.startswith(b"application/json"):
                self._held = message
                return
        elif message["type"] == "http.response.body" and self._held is not None:
            self._body += message.get("body", b"")
            if message.get("more_body"):
                return
            text = self._body.decode("utf-8", "replace").strip() or "error"
            if self.status == 400 and text == "Invalid host header":  # TrustedHostMiddleware's
                host = dict(self.scope["headers"]).get(b"host", b"").decode("latin-1")
                text = (f"this server does not answer to the Host {host!r}: ask for it by an allowed name "
                        f"(--allowed-hosts)")
            body = json.dumps({"error": text}).encode()
            headers = [(k, v) for k, v in self._held["headers"] if k.lower() not in (b"content-type",
                                                                                     b"content-length")]
            headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await self._send({**self._held, "headers": headers})
            message = {"type": "http.response.body", "body": body}
        await self._send(message)


async def read_body(request: Request, limits: Limits, timeout_s: float) -> bytes:
    """The request body, read as it streams in, for at most `timeout_s` seconds.

    Raises:
        BadRequest: 413 as soon as the body is announced (Content-Length) or found (as it streams) larger than the
            limit, without reading the rest; 408 when it has not all arrived in time; 499 when the client left.
    """
    declared = request.headers.get("content-length")
    size = int(declared) if declared and declared.isdigit() else None
    if size is not None and size > limits.max_body_bytes:
        raise BadRequest(413, f"request body is {size:,} bytes; the limit is {limits.max_body_bytes:,}")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    chunks, seen = [], 0
    while True:
        try:
            message = await asyncio.wait_for(request.receive(), max(deadline - loop.time(), 0))
        except TimeoutError:
            raise BadRequest(408, f"the request body did not arrive within {timeout_s:g} s (--read-timeout)") from None
        if message["type"] == "http.disconnect":
            raise BadRequest(499, "the client left while sending the body")
        chunk = message.get("body", b"")
        seen += len(chunk)
        if seen > limits.max_body_bytes:
            raise BadRequest(413, f"request body is {seen:,} bytes or more; the limit is {limits.max_body_bytes:,}")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class TimedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, with a deadline for each request's headers: a connection that sends nothing,
    or its headers a byte at a time, is closed after `header_timeout` seconds (with a JSON 408 when part of a
    request had come). uvicorn itself only times out a connection idle after a response (`timeout_keep_alive`)."""

    def __init__(self, *args, header_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's headers are in: the route's own limits apply from here
            self._disarm()

    def on_response_complete(self) -> None:
        self._arm()  # first: a pipelined request that starts within disarms it
        super().on_response_complete()

    def _arm(self) -> None:
        self._disarm()
        self._timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _headers_late(self) -> None:
        self._timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return
        if self.conn.trailing_data[0]:  # part of a request came: say why it is dropped
            body = json.dumps({"error": f"the request's headers did not arrive within {self.header_timeout:g} s "
                                        f"(--read-timeout)"}).encode()
            head = [b"HTTP/1.1 408 Request Timeout", b"content-type: application/json",
                    b"content-length: " + str(len(body)).encode(), b"connection: close",
                    *(k + b": " + v for k, v in SECURITY_HEADERS)]
            self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        try:
            self.conn.send(h11.ConnectionClosed())
        except h11.LocalProtocolError:
            pass
        self.transport.close()
