"""Preference data out, as JSONL in the formats people train with.

- `trl`: TRL's conversational preference rows, `{"prompt", "chosen", "rejected"}`.
- `trl-kto`: TRL's unpaired rows, `{"prompt", "completion", "label"}`.
- `openai-dpo`: OpenAI's DPO fine-tuning rows,
  `{"input", "preferred_output", "non_preferred_output"}`.

Pairs come from pairwise votes with a winner (ties and both-bad carry no preference) and from
thumbs-down votes with a correction (the correction is preferred to the answer). Unpaired rows come
from thumbs votes, plus each correction as a desirable answer. Rows are in feedback order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from sqlalchemy import select
from sqlalchemy.orm import aliased

from service.protocol import ExportFormat
from service.store import Feedback, Generation, GenerationChoice, Store

Messages = list[dict[str, str]]


def _assistant(text: str) -> Messages:
    return [{"role": "assistant", "content": text}]


def pair_row(fmt: ExportFormat, prompt: Messages, chosen: str, rejected: str) -> dict:
    if fmt == "openai-dpo":
        return {
            "input": {"messages": prompt},
            "preferred_output": _assistant(chosen),
            "non_preferred_output": _assistant(rejected),
        }
    return {"prompt": prompt, "chosen": _assistant(chosen), "rejected": _assistant(rejected)}


def kto_row(prompt: Messages, completion: str, desirable: bool) -> dict:
    return {"prompt": prompt, "completion": _assistant(completion), "label": desirable}


def rows(store: Store, fmt: ExportFormat) -> Iterator[dict]:
    """Stream export rows from a read transaction, a few hundred feedback rows at a time."""
    gen_a, gen_b = aliased(Generation), aliased(Generation)
    choice_a, choice_b = aliased(GenerationChoice), aliased(GenerationChoice)
    query = (
        select(Feedback, gen_a.messages, choice_a.text, choice_b.text)
        .join(gen_a, gen_a.id == Feedback.a_generation_id)
        .join(
            choice_a,
            (choice_a.generation_id == Feedback.a_generation_id)
            & (choice_a.index == Feedback.a_choice_index),
        )
        .outerjoin(gen_b, gen_b.id == Feedback.b_generation_id)
        .outerjoin(
            choice_b,
            (choice_b.generation_id == Feedback.b_generation_id)
            & (choice_b.index == Feedback.b_choice_index),
        )
        .order_by(Feedback.created_at, Feedback.id)
        .execution_options(yield_per=500)
    )
    with store.reading() as session:
        for fb, prompt, text_a, text_b in session.execute(query):
            if fmt == "trl-kto":
                if fb.kind == "thumbs":
                    yield kto_row(prompt, text_a, fb.rating == "up")
                    if fb.correction:
                        yield kto_row(prompt, fb.correction, True)
            elif fb.kind == "pairwise" and fb.winner in ("a", "b"):
                chosen, rejected = (text_a, text_b) if fb.winner == "a" else (text_b, text_a)
                yield pair_row(fmt, prompt, chosen, rejected)
            elif fb.kind == "thumbs" and fb.correction and fb.rating == "down":
                yield pair_row(fmt, prompt, fb.correction, text_a)


def jsonl(store: Store, fmt: ExportFormat) -> Iterator[bytes]:
    for row in rows(store, fmt):
        yield (json.dumps(row, ensure_ascii=False) + "\n").encode()
