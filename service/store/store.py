"""The store: SQLAlchemy engines for SQLite (WAL, the default) or PostgreSQL, migrations, and
transactions that apply many writes at once (see `writer.py` for how requests share them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event, make_url, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from service.store.schema import Feedback, Generation, PreferenceSnapshot

logger = logging.getLogger(__name__)
T = TypeVar("T")
MIGRATIONS = Path(__file__).with_name("migrations")
CONNECT_TIMEOUT_S = 5


class DatabaseUnreachable(RuntimeError):
    """The database cannot be reached or opened. The message names where (host and port, or the
    SQLite file), the driver's cause and the setting to check; never the password."""

    @classmethod
    def from_error(cls, url: str, exc: OperationalError) -> DatabaseUnreachable:
        parsed = make_url(url)
        text = str(exc.orig if exc.orig is not None else exc).strip()
        # The driver's first line ends with the cause: `... port 5999 failed: Connection refused`.
        cause = text.splitlines()[0].rsplit(": ", 1)[-1].strip() if text else type(exc).__name__
        if parsed.password:
            cause = cause.replace(str(parsed.password), "***")
        cause = cause[:1].lower() + cause[1:]
        if parsed.get_backend_name() == "sqlite":
            return cls(
                f"cannot open the database at {parsed.database} ({cause}); check "
                "PREFLOOP_DATABASE_URL and PREFLOOP_DATA_DIR"
            )
        where = f"{parsed.host or 'the local socket'}:{parsed.port or 5432}"
        return cls(f"cannot reach the database at {where} ({cause}); check PREFLOOP_DATABASE_URL")


def _sqlite_engine(url: str, *, begin: str) -> Engine:
    """A SQLite engine in WAL mode whose commits are durable (synchronous=FULL).

    pysqlite's own transaction handling breaks SAVEPOINT, so it is turned off and SQLAlchemy's
    `begin` emits the BEGIN itself (the recipe in SQLAlchemy's SQLite dialect docs). The writer uses
    BEGIN IMMEDIATE so that concurrent writers (several replicas on one file) queue on the lock
    instead of failing a read-to-write upgrade.
    """
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        for pragma in (
            "journal_mode=WAL",
            "synchronous=FULL",
            "foreign_keys=ON",
            "busy_timeout=30000",
        ):
            cur.execute(f"PRAGMA {pragma}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql(begin)

    return engine


def used_feedback_ids(session: Session) -> set[str]:
    """Ids of the feedback some preference snapshot already took (and did not give back)."""
    used: set[str] = set()
    query = select(PreferenceSnapshot.feedback_ids).where(PreferenceSnapshot.released_at.is_(None))
    for ids in session.scalars(query):
        used.update(ids)
    return used


class Store:
    """Owns the database connection pools; every method opens and closes its own transaction."""

    def __init__(self, url: str):
        self.url = url
        if url.startswith("sqlite"):
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._write_engine = _sqlite_engine(url, begin="BEGIN IMMEDIATE")
            self._read_engine = _sqlite_engine(url, begin="BEGIN")
        else:
            # A bounded connect: while the database is away the writer journals, and its probe
            # and commits must fail in seconds, not after the kernel's TCP retries (minutes).
            self._write_engine = self._read_engine = create_engine(
                url, pool_pre_ping=True, connect_args={"connect_timeout": CONNECT_TIMEOUT_S}
            )
        self._writes = sessionmaker(self._write_engine, expire_on_commit=False)
        self._reads = sessionmaker(self._read_engine, expire_on_commit=False)

    def upgrade(self) -> None:
        """Bring the schema to the newest migration (idempotent). The first thing every entry
        point does with the database, so it raises `DatabaseUnreachable` when it cannot connect."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        try:
            connection = self._write_engine.connect()
        except OperationalError as exc:
            raise DatabaseUnreachable.from_error(self.url, exc) from None
        with connection as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
            conn.commit()

    def ping(self) -> None:
        """One round trip to the database; raises what the driver raises when it cannot."""
        with self._read_engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")

    def close(self) -> None:
        self._write_engine.dispose()
        self._read_engine.dispose()

    def write_batch(self, ops: Sequence[Callable[[Session], T]]) -> list[T | Exception]:
        """Run `ops` in one transaction and commit once; an op that raises fails alone, its
        exception returned in its place. Results are returned only after the commit, so an
        acknowledged write is on disk.

        Each op runs in its own savepoint, except one with a `stage(session)` method, which
        checks and adds its rows without flushing and raises, if at all, before adding: staged
        rows are flushed together at the end (one multi-row INSERT per table instead of a
        savepoint and an INSERT each). If that flush breaks a constraint (another writer took a
        unique key in the meantime), the batch runs again with every op in its own savepoint, so
        that the op concerned answers alone. Ops of one kind can share their reads: an op with a
        `prefetch(session, ops)` attribute has it called once, with every op in the batch that
        carries the same one, before the first op runs.
        """
        try:
            return self._write_batch(ops, staged=True)
        except IntegrityError:
            logger.info("a staged batch of %d writes conflicted; writing each apart", len(ops))
            return self._write_batch(ops, staged=False)

    def _write_batch(
        self, ops: Sequence[Callable[[Session], T]], staged: bool
    ) -> list[T | Exception]:
        with self._writes.begin() as session:
            shared: dict[Callable[[Session, list[Any]], None], list[Any]] = {}
            for op in ops:
                if (prefetch := getattr(op, "prefetch", None)) is not None:
                    shared.setdefault(prefetch, []).append(op)
            for prefetch, group in shared.items():
                prefetch(session, group)
            # Savepoints flush what is pending: the staged ops run after the others.
            stages = [getattr(op, "stage", None) if staged else None for op in ops]
            results: list[T | Exception] = [RuntimeError("not run")] * len(ops)
            for i in sorted(range(len(ops)), key=lambda i: stages[i] is not None):
                try:
                    if (stage := stages[i]) is not None:
                        results[i] = stage(session)
                    else:
                        with session.begin_nested():
                            results[i] = ops[i](session)
                except Exception as exc:
                    results[i] = exc
            session.flush()
        return results

    def write_one(self, op: Callable[[Session], T]) -> T:
        """`write_batch` of one op: its result, or its exception raised."""
        result = self.write_batch([op])[0]
        if isinstance(result, Exception):
            raise result
        return result

    @contextmanager
    def reading(self) -> Iterator[Session]:
        with self._reads.begin() as session:
            yield session

    def get_generation(self, generation_id: str) -> Generation | None:
        with self.reading() as session:
            return session.get(Generation, generation_id)

    def count(self, model: type[Generation] | type[Feedback]) -> int:
        from sqlalchemy import func

        with self.reading() as session:
            return session.scalar(select(func.count()).select_from(model)) or 0
