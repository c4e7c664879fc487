"""The ingest benchmark's arithmetic, on hand-made runs: rates, latency percentiles, the CPU split,
the ratio to the bare endpoint and the targets' verdicts."""

import argparse
import json
import os

import pytest

from bench.common import Result
from bench.ingest import (
    Events,
    Run,
    Variant,
    _ratio,
    batch_acks,
    report,
    single_ack,
    split_cpu,
)


def run(variant: str, endpoint: str, concurrency: int, events: int, elapsed_s: float, **kw) -> Run:
    return Run(variant, endpoint, concurrency, 8.0, elapsed_s=elapsed_s, events=events, **kw)


def test_run_rates_latency_and_replica_cost():
    r = run("sqlite", "single", 8, 300, 2.0, requests=3)
    assert (r.events_per_s, r.requests_per_s) == (150.0, 1.5)
    assert run("sqlite", "single", 8, 0, 0.0).events_per_s == 0.0  # nothing answered: no rate
    # p50 halfway between 6 and 10 ms; p99 at rank 2.97 of 4: 10 + 0.97 * (20 - 10) ms.
    r.latencies = [0.010, 0.004, 0.020, 0.006]
    assert (r.latency_ms(50), r.latency_ms(99)) == (8.0, 19.7)
    # 0.6 cores at 150 events/s: 4 ms of replica CPU per event.
    assert r.replica_ms_per_event is None
    r.cpu["replica"] = 0.6
    assert r.replica_ms_per_event == 4.0
    assert run("sqlite", "single", 8, 0, 2.0, cpu={"replica": 0.6}).replica_ms_per_event is None


def test_acks_count_201s_only():
    assert (single_ack(201, b""), single_ack(200, b""), single_ack(409, b"")) == (1, 0, 0)
    payload = json.dumps({"data": [{"status": s} for s in (201, 200, 409, 201, 422)]}).encode()
    assert batch_acks(200, payload) == 2
    assert batch_acks(500, b"not json") == 0


def test_events_are_three_thumbs_to_one_pairwise_with_unique_keys():
    events = Events([("g0", 0), ("g1", 0), ("g2", 1), ("g3", 1)], "t")
    sent = [json.loads(events.single()) for _ in range(8)]
    assert [e["type"] for e in sent] == (["thumbs"] * 3 + ["pairwise"]) * 2
    assert len({e["idempotency_key"] for e in sent}) == 8
    # Down on every third event from the first (events 0 and 6; event 3 is a pairwise vote).
    ratings = [e.get("rating") for e in sent]
    assert ratings == ["down", "up", "up", None, "up", "up", "down", None]
    # The pairwise votes alternate: two choices of one response, then two responses.
    first, second = (e for e in sent if e["type"] == "pairwise")
    assert first["a"]["response_id"] == first["b"]["response_id"]
    assert second["a"]["response_id"] != second["b"]["response_id"]


def test_cpu_split_charges_descendants_services_and_the_busiest_other():
    root = os.getpid()
    child, grandchild, new, kthread, other, idle = (10**9 + i for i in range(6))  # no such pids
    before = {
        child: (root, 1.0),
        grandchild: (child, 0.5),
        kthread: (2, 0.0),
        other: (1, 3.0),
        idle: (1, 7.0),
    }
    after = {
        child: (root, 2.5),
        grandchild: (child, 1.5),
        new: (root, 0.25),
        kthread: (2, 0.25),
        other: (1, 3.75),
        idle: (1, 7.0),
    }
    ours, services, busiest = split_cpu(before, after)
    assert ours == pytest.approx(1.5 + 1.0 + 0.25)  # child, grandchild, one started meanwhile
    assert services == 0.25  # a kernel thread (under kthreadd) works for us
    assert busiest == (0.75, other)


def test_ratio_is_against_the_bare_run_of_the_same_endpoint_and_connections():
    bare = Variant("bare", None, runs=[run("bare", "single", 8, 400, 2.0)])
    assert _ratio(bare, run("sqlite", "single", 8, 360, 2.0)) == 0.9  # 180 vs 200 events/s
    assert _ratio(bare, run("sqlite", "single", 32, 360, 2.0)) is None
    assert _ratio(bare, run("sqlite", "batch", 8, 360, 2.0)) is None
    assert _ratio(None, run("sqlite", "single", 8, 360, 2.0)) is None
    silent = Variant("bare", None, runs=[run("bare", "single", 8, 0, 2.0)])
    assert _ratio(silent, run("sqlite", "single", 8, 360, 2.0)) is None


def test_report_targets_and_their_verdicts():
    bare = Variant(
        "bare",
        None,
        runs=[
            run("bare", "single", 8, 400, 2.0, cpu={"replica": 0.6}),  # 200 events/s, 3 ms each
            run("bare", "single", 32, 500, 2.0),  # 250 events/s
            run("bare", "batch", 1, 2000, 1.0),
        ],
    )
    sqlite = Variant(
        "sqlite",
        "sqlite:///unused.db",
        runs=[
            run("sqlite", "single", 8, 360, 2.0, cpu={"replica": 0.9}),  # 180/s, 5 ms each
            run("sqlite", "single", 32, 425, 2.0),  # 212.5/s
            run("sqlite", "batch", 1, 4200, 1.0),  # 4,200/s
            run("sqlite", "batch", 8, 10200, 2.0),  # 5,100/s: the best
        ],
        extra_acks=40,
    )
    # 360 + 425 + 4200 + 10200 + 40 (warm-up) acknowledged; two rows short.
    assert sqlite.acked == 15225
    sqlite.stored = 15223
    args = argparse.Namespace(batch_size=100, duration=8.0, batch_duration=5.0, warmup=1.0)
    result = Result("ingest", "Feedback ingest", command="python -m bench.ingest")
    report(result, [sqlite, bare], args)

    verdicts = {t.name: (t.value, t.goal, t.met, t.shortfall) for t in result.targets}
    assert verdicts == {
        "sqlite: single events/s vs no storage, 8 connections": (0.9, 0.9, True, ""),
        "sqlite: single events/s vs no storage, 32 connections": (
            0.85,
            0.9,
            False,
            "missed by 0.05x (6% of the goal)",
        ),
        "sqlite: batch endpoint events/s (best of 2 concurrencies)": (5100, 5000, True, ""),
        "sqlite: acknowledged events missing from (or extra in) the store": (
            2,
            0,
            False,
            "missed by 2 events",
        ),
    }
    durability = result.tables[2]
    assert durability["rows"] == [["sqlite", 15225, 15223, -2]]
    # Columns 2, 6 and 8 of the single-event table: events/s, vs bare, replica CPU ms/event.
    single = {(row[0], row[1]): row for row in result.tables[0]["rows"]}
    assert [single["sqlite", 8][i] for i in (2, 6, 8)] == [180, 0.9, 5.0]
    assert [single["sqlite", 32][i] for i in (2, 6)] == [212, 0.85]  # 212.5 rounds to even
    assert [single["bare", 8][i] for i in (2, 6, 8)] == [200, None, 3.0]
    # Storing's cost: 5 ms of replica CPU per event against the bare app's 3.
    assert any("single c=8 2.00" in note for note in result.notes)
