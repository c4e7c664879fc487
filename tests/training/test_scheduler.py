"""The scheduler's triggers, the cycle's failure path (a failed cycle gives its feedback back and
the scheduler backs off), and what a rejected candidate does with its feedback, on feedback sent
through the API."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

import pytest

import training.cycle
import training.trainer
from service.admin import loop_status
from service.runs import get_run, queue_run, recent_runs, update_run
from service.store import PreferenceSnapshot
from training import preference_sets, scheduler
from training.config import SchedulerConfig, SnapshotConfig, TrainingSettings
from training.cycle import CycleContext, run_cycle
from training.gate import GateResult
from training.trainer import TrainResult


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


def broken(job):
    raise RuntimeError("worker lost")


def usable(ctx: CycleContext) -> int:
    return preference_sets.build(ctx.store, ctx.settings.snapshot).usable


def snapshots(registry) -> list[PreferenceSnapshot]:
    with registry.store.reading() as session:
        return list(session.query(PreferenceSnapshot).order_by(PreferenceSnapshot.created_at))


async def test_a_failed_cycle_gives_its_feedback_back(client, registry, tmp_path, monkeypatch):
    monkeypatch.setattr(training.trainer, "run_training", broken)
    ctx = context(registry, tmp_path)
    await vote(client, 4)
    first = run_cycle(ctx, queue_run(registry.store, "manual", "ops").id)
    assert first.status == "failed" and first.snapshot_id is not None
    # The snapshot stays on record, but its feedback counts as unused again.
    assert usable(ctx) == 4
    assert loop_status(registry)["feedback"] == {"total": 4, "pending": 4}
    second = run_cycle(ctx, queue_run(registry.store, "manual", "ops").id)
    released, retaken = snapshots(registry)
    assert (released.id, retaken.id) == (first.snapshot_id, second.snapshot_id)
    assert released.released_at is not None
    assert (
        sorted(retaken.feedback_ids) == sorted(released.feedback_ids)
        and retaken.counts["pairs_train"] == 4
    )


async def test_failing_cycles_back_off_exponentially_up_to_the_cap(
    client, registry, tmp_path, monkeypatch
):
    monkeypatch.setattr(training.trainer, "run_training", broken)
    ctx = context(registry, tmp_path, min_new_items=1, retry_backoff_s=100, retry_backoff_max_s=300)
    await vote(client, 2)
    assert scheduler.backoff(ctx) == {
        "failed_in_a_row": 0,
        "backoff_s": 0.0,
        "retry_after": None,
        "waiting": False,
    }
    for failures, wait in ((1, 100), (2, 200), (3, 300), (4, 300)):
        # The scheduler's own cycle, then (it would wait now) a person's, which nobody holds back.
        run = scheduler.tick(ctx) if failures == 1 else None
        if run is None:
            queue_run(registry.store, "manual", "ops")
            run = scheduler.tick(ctx)
        assert run is not None and run.status == "failed"
        finished = get_run(registry.store, run.id).finished_at.replace(tzinfo=UTC).timestamp()
        state = scheduler.backoff(ctx)
        assert (state["failed_in_a_row"], state["backoff_s"]) == (failures, wait)
        assert state["retry_after"] == datetime.fromtimestamp(finished + wait, UTC).isoformat()
        assert state["waiting"] and not scheduler.backoff(ctx, now=finished + wait + 1)["waiting"]
        assert scheduler.due_trigger(ctx, now=finished + wait - 1) is None
        assert scheduler.due_trigger(ctx, now=finished + wait + 1) == "count"
    # A cycle that ends (here: promoted) resets the count.
    queue_run(registry.store, "manual", "ops")
    monkeypatch.setattr(scheduler, "run_cycle", finish_run)
    scheduler.tick(ctx)
    assert scheduler.backoff(ctx)["failed_in_a_row"] == 0
    assert scheduler.due_trigger(ctx) == "count"


async def test_recover_gives_back_the_feedback_of_an_interrupted_run(client, registry, tmp_path):
    ctx = context(registry, tmp_path)
    await vote(client, 3)
    snap = preference_sets.write_snapshot(
        registry.store, tmp_path, preference_sets.build(registry.store, ctx.settings.snapshot)
    )
    run = queue_run(registry.store, "manual", "ops")
    update_run(registry.store, run.id, status="running", snapshot_id=snap.id)
    assert usable(ctx) == 0
    scheduler.recover(ctx)
    assert get_run(registry.store, run.id).status == "failed"
    assert usable(ctx) == 3


async def test_a_rejected_candidate_keeps_its_feedback(client, registry, tmp_path, monkeypatch):
    """README, The learning loop: the gate judged a model trained on exactly this feedback, and
    the same rows and seed would train the same candidate again."""

    def train(job):
        job.output_dir.mkdir(parents=True)
        (job.output_dir / "adapter_model.safetensors").write_bytes(b"")
        return TrainResult(job.output_dir, [], {})

    def merge(base, adapter, out, tokenizer):
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"")

    monkeypatch.setattr(training.trainer, "run_training", train)
    monkeypatch.setattr(training.cycle, "merge_adapter", merge)
    monkeypatch.setattr(
        training.cycle, "run_gate", lambda *a, **k: GateResult(False, ["accuracy 0.40 < 0.6"])
    )
    ctx = context(registry, tmp_path, min_new_items=1)
    await vote(client, 3)
    run = run_cycle(ctx, queue_run(registry.store, "manual", "ops").id)
    assert run.status == "rejected"
    assert usable(ctx) == 0 and scheduler.due_trigger(ctx) is None
    assert scheduler.backoff(ctx)["failed_in_a_row"] == 0
