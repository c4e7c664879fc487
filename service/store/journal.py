"""The local journal that keeps writes durable while the database cannot take them.

Each process appends to a file of its own, `<data_dir>/journal/<host>-<pid>-<nonce>.journal`,
and holds `<same name>.lock` with an exclusive `fcntl.flock` for as long as it lives: a lock that
another process can take belongs to a dead one, whose journal that process adopts and replays
(`adopt`). The lock lives on its own file because the journal is compacted by renaming a new file
over it, which a lock on the journal's own inode would not survive. flock needs a filesystem that
honours it across the processes that share the folder: a node's local disk, or one host's replicas
on a shared volume; not NFS between nodes.

A record is framed as `<u32 length><u32 crc32>` (little-endian) and `length` bytes of JSON,
`{"kind", "at", "data"}`. A batch of records is written with one `write` and one `fsync` before any
of them is acknowledged, so a crash can only tear the last batch, which nobody was told was kept: a
reader stops at the first frame that is short or fails its checksum, and drops the rest.

Events that cannot be stored when the journal is replayed go to `rejected.jsonl` beside it, one
JSON line each with the reason, so that nothing acknowledged disappears without a trace.

The writer (`writer.py`) decides what is journaled and when it is replayed; this file only keeps
records in order and on disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import struct
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
FRAME = struct.Struct("<II")  # payload length, crc32 of the payload
SUFFIX = ".journal"
LOCK_SUFFIX = ".lock"
REJECTED = "rejected.jsonl"


@dataclass(frozen=True)
class Entry:
    """One journaled write: its kind (which class replays it), when it was journaled, its data."""

    kind: str
    at: float
    data: dict[str, Any]

    def frame(self) -> bytes:
        payload = json.dumps(
            {"kind": self.kind, "at": self.at, "data": self.data},
            ensure_ascii=False,
            separators=(",", ":"),
        ).encode()
        return FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def _fsync_dir(directory: Path) -> None:
    """Make a file's creation, rename or removal durable, not only its contents."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on `path` (created if missing), or None if it is held."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class Segment:
    """One journal file, locked by this process: its own, or one it adopted."""

    def __init__(self, path: Path, lock_fd: int):
        self.path, self._lock_fd = path, lock_fd

    @property
    def lock_path(self) -> Path:
        return self.path.with_suffix(LOCK_SUFFIX)

    def read(self, start: int, limit: int, end: int | None = None) -> tuple[list[Entry], int]:
        """Up to `limit` whole records from byte `start` (not past `end`), and the offset after
        the last one. Stops early at a torn or corrupt frame (logged, and dropped for good)."""
        entries: list[Entry] = []
        offset = start
        try:
            f = open(self.path, "rb")  # noqa: SIM115 - closed below; a missing file has no records
        except FileNotFoundError:
            return entries, offset
        with f:
            size = os.fstat(f.fileno()).st_size if end is None else end
            f.seek(start)
            while len(entries) < limit and offset < size:
                header = f.read(FRAME.size)
                if len(header) == FRAME.size:
                    length, crc = FRAME.unpack(header)
                    payload = f.read(length)
                    if len(payload) == length and zlib.crc32(payload) == crc:
                        raw = json.loads(payload)
                        entries.append(Entry(raw["kind"], raw["at"], raw["data"]))
                        offset += FRAME.size + length
                        continue
                logger.warning(
                    "journal %s: dropping %d bytes from offset %d (a record torn by a crash "
                    "before it was acknowledged)",
                    self.path,
                    size - offset,
                    offset,
                )
                break
        return entries, offset

    def release(self, remove: bool) -> None:
        """Unlock; with `remove`, delete the journal and its lock first (it holds nothing)."""
        if remove:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            with contextlib.suppress(FileNotFoundError):
                self.lock_path.unlink()
            _fsync_dir(self.path.parent)
        os.close(self._lock_fd)


class Journal(Segment):
    """This process's journal: appended to in batches, each made durable by one fsync, and
    capped at `max_bytes` (`room` says what still fits)."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.size = 0
        self._fd: int | None = None
        name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.directory.mkdir(parents=True, exist_ok=True)
        lock_fd = _try_lock(self.directory / f"{name}{LOCK_SUFFIX}")
        assert lock_fd is not None, "a fresh name is nobody else's"
        super().__init__(self.directory / f"{name}{SUFFIX}", lock_fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        _fsync_dir(self.directory)

    @property
    def room(self) -> int:
        return self.max_bytes - self.size

    def append(self, frames: list[bytes]) -> None:
        """Write `frames` (from `Entry.frame`) and fsync once; on a failed write the file is cut
        back to where it was, so a later append does not follow a torn record."""
        assert self._fd is not None, "the journal is closed"
        data = b"".join(frames)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            os.fsync(self._fd)
        except OSError:
            os.ftruncate(self._fd, self.size)
            raise
        self.size += len(data)

    def rewrite(self, entries: list[Entry]) -> None:
        """Replace the whole journal with `entries` (those a replay keeps for later), atomically:
        a crash leaves either the old journal, whose replay is idempotent, or the new one."""
        assert self._fd is not None, "the journal is closed"
        data = b"".join(e.frame() for e in entries)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        _fsync_dir(self.directory)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self.size = len(data)

    def adopt(self) -> list[Segment]:
        """The journals of dead processes in this folder, oldest first, now locked by this one."""
        adopted = []
        locks = sorted(self.directory.glob(f"*{LOCK_SUFFIX}"), key=_mtime)
        for lock_path in locks:
            if lock_path == self.lock_path:
                continue
            fd = _try_lock(lock_path)
            if fd is None:
                continue  # a live process's
            path = lock_path.with_suffix(SUFFIX)
            with contextlib.suppress(FileNotFoundError):
                path.with_name(path.name + ".tmp").unlink()  # a compaction cut short
            adopted.append(Segment(path, fd))
            logger.info("adopted the journal %s of a process that is gone", path)
        return adopted

    def reject(self, entry: Entry, reason: dict[str, Any]) -> None:
        """Record an event that replay could not store, durably, in `rejected.jsonl`."""
        line = {
            "rejected_at": time.time(),
            "reason": reason,
            "kind": entry.kind,
            "journaled_at": entry.at,
            "data": entry.data,
        }
        with open(self.directory / REJECTED, "a", encoding="utf-8") as f:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        """Release the journal: removed when empty, else left for the next process to adopt."""
        if self._fd is None:
            return
        os.close(self._fd)
        self._fd = None
        if self.size:
            logger.warning(
                "closing with %d bytes journaled and not yet in the database: %s (the next "
                "process to start here replays it)",
                self.size,
                self.path,
            )
        self.release(remove=self.size == 0)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0
