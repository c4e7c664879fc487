"""Admin routes: model versions, promotion and rollback, loop status, training on demand.

Training itself runs on the offline side; asking for it here queues a training run in the store,
which the scheduler picks up (the service never imports `training`).
"""

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from sqlalchemy import func, select

from service.auth import Principal
from service.registry import Registry
from service.rollout import VersionFollower
from service.runs import ACTIVE, queue_run, recent_runs
from service.store import Feedback, ModelVersion, TrainingRun, used_feedback_ids


def version_view(v: ModelVersion) -> dict[str, Any]:
    return {
        "id": v.id,
        "object": "model.version",
        "parent": v.parent_id,
        "kind": v.kind,
        "algorithm": v.algorithm,
        "status": v.status,
        "reason": v.reason,
        "snapshot_id": v.snapshot_id,
        "metrics": v.metrics,
        "created": int(v.created_at.timestamp()),
    }


def run_view(r: TrainingRun | None) -> dict[str, Any] | None:
    if r is None:
        return None
    last = r.step_metrics[-1] if r.step_metrics else None
    return {
        "id": r.id,
        "status": r.status,
        "trigger": r.trigger,
        "algorithm": r.algorithm,
        "parent_version": r.parent_version_id,
        "snapshot_id": r.snapshot_id,
        "candidate_version": r.candidate_version_id,
        "steps": len(r.step_metrics),
        "last_step": last,
        "stages": r.stages,
        "error": r.error,
        "created": int(r.created_at.timestamp()),
        "finished": int(r.finished_at.timestamp()) if r.finished_at else None,
    }


def loop_status(registry: Registry) -> dict[str, Any]:
    """Served version, feedback no snapshot has used yet, and the newest runs."""
    served = registry.served()
    with registry.store.reading() as s:
        used = used_feedback_ids(s)
        total = s.scalar(select(func.count()).select_from(Feedback)) or 0
    runs = recent_runs(registry.store)
    current = next((r for r in runs if r.status in ACTIVE), None)
    last = next((r for r in runs if r.status not in ACTIVE), None)
    return {
        "served_version": version_view(served.version),
        "feedback": {"total": total, "pending": total - len(used)},
        "current_run": run_view(current),
        "last_run": run_view(last),
    }


def admin_router(registry: Registry, follower: VersionFollower, admin: Any) -> APIRouter:
    router = APIRouter(prefix="/v1/admin")
    Admin = Annotated[Principal, Depends(admin)]

    @router.get("/versions")
    async def list_versions(_: Admin) -> dict:
        versions = await asyncio.to_thread(registry.versions)
        served = (await asyncio.to_thread(registry.served)).version.id
        return {"object": "list", "served": served, "data": [version_view(v) for v in versions]}

    @router.get("/versions/{version_id}")
    async def get_version(version_id: str, _: Admin) -> dict:
        v = await asyncio.to_thread(registry.get, version_id)
        return {**version_view(v), "manifest": v.manifest}

    @router.post("/versions/{version_id}/promote")
    async def promote(version_id: str, who: Admin) -> dict:
        promo = await asyncio.to_thread(registry.promote, version_id, who.name)
        # This replica swaps before answering; the others follow within their poll interval.
        serving = await follower.sync()
        return {
            "object": "promotion",
            "id": promo.id,
            "version": promo.version_id,
            "action": promo.action,
            "serving": serving,
        }

    @router.get("/status")
    async def status(_: Admin) -> dict:
        return await asyncio.to_thread(loop_status, registry)

    @router.post("/train", status_code=202)
    async def train(who: Admin) -> dict:
        run = await asyncio.to_thread(queue_run, registry.store, "manual", who.name)
        return run_view(run) or {}

    return router
