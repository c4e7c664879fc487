"""The Ray Serve applications: the composition root of the online system.

Two applications behind one proxy. `prefloop-policy` (route `/v1/chat`) holds the policy replicas:
each is itself the FastAPI ingress and owns a vLLM engine, so the proxy reaches the engine in one
hop (a second deployment in the token path cost 12% of throughput). `prefloop` (route `/`) holds
the API replica: feedback, export, admin, models, readiness and metrics, without an engine, so a
vote is accepted while a policy replica restarts; it reaches the policy replicas through Serve
handles (`ServePolicy`) for what it needs of them. `deploy` migrates the store, starts (or joins)
Ray and Serve, and runs both.
"""

from __future__ import annotations

import asyncio
import logging
import os

from ray import serve

from service.app import CHAT_PREFIX, AppOptions, build_api_app, build_policy_app
from service.auth import Authenticator
from service.engine import VllmEngine
from service.errors import EngineUnavailable
from service.registry import Registry
from service.request_ids import configure_logging
from service.settings import Settings, SettingsError, load_settings
from service.store import Store

logger = logging.getLogger(__name__)
APP_NAME = "prefloop"


def policy_app_name(name: str = APP_NAME) -> str:
    """The policy application that goes with the API application `name`."""
    return f"{name}-policy"


# Serve's own refusals past `max_queued_requests` say when to retry, as the replicas' do.
BACKPRESSURE = {"status_code": 503, "retry_after_s": 1}
# How long the API replica waits for a policy replica to answer a readiness or version call.
POLICY_CALL_TIMEOUT_S = 10.0


@serve.ingress()
class PolicyReplica:
    """One engine and the chat route in front of it. A dead engine fails `check_health`, and Serve
    replaces the replica. The API replica calls `version`, `ready` and `sync` through a handle."""

    async def __init__(self, settings: Settings):  # type: ignore[misc] # Serve awaits it
        configure_logging(os.environ.get("PREFLOOP_LOG_LEVEL", "INFO"))
        registry = Registry(Store(settings.resolved_database_url), settings.data_dir)
        # A new or replacement replica starts on whatever is served now.
        served = registry.served()
        self._engine = VllmEngine(
            settings, served.weights_path, served.version.id, registry.tokenizer_path()
        )
        self._app, self._policy = build_policy_app(
            self._engine,
            registry,
            Authenticator(settings.all_api_keys),
            AppOptions.from_settings(settings, echo_request_id=False),
        )

    def __serve_build_asgi_app__(self):
        return self._app

    async def check_health(self) -> None:
        await self._engine.check_health()

    async def version(self) -> str:
        return await self._policy.version()

    async def ready(self) -> str:
        return await self._policy.ready()

    async def sync(self) -> str:
        return await self._policy.sync()

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()


class ServePolicy:
    """The policy replicas as the API replica reaches them: a call through Serve's handle to one
    of them (whichever Serve routes it to), bounded by a timeout so that no replica up is a fast
    503 rather than a request that waits for one."""

    def __init__(self, model_name: str, policy_app: str):
        self.model_name, self._policy_app = model_name, policy_app

    async def _call(self, method: str) -> str:
        handle = serve.get_deployment_handle("policy", app_name=self._policy_app)
        try:
            return await asyncio.wait_for(
                getattr(handle, method).remote(), timeout=POLICY_CALL_TIMEOUT_S
            )
        except TimeoutError:
            raise EngineUnavailable(
                f"no policy replica answered within {POLICY_CALL_TIMEOUT_S:.0f} s",
                code="engine_unavailable",
            ) from None
        except Exception as exc:  # the replica's own error, wrapped by Ray
            cause = getattr(exc, "cause", None) or exc
            raise EngineUnavailable(
                f"the policy replica failed: {cause}", code="engine_unavailable"
            ) from None

    async def version(self) -> str:
        return await self._call("version")

    async def ready(self) -> str:
        return await self._call("ready")

    async def sync(self) -> str:
        return await self._call("sync")


@serve.ingress()
class ApiReplica:
    """Every route but chat, without an engine: cheap to start and to restart."""

    def __init__(self, settings: Settings, policy_app: str):
        configure_logging(os.environ.get("PREFLOOP_LOG_LEVEL", "INFO"))
        registry = Registry(Store(settings.resolved_database_url), settings.data_dir)
        self._app = build_api_app(
            ServePolicy(settings.served_model_name, policy_app),
            registry,
            Authenticator(settings.all_api_keys),
            AppOptions.from_settings(settings, echo_request_id=False),
        )

    def __serve_build_asgi_app__(self):
        return self._app


