"""Wire models only: the OpenAI chat subset prefloop serves, feedback, export, reward scoring.
No logic here."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

MAX_CHOICES = 4
# OpenAI's bound on `top_logprobs`, and vLLM's default `max_logprobs`.
MAX_TOP_LOGPROBS = 20
# One request scores at most this many answers: the forward passes run on the replica's CPU threads.
MAX_SCORED_ANSWERS = 16
UNSERVED_FIELDS = (
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "logit_bias",
    "audio",
    "modalities",
)


class ContentPart(BaseModel):
    """One part of a message's content, as OpenAI's API allows (`[{"type": "text", "text": ...}]`).
    Only text parts are served; another type is refused with a 400 naming the part
    (`service.limits.check_request`)."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = Field(default=None, max_length=200_000)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: (
        Annotated[str, Field(max_length=200_000)]
        | Annotated[list[ContentPart], Field(min_length=1, max_length=64)]
    )

    @property
    def text(self) -> str:
        """What the model reads and the store keeps: the string, or the text parts joined by
        newlines, as vLLM's own OpenAI server joins them."""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text or "" for part in self.content)

    def as_prompt(self) -> dict[str, str]:
        return {"role": self.role, "content": self.text}


class JsonSchemaFormat(BaseModel):
    """`response_format.json_schema`: the schema the answer must follow (enforced by the engine's
    structured output)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict = Field(default_factory=dict, alias="schema")
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _a_json_schema(cls, schema: dict) -> dict:
        from jsonschema import Draft202012Validator, SchemaError

        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as exc:
            raise ValueError(f"not a JSON schema: {exc.message}") from None
        return schema


class ResponseFormat(BaseModel):
    """`response_format`: plain text (the default), any JSON object, or JSON following a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = Field(default=None, validate_default=True)

    @field_validator("json_schema")
    @classmethod
    def _with_its_type(cls, spec: JsonSchemaFormat | None, info: ValidationInfo):
        if (spec is not None) != (info.data.get("type") == "json_schema"):
            raise ValueError('given exactly when type is "json_schema"')
        return spec


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI's `POST /v1/chat/completions` body; unknown fields are ignored as OpenAI's are."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    # The answer's tokens with their log-probabilities, and the `top_logprobs` likeliest tokens at
    # each position, as the engine computed them.
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # The answer constrained to JSON (any object, or following a schema) by the engine.
    response_format: ResponseFormat | None = None
    # OpenAI fields that would change the answer and are not served: named so that a request
    # setting one is refused with a 400 naming it (`service.limits.check_request`) instead of
    # answered as if it had not been sent.
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    functions: list[dict] | None = None
    function_call: str | dict | None = None
    logit_bias: dict[str, float] | None = None
    audio: dict | None = None
    modalities: list[str] | None = None

    @property
    def unserved(self) -> list[str]:
        """The fields set that this API does not serve (text modalities ask for what it does
        anyway)."""
        names = [
            name for name in UNSERVED_FIELDS if getattr(self, name) not in (None, False, [], {})
        ]
        if self.modalities == ["text"]:
            names.remove("modalities")
        return names

    # Field validators (not one model validator) so that a 422 names the field in `param`.
    @field_validator("messages")
    @classmethod
    def _ends_with_a_question(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if messages and messages[-1].role == "assistant":
            raise ValueError("the last message must be from the user or the system")
        return messages

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError("at most 4 stop sequences")
        return stop

    @field_validator("top_logprobs")
    @classmethod
    def _only_with_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("only allowed when logprobs is true")
        return top

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, opts: StreamOptions | None, info: ValidationInfo):
        if opts is not None and not info.data.get("stream"):
            raise ValueError("only allowed when stream is true")
        return opts

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def json_schema(self) -> dict | None:
        """The schema the answer must follow, when `response_format` gives one."""
        fmt = self.response_format
        return fmt.json_schema.schema_ if fmt is not None and fmt.json_schema else None

    @property
    def json_object(self) -> bool:
        return self.response_format is not None and self.response_format.type == "json_object"

    @property
    def top_logprobs_asked(self) -> int | None:
        """How many likeliest tokens per position the answer reports; None: no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]  # the token's UTF-8 bytes: a token can end inside a character


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[Choice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "prefloop"
    version: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# Feedback -----------------------------------------------------------------------------------


class AnswerRef(BaseModel):
    """One answer: a choice of a stored response."""

    model_config = ConfigDict(extra="forbid")

    response_id: str = Field(min_length=1, max_length=64)
    choice_index: int = Field(default=0, ge=0, lt=MAX_CHOICES)


class _FeedbackBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: str | None = Field(default=None, max_length=256)
    comment: str | None = Field(default=None, max_length=10_000)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=255)


class ThumbsFeedback(_FeedbackBase):
    type: Literal["thumbs"]
    response_id: str = Field(min_length=1, max_length=64)
    choice_index: int = Field(default=0, ge=0, lt=MAX_CHOICES)
    rating: Literal["up", "down"]
    correction: str | None = Field(default=None, min_length=1, max_length=100_000)


class PairwiseFeedback(_FeedbackBase):
    """A vote between two answers, as in LMSYS Arena: `a`, `b`, `tie` or `both_bad`."""

    type: Literal["pairwise"]
    a: AnswerRef
    b: AnswerRef
    winner: Literal["a", "b", "tie", "both_bad"]

    @field_validator("b")
    @classmethod
    def _distinct(cls, b: AnswerRef, info: ValidationInfo) -> AnswerRef:
        if b == info.data.get("a"):
            raise ValueError("must name a different answer than a")
        return b


FeedbackEvent = Annotated[ThumbsFeedback | PairwiseFeedback, Field(discriminator="type")]


class FeedbackBatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    events: list[dict] = Field(min_length=1, max_length=1000)


class FeedbackAck(BaseModel):
    id: str
    object: Literal["feedback"] = "feedback"
    created: int
    replayed: bool = False
    # Accepted while the database was unreachable: journaled durably, stored under this id once
    # the database is back, unless its checks then fail (HTTP 202).
    queued: bool = False


class BatchItemResult(BaseModel):
    index: int
    status: int
    feedback: FeedbackAck | None = None
    error: dict | None = None


class FeedbackBatchResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchItemResult]


ExportFormat = Literal["trl", "trl-kto", "openai-dpo"]


# Reward scoring (admin) ----------------------------------------------------------------------


class ScoreRequest(BaseModel):
    """`POST /v1/admin/score`: answers to one conversation, scored by a reward model."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage] = Field(min_length=1)
    answers: list[Annotated[str, Field(min_length=1, max_length=200_000)]] = Field(
        min_length=1, max_length=MAX_SCORED_ANSWERS
    )
    # A version id; none: the newest approved reward model.
    reward_model: str | None = Field(default=None, min_length=1, max_length=64)


class RewardScore(BaseModel):
    index: int
    score: float
    # (score - score_mean) / score_std over the reward model's training answers; the raw score
    # when its metrics lack them.
    normalized: float


class RewardScores(BaseModel):
    object: Literal["reward.scores"] = "reward.scores"
    reward_model: str
    data: list[RewardScore]


# Errors --------------------------------------------------------------------------------------


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error's body, OpenAI's shape (`service.errors`)."""

    error: ErrorBody
