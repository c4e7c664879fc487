"""Replica autoscaling: one replica to two under load and back, every answer from the promoted
version (the replica Serve adds starts on it) and none failed."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from service.registry import Registry
from service.settings import AutoscalingSettings
from tests.conftest import CHAT_KEY, auth
from tests.e2e.conftest import Service, chats_per_replica, running_service

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.ray]

# Generous: a replica starts its engine in about a minute here, several when the box is busy.
SCALE_TIMEOUT_S = 600
CLIENTS = 8


@pytest.fixture(scope="module")
def autoscaled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    scaling = AutoscalingSettings(
        enabled=True,
        min_replicas=1,
        max_replicas=2,
        target_ongoing_requests=2,
        upscale_delay_s=2,
        downscale_delay_s=10,
    )
    with running_service(
        tmp_path_factory, autoscaling=scaling, data_dir=tmp_path_factory.mktemp("data")
    ) as svc:
        yield svc


def running_replicas() -> int:
    from ray import serve

    from service.deployment import policy_app_name

    deployment = serve.status().applications[policy_app_name()].deployments["policy"]
    return int(deployment.replica_states.get("RUNNING", 0))


def publish_copy_of_base(svc: Service, tmp_path: Path) -> str:
    """A version with the base model's weights under a new id, approved and promoted."""
    registry = Registry(svc.store, svc.settings.data_dir)
    source = tmp_path / "copy"
    shutil.copytree(svc.settings.resolved_model_path, source / "weights")
    version = registry.publish(
        version_id="v-autoscaled",
        parent=registry.get("base"),
        source=source,
        kind="full",
        algorithm="copy",
        snapshot_id=None,
        config={},
        metrics={},
    )
    registry.judge(version.id, approved=True, reason=None, metrics={})
    registry.promote(version.id, actor="test")
    return version.id


class Load:
    """Clients chatting until stopped; every answer's status and version."""

    def __init__(self, svc: Service, clients: int):
        self.svc, self.clients = svc, clients
        self.answers: list[tuple[int, str]] = []
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(clients)

    def _client(self, i: int) -> None:
        with httpx.Client(base_url=self.svc.base_url, headers=auth(CHAT_KEY), timeout=120) as c:
            while not self._stop.is_set():
                r = c.post(
                    "/v1/chat/completions",
                    json={
                        "messages": [{"role": "user", "content": f"Count to {i}"}],
                        "max_tokens": 24,
                    },
                )
                version = r.json().get("system_fingerprint", "") if r.status_code == 200 else ""
                self.answers.append((r.status_code, version))

    def __enter__(self) -> Load:
        for i in range(self.clients):
            self._pool.submit(self._client, i)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._pool.shutdown(wait=True)


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout_s} s"
        time.sleep(1)


def test_scales_out_under_load_and_back_on_the_promoted_version(
    autoscaled: Service, tmp_path: Path
) -> None:
    svc = autoscaled
    assert running_replicas() == 1
    version = publish_copy_of_base(svc, tmp_path)

    def serving_it() -> bool:
        r = httpx.post(
            f"{svc.base_url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
            headers=auth(CHAT_KEY),
            timeout=60,
        )
        return r.status_code == 200 and r.json()["system_fingerprint"] == version

    wait_for(serving_it, 30, f"the replica serves {version}")

    with Load(svc, CLIENTS) as busy:
        wait_for(lambda: running_replicas() == 2, SCALE_TIMEOUT_S, "a second replica under load")
        served_before = len(busy.answers)
        # Enough answers after the second replica joined that it must have served some.
        wait_for(lambda: len(busy.answers) >= served_before + 4 * CLIENTS, 120, "answers on two")
        # Ray's export (10 s report interval) shows the added replica answering too.
        wait_for(lambda: len(chats_per_replica()) == 2, 60, "chats answered by both replicas")
    with Load(svc, 1) as quiet:
        wait_for(lambda: running_replicas() == 1, SCALE_TIMEOUT_S, "back to one replica when idle")
        time.sleep(2)

    answers = busy.answers + quiet.answers
    failed = [status for status, _ in answers if status != 200]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed: {failed[:5]}"
    versions = {v for _, v in answers}
    assert versions == {version}, f"answers from {versions}, promoted {version}"
