"""How a simulated Acme Shop customer judges an answer: a fixed, deterministic rubric taken from the
scenario (deploy/simulation/customer_service.yaml), never from any model's outputs.

A customer approves an answer that is direct and actionable, which here means all five rules hold:

1. on topic: it contains at least `MIN_ACTION_TERMS` (2) of the topic's `action_terms`, matched
   case-insensitively as whole words, allowing regular inflections (`charge` matches `charges`,
   `charged`; `cancel` matches `cancelled`; `ship` matches `shipping`) and a hyphen or a space
   between the words of a term (`sign in`, `sign-in`);
2. a concrete step: it contains one of `STEP_MARKERS`, a navigation or imperative word ("go to",
   "click", "tap", ...), a menu path (`Settings > Account`, `->`, `→`) or a numbered step (`1.`,
   `2)`, `step 3`);
3. short: at most `WORD_LIMIT` (80) words (whitespace-separated tokens with a letter or digit, so
   `>` and list bullets are not words); the customer reads it in a chat window;
4. no retention pitch, deflection or filler: none of the phrases of `FILLER`, each listed with why;
5. no question back: no `?` anywhere and none of `QUESTION_BACK`'s requests for information. The
   customer asked a question and wants the answer, not a counter-question; a rhetorical question
   ("Forgot your password? ...") counts too, which keeps the rule a plain character test.

`judge` returns the verdict with the reasons for each failed rule. `score` orders answers for
pairwise votes, in this order of precedence (each level's weight exceeds the whole range of the
levels below it):

- approved answers before unapproved ones (1000);
- more content rules passed: on topic, concrete step, no filler, no question back (100 each);
- more distinct action terms, fewer filler hits (+10 per term, -10 per hit, each counted up to 9);
- among approved answers only, shorter: +7 for 1-10 words down to 0 for 71-80 (10-word buckets).

Length never decides between two unapproved answers, and the length rule is not one of the content
rules: the first calibration of the loop (DESIGN.md) found that pairs where "the shorter answer
wins" stand in for missing signal teach DPO to collapse answers. Between two approved answers, the
shorter one is preferred only by a coarse bucket, so most pairs of approved answers of similar
length are ties, which carry no preference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from deploy.simulation.scenario import Topic

WORD_LIMIT = 80
MIN_ACTION_TERMS = 2

# A concrete step: what the customer can do next, in the shop's interface.
STEP_MARKERS: tuple[str, ...] = (
    r"\bgo to\b",
    r"\bnavigate to\b",
    r"\bhead to\b",
    r"\bvisit\b",
    r"\bclick\b",
    r"\btap\b",
    r"\bselect\b",
    r"\bchoose\b",
    r"\bopen\b",
    r"\bpress\b",
    r"\benter\b",
    r"\w\s*>\s*\w",  # a menu path: Settings > Account
    r"->|→",
    r"(?:^|\s)\d{1,2}[.)]\s+\w",  # a numbered step: "1. Go", "2) Click"
    r"\bstep \d+\b",
)

# Each phrase, and why a customer who wants a direct answer holds it against the answer.
FILLER: dict[str, str] = {
    # Retention pitch: the customer asked how to leave or cancel, not to be talked out of it.
    "before you go": "retention pitch",
    "special offer": "retention pitch: an offer instead of the way out",
    "exclusive offer": "retention pitch: an offer instead of the way out",
    "we'd hate": "retention pitch",
    "we would hate": "retention pitch",
    "sorry to see you go": "retention pitch",
    "are you sure": "retention pitch: second-guesses the customer's decision",
    "reconsider": "retention pitch: asks the customer to change their mind",
    "stay with us": "retention pitch",
    "free month": "retention pitch: an incentive to stay",
    # (Bare "discount" is not listed: the promo-code topic legitimately talks of discount codes.)
    # Deflection: the assistant is the shop's support channel, so disclaiming access or sending
    # the customer to another channel does not answer the question.
    "as an ai": "deflection: talks about itself instead of the shop",
    "language model": "deflection: talks about itself instead of the shop",
    "i'm just": "deflection: disclaims the ability to help",
    "i am just": "deflection: disclaims the ability to help",
    "i don't have access": "deflection: disclaims the ability to help",
    "i do not have access": "deflection: disclaims the ability to help",
    "i cannot": "deflection: disclaims the ability to help",
    "i can't": "deflection: disclaims the ability to help",
    "i'm unable": "deflection: disclaims the ability to help",
    "i am unable": "deflection: disclaims the ability to help",
    "i'm not able": "deflection: disclaims the ability to help",
    "contact customer": "deflection: sends the customer to the support they are already using",
    "contact our": "deflection: sends the customer to another channel",
    "contact support": "deflection: sends the customer to the support they are already using",
    "contact us": "deflection: sends the customer to another channel",
    "reach out to": "deflection: sends the customer to another channel",
    "get in touch": "deflection: sends the customer to another channel",
    # Filler: stock pleasantries whose only job is to open or close a conversation.
    "hope this helps": "filler",
    "feel free to": "filler",
    "don't hesitate": "filler",
    "do not hesitate": "filler",
    "let me know": "filler: invites a follow-up instead of finishing the answer",
    "great question": "filler",
    "thank you for reaching out": "filler",
    "thanks for reaching out": "filler",
    "happy to help": "filler",
    "glad to help": "filler",
    "sorry to hear": "filler: an apology in place of the answer",
    "apologize for the inconvenience": "filler: an apology in place of the answer",
    "understand your frustration": "filler",
}

# Requests for information: the answer hands the question back to the customer.
QUESTION_BACK: tuple[str, ...] = (
    "please provide",
    "could you provide",
    "can you provide",
    "could you tell me",
    "can you tell me",
    "could you share",
    "can you share",
    "could you please",
    "can you please",
    "may i ask",
    "may i have",
)

Winner = Literal["a", "b", "tie", "both_bad"]


def _normalize(text: str) -> str:
    """Lowercase, straight apostrophes, single spaces: the form every rule matches against."""
    text = text.lower().replace("\u2019", "'").replace("\u2018", "'")
    return " ".join(text.split())


def _phrase_pattern(phrase: str) -> re.Pattern[str]:
    words = [re.escape(w) for w in _normalize(phrase).split()]
    return re.compile(r"(?<!\w)" + r"\s+".join(words) + r"(?!\w)")


def _term_pattern(term: str) -> re.Pattern[str]:
    """A whole-word match of `term` with its regular inflections; words joined by space or `-`."""
    words = [re.escape(w) for w in _normalize(term).replace("-", " ").split()]
    last = term[-1]
    doubled = f"|{re.escape(last)}ed|{re.escape(last)}ing" if last.isalpha() else ""
    suffix = f"(?:s|es|d|ed|ing{doubled})?"
    return re.compile(r"(?<!\w)" + r"[\s-]+".join(words) + suffix + r"(?!\w)")


_WORD = re.compile(r"\w")
_STEPS = tuple(re.compile(p) for p in STEP_MARKERS)
_FILLER = {phrase: _phrase_pattern(phrase) for phrase in FILLER}
_QUESTION_BACK = {phrase: _phrase_pattern(phrase) for phrase in QUESTION_BACK}


def action_terms_in(topic: Topic, text: str) -> list[str]:
    """The topic's action terms that `text` contains, in the topic's order."""
    norm = _normalize(text)
    return [t for t in topic.action_terms if _term_pattern(t).search(norm)]


@dataclass(frozen=True)
class Verdict:
    """A customer's judgement of one answer: `reasons` names each failed rule (empty if
    approved); the other fields are what the rules measured."""

    approved: bool
    score: float
    reasons: list[str] = field(default_factory=list)
    words: int = 0
    action_terms: list[str] = field(default_factory=list)
    filler: list[str] = field(default_factory=list)


def judge(topic: Topic, text: str) -> Verdict:
    """Apply the five rules of the module docstring to `text` as an answer about `topic`."""
    norm = _normalize(text)
    words = sum(1 for token in norm.split() if _WORD.search(token))
    terms = action_terms_in(topic, text)
    filler_hits = [p for p, pat in _FILLER.items() for _ in pat.finditer(norm)]
    asks = [p for p, pat in _QUESTION_BACK.items() if pat.search(norm)]

    on_topic = len(terms) >= MIN_ACTION_TERMS
    has_step = any(pat.search(norm) for pat in _STEPS)
    short = 0 < words <= WORD_LIMIT
    no_filler = not filler_hits
    no_question = "?" not in norm and not asks

    reasons = []
    if not on_topic:
        reasons.append(
            f"off topic: {len(terms)} of the action terms {list(topic.action_terms)} "
            f"(needs {MIN_ACTION_TERMS})"
        )
    if not has_step:
        reasons.append("no concrete step (no navigation, imperative or numbered step)")
    if not short:
        reasons.append(f"{words} words (limit {WORD_LIMIT})")
    if not no_filler:
        reasons.append(f"retention pitch, deflection or filler: {sorted(set(filler_hits))}")
    if not no_question:
        reasons.append(f"asks a question back: {asks or ['?']}")
    approved = not reasons

    score = 100 * (on_topic + has_step + no_filler + no_question)
    score += 10 * min(len(terms), 9) - 10 * min(len(filler_hits), 9)
    if approved:
        score += 1000 + 7 - (words - 1) // 10
    return Verdict(approved, float(score), reasons, words, terms, filler_hits)


def compare(topic: Topic, text_a: str, text_b: str) -> Winner:
    """The customer's pairwise vote: the higher score wins; equal scores are a `tie` when both
    answers are approved and `both_bad` when neither is (equal scores share their approval)."""
    a, b = judge(topic, text_a), judge(topic, text_b)
    if a.score == b.score:
        return "tie" if a.approved else "both_bad"
    return "a" if a.score > b.score else "b"
