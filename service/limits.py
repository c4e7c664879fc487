"""Input limits checked before the work they would cost: the size of a request body and how long
it may take to arrive (`BodyLimit`, pure ASGI, before anything parses the body), and the size of a
chat request before its prompt is tokenised (`check_request`).

A 30 MB chat body used to be read, parsed and tokenised whole (49 s on the event loop of a 2-core
replica) before it was refused for its length; meanwhile every other request and the health checks
waited, and Serve restarted the replica.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.engine import PolicyEngine
from service.errors import InvalidRequest, PayloadTooLarge, RequestTimeout, send_error
from service.protocol import ChatCompletionRequest


class BodyLimit:
    """Reads the body before the app does, refusing it with 413 as soon as its size passes
    `max_bytes` (at once when `Content-Length` says so, else when the streamed bytes pass it) and
    with 408 when it has not arrived whole within `timeout_s`; the connection is then closed. The
    app gets the body as one message, so no route reads more than `max_bytes`, and a client that
    trickles its body holds a connection for `timeout_s` at most, never an admission slot."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"the request body is larger than {self.max_bytes} bytes", code="body_too_large"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                bad = InvalidRequest("Content-Length is not a number", code="invalid_header")
                return await send_error(send, bad, close=True)
            if int(declared) > self.max_bytes:
                return await send_error(send, self._too_large(), close=True)
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return  # the client left before its body arrived: nobody to answer
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_bytes:
                        return await send_error(send, self._too_large(), close=True)
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            late = RequestTimeout(
                f"the request body did not arrive within {self.timeout_s:g} s", code="body_timeout"
            )
            return await send_error(send, late, close=True)

        whole: list[Message] = [{"type": "http.request", "body": b"".join(chunks)}]

        async def replay() -> Message:
            # The body once, then the client's own messages (a disconnect, for a stream).
            return whole.pop() if whole else await receive()

        await self.app(scope, replay, send)


def check_request(engine: PolicyEngine, req: ChatCompletionRequest, max_messages: int) -> None:
    """Refuse, without tokenising, a chat this API cannot answer as asked: a field it does not
    serve, a content part that is not text, too many messages, or more characters than
    `max_model_len` tokens of the tokenizer's longest can hold. Cheap (a sum of lengths); a prompt
    that passes may still be refused by its token count."""
    if unserved := req.unserved:
        raise InvalidRequest(
            f"{unserved[0]} is not supported by this API; leave it out",
            param=unserved[0],
            code="unsupported_parameter",
        )
    messages = req.messages
    if len(messages) > max_messages:
        raise InvalidRequest(
            f"at most {max_messages} messages per request; got {len(messages)}",
            param="messages",
            code="too_many_messages",
        )
    for i, message in enumerate(messages):
        for j, part in enumerate(message.content if isinstance(message.content, list) else []):
            if part.type != "text" or part.text is None:
                raise InvalidRequest(
                    f"messages.{i}.content.{j}: a content part of type {part.type!r} (this model "
                    'reads text parts, {"type": "text", "text": ...})',
                    param=f"messages.{i}.content.{j}",
                    code="unsupported_content_part",
                )
    chars = sum(len(m.text) for m in messages)
    most = engine.max_model_len * engine.max_chars_per_token
    if chars > most:
        raise InvalidRequest(
            f"this model's context is {engine.max_model_len} tokens; the messages have {chars} "
            f"characters, more than {most} can fit",
            param="messages",
            code="context_length_exceeded",
        )
