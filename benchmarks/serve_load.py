"""Load on `mlmtune serve` over loopback: batching on against off, and a burst over the queue bound.

    python benchmarks/serve_load.py [--clients 32] [--requests 2000]

Starts the server as a real process on a free 127.0.0.1 port (the quickstart MiniLM with its
seeded head, saved to a temporary folder), sends `--requests` POST /fill requests from
`--clients` concurrent clients, and reports throughput, p50/p99 latency and errors, with batching
on (`--max-batch 32`) and off (`--max-batch 1`). Then a burst: a server with `--max-queue 16`
gets 400 requests at once; it must answer 503 to the overflow, 200 to the rest, and stay up.
Every loop is bounded in count and time. Prints a table and writes
benchmarks/results/MACHINE/serve_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import quickstart_model_folder, table, write_json  # noqa: E402
from fill_throughput import sentences  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, *flags: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.Popen([sys.executable, "-m", "mlmtune", "serve", "--model", str(model), "--port", str(port),
                          *flags], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return wait_ready(p, port, lambda: p.stderr.read()[-2000:])


def wait_ready(p: subprocess.Popen, port: int, why) -> subprocess.Popen:
    """The server process once its /health answers 200 (two minutes at most); `why()` says why one exited."""
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError(why())
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return p
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    p.kill()
    raise RuntimeError("server did not become ready in 120 s")


async def load(url: str, texts: list[str], clients: int, requests: int, limit_s: float = 300) -> dict:
    import httpx

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    counter = iter(range(requests))
    deadline = time.monotonic() + limit_s

    async def client(http: httpx.AsyncClient) -> None:
        for i in counter:
            if time.monotonic() > deadline:
                return
            t = time.perf_counter()
            try:
                r = await http.post(url, json={"text": texts[i % len(texts)], "top_k": 5})
                code = r.status_code
            except httpx.HTTPError:
                code = 0
            latencies.append(time.perf_counter() - t)
            statuses[code] = statuses.get(code, 0) + 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        seconds = time.perf_counter() - t0
    latencies.sort()
    done = len(latencies)
    return {"requests": done, "seconds": seconds, "requests_per_s": done / seconds,
            "p50_ms": 1000 * latencies[done // 2], "p99_ms": 1000 * latencies[min(done - 1, int(done * 0.99))],
            "errors": done - statuses.get(200, 0), "statuses": statuses}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()

    folder = quickstart_model_folder()
    texts = sentences(500)

    rows = []
    for name, flags in (("batching on (max batch 32, 5 ms window)", ["--max-batch", "32"]),
                        ("batching off (max batch 1)", ["--max-batch", "1"])):
        port = free_port()
        server = start_server(folder, port, *flags)
        try:
            r = asyncio.run(load(f"http://127.0.0.1:{port}/fill", texts, args.clients, args.requests))
        finally:
            server.terminate()
            server.wait(30)
        rows.append({"server": name, **r})
        print(f"{name}: {r}", file=sys.stderr)

    port = free_port()
    server = start_server(folder, port, "--max-batch", "32", "--max-queue", "16")
    try:
        burst = asyncio.run(load(f"http://127.0.0.1:{port}/fill", texts, 400, 400))
        import httpx

        alive = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json() == {"status": "ok"}
    finally:
        server.terminate()
        server.wait(30)

    print(table(rows, [("server", "server", ""), ("requests", "requests", ",d"), ("requests_per_s", "req/s", ",.1f"),
                       ("p50_ms", "p50 ms", ",.0f"), ("p99_ms", "p99 ms", ",.0f"), ("errors", "errors", "d")]))
    print(f"\nbatching on / off throughput: {rows[0]['requests_per_s'] / rows[1]['requests_per_s']:.1f}x; "
          f"{args.clients} clients on loopback")
    print(f"burst of 400 concurrent requests at a server with --max-queue 16: {burst['statuses']}; "
          f"server still healthy: {alive}")
    path = write_json("serve_load", {"clients": args.clients, "rows": rows,
                                     "burst": {"requests": 400, "max_queue": 16, "statuses": burst["statuses"],
                                               "healthy_after": alive}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
