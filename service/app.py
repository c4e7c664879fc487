"""The HTTP API: routes parse, delegate and map results; nothing else.

The routes come in two halves so that a vote never waits on an engine. The policy half
(`build_policy_app`: chat completions and the replica's own probes) runs in every policy replica,
beside its vLLM engine; the API half (`build_api_app`: feedback, export, admin, models, readiness,
metrics) runs in a light replica of its own, and reaches the policy replicas through a `Policy`.
Serve's proxy routes `/v1/chat` to the first and everything else to the second, one hop each, so
feedback keeps being accepted while a policy replica restarts. `build_app` puts both halves in one
app over one engine (the fast tests, and anything that runs without Serve).
"""

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Body, Depends, FastAPI, Header, Query
from fastapi.responses import JSONResponse, Response, StreamingResponse

from service import export
from service.admin import admin_router
from service.auth import Authenticator, Principal
from service.chat import ChatService, GenerationRecord
from service.engine import PolicyEngine
from service.errors import ApiError, install_error_handlers
from service.feedback import FeedbackService, FeedbackWrite, parse_event, with_header_key
from service.metrics import Metrics
from service.policy import LocalPolicy, Policy
from service.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    ExportFormat,
    FeedbackAck,
    FeedbackBatchRequest,
    FeedbackBatchResponse,
    ModelCard,
    ModelList,
)
from service.registry import Registry
from service.rollout import VersionFollower
from service.scoring import ScorerCache
from service.settings import JournalSettings, Scope
from service.store import GroupCommitWriter, Journal

ROUTES = frozenset(
    {
        "/healthz",
        "/readyz",
        "/metrics",
        "/v1/models",
        "/v1/chat/completions",
        "/v1/feedback",
        "/v1/feedback/batch",
        "/v1/preferences/export",
        "/v1/admin/versions",
        "/v1/admin/status",
        "/v1/admin/train",
        "/v1/admin/score",
    }
)
CHAT_PREFIX = "/v1/chat"  # the policy half's routes, as Serve's proxy routes them


class _RequestMetrics:
    """Pure ASGI middleware (no per-chunk wrapping cost): status and time to the last byte."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]
        self.metrics.sample_in_flight()

        async def _send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
            self.metrics.sample_in_flight()


class _AbsolutePaths:
    """Serve's proxy sets `root_path` to the application's route prefix, which Starlette strips
    before matching; routes here are written whole (`/v1/chat/completions`), so it is cleared."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("root_path"):
            scope = {**scope, "root_path": ""}
        await self.app(scope, receive, send)


class _Scopes:
    """The route dependencies that authenticate the caller and check one scope."""

    def __init__(self, authenticator: Authenticator):
        def principal(authorization: Annotated[str | None, Header()] = None) -> Principal:
            return authenticator(authorization)

        self.caller = principal

    def __call__(self, scope: Scope) -> Callable[..., Principal]:
        principal = self.caller

        def check(caller: Annotated[Principal, Depends(principal)]) -> Principal:
            return caller.require(scope)

        return check


def _writer(
    registry: Registry,
    metrics: Metrics,
    feedback_batch_max: int,
    write_queue_max: int,
    journal: JournalSettings | None,
) -> GroupCommitWriter:
    """The replica's group-commit writer, journaling to the data directory while the database is
    unreachable."""
    journal = journal or JournalSettings()
    return GroupCommitWriter(
        registry.store,
        max_batch=feedback_batch_max,
        queue_max=write_queue_max,
        journal=Journal(registry.data_dir / "journal", journal.max_bytes),
        kinds=(GenerationRecord, FeedbackWrite),  # a vote names a generation: those go first
        probe_interval_s=journal.probe_interval_s,
        orphan_grace_s=journal.orphan_grace_s,
        metrics=metrics,
    )


