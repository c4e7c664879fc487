"""`make demo`: serve the embedded model and hold a scripted chat-and-feedback exchange with it,
through the public HTTP API only, as a chat app would.

    python -m deploy.demo        (settings from PREFLOOP_...; the port defaults to 8000)

It asks a few customer-service questions, compares two answers to one of them, leaves thumbs and a
pairwise vote, and shows the resulting preference export; then it stops the service.
"""

from __future__ import annotations

import json
import logging
import sys
import time

import httpx

from deploy.bootstrap import ensure_embedded_model
from service.settings import SettingsError, load_settings

SYSTEM = "You are the support assistant of an online shop. Answer in at most three sentences."
QUESTIONS = [
    "How do I cancel my subscription?",
    "I forgot my password. How can I reset it?",
    "My parcel has not arrived after ten days. What should I do?",
]


def _wait_ready(client: httpx.Client, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise TimeoutError("the service did not become ready")


def _ask(client: httpx.Client, question: str, n: int = 1) -> dict:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    r = client.post(
        "/v1/chat/completions",
        json={"messages": messages, "n": n, "max_tokens": 96, "temperature": 0.8},
    )
    r.raise_for_status()
    return r.json()


def converse(client: httpx.Client) -> None:
    """The scripted exchange; raises on any unexpected answer from the service."""
    for question in QUESTIONS:
        answer = _ask(client, question)
        print(
            f"\nuser> {question}\nbot ({answer['system_fingerprint']})> "
            f"{answer['choices'][0]['message']['content'].strip()}"
        )
        rating = "up" if answer["choices"][0]["finish_reason"] == "stop" else "down"
        fb = client.post(
            "/v1/feedback",
            json={
                "type": "thumbs",
                "response_id": answer["id"],
                "rating": rating,
                "user_id": "demo-user",
            },
        )
        fb.raise_for_status()
        print(f"  thumbs {rating} -> {fb.json()['id']}")

    pair = _ask(client, QUESTIONS[0], n=2)
    texts = [c["message"]["content"] for c in pair["choices"]]
    # The demo user prefers the shorter, more direct answer.
    winner = "a" if len(texts[0]) <= len(texts[1]) else "b"
    vote = {
        "type": "pairwise",
        "winner": winner,
        "user_id": "demo-user",
        "a": {"response_id": pair["id"], "choice_index": 0},
        "b": {"response_id": pair["id"], "choice_index": 1},
        "idempotency_key": f"demo-{pair['id']}",
    }
    for attempt in ("sent", "retried"):
        r = client.post("/v1/feedback", json=vote)
        r.raise_for_status()
        print(
            f"  pairwise vote {attempt}: {r.status_code} {r.json()['id']}"
            f" replayed={r.json()['replayed']}"
        )

    export = client.get("/v1/preferences/export", params={"format": "trl"})
    export.raise_for_status()
    rows = [json.loads(line) for line in export.text.splitlines()]
    print(
        f"\nexport (TRL preference format): {len(rows)} pair(s); last chosen answer:\n  "
        f"{rows[-1]['chosen'][0]['content'].strip()[:200]}"
    )


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    if settings.model_path is None:
        ensure_embedded_model(settings.data_dir)
    headers = {}
    if settings.auth_enabled:
        admin = [k for k in settings.all_api_keys if "admin" in k.scopes]
        if not admin:
            print(
                "demo: the demo exports preferences and needs a key with the admin scope",
                file=sys.stderr,
            )
            return 2
        headers["Authorization"] = f"Bearer {admin[0].key.get_secret_value()}"
    from service import deployment

    started = time.monotonic()
    deployment.deploy(settings)
    try:
        base_url = f"http://127.0.0.1:{settings.port}"
        with httpx.Client(base_url=base_url, headers=headers, timeout=120) as client:
            _wait_ready(client)
            print(
                f"prefloop is serving on port {settings.port} "
                f"(ready after {time.monotonic() - started:.0f} s)"
            )
            converse(client)
    finally:
        deployment.shutdown()
    print("\ndemo complete")
    return 0


if __name__ == "__main__":
    sys.exit(main())
