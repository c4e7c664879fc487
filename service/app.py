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
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request, Security
from fastapi.responses import Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service import export
from service.admin import admin_router
from service.admission import Admission
from service.auth import Authenticator, Principal
from service.chat import ChatService, GenerationRecord
from service.engine import PolicyEngine
from service.errors import (
    AUTH_ERRORS,
    BODY_ERRORS,
    CatchAll,
    documented,
    install_error_handlers,
)
from service.feedback import FeedbackService, FeedbackWrite, with_header_key
from service.limits import BodyLimit, check_request
from service.metrics import Metrics
from service.policy import LocalPolicy, Policy
from service.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    ExportFormat,
    FeedbackAck,
    FeedbackBatchRequest,
    FeedbackBatchResponse,
    FeedbackEvent,
    ModelCard,
    ModelList,
)
from service.ratelimit import RateLimiter
from service.registry import Registry
from service.request_ids import RequestIds
from service.rollout import VersionFollower
from service.scoring import ScorerCache
from service.settings import JournalSettings, LimitsSettings, Scope, Settings
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
CHAT_PATH = "/v1/chat/completions"
PUBLIC_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})
METRICS_MEDIA_TYPE = "text/plain; version=0.0.4"


def _content(media_type: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {media_type: {"schema": {"type": "string"}}}}


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
    """The route dependencies that authenticate the caller, charge its key's request rate and
    check one scope. The bearer scheme is declared so that the OpenAPI document says how to
    authenticate."""

    def __init__(self, authenticator: Authenticator, limiter: RateLimiter):
        bearer = HTTPBearer(auto_error=False, description="an API key")

        def principal(
            credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
        ) -> Principal:
            caller = authenticator(credentials.credentials if credentials else None)
            limiter.admit(caller.name)
            return caller

        self.caller = principal

    def __call__(self, scope: Scope) -> Callable[..., Principal]:
        principal = self.caller

        def check(caller: Annotated[Principal, Depends(principal)]) -> Principal:
            return caller.require(scope)

        return check


