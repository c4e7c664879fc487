"""End to end: the RLHF path of the loop over HTTP on the real service.

The scenario's simulated users chat with the embedded model and vote by its rubric (comparisons,
thumbs, corrections); a cycle with `train.algorithm=rlhf` then runs SFT -> reward model -> PPO on
Ray Train, the gate scores the candidate with the reward model against the served version (win
rate, KL, length) and runs the vLLM canary, and the promoted version serves the next answers.
`POST /v1/admin/score` scores answers with the new reward model. The PPO budget is cut to keep the
test to minutes; the demo runs the full one. Run alone with:

    pytest tests/e2e/loop/test_rlhf.py -m e2e
"""

from __future__ import annotations

import asyncio
import math
import time

import httpx
import pytest

from deploy.simulation.scenario import load_scenario
from deploy.simulation.users import make_client, run_traffic
from service.registry import Registry
from tests.conftest import ADMIN_KEY, CHAT_KEY, auth
from tests.e2e.conftest import Service
from tests.e2e.loop.test_loop import served_version
from training.config import GateConfig, SchedulerConfig, TrainConfig, TrainingSettings
from training.cycle import CycleContext
from training.scheduler import tick

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.e2e]


# The budget is cut to what checks the path (the demo measures quality): at 64 conversations, a
# full traffic + cycle took 547 s here (traffic 105 s, SFT 58, reward model 130, PPO 109 with three
# iterations, gate 75 on 16 prompts).
CONVERSATIONS = 40
PPO_ITERATIONS = 2


def rlhf_settings(svc: Service) -> TrainingSettings:
    train = TrainConfig(algorithm="rlhf")
    train.sft.epochs = 1.0
    # One epoch, not the default three: the test checks the path and the ranking of a vague answer
    # below the shop's procedure, which one epoch learns.
    train.reward.epochs = 1.0
    train.ppo = train.ppo.model_copy(
        update={
            "iterations": PPO_ITERATIONS,
            "rollouts_per_iteration": 8,
            "minibatch_size": 8,
            "epochs": 1,
            "max_new_tokens": 48,
        }
    )
    return TrainingSettings(
        data_dir=svc.settings.data_dir,
        train=train,
        gate=GateConfig(eval_prompts=8),
        scheduler=SchedulerConfig(enabled=False),
    )


@pytest.mark.timeout(1800)
def test_sft_reward_model_ppo_over_http(loop_service: Service):
    svc = loop_service
    scenario = load_scenario()

    async def traffic() -> None:
        async with make_client(svc.base_url, CHAT_KEY) as client:
            stats = await run_traffic(
                client, scenario, CONVERSATIONS, concurrency=8, seed=3, pairwise_share=0.5,
                correction_share=1.0,
            )  # fmt: skip
            assert stats.failures == 0

    started = time.monotonic()
    asyncio.run(traffic())
    traffic_s = time.monotonic() - started
    queued = httpx.post(f"{svc.base_url}/v1/admin/train", headers=auth(ADMIN_KEY))
    assert queued.status_code == 202, queued.text
    ctx = CycleContext(
        registry=Registry(svc.store, svc.settings.data_dir),
        settings=rlhf_settings(svc),
        database_url=svc.settings.resolved_database_url,
    )
    run = tick(ctx)
    assert run is not None and run.id == queued.json()["id"]
    print(f"\n[rlhf] traffic {traffic_s:.1f} s; cycle stages (s): {run.stages}")
    assert run.status == "promoted", run.error
    assert run.algorithm == "rlhf"
    assert set(run.stages) >= {"snapshot", "sft", "reward_model", "train", "gate", "promote"}
    assert [s["step"] for s in run.step_metrics] == list(range(1, PPO_ITERATIONS + 1))

    candidate = ctx.registry.get(run.candidate_version_id)
    reward = ctx.registry.get(candidate.metrics["reward_model"])
    assert reward.kind == "reward" and reward.status == "approved"
    gate = candidate.metrics["gate"]
    assert gate["canary"].strip()
    checked = gate["reward_model"]
    assert checked["win_rate"] >= 0.5 and checked["kl_reference"] <= 10.0
    assert math.isfinite(checked["kl"])  # the KL to the served version (SFT's too) is reported

    deadline = time.monotonic() + 5.0
    while served_version(svc) != candidate.id:
        assert time.monotonic() < deadline, "the replica did not serve the RLHF version"
        time.sleep(0.05)

    prompt = scenario.heldout[0]
    scored = httpx.post(
        f"{svc.base_url}/v1/admin/score",
        headers=auth(ADMIN_KEY),
        timeout=120,
        json={
            "messages": scenario.messages(prompt),
            "answers": [
                "I'm not sure, please ask someone else.",
                scenario.topic_of(prompt).action_path,
            ],
        },
    )
    assert scored.status_code == 200, scored.text
    body = scored.json()
    assert body["reward_model"] == reward.id and len(body["data"]) == 2
    # The users' corrections were the shop's procedures: the reward model learned to prefer them.
    vague, procedure = (d["score"] for d in body["data"])
    assert procedure > vague, body
    # Refusing a reward model as a chat model, over HTTP.
    refused = httpx.post(
        f"{svc.base_url}/v1/admin/versions/{reward.id}/promote", headers=auth(ADMIN_KEY)
    )
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "not_a_chat_model"
    assert (
        httpx.get(f"{svc.base_url}/v1/models", headers=auth(CHAT_KEY)).json()["data"][0]["version"]
        == candidate.id
    )
