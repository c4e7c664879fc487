"""End to end: the learning loop over HTTP on the real service, and swaps under load.

- feedback in through the API, a DPO cycle on Ray Train (snapshot, train, merge, gate with a vLLM
  canary), promotion, and the next responses carry the new version; then a rollback;
- promotion and rollback while a client streams steady chat traffic: every request succeeds and
  each response's text and version agree with one version.

The cycle's gate thresholds are opened here (a few pairs cannot show quality); the demo measures
quality. Run (several minutes on a 2-core CPU):

    pytest tests/e2e/loop/test_loop.py -m e2e -p no:randomly
"""

from __future__ import annotations

import json
import shutil
import threading
import time

import httpx
import pytest

from service.registry import Registry
from service.store import PreferenceSnapshot
from tests.conftest import ADMIN_KEY, CHAT_KEY, auth
from tests.e2e.conftest import Service
from training.config import GateConfig, SchedulerConfig, TrainConfig, TrainingSettings
from training.cycle import CycleContext
from training.scheduler import tick

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.e2e]

QUESTIONS = [
    "How do I cancel my subscription?",
    "How can I reset my password?",
    "Where is my parcel?",
    "How do I get a refund?",
    "How do I change my email address?",
    "How can I download an invoice?",
    "How do I apply a promo code?",
    "How do I return an item?",
]
PROBE = [{"role": "user", "content": "How do I cancel my subscription?"}]


def chat(svc: Service, messages, **params) -> dict:
    r = httpx.post(
        f"{svc.base_url}/v1/chat/completions",
        headers=auth(CHAT_KEY),
        timeout=120,
        json={"messages": messages, "max_tokens": 32, **params},
    )
    assert r.status_code == 200, r.text
    return r.json()


