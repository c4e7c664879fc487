"""Typed errors raised inside the service and their one translation to OpenAI's error shape.

Everything below the routes raises an `ApiError` subclass; `install_error_handlers` turns those, and
FastAPI's validation errors, into `{"error": {"message", "type", "param", "code"}}` with the status.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic_core import ErrorDetails
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class ApiError(Exception):
    status = 500
    type = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def headers(self) -> dict[str, str]:
        return {}

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


class EngineUnavailable(ApiError):
    status = 503
    type = "service_unavailable_error"


class RetryLater(ApiError):
    """Refused for now, not for good: a full write queue or a full journal. The answer carries
    `Retry-After` (seconds), as HTTP 503 answers beyond capacity should."""

    status = 503
    type = "service_unavailable_error"

    def __init__(self, message: str, *, retry_after: int, code: str):
        super().__init__(message, code=code)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


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


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = unprocessable(exc.errors()[0])
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: NotFound, 405: InvalidRequest}.get(exc.status_code, ApiError)
        err = kind(str(exc.detail))
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        err = ApiError("internal error; the request was not completed", code="internal_error")
        return JSONResponse(err.body(), status_code=500)
