"""Group commit, and the journal that carries writes through a database outage.

A single task takes the first queued write, then everything else already queued (up to
`max_batch`) without waiting, runs them in one `Store.write_batch` in a worker thread, and resolves
each caller's future after the commit. A lone request is written at once; under load, the writes
that arrive while a commit is in flight ride the next one, so throughput grows with concurrency
instead of being capped by one fsync per event. The queue is bounded (`queue_max`): past it a write
is refused at once with 503 and `Retry-After: 1` rather than left to wait behind a database that
cannot keep up.

Outage mode (with a `Journal`). When a batch's commit fails because the database cannot be reached
(`unreachable`: connection-level errors, never an op's own refusal), the writer journals the
batch's writes on local disk, fsynced, and resolves each with what its op says a queued write
answers (`Journaled.queued`: a generation "journaled", a feedback ack with `queued: true`). From
then on every write goes to the journal, in order, while a probe asks the database every
`probe_interval_s`. When it answers, the writer replays: journals adopted from dead processes
first, then its own, a chunk at a time, each chunk's kinds committed in the order `kinds` lists
them (a feedback event never precedes the generation it names). Writes that arrive meanwhile are
journaled after what is being replayed, so order holds; once the journal is drained and nothing
is queued, writes commit directly again. Only writes whose op can be journaled (`Journaled`) are;
any other gets a 503 while the database is unreachable.

Exactly once: a journaled write carries the ids it was acknowledged with, and replaying one whose
row is already stored (the process died between the commit and the journal's compaction, or the
failed commit in fact reached the database) stores nothing. A replayed write that fails its own
checks is not stored; it goes to `rejected.jsonl` with the reason, unless its op `waits` for it
(feedback naming a response that is not in the database yet, perhaps journaled by a replica that
has not replayed): such a write is kept in the journal and retried on later passes, every
`probe_interval_s`, until `orphan_grace_s` after it was journaled.

The journal holds at most `max_bytes`: a write that does not fit is refused with 503
`journal_full` and `Retry-After` (chat answers anyway and drops its record; see `service.chat`).

Idempotency keys while journaling: a retry of a journaled event (same key, same body) gets the
first one's ack again, from an in-memory index that lives until the journal is replayed, and so
does a retry of one of the newest `RECENT_KEYS` events this process stored before the outage; a
reused key with another body is a 409 at once. The index is this process's: a retry sent to
another replica, or of an older event, is journaled again with an ack of its own, and replay
stores nothing for it (it is the same event), so that ack's id never appears in the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections import ChainMap, OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeVar, runtime_checkable

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from service.errors import ApiError, Overloaded
from service.metrics import Metrics
from service.store.journal import Entry, Journal, Segment
from service.store.store import Store

logger = logging.getLogger(__name__)
T = TypeVar("T")
# A full journal means an outage longer than the disk allows; retrying within a second or two
# would only be refused again.
JOURNAL_FULL_RETRY_S = 5
# Keyed writes remembered per kind after their commit (see `_recent`): clients retry within
# seconds, and ten thousand keys cost a few MB.
RECENT_KEYS = 10_000


@dataclass(frozen=True)
class Queued(Generic[T]):
    """What a write answers when it is journaled instead of committed: `result` for its caller;
    `journal` false when it is a retry of a write already journaled; `key` registers this write
    in the index its kind's later writes see (its idempotency key)."""

    result: T
    journal: bool = True
    key: Hashable | None = None


@runtime_checkable
class Journaled(Protocol):
    """A write that can be journaled and replayed: a serialisable op with its ids fixed."""

    kind: ClassVar[str]

    def __call__(self, session: Session) -> Any: ...

    def to_record(self) -> dict[str, Any]: ...

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> Journaled:
        """The op that replays `data`; it stores nothing when its row is already there."""
        ...

    def queued(self, pending: Mapping[Hashable, Any]) -> Queued:
        """The answer while journaled. `pending` maps the keys of this kind's journaled writes
        to their ops; raises an `ApiError` for a write refused without the database."""
        ...

    def waits(self, error: Exception) -> bool:
        """Whether `error` on replay may clear once other journals are replayed."""
        ...

    def stored_key(self, result: Any) -> Hashable | None:
        """The key by which a retry of this committed write is known (see `queued`), or None:
        it has none, or `result` is not a new row of its own."""
        ...


def unreachable(exc: BaseException) -> bool:
    """A failure of the connection to the database, not of what was written: worth journaling.
    SQLite's OperationalError covers a file that cannot be opened and a lock never granted."""
    if isinstance(exc, (OperationalError, InterfaceError, sqlite3.OperationalError)):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    try:
        import psycopg
    except ImportError:  # pragma: no cover - the service depends on it
        return False
    return isinstance(exc, psycopg.OperationalError)


