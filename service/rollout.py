"""Keeps a replica on the version the registry serves: the swap half of promotion and rollback.

Every replica polls the newest promotion (one indexed row) and swaps its engine when it changes,
so the same mechanism works with one replica or many, on one box or on a cluster sharing the
database and the data directory; nothing has to reach the replicas.
"""

from __future__ import annotations

import asyncio
import logging
import time

from service.engine import PolicyEngine
from service.metrics import Metrics
from service.registry import Registry

logger = logging.getLogger(__name__)


class VersionFollower:
    def __init__(self, engine: PolicyEngine, registry: Registry, poll_s: float, metrics: Metrics):
        self._engine = engine
        self._metrics = metrics
        self._registry = registry
        self._poll_s = poll_s
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None

    async def sync(self) -> str:
        """Swap to the served version if this replica is not on it; returns the version."""
        async with self._lock:
            served = await asyncio.to_thread(self._registry.served)
            if served.version.id != self._engine.version:
                started = time.perf_counter()
                await self._engine.swap(served.version.id, served.weights_path)
                self._metrics.swap_seconds.observe(time.perf_counter() - started)
                self._metrics.swaps.labels(served.version.id).inc()
            return self._engine.version

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="follow-version")

    async def _run(self) -> None:
        failing = False
        while True:
            try:
                await self.sync()
            except Exception as exc:  # a database outage must not stop the follower
                # Logged once per outage, not every poll: the replica keeps serving its version.
                if not failing:
                    logger.warning(
                        "cannot read the served version (%s: %s); serving %s until the "
                        "database answers",
                        type(exc).__name__,
                        str(exc).splitlines()[0] if str(exc) else "",
                        self._engine.version,
                        exc_info=True,
                    )
                failing = True
            else:
                if failing:
                    logger.warning("the served version is readable again: %s", self._engine.version)
                failing = False
            await asyncio.sleep(self._poll_s)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
