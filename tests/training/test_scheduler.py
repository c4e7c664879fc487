"""The scheduler's triggers and the cycle's failure path, on feedback sent through the API."""

from __future__ import annotations

import time
import uuid

import pytest

from service.runs import get_run, queue_run, recent_runs
from training import scheduler
from training.config import SchedulerConfig, SnapshotConfig, TrainingSettings
from training.cycle import CycleContext, run_cycle


def context(registry, tmp_path, **scheduler_cfg) -> CycleContext:
    settings = TrainingSettings(
        data_dir=tmp_path,
        snapshot=SnapshotConfig(heldout_fraction=0.0),
        scheduler=SchedulerConfig(**scheduler_cfg),
    )
    return CycleContext(
        registry=registry,
        settings=settings,
        database_url=registry.store.url,
    )


async def vote(client, n_pairs: int) -> None:
    """`n_pairs` pairwise votes, each on a new question (the same question twice is one pair)."""
    for _ in range(n_pairs):
        question = f"question {uuid.uuid4().hex}"
        body = (
            await client.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": question}], "n": 2},
            )
        ).json()
        r = await client.post(
            "/v1/feedback",
            json={
                "type": "pairwise",
                "winner": "a",
                "a": {"response_id": body["id"]},
                "b": {"response_id": body["id"], "choice_index": 1},
            },
        )
        assert r.status_code == 201


async def test_count_and_interval_triggers(client, registry, tmp_path):
    ctx = context(registry, tmp_path, min_new_items=5, min_items_for_interval=2, interval_s=60)
    assert scheduler.due_trigger(ctx) is None
    await vote(client, 2)
    assert scheduler.due_trigger(ctx) == "interval"  # no cycle yet: the interval has passed
    await vote(client, 3)
    assert scheduler.due_trigger(ctx) == "count"


async def test_interval_counts_from_the_last_cycle(client, registry, tmp_path, monkeypatch):
    ctx = context(registry, tmp_path, min_new_items=50, min_items_for_interval=2, interval_s=60)
    monkeypatch.setattr(scheduler, "run_cycle", finish_run)
    await vote(client, 1)
    queue_run(registry.store, "manual", "test")
    scheduler.tick(ctx)
    await vote(client, 2)
    assert scheduler.due_trigger(ctx) is None
    assert scheduler.due_trigger(ctx, now=time.time() + 61) == "interval"


def finish_run(ctx, run_id):
    from datetime import UTC, datetime

    from service.runs import update_run

    update_run(
        ctx.store,
        run_id,
        status="promoted",
        started_at=datetime.now(UTC),
        finished_at=datetime.now(UTC),
    )
    return get_run(ctx.store, run_id)


async def test_tick_runs_the_queued_run_once(client, registry, tmp_path, monkeypatch):
    ctx = context(registry, tmp_path, min_new_items=1)
    calls = []
    monkeypatch.setattr(
        scheduler, "run_cycle", lambda c, rid: calls.append(rid) or finish_run(c, rid)
    )
    manual = queue_run(registry.store, "manual", "ops")
    await vote(client, 3)
    assert scheduler.tick(ctx).id == manual.id  # the queued run goes first
    run = scheduler.tick(ctx)  # then the count trigger fires
    assert run.trigger == "count" and calls == [manual.id, run.id]


async def test_a_running_run_blocks_another(client, registry, tmp_path, monkeypatch):
    from service.runs import update_run

    ctx = context(registry, tmp_path, min_new_items=1)
    monkeypatch.setattr(scheduler, "run_cycle", lambda *a: pytest.fail("second cycle started"))
    run = queue_run(registry.store, "manual", "ops")
    update_run(registry.store, run.id, status="running")
    await vote(client, 3)
    assert scheduler.tick(ctx) is None
    scheduler.recover(ctx)
    assert get_run(registry.store, run.id).status == "failed"


async def test_failed_cycle_is_recorded_and_serving_untouched(
    client, registry, tmp_path, monkeypatch
):
    import training.trainer

    def broken(job):
        raise RuntimeError("worker lost")

    monkeypatch.setattr(training.trainer, "run_training", broken)
    ctx = context(registry, tmp_path)
    await vote(client, 4)
    run = run_cycle(ctx, queue_run(registry.store, "manual", "ops").id)
    assert run.status == "failed"
    assert "RuntimeError: worker lost" in run.error
    assert run.snapshot_id is not None and "train" in run.stages
    assert registry.served().version.id == "base"
    assert [v.id for v in registry.versions()] == ["base"]
    assert [r.status for r in recent_runs(registry.store)] == ["failed"]
    assert not list((tmp_path / "runs").iterdir())  # scratch space cleaned up


async def test_nothing_to_train_is_skipped(registry, tmp_path):
    ctx = context(registry, tmp_path)
    run = run_cycle(ctx, queue_run(registry.store, "manual", "ops").id)
    assert run.status == "skipped" and run.error == "no training rows for algorithm auto"
