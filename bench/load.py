"""A closed-loop streaming chat load: `clients` users, each sending the next request as soon as
the previous one ended, recording what a user sees (start, first chunk, end, status, version).

The hot-swap and loop benchmarks use it to see which version answered each request and how long
users waited while versions changed.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx

PROMPTS = (
    "How do I reset my password?",
    "Where is my order?",
    "Can I change my delivery address?",
    "How do I cancel my subscription?",
)


@dataclass(frozen=True)
class Sample:
    start: float  # wall clock (time.time()) when the request was sent
    first: float | None  # first content chunk
    end: float
    status: int  # HTTP status; 0 for a connection error, -1 for a stream that ended in error
    version: str  # system_fingerprint of the response: the model version that answered

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def latency(self) -> float:
        return self.end - self.start


@dataclass
class ChatLoad:
    base_url: str
    clients: int = 4
    max_tokens: int = 32
    headers: dict[str, str] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task] = field(default_factory=list)
    _pending: dict[int, float] = field(default_factory=dict)  # user -> when its request was sent

    def start(self) -> None:
        self._stop.clear()
        self._tasks = [asyncio.create_task(self._user(i)) for i in range(self.clients)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def between(self, start: float, end: float) -> list[Sample]:
        return [s for s in self.samples if start <= s.start < end]

    def oldest_pending(self) -> float | None:
        """When the oldest request still in flight was sent; None when none is: a window's last
        requests are in `samples` once this is past the window's end."""
        return min(self._pending.values(), default=None)

    async def _user(self, index: int) -> None:
        timeout = httpx.Timeout(120, connect=10)
        async with httpx.AsyncClient(
            base_url=self.base_url, headers=self.headers, timeout=timeout
        ) as client:
            turn = 0
            while not self._stop.is_set():
                prompt = PROMPTS[(index + turn) % len(PROMPTS)]
                turn += 1
                self._pending[index] = time.time()
                self.samples.append(await self._one(client, prompt))
                del self._pending[index]

    async def _one(self, client: httpx.AsyncClient, prompt: str) -> Sample:
        body = {
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": self.max_tokens,
            "temperature": 0.0,
            "stream": True,
        }
        start, first, version, status = time.time(), None, "", 0
        try:
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                status = response.status_code
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        status = -1
                        break
                    version = chunk.get("system_fingerprint") or version
                    if first is None and any(
                        (c.get("delta") or {}).get("content") for c in chunk.get("choices", [])
                    ):
                        first = time.time()
        except httpx.HTTPError:
            status = -1 if status else 0  # cut mid-stream, or never connected
        return Sample(start, first, time.time(), status, version)
