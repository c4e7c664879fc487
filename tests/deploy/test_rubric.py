"""The simulated customers' rubric, one rule at a time, on hand-written answers."""

from __future__ import annotations

import pytest

from deploy.simulation.rubric import FILLER, WORD_LIMIT, action_terms_in, compare, judge
from deploy.simulation.scenario import Topic

CANCEL = Topic(
    id="cancel_subscription",
    action_path="Go to Settings > Account > Cancel Subscription, then click Confirm.",
    action_terms=("settings", "account", "cancel"),
)
DIRECT = "Go to Settings > Account > Cancel Subscription, then click Confirm."


def test_a_direct_actionable_answer_is_approved():
    v = judge(CANCEL, DIRECT)
    assert v.approved and v.reasons == []
    assert v.action_terms == ["settings", "account", "cancel"]
    assert v.words == 9 and v.filler == []  # `>` is not a word


@pytest.mark.parametrize(
    "answer",
    [
        "Open your account settings and choose Cancel.",
        "1. Sign in. 2) Find the cancel button in your account.",
        "Account -> Cancel plan. That's all it takes in your settings.",
        "Tap Settings, then Cancel under your plan.",
    ],
)
def test_other_concrete_steps_count(answer):
    assert judge(CANCEL, answer).approved, judge(CANCEL, answer).reasons


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (
            "Before you go, we have a special offer: 50% off your next three months! "
            "Go to Settings > Account > Cancel if you still want to leave.",
            "retention pitch",
        ),
        ("Go to Settings > Account > Cancel. I hope this helps!", "retention pitch, deflection"),
        (
            "As an AI, I don't have access to your account settings, but you can cancel there.",
            "retention pitch, deflection or filler",
        ),
        (
            "Please contact customer support to cancel your account; click the Help button.",
            "retention pitch, deflection or filler",
        ),
        ("Go to Orders and click Track Package to see where your parcel is.", "off topic"),
        ("You can cancel your subscription from your account settings.", "no concrete step"),
        (
            "Could you tell me which plan you have? Then go to Settings > Account > Cancel.",
            "asks a question back",
        ),
        ("Go to Settings > Account > Cancel. Are you sure you want to leave", "retention pitch"),
    ],
)
def test_each_rule_rejects(answer, reason):
    v = judge(CANCEL, answer)
    assert not v.approved
    assert any(r.startswith(reason) or reason in r for r in v.reasons), v.reasons


def test_too_long_is_rejected_and_the_limit_is_inclusive():
    padding = " and".join([" then wait"] * 40)
    long_answer = DIRECT + padding
    assert len(long_answer.split()) > WORD_LIMIT
    v = judge(CANCEL, long_answer)
    assert not v.approved and v.reasons == [f"{v.words} words (limit {WORD_LIMIT})"]
    exact = DIRECT + " ok" * (WORD_LIMIT - 9)
    assert judge(CANCEL, exact).words == WORD_LIMIT and judge(CANCEL, exact).approved
    assert not judge(CANCEL, exact + " ok").approved


def test_empty_answer_is_rejected():
    v = judge(CANCEL, "")
    assert not v.approved and v.words == 0


def test_terms_match_whole_words_with_inflections_case_insensitively():
    topic = Topic(id="t", action_path="x", action_terms=("charge", "ship", "sign in", "cancel"))
    text = "CHARGED, shipping, Sign-in and cancelled"
    assert action_terms_in(topic, text) == ["charge", "ship", "sign in", "cancel"]
    # Whole words only: no match inside another word.
    assert action_terms_in(topic, "discharge, friendship, cancellation-free") == []


def test_filler_is_counted_per_hit_and_curly_apostrophes_match():
    v = judge(CANCEL, "I can’t help. I can't. Go to Settings > Account > Cancel.")
    assert v.filler == ["i can't", "i can't"]
    assert "discount" not in FILLER  # promo-code answers legitimately mention discounts


def test_score_orders_approved_first_then_terms_then_filler():
    approved = judge(CANCEL, DIRECT)
    two_terms = judge(CANCEL, "Go to Account and press Cancel.")
    assert approved.score > two_terms.score  # both approved: more action terms first
    pitched = judge(CANCEL, DIRECT + " Before you go, see our special offer.")
    pitched_twice = judge(CANCEL, DIRECT + " Before you go, reconsider our special offer.")
    assert two_terms.score > pitched.score > pitched_twice.score


def test_length_decides_only_between_approved_answers():
    short = "Go to Settings > Account > Cancel."
    longer = short + " It takes a moment and your plan runs until the end of the month you paid."
    assert compare(CANCEL, short, longer) == "a"
    assert compare(CANCEL, longer, short) == "b"
    # Two unapproved answers that differ only in length: no preference.
    vague = "You can cancel from your account."
    vaguer = vague + " It only takes a moment, and your plan runs until the end of the month."
    assert not judge(CANCEL, vague).approved and not judge(CANCEL, vaguer).approved
    assert compare(CANCEL, vague, vaguer) == "both_bad"


def test_compare_outcomes():
    pitch = "Before you go: we'd hate to lose you! Here is a special offer just for you."
    assert compare(CANCEL, DIRECT, pitch) == "a"
    assert compare(CANCEL, pitch, DIRECT) == "b"
    # Equal scores: tie when both are approved, both_bad when neither is.
    assert compare(CANCEL, DIRECT, DIRECT.replace("click", "select")) == "tie"
    assert compare(CANCEL, pitch, pitch.replace("lose", "miss")) == "both_bad"
    # Neither approved, but one gives a step on topic: partial credit decides.
    half = "Go to your account settings. Hope this helps!"
    assert compare(CANCEL, pitch, half) == "b"
