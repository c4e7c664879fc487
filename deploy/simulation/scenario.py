"""The customer-service scenario of the demo: Acme Shop's topics, the questions its customers ask
and the system prompt its chat app sends, loaded from `customer_service.yaml` and validated.

    from deploy.simulation.scenario import load_scenario
    scenario = load_scenario()
    scenario.train, scenario.heldout, scenario.messages(scenario.train[0])
"""

from __future__ import annotations

import hashlib
from functools import cached_property
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_PATH = Path(__file__).with_name("customer_service.yaml")
Split = Literal["train", "heldout"]


class Topic(BaseModel):
    """What customers ask about, the path a good answer gives, and the words it must contain."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    action_path: str = Field(min_length=1)
    action_terms: tuple[str, ...] = Field(min_length=2)

    @field_validator("action_terms")
    @classmethod
    def _lowercase_and_distinct(cls, terms: tuple[str, ...]) -> tuple[str, ...]:
        terms = tuple(t.strip().lower() for t in terms)
        if any(not t for t in terms) or len(set(terms)) != len(terms):
            raise ValueError("action terms must be non-empty and distinct")
        return terms


class Prompt(BaseModel):
    """One customer question; `id` is `<topic>-<8 hex digits of the text's sha1>`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    topic: str
    text: str = Field(min_length=1)
    split: Split


class _TopicFile(BaseModel):
    """A topic as written in the YAML file: its questions listed under their split."""

    model_config = ConfigDict(extra="forbid")

    id: str
    action_path: str
    action_terms: list[str]
    prompts: dict[Split, list[str]]


class _ScenarioFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    system_prompt: str = Field(min_length=1)
    topics: list[_TopicFile] = Field(min_length=1)


class Scenario(BaseModel):
    """The validated scenario: every question distinct, every topic on both splits."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    system_prompt: str
    topics: dict[str, Topic]
    prompts: tuple[Prompt, ...]

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        texts = [p.text.strip().lower() for p in self.prompts]
        duplicates = sorted({t for t in texts if texts.count(t) > 1})
        if duplicates:
            raise ValueError(f"questions listed more than once: {duplicates}")
        for p in self.prompts:
            if p.topic not in self.topics:
                raise ValueError(f"question {p.text!r} names unknown topic {p.topic!r}")
        for topic_id in self.topics:
            splits = {p.split for p in self.prompts if p.topic == topic_id}
            if splits != {"train", "heldout"}:
                raise ValueError(
                    f"topic {topic_id!r} has questions only in {sorted(splits)}; "
                    "give it questions under both `train` and `heldout`"
                )
        return self

    @cached_property
    def train(self) -> tuple[Prompt, ...]:
        return tuple(p for p in self.prompts if p.split == "train")

    @cached_property
    def heldout(self) -> tuple[Prompt, ...]:
        return tuple(p for p in self.prompts if p.split == "heldout")

    def topic_of(self, prompt: Prompt) -> Topic:
        return self.topics[prompt.topic]

    def messages(self, prompt: Prompt) -> list[dict[str, str]]:
        """The chat messages the shop's app sends for `prompt`: its system prompt, then the
        customer's question."""
        return [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": prompt.text},
        ]


def prompt_id(topic: str, text: str) -> str:
    return f"{topic}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def load_scenario(path: Path | str = DEFAULT_PATH) -> Scenario:
    """Read and validate a scenario file; raises `pydantic.ValidationError` naming the problem."""
    raw = _ScenarioFile.model_validate(yaml.safe_load(Path(path).read_text()))
    topics: dict[str, Topic] = {}
    prompts: list[Prompt] = []
    for t in raw.topics:
        if t.id in topics:
            raise ValueError(f"{path}: topic {t.id!r} is defined twice")
        topics[t.id] = Topic(id=t.id, action_path=t.action_path, action_terms=tuple(t.action_terms))
        for split, texts in t.prompts.items():
            prompts.extend(
                Prompt(id=prompt_id(t.id, text), topic=t.id, text=text.strip(), split=split)
                for text in texts
            )
    return Scenario(system_prompt=raw.system_prompt.strip(), topics=topics, prompts=tuple(prompts))
