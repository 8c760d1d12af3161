"""Small fills beside heavy word fills and abusive clients: their latency with and without the others, on this
code and on a baseline revision.

    python benchmarks/serve_abuse.py [--seconds 30] [--baseline main]

Starts `mlmtune serve` as a real process on a free 127.0.0.1 port (the quickstart MiniLM with its seeded head,
saved to a temporary folder). Two clients send one-text fills, one after the other, and their latencies are
measured twice: alone, and beside

- heavy word fills, back to back: 16 texts x 40 made-up targets of several pieces each, and 8 texts of 4 masks
  filled jointly (beam 8), each within this code's work bound;
- a client that sends the same heavy fill and leaves after half a second, again and again;
- 40 connections that send their headers a byte every second (slowloris);
- a client that sends bodies of 1 MB, `text/plain` bodies and made-up methods.

The baseline revision (`--baseline REF`, default main; `--baseline none` skips it) is taken from git with
`git archive` into a temporary folder and served the same way. Every phase is bounded in time; a small fill that
gets no answer within 60 s counts as 60 s and as an error. Prints a table and writes
benchmarks/results/MACHINE/serve_abuse.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, quickstart_model_folder, table, write_json  # noqa: E402
from fill_throughput import sentences  # noqa: E402
from serve_load import free_port, wait_ready  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SMALL_TIMEOUT_S = 60.0


def source_of(ref: str) -> Path:
    """The src/ folder of git revision `ref`, extracted to a temporary folder."""
    folder = Path(tempfile.mkdtemp(prefix=f"mlmtune-{ref}-"))
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "src"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder / "src"


def start(model: Path, src: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(src)}
    p = subprocess.Popen([sys.executable, "-m", "mlmtune", "serve", "--model", str(model), "--port", str(port)],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return wait_ready(p, port, lambda: f"the server from {src} exited with {p.returncode}")


def made_up_words(n: int) -> list[str]:
    letters = "bcdfghjkmnpqvwxz"
    return [f"zq{letters[i % 16]}{letters[i // 16 % 16]}vx" for i in range(n)]


def heavy_bodies(texts: list[str]) -> list[dict]:
    """A targets fill and a joint fill, each within the default work bound of 4,096 rows."""
    one_mask = texts[:16]
    four = [t.replace("[MASK]", "[MASK] [MASK]", 1) for t in texts[16:24]]
    four = [" ".join(w if i % 5 else "[MASK]" for i, w in enumerate(t.split()))[:400] for t in four]
    return [{"text": one_mask, "targets": made_up_words(40), "top_k": 3},
            {"text": [t for t in four if 2 <= t.count("[MASK]") <= 8], "joint": True, "beam_size": 8, "top_k": 3}]


async def small_client(url: str, texts: list[str], until: float, out: list, errors: list) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=SMALL_TIMEOUT_S) as http:
        i = 0
        while time.monotonic() < until:
            t = time.perf_counter()
            try:
                r = await http.post(url + "/fill", json={"text": texts[i % len(texts)], "top_k": 5})
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            out.append(time.perf_counter() - t)
            if not ok:
                errors.append(1)
            i += 1


async def heavy_client(url: str, body: dict, until: float, counts: dict, leave_after: float | None = None) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=leave_after or 120) as http:
        while time.monotonic() < until:
            try:
                r = await http.post(url + "/fill", json=body)
                key = str(r.status_code)
            except httpx.TimeoutException:
                key = "left" if leave_after else "timeout"
            except httpx.HTTPError:
                key = "error"
            counts[key] = counts.get(key, 0) + 1


async def slowloris(url: str, until: float, connections: int = 40) -> None:
    host, port = url.removeprefix("http://").split(":")

    async def one():
        while time.monotonic() < until:
            try:
                reader, writer = await asyncio.open_connection(host, int(port))
                for byte in b"POST /fill HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 1000:
                    if time.monotonic() > until or reader.at_eof():
                        break
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(1.0)
                writer.close()
            except OSError:
                await asyncio.sleep(0.5)

    await asyncio.gather(*(one() for _ in range(connections)))


async def junk(url: str, until: float) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=30) as http:
        i = 0
        while time.monotonic() < until:
            try:
                if i % 3 == 0:
                    await http.post(url + "/fill", content=b'{"text": "' + b"a" * 1_000_000 + b'"}',
                                    headers={"content-type": "application/json"})
                elif i % 3 == 1:
                    await http.post(url + "/fill", content=b'{"text": "A [MASK]."}', headers={"content-type":
                                                                                            "text/plain"})
                else:
                    await http.request(f"M{i}", url + "/metrics")
            except httpx.HTTPError:
                pass
            i += 1
            await asyncio.sleep(0.05)


def percentiles(latencies: list[float]) -> dict:
    s = sorted(latencies)
    n = len(s)
    return {"small_fills": n, "p50_ms": 1000 * s[n // 2], "p99_ms": 1000 * s[min(n - 1, int(n * 0.99))],
            "max_ms": 1000 * s[-1]}


async def phase(url: str, texts: list[str], seconds: float, abuse: bool) -> dict:
    until = time.monotonic() + seconds
    latencies: list[float] = []
    errors: list[int] = []
    heavy: dict[str, int] = {}
    tasks = [small_client(url, texts, until, latencies, errors) for _ in range(2)]
    if abuse:
        bodies = heavy_bodies(texts)
        tasks += [heavy_client(url, b, until, heavy) for b in bodies]
        tasks += [heavy_client(url, bodies[0], until, heavy, leave_after=0.5), slowloris(url, until), junk(url, until)]
    await asyncio.wait_for(asyncio.gather(*tasks), seconds + 3 * SMALL_TIMEOUT_S)
    return {**percentiles(latencies), "small_errors": len(errors), "heavy": heavy}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--baseline", default="main", help="git revision to compare with, or none")
    args = parser.parse_args()

    model = quickstart_model_folder()
    texts = sentences(200)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip() or "this tree"
    servers = [(f"{head} (this code)", REPO / "src")]
    if args.baseline != "none":
        servers.insert(0, (args.baseline, source_of(args.baseline)))
    rows = []
    for name, src in servers:
        for abuse in (False, True):
            port = free_port()
            server = start(model, src, port)
            try:
                r = asyncio.run(phase(f"http://127.0.0.1:{port}", texts, args.seconds, abuse))
            finally:
                server.kill()
                server.wait(30)
            rows.append({"code": name, "beside": "heavy word fills and abusers" if abuse else "nothing", **r})
            print(rows[-1], file=sys.stderr)

    m = machine()
    print(table(rows, [("code", "code", ""), ("beside", "small fills beside", ""),
                       ("small_fills", "small fills", ",d"), ("p50_ms", "p50 ms", ",.0f"), ("p99_ms", "p99 ms", ",.0f"),
                       ("max_ms", "max ms", ",.0f"), ("small_errors", "errors", "d"), ("heavy", "heavy fills", "")]))
    print(f"\n{m['cpu']}, {m['cores']} cores ({m['cpu_class']}); {args.seconds:g} s a phase, 2 small-fill clients")
    path = write_json("serve_abuse", {"seconds": args.seconds, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
