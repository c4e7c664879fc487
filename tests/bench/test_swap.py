"""The hot-swap benchmark's reading of what the poller and the users saw: when every replica served
the new version, each swap's window, the tail statistic a window's size allows, the per-replica
confirmation from Ray's metrics, and the targets."""

import argparse
import math

import pytest

from bench import swap
from bench.common import Result
from bench.load import ChatLoad, Sample
from bench.swap import (
    confirmed_replicas,
    failures,
    first_answer,
    overlapping,
    parse_swap_counters,
    swap_done,
    tail_latency,
    window_end,
)


def sample(start, end, version, status=200, first=None):
    return Sample(start=start, first=first, end=end, status=status, version=version)


def test_swap_is_done_at_the_final_run_of_new_answers_once_it_is_long_enough():
    polls = [(99.9, "old"), (100.5, "new"), (100.8, "old"), (101.2, "new"), (101.5, "new")]
    # 100.5 answered "new" but a replica still answered "old" at 100.8.
    assert swap_done(polls, 100.0, "new", consecutive=2) == 101.2
    # Two answers in a row do not show that every replica swapped when three are asked for.
    assert swap_done(polls, 100.0, "new", consecutive=3) is None
    assert swap_done([*polls, (101.8, "new")], 100.0, "new", consecutive=3) == 101.2
    # An answer from before the promotion does not count, nor does a failed poll.
    assert swap_done([(99.0, "new"), (100.2, "new")], 100.0, "new", consecutive=2) is None
    assert swap_done([(100.1, "new"), (100.2, ""), (100.3, "new")], 100.0, "new", 2) is None


def test_a_window_lasts_until_the_first_new_answer_and_every_replica_plus_the_settle():
    samples = [
        sample(99.8, 100.4, "old"),  # running across the promotion at t=100
        sample(100.3, 101.5, "new"),  # held at the closed gate, then the first new answer
        sample(101.6, 102.0, "new"),
    ]
    polls = [(100.2, "old")] + [(100.9 + i * 0.05, "new") for i in range(20)]
    assert first_answer(samples, 100.0, "new") == 101.5
    assert swap_done(polls, 100.0, "new") == 100.9
    # The first answer (101.5) comes after every replica answered "new" (100.9).
    assert window_end(samples, polls, 100.0, "new") == pytest.approx(101.5 + swap.SETTLE_S)
    # Without an answer from the new version the window is still open.
    assert window_end(samples[:1], polls, 100.0, "new") is None
    assert overlapping(samples, 100.0, 101.55) == samples[:2]
    assert overlapping(samples, 100.0, 101.6) == samples
    assert overlapping(samples, 100.5, 101.0) == [samples[1]]


def test_failures_count_within_the_swap_phase_only():
    samples = [
        sample(98.0, 99.0, "", status=0),  # before the first promote
        sample(100.5, 101.0, "", status=-1),
        sample(103.0, 104.0, "new"),
        sample(105.0, 110.0, "", status=503),  # after the last window
    ]
    assert failures(samples, 100.0, 106.0) == 1


@pytest.mark.parametrize(
    ("steady_n", "during_n", "stat"),
    [(150, 100, "p99"), (150, 99, "p95"), (30, 300, "p95"), (150, 19, "max"), (0, 0, "max")],
)
def test_tail_statistic_is_the_one_both_windows_have_enough_requests_for(steady_n, during_n, stat):
    steady = [1.0 + i / 1000 for i in range(steady_n)]
    during = [2.0 + i / 1000 for i in range(during_n)]
    figures = tail_latency(steady, during)
    assert (figures["stat"], figures["steady_n"], figures["during_n"]) == (
        stat,
        steady_n,
        during_n,
    )
    if steady_n and during_n:
        q = {"p99": 99, "p95": 95, "max": 100}[stat]
        assert figures["ratio"] == pytest.approx(
            swap.percentile(during, q) / swap.percentile(steady, q)
        )
    else:
        assert math.isnan(figures["ratio"])


EXPORT = """\
# HELP ray_prefloop_swaps_total engine weight swaps by the version swapped to
# TYPE ray_prefloop_swaps_total counter
ray_prefloop_swaps_total{Component="core_worker",WorkerId="w1",version="v-a"} 1.0
ray_prefloop_swaps_total{Component="core_worker",WorkerId="w2",version="v-a"} 1.0
ray_prefloop_swaps_total{Component="core_worker",WorkerId="w1",version="v-b"} 1.0
# HELP ray_prefloop_requests_total HTTP requests by route and status
# TYPE ray_prefloop_requests_total counter
ray_prefloop_requests_total{WorkerId="w1",route="/v1/models",status="200"} 7.0
"""


def test_every_replica_that_swapped_shows_in_ray_s_metrics_export():
    after = parse_swap_counters(EXPORT)
    assert after == {("w1", "v-a"): 1.0, ("w2", "v-a"): 1.0, ("w1", "v-b"): 1.0}
    # Before the second promotion of v-b, w1 had swapped to it once and w2 never.
    assert confirmed_replicas({}, after, "v-a") == 2
    assert confirmed_replicas({("w1", "v-b"): 1.0}, after, "v-b") == 0
    assert confirmed_replicas({("w1", "v-b"): 0.0}, after, "v-b") == 1


