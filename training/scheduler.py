"""The scheduler: decides when a cycle runs, and runs one at a time.

A cycle starts when someone queued one (`prefloop train`, `POST /v1/admin/train`), when at least
`min_new_items` usable pairs (or KTO rows, with no pairs) arrived since the last snapshot, or when
`interval_s` passed since the last cycle with at least `min_items_for_interval`. After failed
cycles the automatic triggers wait (`backoff`): a failed cycle gives its feedback back, and without
the wait the count trigger would start the next one at once. Only one process should run the
scheduler (`prefloop serve` does); the store refuses a second queued or running run.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from service.errors import Conflict
from service.runs import ACTIVE, queue_run, recent_runs, update_run
from service.store import TrainingRun
from training import preference_sets
from training.config import SchedulerConfig
from training.cycle import CycleContext, run_cycle

logger = logging.getLogger(__name__)


def _epoch(moment: datetime) -> float:
    """Seconds since the epoch; SQLite hands timestamps back without their zone (UTC)."""
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def retry_after(
    runs: Sequence[TrainingRun], cfg: SchedulerConfig
) -> tuple[int, float, float | None]:
    """(failed cycles in a row, the backoff they earn in seconds, the time before which no
    automatic cycle starts or None) from `runs`, newest first. The backoff is `retry_backoff_s`
    doubled for each failure after the first, at most `retry_backoff_max_s`."""
    ended = [r for r in runs if r.status not in ACTIVE]
    failures = next((i for i, r in enumerate(ended) if r.status != "failed"), len(ended))
    if failures == 0:
        return 0, 0.0, None
    wait = min(cfg.retry_backoff_s * 2 ** (failures - 1), cfg.retry_backoff_max_s)
    last = ended[0].finished_at
    return failures, wait, (_epoch(last) + wait if last is not None else None)


def backoff(ctx: CycleContext, now: float | None = None) -> dict[str, Any]:
    """The backoff as `prefloop status` shows it: failed cycles in a row, the wait they earn, until
    when, and whether that is still ahead (`waiting`)."""
    failures, wait, until = retry_after(recent_runs(ctx.store), ctx.settings.scheduler)
    now = time.time() if now is None else now
    return {
        "failed_in_a_row": failures,
        "backoff_s": wait,
        "retry_after": datetime.fromtimestamp(until, UTC).isoformat() if until else None,
        "waiting": until is not None and now < until,
    }


def due_trigger(
    ctx: CycleContext, now: float | None = None, since: float | None = None
) -> str | None:
    """'count' or 'interval' when an automatic cycle is due, else None. The interval runs from
    the last finished cycle, or from `since` (the scheduler's start) before the first one; neither
    is due while failed cycles' backoff lasts."""
    cfg = ctx.settings.scheduler
    runs = recent_runs(ctx.store)
    now = time.time() if now is None else now
    _, _, until = retry_after(runs, cfg)
    if until is not None and now < until:
        return None
    pset = preference_sets.build(ctx.store, ctx.settings.snapshot)
    # What a cycle could train on: held-out rows only evaluate.
    usable = len(pset.pairs_train) or len(pset.kto_train)
    if usable >= cfg.min_new_items:
        return "count"
    finished = [_epoch(r.finished_at) for r in runs if r.finished_at is not None]
    last = max(finished) if finished else since
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
    """Runs left 'running' by a process that died are failed, so they don't block the loop, and
    their snapshots released, so the next cycle trains on their feedback."""
    for run in recent_runs(ctx.store):
        if run.status == "running":
            update_run(
                ctx.store,
                run.id,
                status="failed",
                finished_at=datetime.now(UTC),
                error="interrupted: the process running it stopped",
            )
            candidate = run.candidate_version_id
            if run.snapshot_id is not None and (candidate is None or _unjudged(ctx, candidate)):
                preference_sets.release_snapshot(ctx.store, run.snapshot_id)


def _unjudged(ctx: CycleContext, version_id: str) -> bool:
    """Whether the gate has not yet recorded its verdict on `version_id`."""
    return ctx.registry.get(version_id).status == "candidate"


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
