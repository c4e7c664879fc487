"""Chat completions: run a request on the engine, answer in OpenAI's shape (whole or as SSE
chunks), and record the generation before the response completes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.engine import ChoiceDelta, PolicyEngine, Sampling, TokenLogprob, resolve_max_tokens
from service.errors import ApiError, Overloaded
from service.metrics import Metrics
from service.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    Usage,
)
from service.protocol import TokenLogprob as WireTokenLogprob
from service.protocol import TopLogprob as WireTopLogprob
from service.store import Generation, GenerationChoice, GroupCommitWriter, Queued

logger = logging.getLogger(__name__)
# What became of a chat's record: committed, journaled during a database outage (stored when the
# database is back), or dropped because the journal was full.
Recorded = Literal["stored", "journaled", "dropped"]


def conversation_hash(messages: list[dict[str, str]]) -> str:
    canonical = json.dumps(
        [{"role": m["role"], "content": m["content"]} for m in messages],
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass
class _Run:
    """One request in progress: what every choice has produced so far."""

    id: str
    created: float
    messages: list[dict[str, str]]
    prompt_token_ids: list[int]
    sampling: Sampling
    api_key: str
    stream: bool
    texts: list[str] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list)
    finish: list[str | None] = field(default_factory=list)
    logprobs: list[list[TokenLogprob]] = field(default_factory=list)
    version: str | None = None  # set by the engine's first step

    def __post_init__(self) -> None:
        n = self.sampling.n
        self.texts, self.token_ids, self.finish = [""] * n, [[] for _ in range(n)], [None] * n
        self.logprobs = [[] for _ in range(n)]

    def wire_logprobs(self, tokens: list[TokenLogprob]) -> ChoiceLogprobs | None:
        """`tokens` in OpenAI's shape, or None when the request did not ask for logprobs."""
        if self.sampling.logprobs is None:
            return None
        return ChoiceLogprobs(
            content=[
                WireTokenLogprob(
                    token=t.token,
                    logprob=t.logprob,
                    bytes=list(t.token.encode()),
                    top_logprobs=[
                        WireTopLogprob(token=text, logprob=lp, bytes=list(text.encode()))
                        for text, lp in t.top
                    ],
                )
                for t in tokens
            ]
        )

    @property
    def completion_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)

    def usage(self) -> Usage:
        p, c = len(self.prompt_token_ids), self.completion_tokens
        return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


@dataclass
class GenerationRecord:
    """The write that stores one generation and its choices; serialisable, so that it can be
    journaled during a database outage and replayed (`service.store.writer`). Replayed, it
    stores nothing when its id is already in the database."""

    kind: ClassVar[str] = "generation"

    id: str
    api_key: str
    model: str
    model_version: str
    messages: list[dict[str, str]]
    sampling: dict[str, Any]
    prompt_token_ids: list[int]
    stream: bool
    created_at: datetime
    completed_at: datetime
    choices: list[tuple[str, list[int], str | None]]  # text, token ids, finish reason
    replaying: bool = False
    stored: bool = False  # replaying: the row is already there (set by `prefetch`)

    @classmethod
    def prefetch(cls, session: Session, records: list[GenerationRecord]) -> None:
        ids = [r.id for r in records if r.replaying]
        if ids:
            there = set(session.scalars(select(Generation.id).where(Generation.id.in_(ids))))
            for r in records:
                r.stored = r.id in there

    def __call__(self, session: Session) -> Recorded:
        if self.stored:
            return "stored"
        session.add(
            Generation(
                id=self.id,
                api_key=self.api_key,
                model=self.model,
                model_version=self.model_version,
                conversation_hash=conversation_hash(self.messages),
                messages=self.messages,
                sampling=self.sampling,
                prompt_token_ids=self.prompt_token_ids,
                stream=self.stream,
                created_at=self.created_at,
                completed_at=self.completed_at,
            )
        )
        session.add_all(
            GenerationChoice(
                generation_id=self.id, index=i, text=text, token_ids=ids, finish_reason=finish
            )
            for i, (text, ids, finish) in enumerate(self.choices)
        )
        return "stored"

    def stage(self, session: Session) -> Recorded:
        """There is nothing to check, so the rows can always be staged: they go in with the
        batch's other staged rows, one multi-row INSERT per table (`Store.write_batch`)."""
        return self(session)

    def to_record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "api_key": self.api_key,
            "model": self.model,
            "model_version": self.model_version,
            "messages": self.messages,
            "sampling": self.sampling,
            "prompt_token_ids": self.prompt_token_ids,
            "stream": self.stream,
            "created_at": self.created_at.isoformat(),
            "completed_at": self.completed_at.isoformat(),
            "choices": [list(c) for c in self.choices],
        }

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> GenerationRecord:
        return cls(
            **{
                **data,
                "created_at": datetime.fromisoformat(data["created_at"]),
                "completed_at": datetime.fromisoformat(data["completed_at"]),
                "choices": [tuple(c) for c in data["choices"]],
            },
            replaying=True,
        )

    def queued(self, pending: Mapping) -> Queued[Recorded]:
        return Queued("journaled")

    def waits(self, error: Exception) -> bool:
        return False

    def stored_key(self, result: object) -> None:
        return None  # a generation is never retried: its id is made here


