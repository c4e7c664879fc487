"""The ingest benchmark's arithmetic, on hand-made runs: rates, latency percentiles, the CPU split,
the rounds' order, the per-round ratio to the bare endpoint and the targets' verdicts over the
rounds."""

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
    round_orders,
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


def test_ratio_is_against_the_bare_run_of_the_same_endpoint_connections_and_round():
    bare = Variant(
        "bare",
        None,
        runs=[run("bare", "single", 8, 400, 2.0), run("bare", "single", 8, 300, 2.0, round=1)],
    )
    assert _ratio(bare, run("sqlite", "single", 8, 360, 2.0)) == 0.9  # 180 vs 200 events/s
    assert _ratio(bare, run("sqlite", "single", 8, 360, 2.0, round=1)) == 1.2  # vs 150
    assert _ratio(bare, run("sqlite", "single", 8, 360, 2.0, round=2)) is None
    assert _ratio(bare, run("sqlite", "single", 32, 360, 2.0)) is None
    assert _ratio(bare, run("sqlite", "batch", 8, 360, 2.0)) is None
    assert _ratio(None, run("sqlite", "single", 8, 360, 2.0)) is None
    silent = Variant("bare", None, runs=[run("bare", "single", 8, 0, 2.0)])
    assert _ratio(silent, run("sqlite", "single", 8, 360, 2.0)) is None


def test_rounds_alternate_which_side_goes_first():
    a, b = Variant("sqlite", "sqlite:///x.db"), Variant("bare", None, beside="sqlite")
    orders = round_orders(4, [a, b])
    assert [[v.label for v in order] for order in orders] == [
        ["sqlite", "bare (beside sqlite)"],
        ["bare (beside sqlite)", "sqlite"],
        ["sqlite", "bare (beside sqlite)"],
        ["bare (beside sqlite)", "sqlite"],
    ]
    assert round_orders(1, [a]) == [[a]]


def rounds(variant, endpoint, concurrency, rates, elapsed_s=2.0, **kw):
    """One run per round at these events/s."""
    return [
        run(variant, endpoint, concurrency, round(rate * elapsed_s), elapsed_s, round=r, **kw)
        for r, rate in enumerate(rates)
    ]


def test_report_targets_rest_on_the_spread_of_the_rounds():
    bare = Variant(
        "bare",
        None,
        beside="sqlite",
        runs=[
            *rounds("bare", "single", 8, [200, 200, 200, 200], cpu={"replica": 0.6}),  # 3 ms
            *rounds("bare", "single", 32, [250, 250, 250, 250]),
            *rounds("bare", "batch", 1, [2000, 2000, 2000, 2000]),
        ],
    )
    sqlite = Variant(
        "sqlite",
        "sqlite:///unused.db",
        bare=bare,
        runs=[
            # Ratios 0.95, 0.92, 0.91, 0.96: every round clears 0.9.
            *rounds("sqlite", "single", 8, [190, 184, 182, 192], cpu={"replica": 0.9}),
            # Ratios 0.94, 0.86, 0.92, 0.88: the mean (0.9) is at the goal, the spread is not.
            *rounds("sqlite", "single", 32, [235, 215, 230, 220]),
            # 4,200/s on average at 1 connection, 5,150/s at 8: the best by its mean.
            *rounds("sqlite", "batch", 1, [4100, 4300, 4200, 4200]),
            *rounds("sqlite", "batch", 8, [5200, 5100, 5400, 4900]),
        ],
        extra_acks=40,
    )
    acked = sum(r.events for r in sqlite.runs) + 40
    assert sqlite.acked == acked
    sqlite.stored = acked - 2
    args = argparse.Namespace(
        batch_size=100, duration=2.5, batch_duration=2.0, warmup=1.0, rounds=4
    )
    result = Result("ingest", "Feedback ingest", command="python -m bench.ingest")
    report(result, [sqlite, bare], args)

    targets = {t.name: t for t in result.targets}
    c8 = targets["sqlite: single events/s vs no storage, 8 connections"]
    assert (c8.rounds, c8.value, c8.verdict) == ([0.95, 0.92, 0.91, 0.96], 0.935, "met")
    c32 = targets["sqlite: single events/s vs no storage, 32 connections"]
    assert c32.rounds == [0.94, 0.86, 0.92, 0.88] and c32.value == 0.9
    assert c32.verdict == "not settled (spread straddles the goal)"
    batch = targets["sqlite: batch endpoint events/s (the best of 2 concurrencies by its mean)"]
    assert (batch.rounds, batch.value) == ([5200, 5100, 5400, 4900], 5150)
    assert batch.verdict == "not settled (spread straddles the goal)"
    durability = targets["sqlite: acknowledged events missing from (or extra in) the store"]
    assert (durability.value, durability.verdict) == (2, "missed")
    assert result.tables[2]["rows"] == [["sqlite", acked, acked - 2, -2]]

    # One row per variant and concurrency: rounds, mean events/s and its spread, mean ratio to
    # bare and its spread, mean replica CPU per event.
    single = {(row[0], row[1]): row for row in result.tables[0]["rows"]}
    columns = result.tables[0]["columns"]
    at = {name: columns.index(name) for name in columns}
    row = single["sqlite", 8]
    assert row[at["rounds"]] == 4
    assert row[at["events/s (mean)"]] == 187 and row[at["events/s (spread)"]] == "182-192"
    assert row[at["vs bare (mean)"]] == 0.935
    assert row[at["vs bare (spread)"]] == "0.910-0.960"
    # 0.9 cores over 190, 184, 182 and 192 events/s: 4.74, 4.89, 4.95, 4.69 ms, mean 4.82.
    assert row[at["replica CPU ms/event"]] == 4.82
    base = single["bare (beside sqlite)", 8]
    assert base[at["vs bare (mean)"]] is None and base[at["replica CPU ms/event"]] == 3.0
    assert any("single c=8 1.82" in note for note in result.notes)


