"""Training runs in the store: queue one, update it, read it. The admin API queues manual runs;
the offline side's scheduler queues its own and records progress through the same functions."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import desc, select

from service.errors import Conflict
from service.store import Store, TrainingRun

ACTIVE = ("queued", "running")


def queue_run(store: Store, trigger: str, requested_by: str) -> TrainingRun:
    """Queue a cycle; refused while another is queued or running (never two at once)."""

    def op(session) -> TrainingRun:
        active = session.scalars(
            select(TrainingRun).where(TrainingRun.status.in_(ACTIVE)).limit(1)
        ).first()
        if active is not None:
            raise Conflict(
                f"training run {active.id} is already {active.status}", code="training_in_progress"
            )
        run = TrainingRun(
            id=f"run-{uuid.uuid4().hex[:12]}",
            trigger=trigger,
            status="queued",
            algorithm="auto",
            parent_version_id=None,
            snapshot_id=None,
            candidate_version_id=None,
            config={"requested_by": requested_by},
            step_metrics=[],
            stages={},
            error=None,
            created_at=datetime.now(UTC),
            started_at=None,
            finished_at=None,
        )
        session.add(run)
        return run

    return store.write_one(op)


def update_run(store: Store, run_id: str, **fields: Any) -> None:
    def op(session) -> None:
        row = session.get(TrainingRun, run_id)
        for name, value in fields.items():
            setattr(row, name, value)

    store.write_one(op)


def get_run(store: Store, run_id: str) -> TrainingRun:
    with store.reading() as s:
        row = s.get(TrainingRun, run_id)
    if row is None:
        raise LookupError(f"no training run {run_id!r}")
    return row


def recent_runs(store: Store, limit: int = 20) -> list[TrainingRun]:
    with store.reading() as s:
        return list(
            s.scalars(select(TrainingRun).order_by(desc(TrainingRun.created_at)).limit(limit))
        )