@dataclass
class _Pass:
    """One replay: the segments to read in order and where it is in them."""

    segments: list[Segment]
    index: int = 0
    offset: int = 0
    held: list[Entry] = field(default_factory=list)
    replayed: int = 0
    rejected: int = 0
    started: float = field(default_factory=time.monotonic)


Waiting = tuple[Callable[[Session], Any], asyncio.Future]


class GroupCommitWriter:
    def __init__(
        self,
        store: Store,
        max_batch: int = 256,
        *,
        queue_max: int = 10_000,
        journal: Journal | None = None,
        kinds: Sequence[type[Journaled]] = (),
        probe_interval_s: float = 1.0,
        orphan_grace_s: float = 600.0,
        metrics: Metrics | None = None,
    ):
        self._store = store
        self._max_batch = max_batch
        self._queue_max = queue_max
        self._queue: asyncio.Queue[Waiting] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._journal = journal
        self._kinds = {k.kind: k for k in kinds}  # in dependency order: see `_replay_chunk`
        self._probe_interval_s = probe_interval_s
        self._orphan_grace_s = orphan_grace_s
        self._metrics = metrics
        self._pending: dict[str, dict[Hashable, Any]] = {}
        # The newest keyed writes committed, per kind: a retry of one of them that arrives during
        # an outage is answered as its retry, not journaled as a new event.
        self._recent: dict[str, OrderedDict[Hashable, Any]] = {}
        self._down = False  # the database did not answer; the probe runs
        self._db_up = asyncio.Event()
        self._probe_task: asyncio.Task | None = None
        self._outage_since: float | None = None
        self._full_logged = False
        self._pass: _Pass | None = None
        self._next_check = 0.0  # when normal mode next looks for held or adoptable journals
        self.batches = 0  # commits so far; exposes the batching in tests and metrics

    @property
    def journaling(self) -> bool:
        """Whether a write now goes to the journal (an outage, or the replay after it)."""
        return self._down or self._pass is not None

    def check_room(self, n: int = 1) -> None:
        """Refuse, with 503 and `Retry-After: 1`, when `n` more writes would overfill the queue."""
        if self._queue.qsize() + n > self._queue_max:
            raise Overloaded(
                "too many writes are waiting for the database; retry shortly",
                retry_after=1,
                code="write_queue_full",
            )

    async def submit(self, op: Callable[[Session], T], *, bounded: bool = True) -> T:
        """Queue `op` and return its result once it is committed (or journaled); re-raises what
        `op` raised. `bounded=False` skips the queue's bound, for a caller that checked it
        before doing work it cannot take back (a chat's generation)."""
        return (await self.submit_many([op], bounded=bounded))[0]  # type: ignore[return-value]

    async def submit_many(
        self, ops: Sequence[Callable[[Session], T]], *, bounded: bool = True
    ) -> list[T | Exception]:
        """Queue several ops; each result is its value or the exception it raised."""
        if bounded:
            self.check_room(len(ops))
        self.start()
        loop = asyncio.get_running_loop()
        futures = []
        for op in ops:
            fut = loop.create_future()
            self._queue.put_nowait((op, fut))
            futures.append(fut)
        self._wake.set()
        results = await asyncio.gather(*futures, return_exceptions=True)
        if len(ops) == 1 and isinstance(results[0], BaseException):
            raise results[0]
        return results  # type: ignore[return-value]

    def start(self) -> None:
        """Start the writing task (on the first write at the latest); it first replays whatever
        journals dead processes left."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="group-commit")

    async def close(self) -> None:
        for task in (self._task, self._probe_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._pass is not None:
            for segment in self._pass.segments:
                if segment is not self._journal:
                    segment.release(remove=False)
            self._pass = None
        if self._journal is not None:
            self._journal.close()

    # The writing task -------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if self._down:
                await self._idle(None)
                if batch := self._take():
                    await self._journal_batch(batch)
                if self._db_up.is_set():
                    self._db_up.clear()
                    self._down = False
                    self._pass = self._pass or self._begin_pass(self._adopt())
            elif self._pass is not None:
                if batch := self._take():
                    await self._journal_batch(batch)
                await self._replay_chunk(self._pass)
            else:
                await self._idle(self._until_check())
                if batch := self._take():
                    await self._commit(batch)
                if self._journal is not None and time.monotonic() >= self._next_check:
                    self._next_check = time.monotonic() + self._probe_interval_s
                    adopted = self._adopt()
                    if adopted or self._journal.size:
                        self._pass = self._begin_pass(adopted)

    async def _idle(self, timeout: float | None) -> None:
        """Wait until a write is queued, the probe reports, or `timeout` passes."""
        if self._queue.empty() and not self._db_up.is_set():
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    def _until_check(self) -> float | None:
        if self._journal is None:
            return None
        return max(0.0, self._next_check - time.monotonic())

    def _take(self) -> list[Waiting]:
        batch: list[Waiting] = []
        while len(batch) < self._max_batch and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch

    async def _commit(self, batch: list[Waiting]) -> None:
        try:
            results = await asyncio.to_thread(self._store.write_batch, [op for op, _ in batch])
        except Exception as exc:  # the commit itself failed: nothing in the batch is stored
            if self._journal is not None and unreachable(exc):
                self._go_down(exc)
                await self._journal_batch(batch)
                return
            logger.exception("commit of %d writes failed", len(batch))
            results = [exc] * len(batch)
        finally:
            self.batches += 1
        # The connection can also fail inside an op (the session connects lazily, in the first
        # op's savepoint): the transaction then commits nothing of those ops, which are journaled.
        journaled = self._journal is not None and any(map(_lost, results))
        if journaled:
            self._go_down(next(r for r in results if _lost(r)))
            await self._journal_batch([w for w, r in zip(batch, results, strict=True) if _lost(r)])
        for (op, fut), result in zip(batch, results, strict=True):
            if not (journaled and _lost(result)):
                self._remember(op, result)
                _resolve(fut, result)

    def _remember(self, op: Any, result: Any) -> None:
        if not isinstance(op, Journaled) or isinstance(result, BaseException):
            return
        if (key := op.stored_key(result)) is not None:
            recent = self._recent.setdefault(op.kind, OrderedDict())
            recent[key] = op
            if len(recent) > RECENT_KEYS:
                recent.popitem(last=False)

    async def _journal_batch(self, batch: list[Waiting]) -> None:
        """Append the batch's writes to the journal with one fsync, then answer them queued."""
        journal = self._journal
        assert journal is not None
        frames: list[bytes] = []
        answers: list[tuple[asyncio.Future, object]] = []
        registered: list[tuple[dict[Hashable, Any], Hashable]] = []
        room = journal.room
        for op, fut in batch:
            try:
                if not isinstance(op, Journaled):
                    raise Overloaded(
                        "the database is unreachable", retry_after=1, code="database_unavailable"
                    )
                pending = self._pending.setdefault(op.kind, {})
                queued = op.queued(ChainMap(pending, self._recent.get(op.kind, {})))
                if queued.journal:
                    frame = Entry(op.kind, time.time(), op.to_record()).frame()
                    if len(frame) > room:
                        raise self._full()
                    room -= len(frame)
                    frames.append(frame)
                if queued.key is not None:
                    pending[queued.key] = op
                    registered.append((pending, queued.key))
                answers.append((fut, queued.result))
            except Exception as exc:
                answers.append((fut, exc))
        try:
            await asyncio.to_thread(journal.append, frames)
        except OSError as exc:
            logger.exception("cannot write the journal %s", journal.path)
            for pending, key in registered:
                pending.pop(key, None)
            refused = Overloaded(
                f"cannot write the local journal ({exc.strerror})",
                retry_after=JOURNAL_FULL_RETRY_S,
                code="journal_unavailable",
            )
            answers = [(fut, refused) for fut, _ in answers]
        else:
            self._count("journaled", len(frames))
        self._gauge()
        for fut, answer in answers:
            _resolve(fut, answer)

    def _full(self) -> Overloaded:
        self._count("refused")
        if not self._full_logged:
            self._full_logged = True
            logger.warning(
                "the journal is full (%d bytes, journal.max_bytes): refusing feedback and "
                "dropping chat records until the database is back",
                self._journal.size if self._journal else 0,
            )
        return Overloaded(
            "the database is unreachable and the local journal is full; retry later",
            retry_after=JOURNAL_FULL_RETRY_S,
            code="journal_full",
        )

    # Outage and replay ------------------------------------------------------------------------

    def _go_down(self, exc: BaseException) -> None:
        if self._down:
            return
        self._down = True
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            logger.warning(
                "the database is unreachable (%s: %s); journaling writes in %s and probing "
                "every %.1f s",
                type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "",
                self._journal.path if self._journal else "",
                self._probe_interval_s,
            )
        self._gauge()
        self._probe_task = asyncio.get_running_loop().create_task(self._probe(), name="db-probe")

    async def _probe(self) -> None:
        while True:
            await asyncio.sleep(self._probe_interval_s)
            try:
                await asyncio.to_thread(self._store.ping)
            except Exception as exc:
                logger.debug("the database is still unreachable: %s", exc)
                continue
            self._db_up.set()
            self._wake.set()
            return

    def _adopt(self) -> list[Segment]:
        return self._journal.adopt() if self._journal is not None else []

    def _begin_pass(self, adopted: list[Segment]) -> _Pass:
        assert self._journal is not None
        return _Pass([*adopted, self._journal])

    async def _replay_chunk(self, p: _Pass) -> None:
        """Replay up to `max_batch` records of the pass; end the pass when nothing is left."""
        journal = self._journal
        assert journal is not None
        segment = p.segments[p.index]
        end = journal.size if segment is journal else None
        entries, offset = await asyncio.to_thread(segment.read, p.offset, self._max_batch, end)
        if not entries:
            if segment is not journal:
                p.index, p.offset = p.index + 1, 0
            elif self._queue.empty():
                await self._end_pass(p)
            return
        ops: list[tuple[Entry, Journaled]] = []
        unknown: list[Entry] = []
        for entry in entries:
            kind = self._kinds.get(entry.kind)
            if kind is None:
                unknown.append(entry)
            else:
                ops.append((entry, kind.from_record(entry.data)))
        outcomes: list[tuple[Entry, Journaled, object]] = []
        for kind_name in self._kinds:
            group = [(e, op) for e, op in ops if e.kind == kind_name]
            if not group:
                continue
            try:
                results = await asyncio.to_thread(self._store.write_batch, [op for _, op in group])
                if lost := [r for r in results if _lost(r)]:
                    raise lost[0]
            except Exception as exc:
                # The kinds committed before this one store nothing when the chunk is replayed
                # again: their rows carry the ids they were journaled with.
                if not unreachable(exc):
                    logger.exception("replaying %d journaled writes failed", len(group))
                self._go_down(exc)
                return
            outcomes += [(e, op, r) for (e, op), r in zip(group, results, strict=True)]
        for entry in unknown:
            self._reject(p, entry, {"message": f"unknown record kind {entry.kind!r}"})
        now = time.time()
        for entry, op, result in outcomes:
            if not isinstance(result, Exception):
                p.replayed += 1
                self._count("replayed")
            elif op.waits(result) and now - entry.at < self._orphan_grace_s:
                p.held.append(entry)
                self._count("held")
            else:
                self._reject(p, entry, _reason(result))
        p.offset = offset

    def _reject(self, p: _Pass, entry: Entry, reason: dict[str, Any]) -> None:
        assert self._journal is not None
        p.rejected += 1
        self._count("rejected")
        logger.warning("a journaled %s write was rejected on replay: %s", entry.kind, reason)
        self._journal.reject(entry, reason)

    async def _end_pass(self, p: _Pass) -> None:
        """Everything is committed: compact the journal down to the writes still waiting, and
        only then remove the adopted journals."""
        journal = self._journal
        assert journal is not None
        if journal.size or p.held:
            await asyncio.to_thread(journal.rewrite, p.held)
        for segment in p.segments:
            if segment is not journal:
                segment.release(remove=True)
        self._pending.clear()
        self._pass = None
        self._full_logged = False
        self._next_check = time.monotonic() + self._probe_interval_s
        if self._outage_since is not None:
            logger.warning(
                "the database is back after %.1f s: replayed %d journaled writes in %.1f s "
                "(%d rejected, %d held for a response not stored yet)",
                time.monotonic() - self._outage_since,
                p.replayed,
                time.monotonic() - p.started,
                p.rejected,
                len(p.held),
            )
            self._outage_since = None
        elif p.replayed or p.rejected:
            logger.info(
                "replayed %d journaled writes (%d rejected, %d still held)",
                p.replayed,
                p.rejected,
                len(p.held),
            )
        self._gauge()

    def _count(self, outcome: str, n: int = 1) -> None:
        if self._metrics is not None and n:
            self._metrics.journal_records.labels(outcome).inc(n)

    def _gauge(self) -> None:
        if self._metrics is not None and self._journal is not None:
            self._metrics.journal_bytes.set(self._journal.size)
            self._metrics.store_outage.set(1.0 if self._outage_since is not None else 0.0)


def _resolve(fut: asyncio.Future, result: object) -> None:
    if fut.done():
        return
    if isinstance(result, Exception):
        fut.set_exception(result)
    else:
        fut.set_result(result)


def _lost(result: object) -> bool:
    return isinstance(result, Exception) and unreachable(result)


def _reason(exc: Exception) -> dict[str, Any]:
    if isinstance(exc, ApiError):
        return {"status": exc.status, **exc.body()["error"]}
    return {"type": type(exc).__name__, "message": str(exc)}
