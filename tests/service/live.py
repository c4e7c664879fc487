"""A real HTTP server (uvicorn on 127.0.0.1, a free port) around an app, in a thread, and a raw
socket client for what httpx will not send: bodies that never end, or arrive a byte at a time."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn


@contextmanager
def serving(app) -> Iterator[int]:
    """Serve `app` until the block ends; yields the port."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)


def request_head(path: str, key: str, extra: str) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\n{extra}\r\n"
    ).encode()


def read_response(sock: socket.socket) -> tuple[int, bytes, float]:
    """The status and body of the response on `sock` (one with Content-Length), and when its
    status line arrived (`time.perf_counter()`)."""
    data, first = b"", 0.0
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection without an answer: {data!r}"
        first = first or time.perf_counter()
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection mid-body"
        body += chunk
    return int(head.split(b" ", 2)[1]), body, first


def pump(sock: socket.socket, chunks: Iterator[bytes], stop: threading.Event) -> None:
    """Send `chunks` until they end, `stop` is set, or the server closes the connection."""
    try:
        for chunk in chunks:
            if stop.is_set():
                return
            sock.sendall(chunk)
    except OSError:
        return  # refused and closed: what the caller is waiting for
