"""A 60 s PostgreSQL outage under chat and feedback load, end to end over HTTP.

The test starts a PostgreSQL cluster of its own (initdb + pg_ctl on a free loopback port, as the
`postgres` user when run as root), serves the real app (fake engine) with uvicorn, drives it with
the openai client and httpx, stops the database for 60 s and starts it again. The bar: no failed
chat request, and every acknowledged vote in the database exactly once under its ack's id.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from service.app import AppOptions, build_app
from service.auth import Authenticator
from service.settings import JournalSettings
from service.store import Feedback, Generation, Store
from tests.conftest import CHAT_KEY, KEYS, auth, base_registry
from tests.e2e.conftest import free_port
from tests.fakes import FakeEngine
from tests.service.live import serving

pytestmark = pytest.mark.postgres
logger = logging.getLogger(__name__)
OUTAGE_S = 60.0
PG_BIN = Path("/usr/lib/postgresql/15/bin")


@dataclass
class Cluster:
    """A private PostgreSQL cluster in a temporary folder."""

    folder: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def pg(self, tool: str, *args: str) -> None:
        exe = shutil.which(tool) or str(PG_BIN / tool)
        cmd = [exe, *args]
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1"
        data, log = str(self.folder / "data"), str(self.folder / "log")
        self.pg("pg_ctl", "-D", data, "-o", options, "-l", log, "-w", "start")

    def stop(self) -> None:
        self.pg("pg_ctl", "-D", str(self.folder / "data"), "-m", "fast", "-w", "stop")


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    if not (shutil.which("initdb") or (PG_BIN / "initdb").exists()):
        pytest.skip("initdb not found: install PostgreSQL's server binaries (postgresql-15)")
    folder = Path(tempfile.mkdtemp(prefix="prefloop-pg-"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    c = Cluster(folder, free_port())
    c.pg("initdb", "-D", str(folder / "data"), "-U", "postgres", "-A", "trust", "--no-sync")
    c.start()
    try:
        yield c
    finally:
        with_data = (folder / "data" / "postmaster.pid").exists()
        if with_data:
            c.stop()
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class Tally:
    chats: dict[str, str] = field(default_factory=dict)  # response id -> Prefloop-Record
    failed_chats: list[str] = field(default_factory=list)
    acks: dict[str, int] = field(default_factory=dict)  # feedback id -> status
    failed_votes: list[str] = field(default_factory=list)
    queued_latency: list[float] = field(default_factory=list)
    retries: int = 0


async def chat_and_vote(base_url: str, tally: Tally, stop: asyncio.Event, worker: int) -> None:
    """One client: a chat (every third streamed), then a vote on it with its own idempotency key,
    every fifth vote sent twice; every seventh turn sends its vote in a batch instead."""
    from openai import AsyncOpenAI

    openai = AsyncOpenAI(base_url=f"{base_url}/v1", api_key=CHAT_KEY, max_retries=0)
    async with httpx.AsyncClient(base_url=base_url, headers=auth(CHAT_KEY), timeout=30) as http:
        turn = 0
        while not stop.is_set():
            turn += 1
            messages = [{"role": "user", "content": f"worker {worker} question {turn}"}]
            try:
                if turn % 3 == 0:
                    stream = await openai.chat.completions.create(
                        model="prefloop",
                        messages=messages,
                        stream=True,  # type: ignore[arg-type]
                    )
                    rid = ""
                    async for chunk in stream:
                        rid = chunk.id
                    tally.chats[rid] = "stream"
                else:
                    raw = await openai.chat.completions.with_raw_response.create(
                        model="prefloop",
                        messages=messages,  # type: ignore[arg-type]
                    )
                    rid = raw.parse().id
                    tally.chats[rid] = raw.headers["Prefloop-Record"]
            except Exception as exc:
                tally.failed_chats.append(repr(exc))
                continue
            vote = {"type": "thumbs", "response_id": rid, "rating": "up" if turn % 2 else "down"}
            key = {"Idempotency-Key": f"w{worker}-t{turn}-{uuid.uuid4().hex[:6]}"}
            started = time.perf_counter()
            if turn % 7 == 0:
                r = await http.post("/v1/feedback/batch", json={"events": [{**vote, **_key(key)}]})
                item = r.json()["data"][0] if r.status_code == 200 else {}
                status, ack = item.get("status", r.status_code), item.get("feedback") or {}
            else:
                r = await http.post("/v1/feedback", json=vote, headers=key)
                status, ack = r.status_code, r.json()
            if status not in (201, 202):
                tally.failed_votes.append(f"{status}: {r.text[:200]}")
                continue
            if status == 202:
                tally.queued_latency.append(time.perf_counter() - started)
            tally.acks[ack["id"]] = status
            if turn % 5 == 0:
                again = await http.post("/v1/feedback", json=vote, headers=key)
                assert again.status_code in (200, 202), again.text
                assert again.json()["id"] == ack["id"], (again.json(), ack)
                tally.retries += 1
            await asyncio.sleep(0.05)


def _key(header: dict[str, str]) -> dict[str, str]:
    return {"idempotency_key": header["Idempotency-Key"]}


async def test_sixty_seconds_without_postgres_fail_no_chat_and_lose_no_vote(
    cluster: Cluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO)
    store = Store(cluster.url)
    store.upgrade()
    registry = base_registry(store, tmp_path / "data")
    app = build_app(
        FakeEngine(),
        registry,
        Authenticator(KEYS),
        AppOptions(journal=JournalSettings(probe_interval_s=0.5)),
    )
    writer = app.state.writer
    tally = Tally()
    stop = asyncio.Event()
    with serving(app) as port:
        url = f"http://127.0.0.1:{port}"
        workers = [asyncio.create_task(chat_and_vote(url, tally, stop, w)) for w in range(4)]
        await asyncio.sleep(3)
        stored_before = len(tally.acks)
        await asyncio.to_thread(cluster.stop)
        down_at = time.monotonic()
        await asyncio.sleep(OUTAGE_S)
        await asyncio.to_thread(cluster.start)
        up_at = time.monotonic()
        await asyncio.sleep(3)
        stop.set()
        await asyncio.gather(*workers)
        while writer.journaling:
            assert time.monotonic() - up_at < 120, "the journal was not replayed"
            await asyncio.sleep(0.1)
        drained_after = time.monotonic() - up_at

    assert tally.failed_chats == [], tally.failed_chats[:5]
    assert tally.failed_votes == [], tally.failed_votes[:5]
    queued = [i for i, status in tally.acks.items() if status == 202]
    assert stored_before > 0 and len(queued) > 100, (stored_before, len(queued))
    assert "journaled" in tally.chats.values() and "stored" in tally.chats.values()
    with store.reading() as s:
        feedback_ids = s.scalars(select(Feedback.id)).all()
        generations = s.scalar(select(func.count()).select_from(Generation))
    assert sorted(feedback_ids) == sorted(tally.acks), "every acknowledged vote, exactly once"
    assert generations == len(tally.chats)
    journal_dir = tmp_path / "data" / "journal"
    # Closed with the server; a journal is removed on close only when it holds nothing.
    assert list(journal_dir.glob("*.journal")) == []
    assert not (journal_dir / "rejected.jsonl").exists()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cannot read the served version" in m for m in messages) == 1
    assert sum("the database is unreachable" in m for m in messages) == 1
    [back] = [m for m in messages if "the database is back" in m]
    latency = sorted(tally.queued_latency)
    logger.info(
        "outage %.0f s: %d chats, %d votes (%d queued, %d retries); journaled ack p50 %.1f ms, "
        "p99 %.1f ms; replay done %.1f s after the database came back (%s)",
        up_at - down_at,
        len(tally.chats),
        len(tally.acks),
        len(queued),
        tally.retries,
        statistics.median(latency) * 1000,
        latency[int(len(latency) * 0.99)] * 1000,
        drained_after,
        back,
    )
    store.close()
