"""The simulated users against the real API over a fake engine, in-process: the questions they
ask, the votes they cast and that those votes arrive in the store."""

from __future__ import annotations

import random
from collections import Counter

import httpx
import pytest
from sqlalchemy import select

from deploy.simulation.rubric import judge
from deploy.simulation.scenario import Scenario, load_scenario
from deploy.simulation.users import (
    POPULATION,
    RETRIES,
    make_client,
    measure_approval,
    plan_conversations,
    run_traffic,
)
from service.app import build_app
from service.auth import Authenticator
from service.registry import Registry
from service.store import Feedback, Generation, Store
from tests.conftest import CHAT_KEY, KEYS
from tests.fakes import FakeEngine

SCENARIO = load_scenario()
PITCH = (
    "Before you go, we'd hate to lose you! Stay with us and get a free month as a special offer."
)
# The fake engine counts characters as tokens: room for the longest action path.
MAX_TOKENS = 400


class ShopEngine(FakeEngine):
    """Answers with the topic's action path on even choices and a retention pitch on odd ones
    (the other way round with `good_first=False`)."""

    def __init__(self, scenario: Scenario, good_first: bool = True):
        super().__init__()
        self.good_first = good_first
        self.paths = {p.text: scenario.topic_of(p).action_path for p in scenario.prompts}

    # FakeEngine.answer is a static method; this one needs the scenario's paths.
    def answer(  # type: ignore[override]
        self, prompt: str, index: int, seed: int | None, *_: object
    ) -> str:
        question = prompt.rsplit("<user>", 1)[-1].split("\n", 1)[0]
        good = (index % 2 == 0) == self.good_first
        return self.paths[question] if good else PITCH


class DropFirstFeedbackAnswer(httpx.AsyncBaseTransport):
    """Lets the first feedback request through to the app, then loses its answer."""

    def __init__(self, inner: httpx.AsyncBaseTransport):
        self.inner, self.dropped = inner, False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.url.path == "/v1/feedback" and not self.dropped:
            self.dropped = True
            raise httpx.ReadError("connection reset", request=request)
        return response


def client_for(engine: FakeEngine, registry: Registry, key: str = CHAT_KEY, wrap=None):
    """The API as tests/conftest.py builds it, reached through the simulation's own client."""
    transport: httpx.AsyncBaseTransport = httpx.ASGITransport(
        app=build_app(engine, registry, Authenticator(KEYS))
    )
    return make_client("http://test", key, transport=wrap(transport) if wrap else transport)


def feedback_rows(store: Store) -> list[Feedback]:
    with store.reading() as s:
        return list(s.scalars(select(Feedback)))


def planned_pairwise(conversations: int, seed: int, share: float) -> int:
    """How many conversations of `run_traffic(..., seed)` are pairwise, by replaying its seeded
    draws: for each conversation a train prompt, the kind (pairwise below `share`), a user and a
    chat seed, in that order."""
    rng = random.Random(seed)
    pairwise = 0
    for _ in range(conversations):
        rng.choice(SCENARIO.train)
        pairwise += rng.random() < share
        rng.randrange(POPULATION)
        rng.randrange(2**31)
    return pairwise


def asked(store: Store) -> Counter[tuple[str, int]]:
    """Every stored (question, seed) pair, with its count."""
    with store.reading() as s:
        return Counter(
            (g.messages[-1]["content"], g.sampling["seed"]) for g in s.scalars(select(Generation))
        )


@pytest.mark.parametrize("good_first", [True, False])
async def test_votes_follow_the_rubric_and_reach_the_store(store, registry, good_first):
    async with client_for(ShopEngine(SCENARIO, good_first), registry) as client:
        stats = await run_traffic(
            client, SCENARIO, conversations=40, concurrency=8, seed=7, max_tokens=MAX_TOKENS
        )
    assert (stats.conversations, stats.completed, stats.failures) == (40, 40, 0)
    assert stats.requests == 80 and stats.versions == {"base": 40}
    pairwise, thumbs = stats.votes["pairwise"], stats.votes["thumbs"]
    n_pairwise = planned_pairwise(40, seed=7, share=0.75)  # run_traffic's default share
    n_thumbs = 40 - n_pairwise
    # Every comparison goes to the action path, every thumbs to its verdict on the one answer.
    assert pairwise == {"a" if good_first else "b": n_pairwise}
    assert thumbs == {"up" if good_first else "down": n_thumbs}
    # Answers judged: two per comparison, one per thumbs vote; only the paths are approved.
    assert stats.answers == 2 * n_pairwise + n_thumbs
    assert stats.approved == n_pairwise + (n_thumbs if good_first else 0)

    rows = feedback_rows(store)
    assert len(rows) == 40
    assert Counter(r.winner for r in rows if r.kind == "pairwise") == Counter(pairwise)
    assert Counter(r.rating for r in rows if r.kind == "thumbs") == Counter(thumbs)
    for r in rows:
        assert r.idempotency_key == f"sim-{r.kind}-{r.a_generation_id}"
        assert r.user_id.startswith("sim-user-") and r.a_model_version == "base"
    train = {p.text for p in SCENARIO.train}
    with store.reading() as s:
        for g in s.scalars(select(Generation)):
            assert g.messages[0] == {"role": "system", "content": SCENARIO.system_prompt}
            assert g.messages[-1]["content"] in train


