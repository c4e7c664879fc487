"""Typed errors raised inside the service and their one translation to OpenAI's error shape.

Everything below the routes raises an `ApiError` subclass; `install_error_handlers` turns those, and
FastAPI's validation errors, into `{"error": {"message", "type", "param", "code"}}` with the status;
`CatchAll` answers anything else with a 500 in the same shape, without the exception's text.
The pure ASGI middlewares that refuse a request before it reaches a route answer with `send_error`.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic_core import ErrorDetails
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.protocol import ErrorResponse

logger = logging.getLogger(__name__)


class ApiError(Exception):
    status = 500
    type = "server_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        # Seconds after which the same request may succeed: sent as `Retry-After`.
        self.retry_after = retry_after
        self.extra_headers = headers or {}

    def headers(self) -> dict[str, str]:
        headers = dict(self.extra_headers)
        if self.retry_after is not None:
            # Retry-After is whole seconds; rounding down would invite a retry that fails again.
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return headers

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers())

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(ApiError):
    status = 400
    type = "invalid_request_error"


class Unprocessable(ApiError):
    status = 422
    type = "invalid_request_error"


class Unauthenticated(ApiError):
    status = 401
    type = "authentication_error"


class Forbidden(ApiError):
    status = 403
    type = "permission_error"


class NotFound(ApiError):
    status = 404
    type = "not_found_error"


class Conflict(ApiError):
    status = 409
    type = "conflict_error"


class RequestTimeout(ApiError):
    status = 408
    type = "invalid_request_error"


class PayloadTooLarge(ApiError):
    status = 413
    type = "invalid_request_error"


class RateLimited(ApiError):
    status = 429
    type = "rate_limit_error"


class EngineUnavailable(ApiError):
    status = 503
    type = "service_unavailable_error"


class Overloaded(ApiError):
    """Refused for now, not for good: the replica at its admission bound, a request that waited
    past its deadline, a full write queue or journal. Carries `Retry-After` where a retry can
    be timed."""

    status = 503
    type = "service_unavailable_error"


_DESCRIPTIONS = {
    400: "the body is not JSON, or the request cannot be served (`context_length_exceeded`)",
    401: "no API key, or an unknown one",
    403: "the API key lacks the route's scope, or the resource is another key's",
    404: "no such resource",
    408: "the body did not arrive within the read deadline",
    409: "conflicts with the current state",
    413: "the body is larger than the limit",
    422: "a field is invalid; `param` names it",
    429: "the API key's rate limit is spent; retry after `Retry-After` seconds",
    503: "overloaded or no engine; retry after `Retry-After` seconds where it is given",
}
# What every route that authenticates can answer, and every route with a body.
AUTH_ERRORS = (401, 403, 429)
BODY_ERRORS = (400, 408, 413, 422)
_RETRY_AFTER = {
    "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}
}


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of a route's error statuses, each with the error envelope."""
    docs: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        doc: dict[str, Any] = {"model": ErrorResponse, "description": _DESCRIPTIONS[status]}
        if status in (429, 503):
            doc["headers"] = _RETRY_AFTER
        docs[status] = doc
    return docs


# Parts of a pydantic error location that are not field names: where the value came from, and the
# tags of the feedback union (`service.feedback.parse_event`).
_NOT_FIELDS = frozenset({"body", "query", "header", "path", "thumbs", "pairwise"})


def param_from_loc(loc: tuple | list) -> str | None:
    """`("body", "messages", 0, "role")` -> `messages.0.role`."""
    return ".".join(str(p) for p in loc if p not in _NOT_FIELDS) or None


def unprocessable(err: ErrorDetails, prefix: str = "") -> Unprocessable:
    """One pydantic error as a 422 naming the field."""
    param = param_from_loc(err.get("loc", ()))
    param = f"{prefix}{param}" if param else prefix.rstrip(".") or None
    return Unprocessable(f"{param or 'body'}: {err['msg']}", param=param, code="invalid_value")


def _from_http(exc: StarletteHTTPException) -> ApiError:
    """Starlette's own refusals (unknown path, wrong method, a body that fails to parse), typed by
    their status class; their headers (`Allow` on a 405) are kept."""
    status = exc.status_code
    kind = NotFound if status == 404 else InvalidRequest if status < 500 else ApiError
    err = kind(str(exc.detail), headers=dict(exc.headers or {}))
    err.status = status
    return err


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            bad = InvalidRequest(
                f"the body is not valid JSON: {first.get('ctx', {}).get('error', 'decode error')}",
                code="invalid_json",
            )
            return bad.response()
        return unprocessable(first).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _from_http(exc).response()


async def send_error(send: Send, err: ApiError, *, close: bool = False) -> None:
    """Answer with `err` from pure ASGI middleware. `close`: the request body was not read, so
    the connection cannot carry another request."""
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers().items()]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class CatchAll:
    """Any exception no handler took: logged with its traceback, answered 500 with a generic
    message (never the exception's text: it may carry paths, SQL or secrets). Inside the request
    id middleware, so the 500 carries the id and the log line names it."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def _send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, _send)
        except Exception:
            logger.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise  # a stream already under way: the server drops the connection
            err = ApiError("internal error; the request was not completed", code="internal_error")
            await send_error(send, err)
