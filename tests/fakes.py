"""A deterministic stand-in for the vLLM engine: same protocol, no model.

Tokens are characters (token id = code point). Each choice answers with a fixed sentence that names
the choice and echoes the last message, emitted a few characters per step, so streaming, `n`,
`max_tokens`, `stop` and `seed` behave as they do on the real engine; asked for JSON, the sentence
is the `answer` of a JSON object (whatever the schema). Asked for logprobs, each
character is the likeliest at its position (`logprob_of`), the next code points after it less
likely by 1 nat each.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from pathlib import Path

from service.engine import ChoiceDelta, EngineStep, Sampling, TokenLogprob, VersionGate
from service.errors import EngineUnavailable


class FakeEngine:
    model_name = "prefloop"
    max_chars_per_token = 1  # a token is a character

    def __init__(self, version: str = "base", max_model_len: int = 2048):
        self.max_model_len = max_model_len
        self.dead = False
        self.swaps: list[tuple[str, Path]] = []
        self._gate = VersionGate(version)

    @property
    def version(self) -> str:
        return self._gate.version

    @property
    def in_flight(self) -> int:
        return self._gate.active

    @property
    def swapping(self) -> bool:
        return self._gate.swapping

    async def swap(self, version: str, weights_path: Path) -> None:
        async with self._gate.exclusive():
            await asyncio.sleep(0.01)  # the real engine reloads its weights here
            self._gate.version = version
            self.swaps.append((version, weights_path))

    def render_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"
        return [ord(c) for c in text]

    @staticmethod
    def answer(prompt: str, index: int, seed: int | None, version: str = "base") -> str:
        """The full text choice `index` would produce without a token limit or stop string."""
        question = prompt.rsplit("<user>", 1)[-1].split("\n", 1)[0]
        salt = random.Random(seed).randint(0, 9999) if seed is not None else index
        tag = "" if version == "base" else f" [{version}]"
        return f"Answer {index} (variant {salt}): you asked '{question}'.{tag} Done."

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling: Sampling
    ) -> AsyncIterator[EngineStep]:
        if self.dead:
            raise EngineUnavailable("engine is dead", code="engine_dead")
        async with self._gate.hold() as version:
            async for step in self._generate(version, prompt_token_ids, sampling):
                yield EngineStep(version, step)

    async def _generate(
        self, version: str, prompt_token_ids: list[int], sampling: Sampling
    ) -> AsyncIterator[list[ChoiceDelta]]:
        prompt = "".join(chr(t) for t in prompt_token_ids)
        plans = []
        for i in range(sampling.n):
            text, finish = self.answer(prompt, i, sampling.seed, version), "stop"
            if sampling.json_object or sampling.json_schema is not None:
                text = json.dumps({"answer": text})
            for stop in sampling.stop:
                if stop in text:
                    text = text[: text.index(stop)]
            if sampling.max_tokens is not None and len(text) > sampling.max_tokens:
                text, finish = text[: sampling.max_tokens], "length"
            plans.append((text, finish))
        pos = 0
        while any(pos < len(t) for t, _ in plans):
            await asyncio.sleep(0)
            step = []
            for i, (text, finish) in enumerate(plans):
                piece = text[pos : pos + 4]
                if piece:
                    done = pos + 4 >= len(text)
                    step.append(
                        ChoiceDelta(
                            i,
                            piece,
                            [ord(c) for c in piece],
                            finish if done else None,
                            self._logprobs(piece, sampling.logprobs),
                        )
                    )
            pos += 4
            yield step

    @staticmethod
    def logprob_of(char: str) -> float:
        return -(ord(char) % 5 + 1) / 10

    def _logprobs(self, piece: str, top: int | None) -> list[TokenLogprob] | None:
        if top is None:
            return None
        return [
            TokenLogprob(
                c,
                self.logprob_of(c),
                tuple((chr(ord(c) + j), self.logprob_of(c) - j) for j in range(top)),
            )
            for c in piece
        ]

    async def check_health(self) -> None:
        if self.dead:
            raise EngineUnavailable("engine is dead", code="engine_dead")

    def shutdown(self) -> None:
        self.dead = True
