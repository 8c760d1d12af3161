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
from compare import assert_same_as_pipeline
from live import running

from mlmtune.inference.fill import FillMask
from mlmtune.serving.serve import Limits, make_app

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402


@pytest.fixture(scope="module")
def client(filler):
    with TestClient(make_app(filler, limits=Limits(max_body_bytes=4000, max_chars=300, max_masks=3))) as c:
        yield c


@pytest.mark.parametrize("body", [
    {"text": "The <mask> statement is used in a loop."},
    {"text": "The <mask> statement is used in a <mask>.", "top_k": 3},
    {"text": ["A <mask> is defined.", "The <mask> keyword."], "top_k": 2},
    {"text": ["Only <mask> here."]},
    {"text": "The <mask> statement.", "top_k": 3, "targets": ["Ġin", "Ġdef", "Ġthe"]},
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
    assert client.get("/health").json() == {"status": "ok", "runtime": "torch"}
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
        batcher = app.state.mlmtune.batcher
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
        assert c.get("/health").json() == {"status": "ok", "runtime": "torch"}
        assert c.post("/fill", json={"text": "A <mask>."}).status_code == 200


@pytest.fixture()
def live_server(filler):
    """The app on a free loopback port, in a thread."""
    with running(make_app(filler)) as url:
        yield url


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
        page.wait_for_function("() => document.getElementById('meta').textContent.includes('mask token')")
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


# --- the Inference API shape, /metrics, /openapi.json and the API key ---------------------------------


@pytest.mark.parametrize("path", ["/", "/fill"])
@pytest.mark.parametrize("body, kwargs", [
    ({"inputs": "The <mask> statement is used in a loop."}, {}),
    ({"inputs": "The <mask> statement.", "parameters": {"top_k": 3, "targets": ["Ġin", "Ġdef", "Ġthe"]}},
     {"top_k": 3, "targets": ["Ġin", "Ġdef", "Ġthe"]}),
    ({"inputs": ["A <mask> is defined.", "The <mask> keyword."], "parameters": {"top_k": 2}}, {"top_k": 2}),
    ({"inputs": "The <mask> statement.", "parameters": {"top_k": None, "targets": None}}, {}),  # client's nulls
])
def test_inference_api_shape_matches_the_pipeline(client, pipe, path, body, kwargs):
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    assert_same_as_pipeline(r.json(), pipe(body["inputs"], **kwargs))


@pytest.mark.parametrize("body, message", [
    ({"inputs": 7}, '"inputs" must be a string or a non-empty list of strings'),
    ({"inputs": "A <mask>.", "parameters": {"topk": 3}}, "unknown field(s) in parameters: topk"),
    ({"inputs": "A <mask>.", "parameters": [3]}, '"parameters" must be an object'),
    ({"inputs": "A <mask>.", "text": "A <mask>."}, "unknown field(s): text"),
    ({"inputs": "A <mask>.", "parameters": {"top_k": 0}}, '"top_k" must be an integer from 1 to 100'),
])
def test_inference_api_shape_errors(client, body, message):
    r = client.post("/", json=body)
    assert r.status_code == 422 and message in r.json()["error"], r.text


def test_openapi_describes_both_shapes(client):
    spec = client.get("/openapi.json").json()
    for path in ("/", "/fill"):
        body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        assert [s["title"] for s in body["schema"]["oneOf"]] == ["mlmtune", "Inference API"]
        assert body["examples"]["inference_api"]["value"]["inputs"].count("<mask>") == 1
    r = client.get("/docs")  # off unless asked for
    assert r.status_code == 404 and r.json() == {"error": "Not Found"}


def test_docs_when_asked_for_pin_their_files(filler):
    """--docs: Swagger UI's files from the CDN, each pinned by the hash of the npm package's file, under a policy
    that allows those files and nothing else from outside; no inline script."""
    import re

    from mlmtune.serving.serve import SWAGGER

    with TestClient(make_app(filler, docs=True)) as c:
        page = c.get("/docs")
        assert page.status_code == 200
        assert c.get("/docs.js").text.startswith('SwaggerUIBundle({url: "/openapi.json"')
    outside = re.findall(r'(?:src|href)="(https://[^"]+)"', page.text)
    assert outside == [SWAGGER + "swagger-ui.css", SWAGGER + "swagger-ui-bundle.js"]
    assert page.text.count('integrity="sha384-') == 2 and "<script>" not in page.text
    policy = page.headers["content-security-policy"]
    assert policy.startswith("default-src 'self'; ") and policy.count("https://") == 2 and "@5.35.0/" in policy


def test_non_loopback_host_needs_a_key_or_insecure(tiny_model_dir, capsys, monkeypatch):
    from mlmtune.cli import main
    from mlmtune.serving.serve import check_exposure

    monkeypatch.delenv("MLMTUNE_API_KEY", raising=False)
    assert main(["serve", "--model", str(tiny_model_dir), "--host", "0.0.0.0", "--port", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "MLMTUNE_API_KEY" in err and "--insecure" in err
    check_exposure("0.0.0.0", "s3cret", insecure=False)  # a key, or --insecure, lets it through
    check_exposure("0.0.0.0", None, insecure=True)
    check_exposure("::1", None, insecure=False)
    check_exposure("localhost", None, insecure=False)
    with pytest.raises(Exception, match="the API key is empty"):
        check_exposure("127.0.0.1", " ", insecure=False)


def _scrape(base: str, headers: dict) -> dict:
    """Prometheus text -> {(sample name, sorted labels): value}, read by prometheus_client's own parser."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(base + "/metrics", headers=headers)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


@pytest.fixture(scope="module")
def keyed_server(tiny_model_dir):
    """The real `mlmtune serve` with an API key from the environment, on a free loopback port."""
    import subprocess
    import sys

    key = "test-key-" + os.urandom(8).hex()
    env = {**os.environ, "MLMTUNE_API_KEY": key}
    proc = subprocess.Popen([sys.executable, "-m", "mlmtune", "serve", "--model", str(tiny_model_dir), "--port", "0",
                             "--max-batch", "4"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in proc.stderr:  # "mlmtune serve: http://127.0.0.1:PORT/ (Ctrl-C stops)" once it listens
            if line.startswith("mlmtune serve: http://"):
                url = line.split()[2].rstrip("/")
                break
        assert url, "mlmtune serve did not start"
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
        yield url, key
    finally:
        proc.terminate()
        proc.wait(30)


def test_inference_client_against_mlmtune_serve(keyed_server, pipe, monkeypatch):
    """huggingface_hub's own client, pointed at the server's URL, gets what the pipeline returns."""
    from huggingface_hub import InferenceClient, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the suite's offline mode refuses even loopback URLs

    url, key = keyed_server
    client = InferenceClient(model=url, token=key)
    text = "The <mask> statement is used in a loop."
    got = client.fill_mask(text, top_k=3)
    assert_same_as_pipeline([dict(p) for p in got], pipe(text, top_k=3))
    targets = ["Ġin", "Ġdef", "Ġthe"]
    got = client.fill_mask(text, targets=targets, top_k=2)
    assert_same_as_pipeline([dict(p) for p in got], pipe(text, targets=targets, top_k=2))


def test_api_key_and_metrics(keyed_server):
    import httpx

    url, key = keyed_server
    auth = {"Authorization": f"Bearer {key}"}
    before = _scrape(url, auth)
    assert httpx.get(url + "/health").status_code == 200  # open, for load balancers
    for path in ("/", "/playground.js", "/playground.css"):  # open: a browser cannot send the key to load the page,
        page = httpx.get(url + path)  # which asks for it; it holds nothing about the model or the key
        assert page.status_code == 200 and key not in page.text and "tiny-roberta" not in page.text
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}):
        for method, path in (("POST", "/"), ("POST", "/fill"), ("GET", "/info"), ("GET", "/metrics"),
                             ("POST", "/score"), ("GET", "/openapi.json")):
            r = httpx.request(method, url + path, headers=headers, json={"inputs": "A <mask>."})
            assert r.status_code == 401 and "API key" in r.json()["error"], (method, path, headers)
    for _ in range(3):
        assert httpx.post(url + "/", headers=auth, json={"inputs": "A <mask> here."}).status_code == 200
    assert httpx.post(url + "/fill", headers=auth, json={"text": "No mask."}).status_code == 422

    after = _scrape(url, auth)

    def delta(name, **labels):
        key_ = (name, tuple(sorted(labels.items())))
        return after.get(key_, 0) - before.get(key_, 0)

    assert delta("mlmtune_requests_total", route="/", method="POST", status="200") == 3
    assert delta("mlmtune_requests_total", route="/", method="POST", status="401") == 3
    assert delta("mlmtune_requests_total", route="/fill", method="POST", status="422") == 1
    assert delta("mlmtune_requests_total", route="/health", method="GET", status="200") == 1
    assert delta("mlmtune_request_duration_seconds_count", route="/") == 6  # 401s included
    assert delta("mlmtune_batch_texts_count") == 3 and delta("mlmtune_batch_texts_sum") == 3
    assert after[("mlmtune_queue_depth", ())] == 0
    assert after[("mlmtune_model_load_seconds", ())] > 0


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="no chromium (CI installs it)")
def test_playground_with_an_api_key_in_a_real_browser(keyed_server, pipe):
    """The real `mlmtune serve` with a key: the page loads without it, says the key is missing, and works once the
    key is typed in (sent as the Bearer header, kept nowhere but the page)."""
    from playwright.sync_api import sync_playwright

    url, key = keyed_server
    text = "The <mask> statement is used in a loop."
    expected = pipe(text, top_k=3)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        page = browser.new_page()
        page.goto(url + "/")
        page.wait_for_function("() => document.getElementById('meta').textContent.includes('API key')")
        page.fill("#key", key)
        page.press("#key", "Tab")  # the key field's change: the page asks /info again, with the key
        page.wait_for_function("() => document.getElementById('meta').textContent.includes('mask token')")
        page.fill("#text", text)
        page.fill("#topk", "3")
        page.click("#submit")
        page.wait_for_selector(".candidate")
        tokens = page.locator(".candidate .token").all_text_contents()
        stored = page.evaluate("JSON.stringify(localStorage) + JSON.stringify(sessionStorage) + document.cookie")
        browser.close()
    assert tokens == [p["token_str"] for p in expected]
    assert key not in stored


# --- /score and words in /fill --------------------------------------------------------------------


def test_score_route_equals_the_scorer(client, tiny_model_dir):
    from mlmtune.inference.scoring import Scorer

    texts = ["The break statement exits the innermost loop.", "Names refer to objects."]
    expected = Scorer.from_pretrained(str(tiny_model_dir)).score(texts, metric="original")
    r = client.post("/score", json={"text": texts, "metric": "original", "per_word": True})
    assert r.status_code == 200, r.text
    got = r.json()
    assert [g["pll"] for g in got] == pytest.approx([e.pll for e in expected], abs=1e-5)
    assert [g["per_word"] for g in got][1] == [{**w, "pll": pytest.approx(w["pll"], abs=1e-5)}
                                               for w in expected[1].words]
    one = client.post("/score", json={"inputs": texts[0], "parameters": {"metric": "original"}}).json()
    assert one["pll"] == pytest.approx(expected[0].pll, abs=1e-5) and "per_word" not in one


@pytest.mark.parametrize("body, status, message", [
    ({"text": " "}, 422, "is empty: there is nothing to score"),
    ({"text": "a", "metric": "l2r"}, 422, '"metric" must be one of within-word-l2r, original'),
    ({"text": "a", "per_word": "yes"}, 422, '"per_word" must be true or false'),
    ({"text": "word " * 70}, 413, "the limit is 300"),
    ({"txt": "a"}, 422, "unknown field(s): txt"),
])
def test_bad_score_requests(client, body, status, message):
    r = client.post("/score", json=body)
    assert r.status_code == status and message in r.json()["error"], r.text


def test_fill_route_fills_words(client, filler):
    text = "The <mask> statement."
    r = client.post("/fill", json={"text": text, "top_k": 2, "targets": ["Ġin", "photosynthesis"]})
    assert r.status_code == 200, r.text
    assert r.json() == [{**e, "score": pytest.approx(e["score"], rel=1e-5)}
                        for e in filler(text, top_k=2, targets=["Ġin", "photosynthesis"])]
    r = client.post("/fill", json={"inputs": "The <mask> is used in a <mask>.", "parameters": {"joint": True,
                                                                                              "top_k": 2}})
    assert r.status_code == 200 and len(r.json()) == 2 and len(r.json()[0]["tokens"]) == 2
    r = client.post("/fill", json={"text": "The <mask> of <mask>.", "max_pieces": 2})
    assert r.status_code == 422 and "words of several pieces are filled into one mask" in r.json()["error"]
    r = client.post("/fill", json={"text": "The <mask>.", "max_pieces": 9})
    assert r.status_code == 422 and '"max_pieces" must be an integer from 1 to 5' in r.json()["error"]


def test_a_5mb_body_gets_413_over_a_real_socket_and_the_server_keeps_answering(live_server):
    """Declared (Content-Length) and streamed (chunked, no length): the client reads the 413 with the JSON error,
    never a reset connection."""
    import httpx

    big = b'{"text": "' + b"a" * 5_000_000 + b'"}'
    with httpx.Client(base_url=live_server, timeout=30) as c:
        r = c.post("/fill", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json() == {
            "error": f"request body is {len(big):,} bytes; the limit is 64,000"}
        r = c.post("/score", content=(big[i : i + 65536] for i in range(0, len(big), 65536)),
                   headers={"content-type": "application/json"})
        assert r.status_code == 413 and "bytes or more; the limit is 64,000" in r.json()["error"]
        assert c.post("/fill", json={"text": "A <mask>."}).status_code == 200


def test_serve_takes_the_body_limit_as_a_flag(capsys):
    from mlmtune.cli import main

    assert main(["serve", "--model", "x", "--max-body-bytes", "10"]) == 1
    assert "--max-body-bytes must be at least 1024" in capsys.readouterr().err