@dataclass(frozen=True)
class AppOptions:
    """How an app serves, from `Settings` (`from_settings`); the defaults are Settings' own."""

    default_max_tokens: int = 512
    feedback_batch_max: int = 256
    swap_poll_s: float = 0.25
    write_queue_max: int = 10_000
    journal: JournalSettings = field(default_factory=JournalSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    # The engine's batch size: admission lets that many chats run at once.
    max_num_seqs: int = 32
    # Behind Serve's proxy the proxy answers with the request id it logged; alone, the app does.
    echo_request_id: bool = True

    @classmethod
    def from_settings(cls, settings: Settings, *, echo_request_id: bool = True) -> "AppOptions":
        return cls(
            default_max_tokens=settings.engine.default_max_tokens,
            feedback_batch_max=settings.feedback_batch_max,
            swap_poll_s=settings.swap_poll_s,
            write_queue_max=settings.write_queue_max,
            journal=settings.journal,
            limits=settings.limits,
            max_num_seqs=settings.engine.max_num_seqs,
            echo_request_id=echo_request_id,
        )


def _writer(registry: Registry, metrics: Metrics, options: AppOptions) -> GroupCommitWriter:
    """The replica's group-commit writer, journaling to the data directory while the database is
    unreachable."""
    journal = options.journal
    return GroupCommitWriter(
        registry.store,
        max_batch=options.feedback_batch_max,
        queue_max=options.write_queue_max,
        journal=Journal(registry.data_dir / "journal", journal.max_bytes),
        kinds=(GenerationRecord, FeedbackWrite),  # a vote names a generation: those go first
        probe_interval_s=journal.probe_interval_s,
        orphan_grace_s=journal.orphan_grace_s,
        metrics=metrics,
    )


def _new_app(
    metrics: Metrics,
    lifespan: Callable,
    limits: LimitsSettings,
    echo_request_id: bool,
    admission: Admission | None = None,
) -> FastAPI:
    app = FastAPI(title="prefloop", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    # Added innermost first. The body is read (bounded) before a chat is admitted, so a client
    # that trickles its body holds no admission slot.
    if admission is not None:
        app.add_middleware(admission.middleware, path=CHAT_PATH)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes, timeout_s=limits.body_timeout_s)
    app.add_middleware(_AbsolutePaths)
    app.add_middleware(_RequestMetrics, metrics=metrics)
    app.add_middleware(CatchAll)
    app.add_middleware(RequestIds, echo=echo_request_id)
    return app


def _policy_routes(
    app: FastAPI,
    engine: PolicyEngine,
    writer: GroupCommitWriter,
    metrics: Metrics,
    scopes: _Scopes,
    limiter: RateLimiter,
    limits: LimitsSettings,
    default_max_tokens: int,
) -> None:
    chat = ChatService(engine, writer, metrics, default_max_tokens, limiter.charge)
    Chat = Annotated[Principal, Depends(scopes("chat"))]
    # One SSE event: `data` is a JSON `chat.completion.chunk`, then `[DONE]`.
    event = {"type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}
    stream = {
        "description": "the completion, or with `stream` its server-sent events",
        "content": {"text/event-stream": {"schema": event}},
    }

    @app.post(
        CHAT_PATH,
        response_model=ChatCompletion,
        responses={200: stream, **documented(*BODY_ERRORS, *AUTH_ERRORS, 503)},
    )
    async def chat_completions(
        req: ChatCompletionRequest, who: Chat, request: Request, response: Response
    ) -> ChatCompletion | Response:
        limiter.admit_completion(who.name)
        check_request(engine, req, limits.max_messages)
        await request.state.admission.wait_for_engine()
        if req.stream:
            body = await chat.start_stream(req, who.name)
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

    @app.get("/readyz", responses=documented(503))
    async def readyz() -> dict:
        return {"status": "ready", "model_version": await policy.ready()}

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: _content(METRICS_MEDIA_TYPE, "Prometheus text format")},
    )
    async def prometheus() -> Response:
        return Response(await metrics.exposition(), media_type=METRICS_MEDIA_TYPE)

    @app.get("/v1/models", responses=documented(*AUTH_ERRORS, 503))
    async def models(_: Chat) -> ModelList:
        card = ModelCard(
            id=policy.model_name, created=int(time.time()), version=await policy.version()
        )
        return ModelList(data=[card])

    @app.post(
        "/v1/feedback",
        status_code=201,
        responses={
            200: {"model": FeedbackAck, "description": "a retry: the first event's ack"},
            **documented(*BODY_ERRORS, *AUTH_ERRORS, 404, 409),
        },
    )
    async def post_feedback(
        event: FeedbackEvent,
        who: Voter,
        response: Response,
        idempotency_key: Annotated[str | None, Header(min_length=1, max_length=255)] = None,
    ) -> FeedbackAck:
        ack = await feedback.submit(who, with_header_key(event, idempotency_key))
        if ack.queued:
            response.status_code = 202
        elif ack.replayed:
            response.status_code = 200
        return ack

    @app.post("/v1/feedback/batch", responses=documented(*BODY_ERRORS, *AUTH_ERRORS))
    async def post_feedback_batch(batch: FeedbackBatchRequest, who: Voter) -> FeedbackBatchResponse:
        return FeedbackBatchResponse(data=await feedback.submit_batch(who, batch.events))

    @app.get(
        "/v1/preferences/export",
        response_class=StreamingResponse,
        responses={
            200: _content("application/x-ndjson", "one preference row per line"),
            **documented(*AUTH_ERRORS, 422),
        },
    )
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
    options: AppOptions | None = None,
) -> tuple[FastAPI, LocalPolicy]:
    """A policy replica's app, and the `Policy` that the API half reaches it through."""
    options = options or AppOptions()
    limits = options.limits
    metrics = Metrics(in_flight=lambda: engine.in_flight)
    writer = _writer(registry, metrics, options)
    follower = VersionFollower(engine, registry, options.swap_poll_s, metrics)
    limiter = _limiter(limits)
    admission = Admission(
        limits.admitted_chats(options.max_num_seqs), options.max_num_seqs, limits.queue_timeout_s
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # A replica that starts while a version is promoted takes no request before it serves it.
        await follower.sync()
        follower.start()
        writer.start()  # replays what a replica that died here left in its journal
        yield
        await follower.stop()
        await writer.close()

    app = _new_app(metrics, lifespan, limits, options.echo_request_id, admission)
    app.state.writer, app.state.metrics, app.state.follower = writer, metrics, follower
    app.state.limiter, app.state.admission = limiter, admission
    scopes = _Scopes(authenticator, limiter)
    max_tokens = options.default_max_tokens
    _policy_routes(app, engine, writer, metrics, scopes, limiter, limits, max_tokens)
    return app, LocalPolicy(engine, follower)


def build_api_app(
    policy: Policy,
    registry: Registry,
    authenticator: Authenticator,
    options: AppOptions | None = None,
) -> FastAPI:
    """The API replica's app: every route but chat."""
    options = options or AppOptions()
    metrics = Metrics(in_flight=lambda: 0)
    writer = _writer(registry, metrics, options)
    limiter = _limiter(options.limits)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        writer.start()  # replays what a replica that died here left in its journal
        yield
        await writer.close()

    app = _new_app(metrics, lifespan, options.limits, options.echo_request_id)
    app.state.writer, app.state.metrics, app.state.limiter = writer, metrics, limiter
    _healthz(app)
    _api_routes(app, policy, registry, writer, metrics, _Scopes(authenticator, limiter))
    return app


def build_app(
    engine: PolicyEngine,
    registry: Registry,
    authenticator: Authenticator,
    options: AppOptions | None = None,
) -> FastAPI:
    """Both halves in one app over one engine, sharing its writer, metrics and rate limits."""
    app, policy = build_policy_app(engine, registry, authenticator, options)
    _healthz(app)
    state = app.state
    scopes = _Scopes(authenticator, state.limiter)
    _api_routes(app, policy, registry, state.writer, state.metrics, scopes)
    return app


def _limiter(limits: LimitsSettings) -> RateLimiter:
    return RateLimiter(limits.requests_per_s, limits.burst, limits.completion_tokens_per_min)