def _new_app(metrics: Metrics, lifespan: Callable) -> FastAPI:
    app = FastAPI(title="prefloop", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(_RequestMetrics, metrics=metrics)
    app.add_middleware(_AbsolutePaths)
    return app


def _policy_routes(
    app: FastAPI,
    engine: PolicyEngine,
    writer: GroupCommitWriter,
    metrics: Metrics,
    scopes: _Scopes,
    default_max_tokens: int,
) -> None:
    chat = ChatService(engine, writer, metrics, default_max_tokens)
    Chat = Annotated[Principal, Depends(scopes("chat"))]

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(
        req: ChatCompletionRequest, who: Chat, response: Response
    ) -> ChatCompletion | Response:
        if req.stream:
            body = chat.start_stream(req, who.name)
            return StreamingResponse(
                body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        completion, recorded = await chat.complete(req, who.name)
        response.headers["Prefloop-Record"] = recorded
        return completion


def _api_routes(
    app: FastAPI,
    policy: Policy,
    registry: Registry,
    writer: GroupCommitWriter,
    metrics: Metrics,
    scopes: _Scopes,
) -> None:
    feedback = FeedbackService(writer, metrics)
    # Reward models for `POST /v1/admin/score`, loaded on first use and kept between requests.
    scorers = ScorerCache()
    app.state.scorers = scorers
    Chat = Annotated[Principal, Depends(scopes("chat"))]
    Voter = Annotated[Principal, Depends(scopes("feedback"))]
    Admin = Annotated[Principal, Depends(scopes("admin"))]

    app.include_router(admin_router(registry, policy, scorers, scopes("admin")))

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        try:
            version = await policy.ready()
        except ApiError as exc:
            return JSONResponse(exc.body(), status_code=exc.status)
        return JSONResponse({"status": "ready", "model_version": version})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(await metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(_: Chat) -> ModelList:
        card = ModelCard(
            id=policy.model_name, created=int(time.time()), version=await policy.version()
        )
        return ModelList(data=[card])

    @app.post("/v1/feedback", status_code=201)
    async def post_feedback(
        raw: Annotated[dict, Body()],
        who: Voter,
        response: Response,
        idempotency_key: Annotated[str | None, Header()] = None,
    ) -> FeedbackAck:
        event = with_header_key(parse_event(raw), idempotency_key)
        ack = await feedback.submit(who, event)
        if ack.queued:
            response.status_code = 202
        elif ack.replayed:
            response.status_code = 200
        return ack

    @app.post("/v1/feedback/batch")
    async def post_feedback_batch(batch: FeedbackBatchRequest, who: Voter) -> FeedbackBatchResponse:
        return FeedbackBatchResponse(data=await feedback.submit_batch(who, batch.events))

    @app.get("/v1/preferences/export")
    async def export_preferences(
        _: Admin, format: Annotated[ExportFormat, Query()] = "trl"
    ) -> StreamingResponse:
        return StreamingResponse(
            export.jsonl(registry.store, format),
            media_type="application/x-ndjson",
            headers={"Content-Disposition": f'attachment; filename="preferences-{format}.jsonl"'},
        )


def _healthz(app: FastAPI) -> None:
    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}


def build_policy_app(
    engine: PolicyEngine,
    registry: Registry,
    authenticator: Authenticator,
    *,
    default_max_tokens: int = 512,
    feedback_batch_max: int = 256,
    swap_poll_s: float = 0.25,
    write_queue_max: int = 10_000,
    journal: JournalSettings | None = None,
) -> tuple[FastAPI, LocalPolicy]:
    """A policy replica's app, and the `Policy` that the API half reaches it through."""
    metrics = Metrics(in_flight=lambda: engine.in_flight)
    writer = _writer(registry, metrics, feedback_batch_max, write_queue_max, journal)
    follower = VersionFollower(engine, registry, swap_poll_s, metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # A replica that starts while a version is promoted takes no request before it serves it.
        await follower.sync()
        follower.start()
        writer.start()  # replays what a replica that died here left in its journal
        yield
        await follower.stop()
        await writer.close()

    app = _new_app(metrics, lifespan)
    app.state.writer, app.state.metrics, app.state.follower = writer, metrics, follower
    _policy_routes(app, engine, writer, metrics, _Scopes(authenticator), default_max_tokens)
    return app, LocalPolicy(engine, follower)


def build_api_app(
    policy: Policy,
    registry: Registry,
    authenticator: Authenticator,
    *,
    feedback_batch_max: int = 256,
    write_queue_max: int = 10_000,
    journal: JournalSettings | None = None,
) -> FastAPI:
    """The API replica's app: every route but chat."""
    metrics = Metrics(in_flight=lambda: 0)
    writer = _writer(registry, metrics, feedback_batch_max, write_queue_max, journal)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        writer.start()  # replays what a replica that died here left in its journal
        yield
        await writer.close()

    app = _new_app(metrics, lifespan)
    app.state.writer, app.state.metrics = writer, metrics
    _healthz(app)
    _api_routes(app, policy, registry, writer, metrics, _Scopes(authenticator))
    return app


def build_app(
    engine: PolicyEngine,
    registry: Registry,
    authenticator: Authenticator,
    *,
    default_max_tokens: int = 512,
    feedback_batch_max: int = 256,
    swap_poll_s: float = 0.25,
    write_queue_max: int = 10_000,
    journal: JournalSettings | None = None,
) -> FastAPI:
    """Both halves in one app over one engine, sharing its writer and metrics."""
    app, policy = build_policy_app(
        engine,
        registry,
        authenticator,
        default_max_tokens=default_max_tokens,
        feedback_batch_max=feedback_batch_max,
        swap_poll_s=swap_poll_s,
        write_queue_max=write_queue_max,
        journal=journal,
    )
    _healthz(app)
    state = app.state
    _api_routes(app, policy, registry, state.writer, state.metrics, _Scopes(authenticator))
    return app
