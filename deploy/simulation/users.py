"""Simulated Acme Shop customers: they ask the service questions and vote on its answers through its
public HTTP API only (`/v1/chat/completions`, `/v1/feedback`), as the shop's chat app would.

`run_traffic` is the feedback-producing traffic on the train questions; `measure_approval` asks the
held-out questions and judges the answers without sending any feedback. Both are deterministic
given their seed apart from the model's own sampling, and the `seed` they pass in each chat
request makes that reproducible on the same engine too.

    python -m deploy.simulation.users traffic --conversations 200 --concurrency 8
    python -m deploy.simulation.users measure --samples 4
    (--base-url defaults to http://127.0.0.1:8000, --api-key to $PREFLOOP_API_KEY)
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import os
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import httpx
from pydantic import BaseModel, Field

from deploy.simulation.rubric import compare, judge
from deploy.simulation.scenario import Prompt, Scenario, load_scenario

logger = logging.getLogger(__name__)

# The service accepts at most this many choices per request (service/protocol.py MAX_CHOICES).
MAX_CHOICES = 4
# Users in the population; each conversation is held by one of them (the feedback's `user_id`).
POPULATION = 100
# A user with a failed request tries again this many times; feedback retries are safe because
# the idempotency key is derived from the response id.
RETRIES = 2
# Status codes worth retrying: the service was busy or an engine was being replaced.
RETRYABLE = frozenset({429, 500, 502, 503, 504})
# Sampling the shop's chat app asks for: temperature 1.0 samples the model as trained, which gives
# the pairwise votes two genuinely different answers, and measures approval on the same sampling.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_MAX_TOKENS = 96


def make_client(
    base_url: str,
    api_key: str | None = None,
    *,
    timeout_s: float = 120.0,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """An HTTP client for the service at `base_url`, with a bearer `api_key` when given."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.AsyncClient(
        base_url=base_url, headers=headers, timeout=timeout_s, transport=transport
    )


class TrafficStats(BaseModel):
    conversations: int = 0
    completed: int = 0  # conversations whose answer and vote were both acknowledged
    requests: int = 0  # HTTP requests sent, retries included
    failures: int = 0  # of those: non-2xx answers and transport errors
    failure_reasons: dict[str, int] = Field(default_factory=dict)  # "503", "ReadTimeout", ...
    votes: dict[str, dict[str, int]] = Field(default_factory=dict)  # kind -> outcome -> count
    answers: int = 0  # answers the users judged
    approved: int = 0  # of those, approved by the rubric
    versions: dict[str, int] = Field(default_factory=dict)  # system_fingerprint -> responses


class ApprovalReport(BaseModel):
    approval: float  # approved / samples; 0.0 when nothing was sampled
    by_topic: dict[str, float]
    samples: int
    approved: int
    samples_by_topic: dict[str, int]
    mean_words: float  # DPO exploits length (DESIGN.md), so watch it beside approval
    requests: int
    failures: int
    versions: dict[str, int]


@dataclass(frozen=True)
class Conversation:
    """One planned conversation: who asks what, how they vote, and the chat request's seed."""

    index: int
    prompt: Prompt
    kind: Literal["pairwise", "thumbs"]
    user_id: str
    seed: int


def plan_conversations(
    scenario: Scenario, conversations: int, seed: int, pairwise_share: float
) -> list[Conversation]:
    """The conversations of `run_traffic`, drawn up front so they do not depend on scheduling."""
    if not 0.0 <= pairwise_share <= 1.0:
        raise ValueError(f"pairwise_share={pairwise_share}: must be between 0 and 1")
    rng = random.Random(seed)
    plan = []
    for i in range(conversations):
        prompt = rng.choice(scenario.train)
        kind: Literal["pairwise", "thumbs"] = (
            "pairwise" if rng.random() < pairwise_share else "thumbs"
        )
        user = f"sim-user-{rng.randrange(POPULATION)}"
        plan.append(Conversation(i, prompt, kind, user, rng.randrange(2**31)))
    return plan


