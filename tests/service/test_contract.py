"""The API's contract beyond single routes: the scope of every route, request ids, what errors
reveal, 405s, unparsable bodies, and what the OpenAPI document declares."""

from __future__ import annotations

import logging
import re

import httpx
import pytest
from fastapi.routing import APIRoute

from service.app import build_app
from service.auth import Authenticator
from tests.conftest import ADMIN_KEY, CHAT_KEY, KEYS, READONLY_KEY, auth
from tests.fakes import FakeEngine

# Every route and who may call it: None is public. A route missing here fails the first test.
SCOPES = {
    ("GET", "/healthz"): None,
    ("GET", "/readyz"): None,
    ("GET", "/metrics"): None,
    ("GET", "/v1/models"): "chat",
    ("POST", "/v1/chat/completions"): "chat",
    ("POST", "/v1/feedback"): "feedback",
    ("POST", "/v1/feedback/batch"): "feedback",
    ("GET", "/v1/preferences/export"): "admin",
    ("GET", "/v1/admin/versions"): "admin",
    ("GET", "/v1/admin/versions/{version_id}"): "admin",
    ("POST", "/v1/admin/versions/{version_id}/promote"): "admin",
    ("GET", "/v1/admin/status"): "admin",
    ("POST", "/v1/admin/train"): "admin",
    ("POST", "/v1/admin/score"): "admin",
}
# A key without the scope, for each scope.
LACKING = {"chat": READONLY_KEY, "feedback": ADMIN_KEY, "admin": CHAT_KEY}
HOLDING = {"chat": CHAT_KEY, "feedback": CHAT_KEY, "admin": ADMIN_KEY}


def routes(app) -> set[tuple[str, str]]:
    return {(method, r.path) for r in app.routes if isinstance(r, APIRoute) for method in r.methods}


async def test_every_route_has_a_declared_scope_and_checks_it(client):
    app = client._transport.app
    assert routes(app) == set(SCOPES)
    for (method, path), scope in SCOPES.items():
        url = path.replace("{version_id}", "base")
        # A body that is valid for no route: a route that checks the caller refuses it first.
        send = {"json": {}} if method == "POST" else {}
        anonymous = await client.request(method, url, headers={"Authorization": ""}, **send)
        if scope is None:
            assert anonymous.status_code not in (401, 403), (method, path)
            continue
        assert anonymous.status_code == 401, (method, path, anonymous.text)
        if scope != "feedback":  # the admin scope holds every other
            lacking = await client.request(method, url, headers=auth(LACKING[scope]), **send)
            assert lacking.status_code == 403, (method, path, lacking.text)
            assert lacking.json()["error"]["code"] == "insufficient_scope"
        allowed = await client.request(method, url, headers=auth(HOLDING[scope]), **send)
        assert allowed.status_code not in (401, 403), (method, path, allowed.text)


async def test_request_id_is_taken_or_made_and_on_every_response(client):
    sent = await client.get("/healthz", headers={"X-Request-Id": "client-id.42"})
    assert sent.headers["X-Request-Id"] == "client-id.42"
    made = await client.get("/v1/models", headers={"X-Request-Id": "bad id\twith spaces"})
    assert re.fullmatch(r"[0-9a-f]{32}", made.headers["X-Request-Id"])
    refused = await client.get("/v1/models", headers={"Authorization": ""})
    assert refused.status_code == 401 and refused.headers["X-Request-Id"]
    too_big = await client.post("/v1/feedback", content=b"x" * (5 * 1024 * 1024))
    assert too_big.status_code == 413 and too_big.headers["X-Request-Id"]
    assert made.headers["X-Request-Id"] != refused.headers["X-Request-Id"]


class BrokenEngine(FakeEngine):
    def render_prompt(self, messages):
        raise RuntimeError("cannot open /srv/prefloop/secret/tokenizer.json: password=hunter2")


async def test_internal_error_reveals_nothing_and_is_logged_with_the_request_id(registry, caplog):
    from service.request_ids import RequestIdFilter

    app = build_app(BrokenEngine(), registry, Authenticator(KEYS))
    handler = caplog.handler
    handler.addFilter(RequestIdFilter())
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t", headers=auth(CHAT_KEY)
    ) as c:
        with caplog.at_level(logging.ERROR):
            r = await c.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "hi"}]},
                headers={"X-Request-Id": "trace-me"},
            )
    assert r.status_code == 500
    assert r.json() == {
        "error": {
            "message": "internal error; the request was not completed",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
    }
    assert "/srv" not in r.text and "hunter2" not in r.text and "Traceback" not in r.text
    assert r.headers["X-Request-Id"] == "trace-me"
    logged = [rec for rec in caplog.records if rec.levelno == logging.ERROR]
    assert logged and all(rec.request_id == "trace-me" for rec in logged)
    assert "hunter2" in caplog.text  # the log keeps what the answer hides


async def test_wrong_method_is_405_with_allow(client):
    r = await client.delete("/v1/feedback")
    assert r.status_code == 405
    assert r.headers["Allow"] == "POST"
    assert r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("body", [b"{not json", b'{"messages": "\xff\xfe"}'])
async def test_unparsable_body_is_400_invalid_request(client, body):
    r = await client.post(
        "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


async def test_openapi_declares_media_types_errors_and_the_feedback_union(client):
    doc = (await client.get("/openapi.json")).json()
    paths = doc["paths"]
    assert set(paths["/metrics"]["get"]["responses"]["200"]["content"]) == {
        "text/plain; version=0.0.4"
    }
    export = paths["/v1/preferences/export"]["get"]["responses"]
    assert set(export["200"]["content"]) == {"application/x-ndjson"}
    chat = paths["/v1/chat/completions"]["post"]["responses"]
    assert set(chat["200"]["content"]) == {"application/json", "text/event-stream"}
    for status in ("400", "401", "403", "413", "422", "429", "503"):
        schema = chat[status]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, status
    assert "Retry-After" in chat["429"]["headers"] and "Retry-After" in chat["503"]["headers"]
    feedback = paths["/v1/feedback"]["post"]
    body = feedback["requestBody"]["content"]["application/json"]["schema"]
    assert body["discriminator"]["propertyName"] == "type"
    assert {"404", "409", "422"} <= set(feedback["responses"])
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