def swap_figures(swap_s, confirmed, window, t0=100.0, end=104.0):
    return {
        "version": "v-a",
        "t0": t0,
        "end": end,
        "call_s": 0.5,
        "swap_s": swap_s,
        "first_answer_s": swap_s,
        "confirmed": confirmed,
        "window": window,
        "failed": sum(not s.ok for s in window),
    }


def run_report(swaps, steady, samples):
    args = argparse.Namespace(replicas=2, clients=4, max_tokens=16, samples=100, max_swaps=8)
    naive = swap_figures(25.0, None, [sample(200.0, 230.0, "v-redeployed")], t0=200, end=230)
    result = Result("swap", "Hot swap", command="python -m bench.swap")
    swap.report(result, args, steady, swaps, naive, samples)
    return {t.name: t for t in result.targets}


def test_swap_targets_need_every_swap_every_replica_and_enough_requests():
    steady = [sample(i, i + 1.0, "base") for i in range(120)]  # 1 s each
    slow = [sample(200 + i, 200 + i + 1.2, "v-a") for i in range(60)]  # 1.2 s each
    quick = [sample(300 + i, 300 + i + 1.1, "v-b") for i in range(60)]
    swaps = [
        swap_figures(0.9, 2, slow, t0=200, end=260),
        swap_figures(1.4, 2, quick, t0=300, end=360),
    ]
    failed = sample(261.0, 262.0, "", status=0)  # between the two windows: counted
    targets = run_report(swaps, steady, [*steady, *slow, failed, *quick])

    every = targets["promote -> every replica serving it"]
    assert (every.rounds, every.value, every.verdict) == ([0.9, 1.4], 1.15, "met")
    assert targets["failed requests from the first promote to the end of the last swap"].value == 1
    latency = targets["p99 latency during the swaps / steady state"]
    assert latency.value == pytest.approx(1.2, abs=0.01) and latency.verdict == "met"


def test_a_swap_over_the_goal_or_an_unconfirmed_replica_leaves_the_verdict_open():
    steady = [sample(i, i + 1.0, "base") for i in range(120)]
    window = [sample(200 + i, 200 + i + 1.0, "v-a") for i in range(30)]
    swaps = [swap_figures(0.9, 2, window), swap_figures(2.5, 2, window)]
    targets = run_report(swaps, steady, steady + window)
    every = targets["promote -> every replica serving it"]
    assert every.verdict == "not settled (spread straddles the goal)"
    # 60 requests during: too few for a p99, so p95 and an open verdict naming the counts.
    latency = targets["p95 latency during the swaps / steady state"]
    assert latency.verdict == (
        "not settled (p95 of 60 requests during and 120 steady: a p99 needs 100 in each)"
    )

    unconfirmed = [swap_figures(0.9, 1, window), swap_figures(1.0, 2, window)]
    every = run_report(unconfirmed, steady, steady)["promote -> every replica serving it"]
    assert every.verdict == (
        "not settled (Ray's metrics did not show every replica swapping: swap 1: 1 of 2)"
    )
    # A swap that never finished is infinitely slow, not missing: missed, whatever the metrics.
    never = run_report([swap_figures(None, 0, window)], steady, steady)
    assert never["promote -> every replica serving it"].verdict == "missed"
    assert never["promote -> every replica serving it"].spread == (math.inf, math.inf)


async def test_load_knows_when_its_oldest_request_in_flight_was_sent():
    load = ChatLoad("http://127.0.0.1:1")
    assert load.oldest_pending() is None
    load._pending.update({0: 101.0, 1: 100.5})
    assert load.oldest_pending() == 100.5


async def test_one_swap_waits_for_the_window_and_the_requests_in_it(monkeypatch):
    monkeypatch.setattr(swap, "SETTLE_S", 0.05)
    load = ChatLoad("http://127.0.0.1:1")
    polls: list[tuple[float, str]] = []

    async def change() -> None:
        # The engine swapped: the polls and a user's answer name v-a from now on, and one user's
        # request is still in flight (it started just now).
        now = swap.time.time()
        polls.extend((now + i * 0.001, "v-a") for i in range(swap.CONSECUTIVE))
        load.samples.append(sample(now - 0.5, now + 0.01, "v-a"))
        load._pending[0] = now

    async def answer_later() -> None:
        await swap.asyncio.sleep(0.3)
        load.samples.append(sample(load._pending.pop(0), swap.time.time(), "v-a"))

    finishing = swap.asyncio.create_task(answer_later())
    figures = await swap.one_swap(load, polls, change, "v-a", None)
    await finishing
    assert figures["swap_s"] == pytest.approx(0.0, abs=0.05)
    assert figures["first_answer_s"] == pytest.approx(0.01, abs=0.05)
    # The window waited for the request in flight at its end: both requests are in it.
    assert len(figures["window"]) == 2 and figures["failed"] == 0
    assert figures["confirmed"] is None