def request_seed(seed: int, prompt: Prompt, part: int = 0) -> int:
    """The chat seed for `prompt` in a measurement: independent of the order prompts are asked."""
    digest = hashlib.sha256(f"{seed}:{prompt.id}:{part}".encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1


class _Http:
    """Counts requests and failures, and retries what is safe to retry."""

    def __init__(self, client: httpx.AsyncClient):
        self.client = client
        self.requests = 0
        self.failures: Counter[str] = Counter()

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """POST `body`; the JSON answer, or None once every try has failed."""
        for attempt in range(RETRIES + 1):
            self.requests += 1
            try:
                r = await self.client.post(path, json=body)
            except httpx.TransportError as exc:
                self.failures[type(exc).__name__] += 1
                logger.warning("POST %s: %r (try %d)", path, exc, attempt + 1)
                continue
            if r.is_success:
                data: dict[str, Any] = r.json()
                return data
            self.failures[str(r.status_code)] += 1
            logger.warning("POST %s: %d %s (try %d)", path, r.status_code, r.text, attempt + 1)
            if r.status_code not in RETRYABLE:
                return None
        return None


def _chat_body(
    messages: list[dict[str, str]], n: int, max_tokens: int, temperature: float, seed: int
) -> dict[str, Any]:
    return {
        "messages": messages,
        "n": n,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "seed": seed,
    }


async def run_traffic(
    client: httpx.AsyncClient,
    scenario: Scenario,
    conversations: int,
    concurrency: int,
    seed: int,
    pairwise_share: float = 0.75,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    temperature: float = DEFAULT_TEMPERATURE,
    correction_share: float = 0.0,
) -> TrafficStats:
    """Hold `conversations` conversations on train questions, `concurrency` at a time.

    A pairwise conversation asks for two answers (n=2) and votes between them with `compare`; a
    thumbs one asks for one answer and rates it up when `judge` approves it, down otherwise. A
    `correction_share` of the users who rate down also write the answer they wanted: the topic's
    action path from the scenario (as a support agent reviewing the bot would). Every
    acknowledged vote is counted under its kind and outcome.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency={concurrency}: must be at least 1")
    plan = plan_conversations(scenario, conversations, seed, pairwise_share)
    http = _Http(client)
    gate = asyncio.Semaphore(concurrency)
    votes: defaultdict[str, Counter[str]] = defaultdict(Counter)
    versions: Counter[str] = Counter()
    judged: Counter[str] = Counter()

    async def converse(c: Conversation) -> bool:
        topic = scenario.topic_of(c.prompt)
        n = 2 if c.kind == "pairwise" else 1
        body = _chat_body(scenario.messages(c.prompt), n, max_tokens, temperature, c.seed)
        body["user"] = c.user_id
        answer = await http.post("/v1/chat/completions", body)
        if answer is None:
            return False
        versions[answer["system_fingerprint"]] += 1
        texts = [ch["message"]["content"] for ch in answer["choices"]]
        verdicts = [judge(topic, text) for text in texts]
        judged["answers"] += len(verdicts)
        judged["approved"] += sum(v.approved for v in verdicts)
        rid = answer["id"]
        vote: dict[str, Any]
        if c.kind == "pairwise":
            outcome: str = compare(topic, texts[0], texts[1])
            vote = {
                "type": "pairwise",
                "a": {"response_id": rid, "choice_index": 0},
                "b": {"response_id": rid, "choice_index": 1},
                "winner": outcome,
            }
        else:
            outcome = "up" if verdicts[0].approved else "down"
            vote = {"type": "thumbs", "response_id": rid, "choice_index": 0, "rating": outcome}
            if outcome == "down" and random.Random(c.seed).random() < correction_share:
                vote["correction"] = topic.action_path
                outcome = "down+correction"
        vote |= {"user_id": c.user_id, "idempotency_key": f"sim-{c.kind}-{rid}"}
        if await http.post("/v1/feedback", vote) is None:
            return False
        votes[c.kind][outcome] += 1
        return True

    async def gated(c: Conversation) -> bool:
        async with gate:
            return await converse(c)

    done = await asyncio.gather(*(gated(c) for c in plan))
    stats = TrafficStats(
        conversations=conversations,
        completed=sum(done),
        requests=http.requests,
        failures=sum(http.failures.values()),
        failure_reasons=dict(http.failures),
        votes={kind: dict(outcomes) for kind, outcomes in sorted(votes.items())},
        answers=judged["answers"],
        approved=judged["approved"],
        versions=dict(versions),
    )
    logger.info("traffic: %s", stats.model_dump_json())
    return stats


async def measure_approval(
    client: httpx.AsyncClient,
    scenario: Scenario,
    prompts: Sequence[Prompt],
    samples_per_prompt: int,
    seed: int,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    temperature: float = DEFAULT_TEMPERATURE,
    concurrency: int = 8,
) -> ApprovalReport:
    """The share of sampled answers to `prompts` (the held-out questions) that users approve.

    Each prompt is asked once with n=`samples_per_prompt` (split into requests of at most
    `MAX_CHOICES`, the most the service takes). No feedback is sent. A failed request's samples
    are left out and counted in `failures`.
    """
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt={samples_per_prompt}: must be at least 1")
    http = _Http(client)
    gate = asyncio.Semaphore(concurrency)
    versions: Counter[str] = Counter()
    samples: Counter[str] = Counter()
    approved: Counter[str] = Counter()
    words: list[int] = []
    parts = [
        (prompt, part, min(MAX_CHOICES, samples_per_prompt - start))
        for prompt in prompts
        for part, start in enumerate(range(0, samples_per_prompt, MAX_CHOICES))
    ]

    async def ask(prompt: Prompt, part: int, n: int) -> None:
        body = _chat_body(
            scenario.messages(prompt), n, max_tokens, temperature, request_seed(seed, prompt, part)
        )
        async with gate:
            answer = await http.post("/v1/chat/completions", body)
        if answer is None:
            return
        versions[answer["system_fingerprint"]] += 1
        for choice in answer["choices"]:
            verdict = judge(scenario.topic_of(prompt), choice["message"]["content"])
            samples[prompt.topic] += 1
            approved[prompt.topic] += verdict.approved
            words.append(verdict.words)

    await asyncio.gather(*(ask(*p) for p in parts))
    total = sum(samples.values())
    report = ApprovalReport(
        approval=sum(approved.values()) / total if total else 0.0,
        by_topic={t: approved[t] / samples[t] for t in sorted(samples)},
        samples=total,
        approved=sum(approved.values()),
        samples_by_topic=dict(sorted(samples.items())),
        mean_words=sum(words) / len(words) if words else 0.0,
        requests=http.requests,
        failures=sum(http.failures.values()),
        versions=dict(versions),
    )
    logger.info("approval: %s", report.model_dump_json())
    return report


async def _main(args: argparse.Namespace) -> None:
    scenario = load_scenario()
    async with make_client(args.base_url, args.api_key) as client:
        result: BaseModel
        if args.command == "traffic":
            result = await run_traffic(
                client, scenario, args.conversations, args.concurrency, args.seed
            )
        else:
            result = await measure_approval(
                client, scenario, scenario.heldout, args.samples, args.seed
            )
    print(result.model_dump_json(indent=2))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("command", choices=["traffic", "measure"])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=os.environ.get("PREFLOOP_API_KEY"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--conversations", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4, help="samples per held-out question")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
