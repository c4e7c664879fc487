"""Admission control of chats in a policy replica: a bound on the chats it holds, and a deadline on
the wait for the engine.

Without it every request Serve passed in waited, however long, behind the engine's batch (256
concurrent chats on the 2-core box: p50 23 s, p99 40 s, none refused). Now a replica holds at most
`max_admitted` chats; the engine runs `max_running` of them at once (its batch size) and the rest
wait for a slot in arrival order. A chat past the bound is refused at once with 503 and
Retry-After, before its body is parsed; one that has waited `queue_timeout_s` since it arrived
without a slot is refused with 503 rather than served late. Retrying elsewhere (another replica,
later) is then the client's choice, made early.

The count lives in pure ASGI middleware so it is released when the request ends whatever way it
ends: a finished stream, a client that went away, an error.
"""

from __future__ import annotations

import asyncio
import time

from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import Overloaded, send_error

# A refused client retries after this; a slot frees up as soon as any running chat ends.
RETRY_AFTER_S = 1.0


class Ticket:
    """One admitted chat: when it arrived, and whether it holds an engine slot."""

    def __init__(self, admission: Admission):
        self._admission = admission
        self.arrived = time.monotonic()
        self.running = False

    async def wait_for_engine(self) -> None:
        """Take an engine slot, or raise `Overloaded` once the chat has waited past its deadline
        (counted from its arrival in the replica)."""
        admission = self._admission
        left = self.arrived + admission.queue_timeout_s - time.monotonic()
        try:
            async with asyncio.timeout(max(left, 0.0)):
                await admission.slots.acquire()
        except TimeoutError:
            raise Overloaded(
                f"the request waited {admission.queue_timeout_s:g} s for the engine; try again",
                code="queue_timeout",
                retry_after=RETRY_AFTER_S,
            ) from None
        self.running = True

    def release(self) -> None:
        if self.running:
            self.running = False
            self._admission.slots.release()


class Admission:
    """The chats one replica holds (`admitted`), `max_running` of them on the engine at once."""

    def __init__(self, max_admitted: int, max_running: int, queue_timeout_s: float):
        self.max_admitted, self.queue_timeout_s = max_admitted, queue_timeout_s
        self.admitted = 0
        self.slots = asyncio.Semaphore(max_running)

    def middleware(self, app: ASGIApp, path: str) -> ASGIApp:
        """`app` with the chats posted to `path` admitted here; the route finds its `Ticket` in
        `request.state.admission`."""
        admission = self

        async def admit(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http" or scope["path"] != path or scope["method"] != "POST":
                return await app(scope, receive, send)
            if admission.admitted >= admission.max_admitted:
                busy = Overloaded(
                    f"this replica is serving its limit of {admission.max_admitted} chats; "
                    "try again",
                    code="overloaded",
                    retry_after=RETRY_AFTER_S,
                )
                return await send_error(send, busy)
            ticket = Ticket(admission)
            scope = {**scope, "state": {**scope.get("state", {}), "admission": ticket}}
            admission.admitted += 1
            try:
                await app(scope, receive, send)
            finally:
                admission.admitted -= 1
                ticket.release()

        return admit
