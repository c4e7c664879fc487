"""Request ids: one per request, taken from the client's `X-Request-Id` when it sent a sane one,
else made here; answered in `X-Request-Id` on every response and stamped on every log line written
while the request is handled (a context variable, which `asyncio.to_thread` carries into threads).

`configure_logging` sets up the process's logging with the id in the format; the CLI and each
Serve replica call it.
"""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "x-request-id"
# What a client's id may be: short and free of anything a log line or a header would mangle.
_SANE = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
NO_REQUEST = "-"

request_id: ContextVar[str] = ContextVar("request_id", default=NO_REQUEST)


class RequestIds:
    """Pure ASGI middleware, outermost, so that every answer carries the id, refusals included.
    `echo`: set the response header (off behind Serve's proxy, which sets it itself, from the same
    request header)."""

    def __init__(self, app: ASGIApp, echo: bool = True):
        self.app, self.echo = app, echo

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        sent = dict(scope["headers"]).get(HEADER.encode(), b"").decode("latin-1")
        rid = sent if _SANE.fullmatch(sent) else uuid.uuid4().hex
        token = request_id.set(rid)

        async def _send(message: Message) -> None:
            if message["type"] == "http.response.start" and self.echo:
                headers = [*message.get("headers", []), (HEADER.encode(), rid.encode())]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            request_id.reset(token)


class RequestIdFilter(logging.Filter):
    """Gives every record a `request_id` attribute: the request being handled, else `-`."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


def configure_logging(level: str | int = "INFO") -> None:
    """Root logging to stderr with the request id on every line. Idempotent: a second call (a
    replica's constructor in a process that already configured logging) changes only the level."""
    root = logging.getLogger()
    root.setLevel(level)
    if not any(isinstance(f, RequestIdFilter) for h in root.handlers for f in h.filters):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler.addFilter(RequestIdFilter())
        root.addHandler(handler)
    logging.getLogger("alembic").setLevel(logging.WARNING)
