"""The server under abuse (issue #34): a word fill cannot hold the model, a body cannot hold the event loop, made-up
methods cannot grow /metrics, a web page cannot drive a local server, every error is the documented JSON with the
security headers, and a connection that stalls is dropped. Each finding against a real server or the app itself."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import httpx
import pytest
from live import raw_exchange, running

from mlmtune.serving.batcher import Stopped
from mlmtune.serving.guard import SECURITY_HEADERS
from mlmtune.serving.payloads import Limits
from mlmtune.serving.serve import make_app

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

TEXT = "The <mask> statement is used in a loop."


def _words(n: int) -> list[str]:
    """n distinct made-up words, each of several pieces in the tiny model's vocabulary."""
    letters = "bcdfghjkmnpqvwxz"
    return [f"zq{letters[i % 16]}{letters[i // 16 % 16]}{letters[i // 256 % 16]}vx" for i in range(n)]


class Watched:
    """`filler.fill_words` watched: set `started` at its first call, count the texts it finished, keep what stopped
    it."""

    def __init__(self, filler, monkeypatch):
        self.started, self.ended = threading.Event(), threading.Event()
        self.finished, self.error = 0, None
        real = filler.fill_words

        def watched(*args, **kwargs):
            self.started.set()
            try:
                out = real(*args, **kwargs)
            except BaseException as e:
                self.error = e
                self.ended.set()
                raise
            self.finished += 1
            return out

        monkeypatch.setattr(filler, "fill_words", watched)


def _heavy(texts: int = 24, targets: int = 60) -> dict:
    """A word fill of texts x targets of several pieces: tens of seconds on the tiny model if it ran to its end."""
    return {"text": [TEXT] * texts, "targets": _words(targets), "top_k": 3}


def _post(body: dict, path: str = "/fill", host: str = "127.0.0.1") -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


# --- 1. word fills cannot hold the model ------------------------------------------------------------------------


def test_a_client_that_leaves_frees_the_model_and_small_fills_go_between(filler, monkeypatch):
    import socket

    watch = Watched(filler, monkeypatch)
    app = make_app(filler, limits=Limits(max_work=100_000), request_timeout=600)
    with running(app) as url:
        host, port = url.removeprefix("http://").split(":")
        heavy = socket.create_connection((host, int(port)), timeout=30)
        heavy.sendall(_post(_heavy()))
        assert watch.started.wait(30)
        t = time.perf_counter()
        small = httpx.post(url + "/fill", json={"text": TEXT}, timeout=30)  # between the heavy fill's passes
        assert small.status_code == 200 and time.perf_counter() - t < 5
        assert not watch.ended.is_set() and watch.finished < 24  # the heavy one is still running
        heavy.close()  # the client leaves
        assert watch.ended.wait(10), "the word fill went on after its client left"
        assert isinstance(watch.error, Stopped) and watch.error.client_left
        assert watch.finished < 24
        assert httpx.post(url + "/fill", json={"text": TEXT}, timeout=30).status_code == 200


def test_the_deadline_stops_a_word_fill_between_passes(filler, monkeypatch):
    watch = Watched(filler, monkeypatch)
    with TestClient(make_app(filler, limits=Limits(max_work=100_000), request_timeout=1.0)) as c:
        r = c.post("/fill", json=_heavy())
    assert r.status_code == 503 and "longer than the server's limit of 1 s (--request-timeout)" in r.json()["error"]
    assert isinstance(watch.error, Stopped) and not watch.error.client_left
    assert watch.finished < 24  # it stopped part-way, not at its end


def test_word_requests_count_against_max_queue(filler):
    """With --max-queue 2 and the model busy, two word requests are admitted and the rest get 503 at once."""
    app = make_app(filler, max_queue=2)
    body = {"text": "The <mask> is used in a <mask>.", "joint": True, "top_k": 2}
    with TestClient(app) as c:
        lock = app.state.mlmtune.batcher.lock
        lock.acquire()  # the model is busy
        pool = ThreadPoolExecutor(6)
        try:
            futures = {pool.submit(c.post, "/fill", json=body) for _ in range(6)}
            done: set = set()
            deadline = time.monotonic() + 30
            while len(done) < 4 and time.monotonic() < deadline:
                done |= wait(futures - done, timeout=deadline - time.monotonic(), return_when=FIRST_COMPLETED)[0]
            assert len(done) == 4 and all(f.result().status_code == 503 for f in done)
            assert "busy (2 requests waiting)" in next(iter(done)).result().json()["error"]
        finally:
            lock.release()
            pool.shutdown(wait=True)
        assert sorted(f.result().status_code for f in futures) == [200, 200, 503, 503, 503, 503]


def test_a_word_fill_over_the_work_bound_is_refused_with_the_bound(filler):
    with TestClient(make_app(filler)) as c:
        r = c.post("/fill", json={"text": [TEXT] * 64, "targets": _words(300)})
        assert r.status_code == 422
        assert "(64 texts x 300 targets of several pieces); the limit is 4,096" in r.json()["error"]
        r = c.post("/fill", json={"text": ["<mask> " * 8] * 64, "joint": True, "beam_size": 16})
        assert r.status_code == 422 and "rows through the model" in r.json()["error"]
    with TestClient(make_app(filler, limits=Limits(max_work=10))) as c:  # a score: a copy per token
        r = c.post("/score", json={"text": "The break statement exits the innermost loop."})
        assert r.status_code == 422 and "(1 texts; one copy per token); the limit is 10" in r.json()["error"]