class ChatService:
    def __init__(
        self,
        engine: PolicyEngine,
        writer: GroupCommitWriter,
        metrics: Metrics,
        default_max_tokens: int,
        charge: Callable[[str, int], None] = lambda api_key, completion_tokens: None,
    ):
        self._engine = engine
        self._writer = writer
        self._metrics = metrics
        self._default_max_tokens = default_max_tokens
        self._charge = charge  # completion tokens against the key's rate limit

    async def _start(self, req: ChatCompletionRequest, api_key: str) -> _Run:
        # Refused before the engine does any work: a generation whose record cannot be queued
        # would be answered and never stored.
        self._writer.check_room()
        messages = [m.as_prompt() for m in req.messages]
        # Tokenising a long prompt takes CPU time (about 0.8 s for 150k characters on the CPU box):
        # in a thread, so that other requests and the health checks go on meanwhile.
        prompt = await asyncio.to_thread(self._engine.render_prompt, messages)
        max_tokens = resolve_max_tokens(
            self._engine, len(prompt), req.token_limit, self._default_max_tokens
        )
        sampling = Sampling(
            n=req.n,
            temperature=req.temperature,
            top_p=req.top_p,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            max_tokens=max_tokens,
            stop=tuple(req.stop_list),
            seed=req.seed,
            logprobs=req.top_logprobs_asked,
            json_object=req.json_object,
            json_schema=req.json_schema,
        )
        return _Run(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            created=time.time(),
            messages=messages,
            prompt_token_ids=prompt,
            sampling=sampling,
            api_key=api_key,
            stream=req.stream,
        )

    async def _steps(self, run: _Run) -> AsyncIterator[list[ChoiceDelta]]:
        """Drive the engine, accumulating into `run`; yields each step's deltas. What was
        generated is charged to the key even when the client leaves mid-stream."""
        try:
            async for step in self._engine.generate(run.id, run.prompt_token_ids, run.sampling):
                if run.version is None:
                    run.version = step.version
                    self._metrics.ttft.observe(time.time() - run.created)
                deltas = step.deltas
                for d in deltas:
                    run.texts[d.index] += d.text
                    run.token_ids[d.index].extend(d.token_ids)
                    run.finish[d.index] = d.finish_reason or run.finish[d.index]
                    run.logprobs[d.index].extend(d.logprobs or ())
                yield deltas
        finally:
            self._charge(run.api_key, run.completion_tokens)
        self._metrics.tokens.labels("prompt", str(run.version)).inc(len(run.prompt_token_ids))
        self._metrics.tokens.labels("completion", str(run.version)).inc(run.completion_tokens)

    def _record(self, run: _Run) -> GenerationRecord:
        return GenerationRecord(
            id=run.id,
            api_key=run.api_key,
            model=self._engine.model_name,
            model_version=run.version or self._engine.version,
            messages=run.messages,
            sampling=_sampling_record(run.sampling),
            prompt_token_ids=run.prompt_token_ids,
            stream=run.stream,
            created_at=datetime.fromtimestamp(run.created, UTC),
            completed_at=datetime.now(UTC),
            choices=[
                (run.texts[i], run.token_ids[i], run.finish[i]) for i in range(run.sampling.n)
            ],
        )

    async def _store(self, run: _Run) -> Recorded:
        """Write the generation's record; the chat is answered whatever the outcome, which it
        reports (`Prefloop-Record`)."""
        try:
            return await self._writer.submit(self._record(run), bounded=False)
        except Overloaded as full:  # the journal is full: the answer goes out, the record not
            logger.warning("generation %s answered without its record: %s", run.id, full)
            return "dropped"

    async def complete(
        self, req: ChatCompletionRequest, api_key: str
    ) -> tuple[ChatCompletion, Recorded]:
        run = await self._start(req, api_key)
        async for _ in self._steps(run):
            pass
        recorded = await self._store(run)
        return ChatCompletion(
            id=run.id,
            created=int(run.created),
            model=self._engine.model_name,
            system_fingerprint=run.version or self._engine.version,
            usage=run.usage(),
            choices=[
                Choice(
                    index=i,
                    message=AssistantMessage(content=run.texts[i]),
                    finish_reason=run.finish[i],
                    logprobs=run.wire_logprobs(run.logprobs[i]),
                )
                for i in range(run.sampling.n)
            ],
        ), recorded

    async def start_stream(self, req: ChatCompletionRequest, api_key: str) -> AsyncIterator[str]:
        """Validates now (so errors are plain HTTP errors) and returns the SSE body generator."""
        run = await self._start(req, api_key)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return self._stream(run, include_usage)

    async def _stream(self, run: _Run, include_usage: bool) -> AsyncIterator[str]:
        base = {
            "id": run.id,
            "object": "chat.completion.chunk",
            "created": int(run.created),
            "model": self._engine.model_name,
        }

        def chunk(choices: list[dict], usage: Usage | None = None) -> str:
            body = {**base, "system_fingerprint": run.version, "choices": choices}
            if include_usage:
                body["usage"] = usage.model_dump() if usage else None
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        done = started = False
        try:
            async for step in self._steps(run):
                if not started:
                    # The version is known once the engine takes the request.
                    started = True
                    yield chunk(
                        [
                            {
                                "index": i,
                                "delta": {"role": "assistant", "content": ""},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                            for i in range(run.sampling.n)
                        ]
                    )
                choices = [
                    {
                        "index": d.index,
                        "delta": {"content": d.text} if d.text else {},
                        "logprobs": _dumped(run.wire_logprobs(d.logprobs or [])),
                        "finish_reason": d.finish_reason,
                    }
                    for d in step
                    if d.text or d.finish_reason
                ]
                if choices:
                    yield chunk(choices)
            recorded = await self._store(run)
            done = True
            if include_usage:
                yield chunk([], run.usage())
            # The headers left before the record was written: its outcome goes in-band, as an
            # SSE comment, which SSE clients (the openai client among them) skip.
            yield f": prefloop-record: {recorded}\n\n"
            yield "data: [DONE]\n\n"
        except ApiError as exc:
            # Headers are gone already: report in-band, as OpenAI's streams do.
            yield f"data: {json.dumps(exc.body())}\n\n"
        finally:
            if not done:
                # The client went away or the engine failed mid-stream: keep what was generated,
                # marked aborted, without holding up the cancellation.
                run.finish = [f or "abort" for f in run.finish]
                task = asyncio.get_running_loop().create_task(
                    self._writer.submit(self._record(run), bounded=False)
                )
                task.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("recording an aborted stream failed: %s", task.exception())


def _dumped(logprobs: ChoiceLogprobs | None) -> dict | None:
    return None if logprobs is None else logprobs.model_dump()


def _sampling_record(s: Sampling) -> dict:
    return {
        "n": s.n,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "presence_penalty": s.presence_penalty,
        "frequency_penalty": s.frequency_penalty,
        "max_tokens": s.max_tokens,
        "stop": list(s.stop),
        "seed": s.seed,
        "logprobs": s.logprobs,
        "json_object": s.json_object,
        "json_schema": s.json_schema,
    }
