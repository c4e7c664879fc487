"""The scheduler: decides when a cycle runs, and runs one at a time.

A cycle starts when someone queued one (`prefloop train`, `POST /v1/admin/train`), when at least
`min_new_items` usable pairs (or KTO rows, with no pairs) arrived since the last snapshot, or when
`interval_s` passed since the last cycle with at least `min_items_for_interval`. Only one process
should run the scheduler (`prefloop serve` does); the store refuses a second queued or running run.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime

from service.errors import Conflict
from service.runs import queue_run, recent_runs, update_run
from service.store import TrainingRun
from training import preference_sets
from training.cycle import CycleContext, run_cycle

logger = logging.getLogger(__name__)


def due_trigger(
    ctx: CycleContext, now: float | None = None, since: float | None = None
) -> str | None:
    """'count' or 'interval' when an automatic cycle is due, else None. The interval runs from
    the last finished cycle, or from `since` (the scheduler's start) before the first one."""
    cfg = ctx.settings.scheduler
    pset = preference_sets.build(ctx.store, ctx.settings.snapshot)
    # What a cycle could train on: held-out rows only evaluate.
    usable = len(pset.pairs_train) or len(pset.kto_train)
    if usable >= cfg.min_new_items:
        return "count"
    finished = [r.finished_at for r in recent_runs(ctx.store) if r.finished_at is not None]
    last = max(finished).timestamp() if finished else since
    now = time.time() if now is None else now
    if usable >= cfg.min_items_for_interval and (last is None or now - last >= cfg.interval_s):
        return "interval"
    return None


def tick(ctx: CycleContext, since: float | None = None) -> TrainingRun | None:
    """Run the queued cycle, or an automatic one if due; returns the finished run, if any."""
    runs = recent_runs(ctx.store)
    running = [r for r in runs if r.status == "running"]
    if running:
        return None  # another process is running it
    queued = next((r for r in reversed(runs) if r.status == "queued"), None)
    if queued is None and ctx.settings.scheduler.enabled:
        trigger = due_trigger(ctx, since=since)
        if trigger is not None:
            try:
                queued = queue_run(ctx.store, trigger, "scheduler")
            except Conflict:
                return None
    if queued is None:
        return None
    logger.info("starting training run %s (%s)", queued.id, queued.trigger)
    return run_cycle(ctx, queued.id)


def recover(ctx: CycleContext) -> None:
    """Runs left 'running' by a process that died are failed, so they don't block the loop."""
    for run in recent_runs(ctx.store):
        if run.status == "running":
            update_run(
                ctx.store,
                run.id,
                status="failed",
                finished_at=datetime.now(UTC),
                error="interrupted: the process running it stopped",
            )


class Scheduler:
    """Ticks in a background thread until stopped."""

    def __init__(self, ctx: CycleContext):
        self._ctx = ctx
        self._stop = threading.Event()
        self._started = time.time()
        self._thread = threading.Thread(target=self._loop, name="prefloop-scheduler", daemon=True)

    def start(self) -> None:
        recover(self._ctx)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                tick(self._ctx, since=self._started)
            except Exception:  # a failed tick must not end the loop; runs record their errors
                logger.exception("scheduler tick failed")
            self._stop.wait(self._ctx.settings.scheduler.poll_s)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