# --- 2. parsing a body does not hold the event loop --------------------------------------------------------------


def test_health_answers_while_a_body_is_parsed(filler, monkeypatch):
    import mlmtune.serving.serve

    entered, release = threading.Event(), threading.Event()
    real = mlmtune.serving.serve.parse_fill

    def slow_parse(*args, **kwargs):  # a parse that takes as long as the test says
        entered.set()
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(mlmtune.serving.serve, "parse_fill", slow_parse)
    with TestClient(make_app(filler)) as c, ThreadPoolExecutor(2) as pool:
        fill = pool.submit(c.post, "/fill", json={"text": TEXT})
        try:
            assert entered.wait(30)
            assert pool.submit(c.get, "/health").result(timeout=10).json() == {"status": "ok", "runtime": "torch"}
        finally:
            release.set()
        assert fill.result(timeout=30).status_code == 200


# --- 3. /metrics: labels from fixed sets, every response counted ------------------------------------------------


def _series(c, headers=None) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    text = c.get("/metrics", headers=headers).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples if s.name == "mlmtune_requests_total"}


def test_made_up_methods_do_not_grow_metrics(filler):
    auth = {"Authorization": "Bearer k"}
    with TestClient(make_app(filler, api_key="k")) as c:
        before = _series(c, auth)
        for i in range(300):
            assert c.request(f"X{i}", f"/made/up/{i}").status_code == 401  # keyless strangers
            c.request(f"Y{i}", "/fill", headers=auth)
        after = _series(c, auth)
    new = set(after) - set(before)
    assert {dict(labels)["method"] for _, labels in after} <= {"GET", "POST", "HEAD", "OPTIONS", "other"}
    assert len(new) <= 3  # (other, other, 401), (/fill, other, 405), the first scrape's own series
    assert after[("mlmtune_requests_total", (("method", "other"), ("route", "other"), ("status", "401")))] == 300


# --- 4. a web page cannot drive a local server ----------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
def test_a_body_that_is_not_declared_json_gets_415(filler, content_type):
    headers = {"content-type": content_type} if content_type else {}
    with TestClient(make_app(filler)) as c:
        r = c.post("/fill", content=json.dumps({"text": TEXT}).encode(), headers=headers)
        assert r.status_code == 415 and "Content-Type: application/json" in r.json()["error"]
        r = c.post("/fill", content=json.dumps({"text": TEXT}).encode(),
                   headers={"content-type": "application/json; charset=utf-8"})
        assert r.status_code == 200
        preflight = c.options("/fill", headers={"origin": "https://elsewhere.example",
                                                "access-control-request-method": "POST"})
        assert preflight.status_code == 405 and "access-control-allow-origin" not in preflight.headers


def test_a_host_not_allowed_gets_400_and_nothing_of_the_model(filler):
    app = make_app(filler, allowed_hosts=["127.0.0.1", "localhost"])
    with TestClient(app, base_url="http://localhost:8000") as c:
        assert c.get("/info").status_code == 200
        for path, method in (("/info", "GET"), ("/fill", "POST"), ("/", "GET")):
            r = c.request(method, path, headers={"host": "rebound.attacker.example"}, json={"text": TEXT})
            assert r.status_code == 400 and "rebound.attacker.example" in r.json()["error"]
            assert "--allowed-hosts" in r.json()["error"] and "tiny" not in r.text


def test_default_hosts():
    from mlmtune.serving.serve import default_hosts

    assert default_hosts("127.0.0.1") == ["localhost", "127.0.0.1", "[::1]"]
    assert default_hosts("::1") == ["localhost", "127.0.0.1", "[::1]"]
    assert "10.1.2.3" in default_hosts("10.1.2.3")


# --- 5, 7. every error is the documented JSON, with the security headers ------------------------------------------


def test_a_bad_target_is_a_json_422(filler):
    with TestClient(make_app(filler)) as c:
        r = c.post("/fill", json={"text": "th<mask>", "targets": ["e ", "zzqq"]})
    assert r.status_code == 422 and "the target 'e ' does not stand as a word" in r.json()["error"]


def test_an_uncaught_error_is_a_json_500_counted_and_logged_in_one_line(filler, monkeypatch, caplog):
    def broken(items):
        raise RuntimeError("secret-client-input")

    monkeypatch.setattr(filler, "fill_batch", broken)
    with TestClient(make_app(filler), raise_server_exceptions=False) as c:
        with caplog.at_level("ERROR", logger="mlmtune.serving.serve"):
            r = c.post("/fill", json={"text": "secret-client-input <mask>"})
        series = _series(c)
    assert r.status_code == 500 and r.json() == {"error": "internal error; the server's log says where"}
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "mlmtune.serving.serve"]
    assert len(lines) == 1 and "\n" not in lines[0] and "RuntimeError" in lines[0]
    assert "secret" not in lines[0] and "POST /fill answered 500" in lines[0]
    assert series[("mlmtune_requests_total", (("method", "POST"), ("route", "/fill"), ("status", "500")))] == 1


