"""The HTTP server: every endpoint and every 4xx, /fill against pipeline("fill-mask"), the queue
bound, and the playground in a real headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from pipeline_compare import assert_same_as_pipeline

from mlmtune.fill import FillMask
from mlmtune.serve import Limits, make_app

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402


@pytest.fixture(scope="module")
def filler(tiny_model_dir):
    return FillMask.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    from transformers import pipeline

    return pipeline("fill-mask", model=str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def client(filler):
    with TestClient(make_app(filler, limits=Limits(max_body_bytes=4000, max_chars=300, max_masks=3))) as c:
        yield c


@pytest.mark.parametrize("body", [
    {"text": "The <mask> statement is used in a loop."},
    {"text": "The <mask> statement is used in a <mask>.", "top_k": 3},
    {"text": ["A <mask> is defined.", "The <mask> keyword."], "top_k": 2},
    {"text": ["Only <mask> here."]},
    {"text": "The <mask> statement.", "top_k": 3, "targets": ["Ġloop", "Ġdef", "Ġthe"]},
])
def test_fill_matches_the_pipeline(client, pipe, body):
    r = client.post("/fill", json=body)
    assert r.status_code == 200, r.text
    kwargs = {k: v for k, v in body.items() if k != "text"}
    assert_same_as_pipeline(r.json(), pipe(body["text"], **kwargs))


def test_both_mask_spellings(client, pipe):
    a = client.post("/fill", json={"text": "The [MASK] statement."}).json()  # BERT's spelling, RoBERTa model
    assert_same_as_pipeline(a, pipe("The <mask> statement."))


def test_health_info_and_page(client, filler):
    assert client.get("/health").json() == {"status": "ok"}
    info = client.get("/info").json()
    assert info["mask_token"] == "<mask>" and info["max_length"] == 64
    assert info["precision"] == "fp32" and info["device"] == "cpu"
    page = client.get("/")
    assert page.status_code == 200 and "<form" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from a CDN


@pytest.mark.parametrize("body, status, message", [
    ({"text": "No mask at all."}, 422, "has no mask"),
    ({"text": "<mask> <mask> <mask> <mask>"}, 422, "has 4 masks; the limit is 3"),
    ({"text": "<mask> " + "x" * 400}, 413, "is 407 characters; the limit is 300"),
    ({"text": "<mask> " + "word " * 58}, 422, "tokens long; the model takes at most 64"),
    ({"text": "A <mask>.", "top_k": 0}, 422, '"top_k" must be an integer from 1 to 100'),
    ({"text": "A <mask>.", "top_k": 101}, 422, '"top_k" must be an integer from 1 to 100'),
    ({"text": "A <mask>.", "top_k": "5"}, 422, '"top_k" must be an integer'),
    ({"text": 42}, 422, '"text" must be a string or a non-empty list of strings'),
    ({"text": []}, 422, '"text" must be a string or a non-empty list of strings'),
    ({"txt": "A <mask>."}, 422, "unknown field(s): txt"),
    ({"text": "A <mask>.", "targets": "loop"}, 422, '"targets" must be a non-empty list of words'),
    ({"text": " "}, 422, "is empty"),
])
def test_bad_requests(client, body, status, message):
    r = client.post("/fill", json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_malformed_json_and_oversized_body(client):
    r = client.post("/fill", content=b'{"text": "A <mask>.",', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"].startswith("malformed JSON")
    r = client.post("/fill", content=json.dumps({"text": "<mask>" + " a" * 3000}).encode(),
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and "the limit is 4,000" in r.json()["error"]


def test_a_full_queue_answers_503_at_once(filler):
    """While the model is busy, the queue (bound 1) holds one request and refuses the rest."""
    app = make_app(filler, max_batch=1, max_queue=1)
    with TestClient(app) as c:
        batcher = app.state.mlmtune["batcher"]
        batcher.lock.acquire()  # the model is busy: the worker's forward pass waits here
        pool = ThreadPoolExecutor(6)
        try:
            futures = [pool.submit(c.post, "/fill", json={"text": f"Request {i} <mask>."}) for i in range(6)]
            deadline = time.monotonic() + 30
            while sum(f.done() for f in futures) < 4 and time.monotonic() < deadline:
                time.sleep(0.01)  # the refused ones come back while the lock is still held
            refused = [f.result() for f in futures if f.done()]
            assert len(refused) >= 4 and all(r.status_code == 503 for r in refused)
            assert "busy" in refused[0].json()["error"]
        finally:
            batcher.lock.release()  # before waiting for the pool: the held requests need it
            pool.shutdown(wait=True)
        statuses = sorted(f.result().status_code for f in futures)
        assert statuses.count(200) >= 1 and statuses.count(503) >= 4


def test_health_says_loading_until_the_model_is_in(tiny_model_dir, monkeypatch):
    gate = threading.Event()
    real = FillMask.from_pretrained

    def slow(*a, **k):
        gate.wait(30)
        return real(*a, **k)

    monkeypatch.setattr(FillMask, "from_pretrained", slow)
    with TestClient(make_app(str(tiny_model_dir))) as c:
        assert c.get("/health").status_code == 503
        assert c.post("/fill", json={"text": "A <mask>."}).status_code == 503
        gate.set()
        deadline = time.monotonic() + 30
        while c.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert c.get("/health").json() == {"status": "ok"}
        assert c.post("/fill", json={"text": "A <mask>."}).status_code == 200


@pytest.fixture()
def live_server(filler):
    """The app on a free loopback port, in a thread."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(make_app(filler), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="no chromium (CI installs it)")
def test_playground_in_a_real_browser(live_server, pipe):
    from playwright.sync_api import sync_playwright

    text = "The <mask> statement is used in a loop."
    expected = pipe(text, top_k=5)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        page = browser.new_page()
        page.goto(live_server + "/")
        page.wait_for_function("document.getElementById('meta').textContent.includes('mask token')")
        page.fill("#text", text)
        page.fill("#topk", "5")
        page.click("#submit")
        page.wait_for_selector(".candidate")
        tokens = page.locator(".candidate .token").all_text_contents()
        scores = page.locator(".candidate .score").all_text_contents()
        filled = page.locator("#filled").text_content()
        browser.close()
    assert tokens == [p["token_str"] for p in expected]
    assert scores == [f"{100 * p['score']:.1f}%" for p in expected]
    assert filled == expected[0]["sequence"]