def policy_application(settings: Settings) -> serve.Application:
    scaling = settings.autoscaling
    replicas: dict = (
        {
            "autoscaling_config": {
                "min_replicas": scaling.min_replicas,
                "max_replicas": scaling.max_replicas,
                "target_ongoing_requests": scaling.target_ongoing_requests,
                "upscale_delay_s": scaling.upscale_delay_s,
                "downscale_delay_s": scaling.downscale_delay_s,
            }
        }
        if scaling.enabled
        else {"num_replicas": settings.replicas}
    )
    # Past its admission bound a replica refuses a chat itself, at once, with the API's error
    # shape and Retry-After; Serve's own bound sits above it, so that those refusals happen
    # instead of a queue in front of the replica.
    admitted = settings.limits.admitted_chats(settings.engine.max_num_seqs)
    deployment = serve.deployment(
        name="policy",
        **replicas,
        max_ongoing_requests=2 * admitted,
        # Past this many waiting for a replica, Serve answers 503 itself: the queue is bounded.
        max_queued_requests=settings.limits.max_queued_requests,
        backpressure_config=BACKPRESSURE,
        health_check_period_s=settings.health_check_period_s,
        health_check_timeout_s=max(10.0, settings.health_check_period_s * 2),
        ray_actor_options={"num_cpus": settings.replica_num_cpus},
    )(PolicyReplica)
    return deployment.bind(settings)


def api_application(settings: Settings, policy_app: str) -> serve.Application:
    deployment = serve.deployment(
        name="api",
        num_replicas=settings.api_replicas,
        max_ongoing_requests=settings.max_ongoing_requests,
        max_queued_requests=settings.limits.max_queued_requests,
        backpressure_config=BACKPRESSURE,
        health_check_period_s=settings.health_check_period_s,
        ray_actor_options={"num_cpus": 0},
    )(ApiReplica)
    return deployment.bind(settings, policy_app)


def run_applications(settings: Settings, name: str = APP_NAME) -> None:
    """Deploy (or redeploy) the API application `name` and its policy application on the running
    Serve instance; returns when every replica is up."""
    policy = policy_app_name(name)
    serve.run(policy_application(settings), name=policy, route_prefix=CHAT_PREFIX, blocking=False)
    serve.run(api_application(settings, policy), name=name, route_prefix="/", blocking=False)


def delete_applications(name: str = APP_NAME) -> None:
    serve.delete(name)
    serve.delete(policy_app_name(name))


def prepare_store(settings: Settings) -> str:
    """Migrate the store and register the base model; returns the version to serve."""
    store = Store(settings.resolved_database_url)
    try:
        store.upgrade()
        registry = Registry(store, settings.data_dir)
        registry.ensure_base(settings.resolved_model_path)
        return registry.served().version.id
    finally:
        store.close()


def _settings_for_config_deploy(args: dict[str, str], builder: str) -> Settings:
    if args:
        raise SettingsError(
            f"{builder} takes no args (got {sorted(args)}); set PREFLOOP_ variables instead"
        )
    settings = load_settings()
    if not settings.auth_enabled:
        # A config deploy binds Serve's proxy wherever the config says, not only to loopback.
        raise SettingsError("no API keys: set PREFLOOP_API_KEYS_FILE (a mounted Secret)")
    return settings


def policy_from_env(args: dict[str, str]) -> serve.Application:
    """Builder of the policy application for config-driven deploys (`serve deploy
    deploy/serve_config.yaml`, KubeRay's `serveConfigV2`): every setting comes from the
    `PREFLOOP_` environment of the Ray node. It migrates the store and registers the base model."""
    settings = _settings_for_config_deploy(args, "policy_from_env")
    prepare_store(settings)
    return policy_application(settings)


def api_from_env(args: dict[str, str]) -> serve.Application:
    """Builder of the API application for config-driven deploys, like `policy_from_env`."""
    return api_application(_settings_for_config_deploy(args, "api_from_env"), policy_app_name())


def deploy(settings: Settings, log_to_driver: bool = True) -> None:
    """Migrate the store, start or join Ray, start Serve's proxy and run the app (returns when
    every replica is up). `log_to_driver=False` leaves the replicas' and engines' output in Ray's
    session logs instead of this process's."""
    import ray

    version = prepare_store(settings)
    if not settings.auth_enabled:
        logger.warning(
            "no API keys configured: the API is open to anyone who can reach it, so it "
            "binds to 127.0.0.1 only (set PREFLOOP_API_KEYS or PREFLOOP_API_KEYS_FILE)"
        )
    if not ray.is_initialized():
        ray.init(
            address=settings.ray_address,
            include_dashboard=False,
            namespace=APP_NAME,
            log_to_driver=log_to_driver,
        )
    serve.start(http_options={"host": settings.bind_host, "port": settings.port})
    run_applications(settings)
    logger.info(
        "serving %s (version %s) on http://%s:%d with %s",
        settings.served_model_name,
        version,
        settings.bind_host,
        settings.port,
        f"{settings.autoscaling.min_replicas}-{settings.autoscaling.max_replicas} replicas"
        if settings.autoscaling.enabled
        else f"{settings.replicas} replica(s)",
    )


def shutdown() -> None:
    import ray

    serve.shutdown()
    ray.shutdown()