def test_every_response_carries_the_security_headers(filler, monkeypatch):
    app = make_app(filler, api_key="k", limits=Limits(max_body_bytes=2000))
    auth = {"Authorization": "Bearer k"}
    with TestClient(app, raise_server_exceptions=False) as c:
        responses = [c.get("/health"), c.get("/"), c.get("/playground.js"), c.get("/info", headers=auth),
                     c.post("/fill", json={"text": TEXT}, headers=auth),  # 200
                     c.get("/info"),  # 401
                     c.get("/nowhere", headers=auth), c.delete("/fill", headers=auth),  # 404, 405
                     c.post("/fill", json={"text": "x" * 3000}, headers=auth),  # 413
                     c.post("/fill", content=b"{}", headers={**auth, "content-type": "text/plain"}),  # 415
                     c.post("/fill", json={"text": "no mask"}, headers=auth)]  # 422
        monkeypatch.setattr(filler, "fill_batch", lambda items: 1 / 0)
        responses.append(c.post("/fill", json={"text": TEXT}, headers=auth))  # 500
    assert [r.status_code for r in responses] == [200, 200, 200, 200, 200, 401, 404, 405, 413, 415, 422, 500]
    for r in responses:
        for name, value in SECURITY_HEADERS:
            assert r.headers[name.decode()] == value.decode(), (r.request.url, name)
        if r.status_code >= 400:
            assert list(r.json()) == ["error"], r.text


def test_requests_beyond_the_concurrency_limit_get_a_json_503(filler):
    app = make_app(filler, limit_concurrency=1)
    with TestClient(app) as c:
        batcher = app.state.mlmtune.batcher
        queued, submit = threading.Event(), batcher.submit

        def submit_and_say(*args, **kwargs):
            future = submit(*args, **kwargs)
            queued.set()
            return future

        batcher.submit = submit_and_say
        batcher.lock.acquire()  # the one request in flight waits for the model
        with ThreadPoolExecutor(1) as pool:
            try:
                held = pool.submit(c.post, "/fill", json={"text": TEXT})
                assert queued.wait(30)
                r = c.get("/health")
                assert r.status_code == 503 and "--limit-concurrency 1 requests in flight" in r.json()["error"]
            finally:
                batcher.lock.release()
            assert held.result(timeout=30).status_code == 200


# --- 6. a connection that stalls is dropped ------------------------------------------------------------------


def test_a_stalled_body_is_dropped_with_a_408(filler):
    with running(make_app(filler, read_timeout=0.5), read_timeout=0.5) as url:
        t = time.perf_counter()
        got, closed = raw_exchange(url, b"POST /fill HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                        b"Content-Length: 1000\r\n\r\n{\"text\": ")
        assert closed and time.perf_counter() - t < 15
        assert got.startswith(b"HTTP/1.1 408 ") and b"did not arrive within 0.5 s" in got


def test_stalled_headers_and_idle_connections_are_dropped(filler):
    with running(make_app(filler), read_timeout=0.5) as url:
        got, closed = raw_exchange(url, b"POST /fill HTTP/1.1\r\nHost: x\r\nContent-")
        assert closed and got.startswith(b"HTTP/1.1 408 ") and b"headers did not arrive within 0.5 s" in got
        got, closed = raw_exchange(url, b"")  # connects and says nothing
        assert closed and got == b""


def test_a_body_announced_over_the_limit_is_refused_before_it_is_sent(filler):
    with running(make_app(filler)) as url:
        got, closed = raw_exchange(url, b"POST /fill HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                        b"Content-Length: 50000000\r\n\r\n")
    assert closed and got.startswith(b"HTTP/1.1 413 ")
    assert got.endswith(b'{"error":"request body is 50,000,000 bytes; the limit is 64,000"}')


def test_a_client_that_left_mid_body_is_one_log_line_and_no_answer(filler, monkeypatch, caplog):
    """Starlette raises ClientDisconnect where a body read meets the client's leaving: one info line, no traceback,
    no 500 written to a closed connection, counted as 499."""
    import asyncio

    from starlette.requests import ClientDisconnect

    from mlmtune.serving import serve

    async def left(request, limits, timeout):
        raise ClientDisconnect()

    monkeypatch.setattr(serve, "read_body", left)
    app, sent = make_app(filler), []

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/fill", "raw_path": b"/fill", "query_string": b"",
             "root_path": "", "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")],
             "client": ("127.0.0.1", 5), "server": ("127.0.0.1", 80)}
    with TestClient(app) as c, caplog.at_level("INFO", logger="mlmtune.serving.serve"):  # started: the model loaded
        assert c.get("/health").status_code == 200
        asyncio.run(app(scope, receive, send))
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "mlmtune.serving.serve"]
    assert lines == ["POST /fill: the client left before its answer"]
    assert not any(rec.exc_info for rec in caplog.records)
    assert sent == []  # nothing written to a connection that is gone
