"""How the API half reaches the policy replicas (see `service.app`): in this process
(`LocalPolicy`), or through Serve's handles to the policy deployment (`service.deployment`)."""

from typing import Protocol

from service.engine import PolicyEngine
from service.rollout import VersionFollower


class Policy(Protocol):
    """What the API half needs of the policy replicas."""

    @property
    def model_name(self) -> str: ...

    async def version(self) -> str:
        """The version a policy replica serves."""

    async def ready(self) -> str:
        """The served version once a policy replica's engine answers; raises `EngineUnavailable`."""

    async def sync(self) -> str:
        """Have a policy replica swap to the registry's served version now; returns it."""


class LocalPolicy:
    """The policy replica in this process: one engine and the follower that keeps it current."""

    def __init__(self, engine: PolicyEngine, follower: VersionFollower):
        self._engine, self._follower = engine, follower

    @property
    def model_name(self) -> str:
        return self._engine.model_name

    async def version(self) -> str:
        return self._engine.version

    async def ready(self) -> str:
        await self._engine.check_health()
        return self._engine.version

    async def sync(self) -> str:
        return await self._follower.sync()
