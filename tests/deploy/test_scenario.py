"""The customer-service scenario file: enough distinct questions, both splits, coherent topics."""

from __future__ import annotations

from collections import Counter

import pytest
from pydantic import ValidationError

from deploy.simulation.rubric import action_terms_in, judge
from deploy.simulation.scenario import load_scenario


@pytest.fixture(scope="module")
def scenario():
    return load_scenario()


def test_enough_distinct_questions(scenario):
    texts = [p.text.lower() for p in scenario.prompts]
    assert len(set(texts)) == len(texts) >= 100
    assert len({p.id for p in scenario.prompts}) == len(texts)
    assert 70 <= len(scenario.train) <= 90 and 25 <= len(scenario.heldout) <= 40


def test_every_topic_on_both_splits(scenario):
    per_split = Counter((p.topic, p.split) for p in scenario.prompts)
    for topic in scenario.topics:
        assert per_split[topic, "train"] >= 3 and per_split[topic, "heldout"] >= 2, topic
    assert len(scenario.topics) >= 10


def test_every_action_path_contains_its_terms_and_is_approved(scenario):
    for topic in scenario.topics.values():
        assert action_terms_in(topic, topic.action_path) == list(topic.action_terms), topic.id
        assert judge(topic, topic.action_path).approved, (topic.id, judge(topic, topic.action_path))


def test_the_system_prompt_leaves_the_procedures_to_be_learned(scenario):
    assert "Acme Shop" in scenario.system_prompt
    assert ">" not in scenario.system_prompt and len(scenario.system_prompt.split()) < 40
    prompt = scenario.heldout[0]
    assert scenario.messages(prompt) == [
        {"role": "system", "content": scenario.system_prompt},
        {"role": "user", "content": prompt.text},
    ]


def test_invalid_files_are_refused(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        "system_prompt: hi\n"
        "topics:\n"
        "  - id: refunds\n"
        "    action_path: Go to Orders and click Request Refund.\n"
        "    action_terms: [order, refund]\n"
        "    prompts: {train: ['How do I get a refund?']}\n"
    )
    with pytest.raises(ValidationError, match="both `train` and `heldout`"):
        load_scenario(path)
    path.write_text(
        path.read_text().replace("{train:", "{heldout: ['how do i get a refund?'], train:")
    )
    with pytest.raises(ValidationError, match="more than once"):
        load_scenario(path)