async def test_same_seed_same_conversations(store, registry):
    async with client_for(ShopEngine(SCENARIO), registry) as client:
        await run_traffic(client, SCENARIO, 12, 4, seed=3, max_tokens=MAX_TOKENS)
        first = asked(store)
        await run_traffic(client, SCENARIO, 12, 1, seed=3, max_tokens=MAX_TOKENS)
    assert asked(store) == first + first
    plan = plan_conversations(SCENARIO, 50, seed=3, pairwise_share=0.75)
    assert plan == plan_conversations(SCENARIO, 50, seed=3, pairwise_share=0.75)
    assert plan != plan_conversations(SCENARIO, 50, seed=4, pairwise_share=0.75)
    assert {c.kind for c in plan_conversations(SCENARIO, 30, 3, 0.0)} == {"thumbs"}
    assert {c.kind for c in plan_conversations(SCENARIO, 30, 3, 1.0)} == {"pairwise"}
    assert all(c.prompt.split == "train" for c in plan)
    with pytest.raises(ValueError, match="pairwise_share"):
        plan_conversations(SCENARIO, 1, 0, 1.5)


async def test_a_lost_feedback_answer_is_retried_and_stored_once(store, registry):
    async with client_for(ShopEngine(SCENARIO), registry, wrap=DropFirstFeedbackAnswer) as client:
        stats = await run_traffic(client, SCENARIO, 10, 1, seed=5, max_tokens=MAX_TOKENS)
    assert stats.completed == 10 and stats.failure_reasons == {"ReadError": 1}
    assert stats.requests == 21
    assert len(feedback_rows(store)) == 10


async def test_measure_approval_sends_no_feedback(store, registry):
    heldout = SCENARIO.heldout
    async with client_for(ShopEngine(SCENARIO), registry) as client:
        report = await measure_approval(
            client, SCENARIO, heldout, samples_per_prompt=4, seed=0, max_tokens=MAX_TOKENS
        )
        # More samples than one request takes: split into 4 + 2; the even choices are approved.
        six = await measure_approval(
            client, SCENARIO, heldout[:3], 6, seed=0, max_tokens=MAX_TOKENS
        )
    assert report.approval == 0.5 and report.samples == 4 * len(heldout)
    assert report.requests == len(heldout) and report.failures == 0
    assert report.by_topic == {t: 0.5 for t in SCENARIO.topics}
    assert sum(report.samples_by_topic.values()) == report.samples
    assert report.versions == {"base": len(heldout)}
    words = [judge(SCENARIO.topic_of(p), SCENARIO.topic_of(p).action_path).words for p in heldout]
    pitch = judge(SCENARIO.topic_of(heldout[0]), PITCH).words
    assert report.mean_words == pytest.approx((2 * sum(words) + 2 * len(heldout) * pitch) / 128)
    assert (six.samples, six.approved, six.requests) == (18, 9, 6)
    assert feedback_rows(store) == []


async def test_failures_are_counted_not_raised(store, registry):
    engine = ShopEngine(SCENARIO)
    engine.dead = True
    async with client_for(engine, registry) as client:
        stats = await run_traffic(client, SCENARIO, 5, 2, seed=0)
        report = await measure_approval(client, SCENARIO, SCENARIO.heldout[:2], 2, seed=0)
    assert stats.completed == 0 and stats.votes == {}
    assert stats.failures == stats.requests == 5 * (RETRIES + 1)
    assert stats.failure_reasons == {"503": 5 * (RETRIES + 1)}
    assert (report.samples, report.approval, report.failures) == (0, 0.0, 2 * (RETRIES + 1))


async def test_a_refused_key_is_not_retried(store, registry):
    async with client_for(ShopEngine(SCENARIO), registry, key="sk-unknown-0123456789abcdef") as c:
        stats = await run_traffic(c, SCENARIO, 3, 3, seed=0)
    assert stats.failure_reasons == {"401": 3} and stats.requests == 3


async def test_rating_down_with_the_wanted_answer(store, registry):
    # good_first=False: the single answer is the retention pitch, so every thumbs is down.
    async with client_for(ShopEngine(SCENARIO, good_first=False), registry) as client:
        stats = await run_traffic(
            client,
            SCENARIO,
            8,
            2,
            seed=1,
            pairwise_share=0.0,
            correction_share=1.0,
            max_tokens=MAX_TOKENS,
        )
    assert stats.votes == {"thumbs": {"down+correction": 8}}
    rows = feedback_rows(store)
    assert len(rows) == 8 and all(r.rating == "down" for r in rows)
    with store.reading() as s:
        for row in rows:
            gen = s.get(Generation, row.a_generation_id)
            question = gen.messages[-1]["content"]
            prompt = next(p for p in SCENARIO.prompts if p.text == question)
            assert row.correction == SCENARIO.topic_of(prompt).action_path
