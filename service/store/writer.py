"""Group commit: concurrent requests' writes share one transaction and one fsync.

A single task takes the first queued write, then everything else already queued (up to
`max_batch`) without waiting, runs them in one `Store.write_batch` in a worker thread, and resolves
each caller's future after the commit. A lone request is written at once; under load, the writes
that arrive while a commit is in flight ride the next one, so throughput grows with concurrency
instead of being capped by one fsync per event.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy.orm import Session

from service.store.store import Store

logger = logging.getLogger(__name__)
T = TypeVar("T")


class GroupCommitWriter:
    def __init__(self, store: Store, max_batch: int = 256):
        self._store = store
        self._max_batch = max_batch
        self._queue: asyncio.Queue[tuple[Callable[[Session], Any], asyncio.Future]] = (
            asyncio.Queue()
        )
        self._task: asyncio.Task | None = None
        self.batches = 0  # commits so far; exposes the batching in tests and metrics

    async def submit(self, op: Callable[[Session], T]) -> T:
        """Queue `op` and return its result once it is committed; re-raises what `op` raised."""
        return (await self.submit_many([op]))[0]  # type: ignore[return-value]

    async def submit_many(self, ops: Sequence[Callable[[Session], T]]) -> list[T | Exception]:
        """Queue several ops; each result is its value or the exception it raised."""
        self._ensure_running()
        loop = asyncio.get_running_loop()
        futures = []
        for op in ops:
            fut = loop.create_future()
            self._queue.put_nowait((op, fut))
            futures.append(fut)
        results = await asyncio.gather(*futures, return_exceptions=True)
        if len(ops) == 1 and isinstance(results[0], BaseException):
            raise results[0]
        return results  # type: ignore[return-value]

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="group-commit")

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                results = await asyncio.to_thread(self._store.write_batch, [op for op, _ in batch])
            except Exception as exc:  # the commit itself failed: nothing in the batch is stored
                logger.exception("commit of %d writes failed", len(batch))
                results = [exc] * len(batch)
            self.batches += 1
            for (_, fut), result in zip(batch, results, strict=True):
                if fut.done():
                    continue
                if isinstance(result, Exception):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
