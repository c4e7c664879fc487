"""Faults under feedback load, against the real service (Ray Serve + vLLM on the embedded model).

While clients vote without pause, one process is killed with SIGKILL: the API replica, the policy
replica (with its engine), or Serve's HTTP proxy. Afterwards the service answers chat and feedback
again, every acknowledged vote is stored exactly once, and a retry of an acknowledged vote with its
idempotency key answers with the same id. Each run prints what it measured (docs/reliability.md).

    pytest tests/e2e/test_faults.py -m e2e -p no:randomly -s
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest

from tests.conftest import CHAT_KEY, auth
from tests.e2e.conftest import Service, VoteLoad, answers, assert_votes_kept

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.e2e]

RECOVERY_TIMEOUT_S = 240


def ray_processes(marker: str) -> set[int]:
    """Processes of this test's own Ray cluster (our descendants) whose command line has `marker`
    (Ray titles its workers `ray::<actor class>`, Serve's replicas `ServeReplica:<app>:<name>`)."""
    found = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            if marker in " ".join(proc.cmdline()):
                found.add(proc.pid)
        except psutil.Error:
            continue
    return found


@pytest.fixture(scope="module")
def response_ids(service: Service) -> Iterator[list[str]]:
    body = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 4}
    ids = [
        httpx.post(
            f"{service.base_url}/v1/chat/completions", json=body, headers=auth(CHAT_KEY), timeout=60
        ).json()["id"]
        for _ in range(4)
    ]
    yield ids


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("target", "marker"),
    [
        ("API replica", "ServeReplica:prefloop:api"),
        ("policy replica", "ServeReplica:prefloop-policy:policy"),
        ("proxy", "ProxyActor"),
    ],
)
def test_kill_under_feedback_load(
    service: Service, response_ids: list[str], target: str, marker: str
) -> None:
    victims = ray_processes(marker)
    assert victims, f"no process of this Ray cluster matches {marker!r}"
    with VoteLoad(service.base_url, response_ids) as load:
        time.sleep(3)
        killed_at = time.monotonic()
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        deadline = killed_at + RECOVERY_TIMEOUT_S
        while time.monotonic() < deadline:
            if load.recovered(since=killed_at + 1) and answers(service.base_url):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"{target}: not answering {RECOVERY_TIMEOUT_S} s after SIGKILL")
        recovered_s = time.monotonic() - killed_at
        time.sleep(2)
    during = [v for v in load.votes if v.sent >= killed_at and v.sent < killed_at + recovered_s]
    refused = [v for v in during if v.id is None]
    acked = load.acknowledged()
    print(
        f"\n[fault] SIGKILL {target}: answering again after {recovered_s:.1f} s; "
        f"{len(load.votes)} votes sent, {len(acked)} acknowledged, "
        f"{len(refused)} refused or failed while recovering "
        f"(statuses {sorted({v.status for v in refused})})"
    )
    if target == "policy replica":
        # Votes go to the API replica: a policy replica's death costs none of them.
        assert not refused, refused[:5]
    assert_votes_kept(service.store, service.base_url, acked)
