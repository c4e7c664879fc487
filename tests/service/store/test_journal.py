"""The journal file: framing, torn tails, fsync per batch, the cap, compaction, adoption."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from service.store.journal import FRAME, REJECTED, Entry, Journal

ROOT = Path(__file__).resolve().parents[3]


def entries(n: int, start: int = 0) -> list[Entry]:
    return [Entry("note", 1000.0 + i, {"i": i, "text": "é" * i}) for i in range(start, start + n)]


def test_records_read_back_in_order(tmp_path):
    journal = Journal(tmp_path, max_bytes=2**20)
    journal.append([e.frame() for e in entries(3)])
    journal.append([e.frame() for e in entries(2, start=3)])
    assert journal.size == journal.path.stat().st_size
    read, end = journal.read(0, limit=100)
    assert read == entries(5) and end == journal.size
    # In chunks, resuming where the last one ended.
    first, offset = journal.read(0, limit=2)
    rest, _ = journal.read(offset, limit=100)
    assert first + rest == entries(5)
    journal.close()


def test_a_torn_or_corrupt_tail_is_dropped(tmp_path, caplog):
    journal = Journal(tmp_path, max_bytes=2**20)
    journal.append([e.frame() for e in entries(3)])
    whole = journal.path.read_bytes()
    last = entries(3)[2].frame()
    # A crash in the middle of the last write: half its payload reached the disk.
    journal.path.write_bytes(whole[: len(whole) - len(last) // 2])
    read, end = journal.read(0, limit=100)
    assert read == entries(2) and end == len(whole) - len(last)
    assert "dropping" in caplog.text
    # A frame whose bytes are all there but whose checksum fails is dropped too.
    corrupt = bytearray(whole)
    corrupt[-1] ^= 0xFF
    journal.path.write_bytes(bytes(corrupt))
    assert journal.read(0, limit=100)[0] == entries(2)
    # A header cut short.
    journal.path.write_bytes(whole + last[: FRAME.size - 1])
    assert journal.read(0, limit=100)[0] == entries(3)
    journal.path.write_bytes(whole)
    journal.close()


def test_one_fsync_per_batch_before_append_returns(tmp_path, monkeypatch):
    journal = Journal(tmp_path, max_bytes=2**20)
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_size)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    frames = [e.frame() for e in entries(50)]
    journal.append(frames)
    # One fsync for the 50 records, made when all of them were written.
    assert synced == [sum(map(len, frames))]
    journal.close()


def test_room_counts_down_to_the_cap(tmp_path):
    frame = entries(1)[0].frame()
    journal = Journal(tmp_path, max_bytes=3 * len(frame))
    assert journal.room == 3 * len(frame)
    journal.append([frame, frame])
    assert journal.room == len(frame)
    journal.close()


def test_rewrite_keeps_only_what_it_is_given(tmp_path):
    journal = Journal(tmp_path, max_bytes=2**20)
    journal.append([e.frame() for e in entries(4)])
    journal.rewrite(entries(1, start=2))
    assert journal.read(0, limit=100)[0] == entries(1, start=2)
    journal.append([e.frame() for e in entries(1, start=9)])
    assert journal.read(0, limit=100)[0] == entries(1, start=2) + entries(1, start=9)
    assert journal.size == journal.path.stat().st_size
    journal.rewrite([])
    journal.close()
    assert list(tmp_path.iterdir()) == [], "an empty journal and its lock are removed on close"


def test_reject_appends_a_line_with_the_reason(tmp_path):
    import json

    journal = Journal(tmp_path, max_bytes=2**20)
    journal.reject(entries(1)[0], {"code": "response_not_found"})
    [line] = (tmp_path / REJECTED).read_text().splitlines()
    assert json.loads(line)["reason"] == {"code": "response_not_found"}
    assert json.loads(line)["data"] == entries(1)[0].data
    journal.close()


WRITER = """
import sys, time
from service.store.journal import Entry, Journal
journal = Journal(sys.argv[1], max_bytes=2**20)
journal.append([Entry("note", 1.0, {"from": "child"}).frame()])
print(journal.path, flush=True)
if sys.argv[2] == "hold":
    time.sleep(60)
"""


def child(directory: Path, mode: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(directory), mode],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_a_live_processs_journal_is_left_alone_and_a_dead_ones_adopted(tmp_path):
    mine = Journal(tmp_path, max_bytes=2**20)
    live = child(tmp_path, "hold")
    try:
        live_path = Path(live.stdout.readline().strip())
        assert mine.adopt() == [], "its lock is held: the process is alive"
    finally:
        live.kill()
        live.wait()
    # The process died without closing: its lock went with it, its journal stayed.
    dead = child(tmp_path, "exit")
    dead_path = Path(dead.stdout.readline().strip())
    assert dead.wait() == 0
    adopted = mine.adopt()
    assert sorted(s.path for s in adopted) == sorted([live_path, dead_path])
    for segment in adopted:
        assert segment.read(0, limit=10)[0] == [Entry("note", 1.0, {"from": "child"})]
    other = Journal(tmp_path, max_bytes=2**20)
    assert other.adopt() == [], "adopted ones are locked now"
    other.close()
    for segment in adopted:
        segment.release(remove=True)
    mine.close()
    assert list(tmp_path.iterdir()) == []
