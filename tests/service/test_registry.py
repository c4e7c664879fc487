"""Registry and rollout over HTTP with the fake engine: manifests, checksums, the approval rule,
promotion and rollback, reward models (never served, the newest approved one found), and
responses that never mix versions during a swap."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import pytest

from service.errors import Conflict, NotFound
from service.registry import Registry
from tests.conftest import ADMIN_KEY, CHAT_KEY, auth, trained_result

QUESTION = [{"role": "user", "content": "Where is my invoice?"}]


def publish(
    registry: Registry, tmp_path, version_id: str, approve: bool = True, kind: str = "lora"
):
    parent = registry.served().version
    v = registry.publish(
        version_id=version_id,
        parent=parent,
        source=trained_result(tmp_path, version_id),
        kind=kind,
        algorithm="reward" if kind == "reward" else "dpo",
        snapshot_id="snap-1",
        config={"beta": 0.1},
        metrics={"train_loss": 0.5},
    )
    if approve:
        registry.judge(version_id, approved=True, reason=None, metrics={"accuracy": 1.0})
    return v


def test_publish_writes_manifest_with_checksums(registry, tmp_path):
    v = publish(registry, tmp_path, "v1", approve=False)
    manifest = json.loads((registry.path_of(v) / "manifest.json").read_text())
    assert manifest["parent"] == "base" and manifest["snapshot_id"] == "snap-1"
    assert set(manifest["files"]) == {
        "weights/model.safetensors",
        "weights/config.json",
        "adapter/adapter_model.safetensors",
    }
    assert registry.checksum_mismatches(v) == []
    (registry.path_of(v) / "weights" / "config.json").write_text('{"tampered": true}')
    assert registry.checksum_mismatches(v) == ["weights/config.json"]


def test_only_approved_versions_are_served(registry, tmp_path):
    publish(registry, tmp_path, "v1", approve=False)
    with pytest.raises(Conflict, match="candidate"):
        registry.promote("v1", "ops")
    registry.judge("v1", approved=False, reason="accuracy 0.4 < 0.6", metrics={})
    with pytest.raises(Conflict, match=r"accuracy 0\.4"):
        registry.promote("v1", "ops")
    with pytest.raises(NotFound):
        registry.promote("v404", "ops")
    assert registry.served().version.id == "base"


def test_reward_models_are_never_served(registry, tmp_path):
    publish(registry, tmp_path, "rm1", kind="reward")
    with pytest.raises(Conflict, match="never served") as refused:
        registry.promote("rm1", "ops")
    assert (refused.value.param, refused.value.code) == ("version_id", "not_a_chat_model")
    assert registry.served().version.id == "base"
    assert [p.version_id for p in registry.history()] == ["base"]


def test_latest_reward_is_the_newest_approved_one(registry, tmp_path):
    with pytest.raises(NotFound, match=r"train\.algorithm rlhf") as missing:
        registry.latest_reward()
    assert missing.value.code == "no_reward_model"
    publish(registry, tmp_path, "v1")  # a chat model is never a reward model
    publish(registry, tmp_path, "rm1", kind="reward")
    publish(registry, tmp_path, "rm2", kind="reward")
    publish(registry, tmp_path, "rm3", kind="reward", approve=False)  # a candidate
    assert registry.latest_reward().id == "rm2"
    registry.judge("rm3", approved=False, reason="accuracy 0.4", metrics={})
    assert registry.latest_reward().id == "rm2"


async def test_promote_and_rollback_over_http(client, registry, engine, tmp_path):
    publish(registry, tmp_path, "v1")
    admin = auth(ADMIN_KEY)
    listed = (await client.get("/v1/admin/versions", headers=admin)).json()
    assert listed["served"] == "base"
    assert [v["id"] for v in listed["data"]] == ["base", "v1"]

    r = await client.post("/v1/admin/versions/v1/promote", headers=admin)
    assert r.status_code == 200, r.text
    assert r.json() | {"id": 0} == {
        "object": "promotion",
        "id": 0,
        "version": "v1",
        "action": "promote",
        "serving": "v1",
    }
    chat = (await client.post("/v1/chat/completions", json={"messages": QUESTION})).json()
    assert chat["system_fingerprint"] == "v1" and "[v1]" in chat["choices"][0]["message"]["content"]
    assert engine.swaps[-1] == ("v1", registry.path_of(registry.get("v1")) / "weights")

    r = await client.post("/v1/admin/versions/base/promote", headers=admin)
    assert r.json()["action"] == "rollback" and r.json()["serving"] == "base"
    chat = (await client.post("/v1/chat/completions", json={"messages": QUESTION})).json()
    assert chat["system_fingerprint"] == "base"
    assert [p.action for p in registry.history()] == ["rollback", "promote", "promote"]


async def test_admin_routes_need_admin(client):
    r = await client.get("/v1/admin/versions", headers=auth(CHAT_KEY))
    assert r.status_code == 403
    r = await client.post("/v1/admin/versions/nope/promote", headers=auth(ADMIN_KEY))
    assert r.status_code == 404 and r.json()["error"]["param"] == "version_id"


async def wait_until(
    condition: Callable[[], bool], what: str, poll_s: float = 0.0, timeout_s: float = 10.0
) -> None:
    """Yield to the event loop until `condition()` holds; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout_s} s for {what}")
        await asyncio.sleep(poll_s)


async def test_no_response_mixes_versions_during_a_swap(client, registry, engine, tmp_path):
    publish(registry, tmp_path, "v1")

    async def ask() -> dict:
        r = await client.post("/v1/chat/completions", json={"messages": QUESTION, "n": 2})
        assert r.status_code == 200
        return r.json()

    follower = client._transport.app.state.follower
    before = [asyncio.create_task(ask()) for _ in range(20)]
    await wait_until(lambda: engine.in_flight > 0, "a request to reach the engine")
    registry.promote("v1", "ops")
    swap = asyncio.create_task(follower.sync())
    # The follower reads the promotion first (a thread, a query).
    await wait_until(lambda: engine.swapping, "the engine to start the swap", poll_s=0.001)
    during = [asyncio.create_task(ask()) for _ in range(20)]
    assert await swap == "v1"
    replies = await asyncio.gather(*before, *during)
    versions = {r["system_fingerprint"] for r in replies}
    assert versions == {"base", "v1"}
    for r in replies:
        tagged = ["[v1]" in c["message"]["content"] for c in r["choices"]]
        assert tagged == [r["system_fingerprint"] == "v1"] * 2


async def test_status_and_manual_training_queue(client, registry):
    admin = auth(ADMIN_KEY)
    rid = (await client.post("/v1/chat/completions", json={"messages": QUESTION})).json()["id"]
    await client.post("/v1/feedback", json={"type": "thumbs", "response_id": rid, "rating": "up"})
    status = (await client.get("/v1/admin/status", headers=admin)).json()
    assert status["served_version"]["id"] == "base"
    assert status["feedback"] == {"total": 1, "pending": 1}
    assert status["current_run"] is None
    r = await client.post("/v1/admin/train", headers=admin)
    assert r.status_code == 202 and r.json()["status"] == "queued"
    again = await client.post("/v1/admin/train", headers=admin)
    assert again.status_code == 409 and again.json()["error"]["code"] == "training_in_progress"
    status = (await client.get("/v1/admin/status", headers=admin)).json()
    assert status["current_run"]["id"] == r.json()["id"]
