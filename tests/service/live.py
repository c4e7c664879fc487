"""A real HTTP server (uvicorn on 127.0.0.1, a free port) around an app, in a thread, and a raw
socket client for what httpx will not send: bodies that never end, arrive a byte at a time, or are
30 MB."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import httpx
import uvicorn

from tests.conftest import CHAT_KEY, auth

T = TypeVar("T")
BIG = 30 * 1024 * 1024  # 200 messages of 150,000 characters
CHUNK = 64 * 1024


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


def big_body(declared: bool) -> tuple[bytes, list[bytes]]:
    """The head and body chunks of a 30 MB chat, with Content-Length or chunked."""
    filler = b"x" * CHUNK
    if declared:
        return request_head("/v1/chat/completions", CHAT_KEY, f"Content-Length: {BIG}\r\n"), [
            filler
        ] * (BIG // CHUNK)
    framed = b"%x\r\n" % CHUNK + filler + b"\r\n"
    head = request_head("/v1/chat/completions", CHAT_KEY, "Transfer-Encoding: chunked\r\n")
    return head, [framed] * (BIG // CHUNK)


def refuse_big_body(port: int, declared: bool) -> tuple[int, dict, float]:
    """Post a 30 MB body, the client sending as fast as it can; the status, the error and the time
    from the first byte sent to the status line read."""
    head, chunks = big_body(declared)
    stop = threading.Event()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        start = time.perf_counter()
        sock.sendall(head)
        sender = threading.Thread(target=pump, args=(sock, iter(chunks), stop))
        sender.start()
        status, body, answered = read_response(sock)
        elapsed = answered - start
        stop.set()
        with contextlib.suppress(OSError):  # the server may have closed it already
            sock.shutdown(socket.SHUT_RDWR)
        sender.join(10)
    return status, json.loads(body), elapsed


def beside_big_bodies(
    port: int, measure: Callable[[], T], declared: bool, pause_s: float = 0.0
) -> tuple[T, list[tuple[int, dict, float]]]:
    """`measure()` while a thread posts 30 MB chat bodies to `port`, `pause_s` apart; what it
    returned, and each body's status, error and time to the status line."""
    refusals: list[tuple[int, dict, float]] = []
    stop = threading.Event()

    def send() -> None:
        while not stop.wait(pause_s):
            refusals.append(refuse_big_body(port, declared))

    sender = threading.Thread(target=send)
    sender.start()
    try:
        measured = measure()
    finally:
        stop.set()
        sender.join(60)
    return measured, refusals


def chat_latencies(port: int, n: int, body: dict, timeout_s: float = 5.0) -> list[float]:
    """The seconds each of `n` chats (`body`, one after another) took to answer 200."""
    out = []
    with httpx.Client(
        base_url=f"http://127.0.0.1:{port}", headers=auth(CHAT_KEY), timeout=timeout_s
    ) as c:
        for _ in range(n):
            start = time.perf_counter()
            r = c.post("/v1/chat/completions", json=body)
            out.append(time.perf_counter() - start)
            assert r.status_code == 200, r.text
    return out