def served_version(svc: Service) -> str:
    r = httpx.get(f"{svc.base_url}/v1/models", headers=auth(CHAT_KEY), timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["data"][0]["version"]


def promote(svc: Service, version: str) -> dict:
    r = httpx.post(
        f"{svc.base_url}/v1/admin/versions/{version}/promote", headers=auth(ADMIN_KEY), timeout=60
    )
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.timeout(1500)
def test_feedback_to_new_version_and_back(loop_service: Service):
    svc = loop_service
    for i, q in enumerate(QUESTIONS * 2):
        body = chat(svc, [{"role": "user", "content": q}], n=2, seed=i, temperature=1.0)
        texts = [c["message"]["content"] for c in body["choices"]]
        # Any fixed rule will do here: the shorter answer wins.
        vote = {
            "type": "pairwise",
            "winner": "a" if len(texts[0]) <= len(texts[1]) else "b",
            "a": {"response_id": body["id"], "choice_index": 0},
            "b": {"response_id": body["id"], "choice_index": 1},
        }
        r = httpx.post(f"{svc.base_url}/v1/feedback", json=vote, headers=auth(CHAT_KEY))
        assert r.status_code == 201, r.text

    queued = httpx.post(f"{svc.base_url}/v1/admin/train", headers=auth(ADMIN_KEY))
    assert queued.status_code == 202, queued.text
    ctx = CycleContext(
        registry=Registry(svc.store, svc.settings.data_dir),
        settings=TrainingSettings(
            data_dir=svc.settings.data_dir,
            train=TrainConfig(epochs=1, batch_size=4),
            # Opened on purpose: this test is about the swap (feedback in, the new version served,
            # then rolled back), and a few pairs cannot show quality; the held-out pairs are still
            # scored, and test_gate.py holds candidates to the real thresholds.
            gate=GateConfig(min_accuracy=0.0, min_margin=-1e9),
            scheduler=SchedulerConfig(enabled=False),
        ),
        database_url=svc.settings.resolved_database_url,
    )
    run = tick(ctx)
    assert run is not None and run.id == queued.json()["id"]
    assert run.status == "promoted", run.error
    assert run.step_metrics and "loss" in run.step_metrics[0]
    assert set(run.stages) >= {"snapshot", "train", "register", "gate", "promote"}
    new = run.candidate_version_id

    # The replica's engine reports its version on /v1/models; a chat answer takes longer than the
    # swap on a slow CPU, so the 2 s are read off the poll, then a chat confirms the version.
    deadline = time.monotonic() + 2.0
    while served_version(svc) != new:
        assert time.monotonic() < deadline, "replica did not serve the new version within 2 s"
        time.sleep(0.05)
    assert chat(svc, PROBE)["system_fingerprint"] == new
    status = httpx.get(f"{svc.base_url}/v1/admin/status", headers=auth(ADMIN_KEY)).json()
    assert status["served_version"]["id"] == new
    assert status["last_run"]["status"] == "promoted"
    gate = status["served_version"]["metrics"]["gate"]
    assert gate["canary"].strip()
    # The gate scored exactly the snapshot's held-out pairs. Two of the eight questions hash into
    # the held-out fifth and each got two votes, so there are some and the check ran, not skipped.
    with svc.store.reading() as session:
        snapshot = session.get(PreferenceSnapshot, run.snapshot_id)
        assert snapshot is not None, run.snapshot_id
        snap_dir = ctx.settings.data_dir / snapshot.path
    heldout_rows = (snap_dir / "pairs_heldout.jsonl").read_text().splitlines()
    manifest = json.loads((snap_dir / "manifest.json").read_text())
    assert len(heldout_rows) == manifest["counts"]["pairs_heldout"] > 0
    assert gate["heldout"]["pairs"] == len(heldout_rows)
    assert "skipped" not in gate["heldout"], gate["heldout"]

    back = promote(svc, "base")
    assert back["action"] == "rollback" and back["serving"] == "base"
    assert {chat(svc, PROBE)["system_fingerprint"] for _ in range(3)} == {"base"}


def noisy_copy(registry: Registry, name: str) -> str:
    """An approved version whose weights are the base's plus enough noise that it babbles: its
    answers never name the topic, where the base's always do."""
    import torch
    from safetensors.torch import load_file, save_file

    base = registry.weights_path(registry.get("base"))
    out = registry.data_dir / "scratch" / name
    shutil.copytree(base, out / "weights")
    weights = out / "weights" / "model.safetensors"
    tensors = load_file(str(weights))
    gen = torch.Generator().manual_seed(0)
    noisy = {
        k: (v.float() + 0.1 * torch.randn(v.shape, generator=gen)).to(v.dtype)
        for k, v in tensors.items()
    }
    save_file(noisy, str(weights), metadata={"format": "pt"})
    registry.publish(
        version_id=name,
        parent=registry.get("base"),
        source=out,
        kind="full",
        algorithm="test",
        snapshot_id=None,
        config={},
        metrics={},
    )
    registry.judge(name, approved=True, reason=None, metrics={})
    return name


@pytest.mark.timeout(900)
def test_swaps_under_steady_load(loop_service: Service):
    svc = loop_service
    registry = Registry(svc.store, svc.settings.data_dir)
    other = noisy_copy(registry, "v-noisy")
    greedy = {"messages": PROBE, "temperature": 0.0, "max_tokens": 24}

    # Greedy text shifts a little with the batch it runs in, so the test tells the versions apart
    # by what they say, not by exact text: the base names the topic, the babbling copy does not.
    def says_base(text: str) -> bool:
        return "subscription" in text.lower()

    for version in ("base", other, "base"):
        assert promote(svc, version)["serving"] == version
        text = chat(svc, **greedy)["choices"][0]["message"]["content"]
        assert says_base(text) == (version == "base"), text

    # (sent, answered, status, version, text) of every request
    results: list[tuple[float, float, int, str, str]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=svc.base_url, headers=auth(CHAT_KEY), timeout=60) as c:
            while not stop.is_set():
                sent = time.monotonic()
                r = c.post("/v1/chat/completions", json=greedy)
                body = r.json() if r.status_code == 200 else {}
                results.append(
                    (
                        sent,
                        time.monotonic(),
                        r.status_code,
                        body.get("system_fingerprint", ""),
                        body.get("choices", [{}])[0].get("message", {}).get("content"),
                    )
                )

    # Two clients keep a request in flight at every promotion. The swap waits for the requests in
    # flight to finish (the engine pauses in "wait" mode), so its time includes draining them.
    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    swaps: list[tuple[float, float]] = []
    try:
        for version in (other, "base", other, "base"):
            time.sleep(2.0)
            start = time.monotonic()
            assert promote(svc, version)["serving"] == version
            swaps.append((start, time.monotonic()))
        time.sleep(2.0)
    finally:
        stop.set()
        for t in threads:
            t.join()

    # The load was steady: requests were in flight when each promotion began.
    for start, _ in swaps:
        assert any(sent < start < answered for sent, answered, *_ in results), start
    assert [r for r in results if r[2] != 200] == []
    for *_, version, text in results:
        assert says_base(text) == (version == "base"), f"{version} answered {text!r}"
    assert {r[3] for r in results} == {"base", other}
    # In place, not a restart: Serve's rolling restart of the replica takes about 26 s. How fast
    # a swap is, is bench.swap's to measure (a test's timing on a busy box is not a verdict: swaps
    # of 0.7-2.1 s were seen here across full-suite runs).
    swap_s = [end - start for start, end in swaps]
    assert max(swap_s) < 10.0, swap_s
