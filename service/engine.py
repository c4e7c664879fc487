"""The policy engine: what a replica generates with. `VllmEngine` wraps vLLM's `AsyncLLM`.

The chat logic depends only on the `PolicyEngine` protocol, so it runs against a fake engine in the
fast tests; vLLM is imported inside `VllmEngine` and nowhere else.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from service.errors import EngineUnavailable, InvalidRequest
from service.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # Log-probabilities of the sampled tokens and of this many likeliest at each position (0: the
    # sampled token's alone); None: none.
    logprobs: int | None = None
    # The answer constrained to a JSON object, or to JSON following this schema.
    json_object: bool = False
    json_schema: dict | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's text and log-probability, and the `top` likeliest tokens at its position
    (text, log-probability), likeliest first."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class ChoiceDelta:
    """New output of one choice since the previous step; `logprobs`, one per new token, when the
    request asked for them."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class EngineStep:
    """One step of a request: the version producing it (the same for the whole request)."""

    version: str
    deltas: list[ChoiceDelta]


class VersionGate:
    """Ties every request to one model version while versions are swapped underneath.

    A request holds the gate for its whole generation and reads the version once. A swap closes
    the gate to new requests (they wait, they don't fail), waits until the running ones finish,
    changes the weights, then reopens: no response mixes two versions.
    """

    def __init__(self, version: str):
        self.version = version
        self.active = 0
        self._open = asyncio.Event()
        self._open.set()
        self._idle = asyncio.Event()
        self._idle.set()

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[str]:
        await self._open.wait()
        self.active += 1
        self._idle.clear()
        try:
            yield self.version
        finally:
            self.active -= 1
            if self.active == 0:
                self._idle.set()

    @property
    def swapping(self) -> bool:
        """True from the moment a swap closes the gate until it reopens."""
        return not self._open.is_set()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        self._open.clear()
        try:
            await self._idle.wait()
            yield
        finally:
            self._open.set()


class PolicyEngine(Protocol):
    model_name: str
    max_model_len: int
    # The most characters one token of the tokenizer decodes to: a text of c characters is at
    # least c / max_chars_per_token tokens, so a longer one is refused before it is tokenised.
    max_chars_per_token: int

    @property
    def version(self) -> str:
        """The version new requests run on."""
        ...

    def render_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Chat template applied and tokenised."""
        ...

    def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling: Sampling
    ) -> AsyncIterator[EngineStep]:
        """Yields each step's deltas until every choice has a finish reason."""
        ...

    async def swap(self, version: str, weights_path: Path) -> None:
        """Serve `version` (full weights in `weights_path`) from the next request on."""
        ...

    async def check_health(self) -> None:
        """Raises `EngineUnavailable` when the engine can no longer serve."""
        ...

    @property
    def in_flight(self) -> int: ...

    def shutdown(self) -> None: ...


def resolve_max_tokens(
    engine: PolicyEngine, prompt_len: int, requested: int | None, default: int
) -> int:
    """The completion budget, refusing prompts that leave no room (as OpenAI does)."""
    room = engine.max_model_len - prompt_len
    if room <= 0 or (requested is not None and requested > room):
        raise InvalidRequest(
            f"this model's context is {engine.max_model_len} tokens; the messages take {prompt_len}"
            f" and {requested or 1} were requested for the completion",
            param="messages",
            code="context_length_exceeded",
        )
    return requested if requested is not None else min(default, room)


