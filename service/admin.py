"""Admin routes: model versions, promotion and rollback, loop status, training on demand, and
answers scored by a reward model.

Training itself runs on the offline side; asking for it here queues a training run in the store,
which the scheduler picks up (the service never imports `training`).
"""

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from sqlalchemy import func, select

from service.auth import Principal
from service.errors import AUTH_ERRORS, BODY_ERRORS, Conflict, documented
from service.policy import Policy
from service.protocol import RewardScore, RewardScores, ScoreRequest
from service.registry import REWARD_KIND, Registry
from service.runs import ACTIVE, queue_run, recent_runs
from service.scoring import ScorerCache, normalisation
from service.store import Feedback, ModelVersion, TrainingRun, used_feedback_ids

# What a version listing shows of a reward model's training metrics (`metrics.train.reward_model`).
REWARD_SUMMARY = (
    "heldout_accuracy",
    "longer_wins_accuracy",
    "heldout_pairs",
    "score_mean",
    "score_std",
)


def reward_stats(version: ModelVersion) -> dict[str, Any]:
    """`metrics.train.reward_model` of a reward version, `{}` when training did not record it."""
    train = (version.metrics or {}).get("train")
    stats = train.get("reward_model") if isinstance(train, dict) else None
    return stats if isinstance(stats, dict) else {}


def version_view(v: ModelVersion) -> dict[str, Any]:
    view = {
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
    if v.kind == REWARD_KIND:
        stats = reward_stats(v)
        view["reward_model"] = {key: stats.get(key) for key in REWARD_SUMMARY}
    return view


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


def reward_version(registry: Registry, version_id: str | None) -> ModelVersion:
    """The reward model a score request names, else the newest approved one."""
    if version_id is None:
        return registry.latest_reward()
    version = registry.get(version_id, param="reward_model")
    if version.kind != REWARD_KIND:
        raise Conflict(
            f"version {version_id!r} is a {version.kind} model, not a reward model",
            param="reward_model",
            code="not_a_reward_model",
        )
    return version


def score_answers(registry: Registry, scorers: ScorerCache, req: ScoreRequest) -> RewardScores:
    """Score each answer to `req.messages` (blocking: a database read, maybe a model load, the
    forward passes)."""
    version = reward_version(registry, req.reward_model)
    scorer = scorers.get(version.id, registry.weights_path(version))
    conversation = [m.as_prompt() for m in req.messages]
    scores = scorer.score([conversation] * len(req.answers), req.answers)
    stats = normalisation(version.metrics or {})
    mean, std = stats["score_mean"], stats["score_std"]
    return RewardScores(
        reward_model=version.id,
        data=[
            RewardScore(index=i, score=score, normalized=(score - mean) / std)
            for i, score in enumerate(scores)
        ],
    )


def admin_router(registry: Registry, policy: Policy, scorers: ScorerCache, admin: Any) -> APIRouter:
    router = APIRouter(prefix="/v1/admin", responses=documented(*AUTH_ERRORS))
    Admin = Annotated[Principal, Depends(admin)]

    @router.get("/versions")
    async def list_versions(_: Admin) -> dict:
        versions = await asyncio.to_thread(registry.versions)
        served = (await asyncio.to_thread(registry.served)).version.id
        return {"object": "list", "served": served, "data": [version_view(v) for v in versions]}

    @router.get("/versions/{version_id}", responses=documented(404, 422))
    async def get_version(version_id: str, _: Admin) -> dict:
        v = await asyncio.to_thread(registry.get, version_id)
        return {**version_view(v), "manifest": v.manifest}

    @router.post("/versions/{version_id}/promote", responses=documented(404, 409, 422, 503))
    async def promote(version_id: str, who: Admin) -> dict:
        promo = await asyncio.to_thread(registry.promote, version_id, who.name)
        # One policy replica swaps before this answers; the others follow within their poll
        # interval.
        serving = await policy.sync()
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

    @router.post("/train", status_code=202, responses=documented(409))
    async def train(who: Admin) -> dict:
        run = await asyncio.to_thread(queue_run, registry.store, "manual", who.name)
        return run_view(run) or {}

    @router.post("/score", responses=documented(*BODY_ERRORS, 404, 409))
    async def score(req: ScoreRequest, _: Admin) -> RewardScores:
        return await asyncio.to_thread(score_answers, registry, scorers, req)

    return router