def test_measure_runs_every_cell_in_each_round_in_alternating_order(monkeypatch):
    from bench import ingest

    sent: list[tuple[str, str, int, int]] = []

    async def fake_loop(run, url, make_body, count_acks, pids):
        # 100 events a second for every run; the URL says which app answered.
        assert url.startswith("http://sqlite" if run.variant == "sqlite" else "http://bare/bare")
        sent.append((run.variant, run.endpoint, run.concurrency, run.round))
        run.elapsed_s, run.events, run.requests = 1.0, 100, 100
        return run

    monkeypatch.setattr(ingest, "closed_loop", fake_loop)
    monkeypatch.setattr(ingest, "find_pid", lambda prefix: None)
    stored = Variant("sqlite", "sqlite:///x.db", base_url="http://sqlite", app="a-sqlite")
    bare = Variant("bare", None, beside="sqlite", base_url="http://bare/bare", app="a-bare")
    stored.bare = bare
    args = argparse.Namespace(
        concurrency=[8, 32], batch_concurrency=[1], rounds=2, duration=2.5, batch_duration=2.0,
        warmup=1.0, batch_size=100, repeats_left=0, profile=False, profiled_bare="sqlite",
    )  # fmt: skip
    ids = [("g0", 0), ("g1", 0)]
    ingest.measure([stored, bare], {v.label: Events(ids, v.name) for v in (stored, bare)}, args)

    warm_up = [(v, e, c, -1) for v in ("sqlite", "bare") for e, c in (("single", 8), ("batch", 1))]
    cells = [("single", 8), ("single", 32), ("batch", 1)]
    first = [(v, e, c, 0) for e, c in cells for v in ("sqlite", "bare")]
    second = [(v, e, c, 1) for e, c in cells for v in ("bare", "sqlite")]
    probe = [("bare", "GET /healthz", 8, 0)]
    assert sent == warm_up + first + second + probe
    assert [(r.endpoint, r.concurrency, r.round) for r in stored.series("single", 32)] == [
        ("single", 32, 0),
        ("single", 32, 1),
    ]
    # Warm-up events are stored though no figure: 2 warm-up runs and 6 measured ones.
    assert stored.acked == 800 and stored.extra_acks == 200
    assert bare.probe is not None and stored.probe is None

    # Beside the next stored variant the bare app is not probed again.
    sent.clear()
    other = Variant("bare", None, beside="postgres", base_url="http://bare/bare", app="a-bare")
    ingest.measure([other], {other.label: Events(ids, "other")}, args)
    assert other.probe is None and ("bare", "GET /healthz", 8, 0) not in sent
