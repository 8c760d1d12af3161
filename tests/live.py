"""A real server for the tests that need one: the app under `serve`'s own uvicorn settings, on a free loopback
port, in a thread of the test process (so a test can reach into the app while it serves)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def running(app, read_timeout: float = 10.0) -> Iterator[str]:
    """Serve `app` until the block ends; yields its base URL. The socket listens before uvicorn starts, so a client
    may connect at once: the kernel holds the connection until the server accepts it."""
    import uvicorn

    from mlmtune.serving.serve import bind, server_config

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(server_config(app, read_timeout, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def raw_exchange(url: str, request: bytes, timeout: float = 20.0) -> tuple[bytes, bool]:
    """Send raw bytes on a new connection and read until the server closes it: (what came back, whether it closed
    within `timeout`)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        if request:
            s.sendall(request)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except TimeoutError:
            return got, False
        return got, True
