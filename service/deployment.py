"""The Ray Serve application: the composition root of the online system.

Each policy replica is itself the FastAPI ingress and owns a vLLM engine, so Ray's HTTP proxy
reaches the engine in one hop (a second deployment in the token path cost 12% of throughput).
`deploy` migrates the store, starts (or joins) Ray and Serve, and runs the application.
"""

from __future__ import annotations

import logging

from ray import serve

from service.app import build_app
from service.auth import Authenticator
from service.engine import VllmEngine
from service.registry import Registry
from service.settings import Settings, SettingsError, load_settings
from service.store import Store

logger = logging.getLogger(__name__)
APP_NAME = "prefloop"


@serve.ingress()
class PolicyReplica:
    """One engine and the API in front of it. A dead engine fails `check_health`, and Serve
    replaces the replica."""

    async def __init__(self, settings: Settings):  # type: ignore[misc] # Serve awaits it
        registry = Registry(Store(settings.resolved_database_url), settings.data_dir)
        # A new or replacement replica starts on whatever is served now.
        served = registry.served()
        self._engine = VllmEngine(
            settings, served.weights_path, served.version.id, registry.tokenizer_path()
        )
        self._app = build_app(
            self._engine,
            registry,
            Authenticator(settings.all_api_keys),
            default_max_tokens=settings.engine.default_max_tokens,
            feedback_batch_max=settings.feedback_batch_max,
            swap_poll_s=settings.swap_poll_s,
            write_queue_max=settings.write_queue_max,
            journal=settings.journal,
        )

    def __serve_build_asgi_app__(self):
        return self._app

    async def check_health(self) -> None:
        await self._engine.check_health()

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()


def application(settings: Settings) -> serve.Application:
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
    deployment = serve.deployment(
        name="policy",
        **replicas,
        max_ongoing_requests=settings.max_ongoing_requests,
        health_check_period_s=settings.health_check_period_s,
        health_check_timeout_s=max(10.0, settings.health_check_period_s * 2),
        ray_actor_options={"num_cpus": settings.replica_num_cpus},
    )(PolicyReplica)
    return deployment.bind(settings)


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


def app_from_env(args: dict[str, str]) -> serve.Application:
    """Builder for config-driven deploys (`serve deploy deploy/serve_config.yaml`, KubeRay's
    `serveConfigV2`): every setting comes from the `PREFLOOP_` environment of the Ray node."""
    if args:
        raise SettingsError(
            f"app_from_env takes no args (got {sorted(args)}); set PREFLOOP_ variables instead"
        )
    settings = load_settings()
    if not settings.auth_enabled:
        # A config deploy binds Serve's proxy wherever the config says, not only to loopback.
        raise SettingsError("no API keys: set PREFLOOP_API_KEYS_FILE (a mounted Secret)")
    prepare_store(settings)
    return application(settings)


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
    serve.run(application(settings), name=APP_NAME, route_prefix="/", blocking=False)
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
