"""`POST /v1/admin/score` over HTTP with the fake engine and a real tiny reward model (a random
2-layer Llama under a one-label scalar head, with the byte tokenizer): scores equal the scorer's
own, normalisation by the version's training statistics, the one-model cache, which version
scores, and the errors; reward versions in the version listing and refused by promote."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import pytest

from service.registry import Registry
from service.scoring import RewardScorer
from tests.conftest import ADMIN_KEY, CHAT_KEY, auth

QUESTION = [
    {"role": "system", "content": "You are a support agent."},
    {"role": "user", "content": "How do I cancel my plan?"},
]
ANSWERS = [
    "Open Settings, pick Billing and press Cancel plan.",
    "Before you go, did you know Premium gives you 20% off this month?",
]
STATS = {
    "score_mean": 0.25,
    "score_std": 2.0,
    "heldout_accuracy": 0.75,
    "longer_wins_accuracy": 0.5,
    "heldout_pairs": 8,
}
ADMIN = auth(ADMIN_KEY)


def publish_reward(
    registry: Registry,
    tmp_path: Path,
    weights: Path,
    version_id: str,
    stats: dict[str, Any] | None = STATS,
) -> None:
    """Publish `weights` as an approved reward version, as an RLHF cycle does."""
    source = tmp_path / "runs" / version_id
    shutil.copytree(weights, source / "weights")
    train: dict[str, Any] = {"train_loss": 0.6}
    if stats is not None:
        train["reward_model"] = stats
    registry.publish(
        version_id=version_id,
        parent=registry.get("base"),
        source=source,
        kind="reward",
        weights_id=None,
        algorithm="reward",
        snapshot_id="snap-1",
        config={},
        metrics={"train": train},
    )
    registry.judge(version_id, approved=True, reason=None, metrics={})


def count_loads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Record every `RewardScorer.load` (the cache calls it on the class)."""
    loaded: list[Path] = []
    load = RewardScorer.load

    def spy(path: Path, *args: Any, **kwargs: Any) -> RewardScorer:
        loaded.append(Path(path))
        return load(path, *args, **kwargs)

    monkeypatch.setattr(RewardScorer, "load", spy)
    return loaded


async def test_scores_are_the_reward_models_own(
    client, registry, tmp_path, tiny_reward_dir, monkeypatch
):
    publish_reward(registry, tmp_path, tiny_reward_dir, "rm1")
    weights = registry.weights_path(registry.get("rm1"))
    expected = RewardScorer.load(weights).score([QUESTION] * 2, ANSWERS)
    loaded = count_loads(monkeypatch)

    r = await client.post(
        "/v1/admin/score", json={"messages": QUESTION, "answers": ANSWERS}, headers=ADMIN
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "reward.scores" and body["reward_model"] == "rm1"
    assert [d["index"] for d in body["data"]] == [0, 1]
    scores = [d["score"] for d in body["data"]]
    assert all(math.isfinite(s) for s in scores)
    assert scores == pytest.approx(expected, abs=1e-6)
    assert scores[0] != scores[1]
    assert [d["normalized"] for d in body["data"]] == pytest.approx(
        [(s - STATS["score_mean"]) / STATS["score_std"] for s in scores]
    )

    # Named, and asked again: the cached model scores, nothing is loaded a second time.
    again = await client.post(
        "/v1/admin/score",
        json={"messages": QUESTION, "answers": ANSWERS[:1], "reward_model": "rm1"},
        headers=ADMIN,
    )
    assert again.status_code == 200, again.text
    assert again.json()["data"][0]["score"] == pytest.approx(expected[0], abs=1e-6)
    assert loaded == [weights]


async def test_named_reward_model_and_missing_statistics(
    client, registry, tmp_path, tiny_reward_dir
):
    publish_reward(registry, tmp_path, tiny_reward_dir, "rm-old", stats=None)
    publish_reward(registry, tmp_path, tiny_reward_dir, "rm-new")
    body = {"messages": QUESTION, "answers": ANSWERS}

    latest = (await client.post("/v1/admin/score", json=body, headers=ADMIN)).json()
    assert latest["reward_model"] == "rm-new"
    named = await client.post(
        "/v1/admin/score", json={**body, "reward_model": "rm-old"}, headers=ADMIN
    )
    assert named.status_code == 200, named.text
    assert named.json()["reward_model"] == "rm-old"
    # Without training statistics, normalized is the raw score.
    for d in named.json()["data"]:
        assert d["normalized"] == d["score"]


@pytest.mark.parametrize(
    ("reward_model", "status", "code"),
    [("base", 409, "not_a_reward_model"), ("v404", 404, "version_not_found")],
)
async def test_named_version_must_be_a_reward_model(client, reward_model, status, code):
    r = await client.post(
        "/v1/admin/score",
        json={"messages": QUESTION, "answers": ANSWERS, "reward_model": reward_model},
        headers=ADMIN,
    )
    assert r.status_code == status
    assert r.json()["error"]["code"] == code and r.json()["error"]["param"] == "reward_model"


async def test_no_reward_model_yet(client):
    r = await client.post(
        "/v1/admin/score", json={"messages": QUESTION, "answers": ANSWERS}, headers=ADMIN
    )
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["code"] == "no_reward_model" and "rlhf" in error["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": QUESTION, "answers": []}, "answers"),
        ({"messages": QUESTION, "answers": ["fine"] * 17}, "answers"),
        ({"messages": QUESTION, "answers": ["fine", ""]}, "answers.1"),
        ({"messages": QUESTION}, "answers"),
        ({"messages": [], "answers": ANSWERS}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}], "answers": ANSWERS}, "messages.0.role"),
        ({"messages": QUESTION, "answers": ANSWERS, "temperature": 1.0}, "temperature"),
        ({"messages": QUESTION, "answers": ANSWERS, "reward_model": ""}, "reward_model"),
    ],
)
async def test_invalid_request_names_the_field(client, body, param):
    r = await client.post("/v1/admin/score", json=body, headers=ADMIN)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["code"] == "invalid_value"


async def test_scoring_needs_admin(client):
    r = await client.post(
        "/v1/admin/score", json={"messages": QUESTION, "answers": ANSWERS}, headers=auth(CHAT_KEY)
    )
    assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope"


async def test_reward_versions_are_listed_with_a_summary_and_never_promoted(
    client, registry, tmp_path, tiny_reward_dir
):
    publish_reward(registry, tmp_path, tiny_reward_dir, "rm1")
    listed = (await client.get("/v1/admin/versions", headers=ADMIN)).json()
    views = {v["id"]: v for v in listed["data"]}
    assert views["rm1"]["kind"] == "reward" and views["rm1"]["status"] == "approved"
    assert views["rm1"]["reward_model"] == STATS
    assert "reward_model" not in views["base"]
    one = (await client.get("/v1/admin/versions/rm1", headers=ADMIN)).json()
    assert one["reward_model"] == STATS and one["manifest"]["kind"] == "reward"

    r = await client.post("/v1/admin/versions/rm1/promote", headers=ADMIN)
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "not_a_chat_model"
    assert "never served" in r.json()["error"]["message"]
    assert listed["served"] == "base"
    assert (await client.get("/v1/admin/versions", headers=ADMIN)).json()["served"] == "base"
