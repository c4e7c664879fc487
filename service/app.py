"""The HTTP API of a policy replica: routes parse, delegate and map results; nothing else.

`build_app` is called by the Serve deployment with the replica's collaborators (and by the fast
tests with a fake engine).
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
    store = registry.store
    metrics = Metrics(in_flight=lambda: engine.in_flight)
    journal = journal or JournalSettings()
    writer = GroupCommitWriter(
        store,
        max_batch=feedback_batch_max,
        queue_max=write_queue_max,
        journal=Journal(registry.data_dir / "journal", journal.max_bytes),
        kinds=(GenerationRecord, FeedbackWrite),  # a vote names a generation: those go first
        probe_interval_s=journal.probe_interval_s,
        orphan_grace_s=journal.orphan_grace_s,
        metrics=metrics,
    )
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

    app = FastAPI(title="prefloop", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    chat = ChatService(engine, writer, metrics, default_max_tokens)
    feedback = FeedbackService(writer, metrics)
    # Reward models for `POST /v1/admin/score`, loaded on first use and kept between requests.
    scorers = ScorerCache()
    app.state.writer, app.state.metrics, app.state.follower = writer, metrics, follower
    app.state.scorers = scorers
    app.add_middleware(_RequestMetrics, metrics=metrics)

    def principal(authorization: Annotated[str | None, Header()] = None) -> Principal:
        return authenticator(authorization)

    Caller = Annotated[Principal, Depends(principal)]

    def scoped(scope: Scope) -> Callable[[Principal], Principal]:
        def check(caller: Caller) -> Principal:
            return caller.require(scope)

        return check

    Chat = Annotated[Principal, Depends(scoped("chat"))]
    Voter = Annotated[Principal, Depends(scoped("feedback"))]
    Admin = Annotated[Principal, Depends(scoped("admin"))]

    app.include_router(admin_router(registry, follower, scorers, scoped("admin")))

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        try:
            await engine.check_health()
        except ApiError as exc:
            return JSONResponse(exc.body(), status_code=exc.status)
        return JSONResponse({"status": "ready", "model_version": engine.version})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(await metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(_: Chat) -> ModelList:
        return ModelList(
            data=[ModelCard(id=engine.model_name, created=int(time.time()), version=engine.version)]
        )

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
            export.jsonl(store, format),
            media_type="application/x-ndjson",
            headers={"Content-Disposition": f'attachment; filename="preferences-{format}.jsonl"'},
        )

    return app