def longest_token(tokenizer: Any) -> int:
    """The most characters any token decodes to (81 for the embedded model's tokenizer: a newline
    and 80 spaces; English prose averages 3.2-3.9 characters a token). About 0.6 s for a 49k
    vocabulary, once per replica."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return max(len(text) for text in texts)


class VllmEngine:
    """One `AsyncLLM` in this process, started from the engine settings on `weights_path`, the
    weights of `version`, with the tokenizer in `tokenizer_path` (the base version's)."""

    def __init__(self, settings: Settings, weights_path: Path, version: str, tokenizer_path: Path):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.engine.kv_cache_space_gib))
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        from service.hardware import engine_dtype

        cfg = settings.engine
        chunked = cfg.enable_chunked_prefill
        if chunked is None:
            chunked = not current_platform.is_cpu()
        args = AsyncEngineArgs(
            model=str(weights_path),
            # Later versions are full weights of the same architecture: keep the tokenizer fixed.
            tokenizer=str(tokenizer_path),
            served_model_name=settings.served_model_name,
            dtype=engine_dtype(cfg.dtype),
            max_model_len=cfg.max_model_len,
            max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            enable_chunked_prefill=chunked,
            enforce_eager=cfg.enforce_eager,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            disable_log_stats=True,
        )
        self._llm: Any = AsyncLLM.from_engine_args(args)
        self._tokenizer: Any = self._llm.get_tokenizer()
        self.model_name = settings.served_model_name
        self.max_model_len = cfg.max_model_len
        self.max_chars_per_token = longest_token(self._tokenizer)
        self._gate = VersionGate(version)
        logger.info(
            "engine ready: version %s from %s (chunked prefill %s)", version, weights_path, chunked
        )

    @property
    def version(self) -> str:
        return self._gate.version

    @property
    def in_flight(self) -> int:
        return self._gate.active

    def render_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        ids = self._tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True
        )
        # transformers 5 returns a BatchEncoding-like mapping; older tokenizers a plain list.
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling: Sampling
    ) -> AsyncIterator[EngineStep]:
        from vllm import SamplingParams, TokensPrompt
        from vllm.exceptions import VLLMValidationError
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        params = SamplingParams(
            n=sampling.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            max_tokens=sampling.max_tokens,
            stop=list(sampling.stop) or None,
            seed=sampling.seed,
            logprobs=sampling.logprobs,
            structured_outputs=(
                StructuredOutputsParams(
                    json=sampling.json_schema, json_object=sampling.json_object or None
                )
                if sampling.json_object or sampling.json_schema is not None
                else None
            ),
            output_kind=RequestOutputKind.DELTA,
        )
        prompt = TokensPrompt(prompt_token_ids=prompt_token_ids)
        async with self._gate.hold() as version:
            try:
                async for out in self._llm.generate(prompt, params, request_id=request_id):
                    deltas = [
                        ChoiceDelta(
                            o.index,
                            o.text,
                            list(o.token_ids),
                            o.finish_reason,
                            _logprobs(o.token_ids, o.logprobs, sampling.logprobs),
                        )
                        for o in out.outputs
                    ]
                    yield EngineStep(version, deltas)
            except VLLMValidationError as exc:
                # vLLM checks the request when it is added: a schema its grammar cannot express,
                # or a parameter past the engine's limits.
                if params.structured_outputs is not None and exc.parameter is None:
                    raise InvalidRequest(
                        f"the engine cannot constrain the answer to this response_format: {exc}",
                        param="response_format",
                        code="unsupported_response_format",
                    ) from exc
                raise InvalidRequest(str(exc), param=exc.parameter) from exc
            except (EngineDeadError, EngineGenerateError) as exc:
                raise EngineUnavailable(f"the engine failed: {exc}", code="engine_error") from exc

    async def swap(self, version: str, weights_path: Path) -> None:
        """Reload all weights in place (about 0.6 s for the embedded model) between requests."""
        if version == self._gate.version:
            return
        async with self._gate.exclusive():
            await self._llm.pause_generation(mode="wait")
            try:
                await self._llm.collective_rpc(
                    "reload_weights", kwargs={"weights_path": str(weights_path)}
                )
                await self._llm.reset_prefix_cache()
                self._gate.version = version
            finally:
                await self._llm.resume_generation()
        logger.info("now serving version %s from %s", version, weights_path)

    async def check_health(self) -> None:
        try:
            await self._llm.check_health()
        except Exception as exc:
            raise EngineUnavailable(f"engine is not healthy: {exc}", code="engine_dead") from exc

    def shutdown(self) -> None:
        self._llm.shutdown()


def _logprobs(token_ids: Any, positions: Any, top: int | None) -> list[TokenLogprob] | None:
    """vLLM's logprobs of new tokens (per position, token id -> Logprob with its rank and text;
    the sampled token is always there, the `top` likeliest too) as `TokenLogprob`s."""
    if top is None or positions is None:
        return None
    out = []
    for token_id, candidates in zip(token_ids, positions, strict=True):
        sampled = candidates[token_id]
        likeliest = sorted(
            (c for c in candidates.values() if c.rank is not None and c.rank <= top),
            key=lambda c: c.rank,
        )
        out.append(
            TokenLogprob(
                sampled.decoded_token or "",
                sampled.logprob,
                tuple((c.decoded_token or "", c.logprob) for c in likeliest),
            )
        )
    return out
