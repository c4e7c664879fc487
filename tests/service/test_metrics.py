"""The cluster view of `/metrics`: Ray's per-node exports summed into prefloop's own families."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from service.metrics import merge_expositions

RAY_LABELS = 'Component="core_worker",NodeAddress="{node}",SessionName="s",WorkerId="{worker}"'


def node_export(node: str, workers: dict[str, tuple[float, float, float]]) -> str:
    """Ray's export format for one node: per worker (chat 200s, bucket le=0.1 count, count)."""
    lines = [
        "# HELP ray_prefloop_requests_total HTTP requests by route and status",
        "# TYPE ray_prefloop_requests_total counter",
    ]
    for worker, (chats, _, _) in workers.items():
        tags = RAY_LABELS.format(node=node, worker=worker)
        chat = 'route="/v1/chat/completions",status="200"'
        lines.append(f"ray_prefloop_requests_total{{{tags},{chat}}} {chats}")
    lines += [
        "# HELP ray_prefloop_swap_seconds time to load a version into the engine",
        "# TYPE ray_prefloop_swap_seconds histogram",
    ]
    for worker, (_, fast, count) in workers.items():
        tags = RAY_LABELS.format(node=node, worker=worker)
        lines += [
            f'ray_prefloop_swap_seconds_bucket{{{tags},le="0.1"}} {fast}',
            f'ray_prefloop_swap_seconds_bucket{{{tags},le="+Inf"}} {count}',
            f"ray_prefloop_swap_seconds_count{{{tags}}} {count}",
            f"ray_prefloop_swap_seconds_sum{{{tags}}} {count * 0.5}",
        ]
    lines += [
        "# HELP ray_tasks Ray's own",
        "# TYPE ray_tasks gauge",
        f"ray_tasks{{{RAY_LABELS.format(node=node, worker='w0')}}} 7",
    ]
    return "\n".join(lines) + "\n"


FAMILIES = {"prefloop_requests": ("route", "status"), "prefloop_swap_seconds": ()}


def parsed(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def test_samples_are_summed_over_workers_and_nodes() -> None:
    merged = parsed(
        merge_expositions(
            [
                node_export("10.0.0.1", {"w1": (5, 1, 2), "w2": (3, 0, 1)}),
                node_export("10.0.0.2", {"w3": (4, 2, 2)}),
            ],
            FAMILIES,
        )
    )
    chat = (("route", "/v1/chat/completions"), ("status", "200"))
    assert merged[("prefloop_requests_total", chat)] == 12
    assert merged[("prefloop_swap_seconds_bucket", (("le", "0.1"),))] == 3
    assert merged[("prefloop_swap_seconds_bucket", (("le", "+Inf"),))] == 5
    assert merged[("prefloop_swap_seconds_count", ())] == 5
    assert merged[("prefloop_swap_seconds_sum", ())] == 2.5
    # Ray's own families stay out; no worker or node label survives.
    assert not any(name.startswith("ray_") for name, _ in merged)
    assert all(k in {"route", "status", "le"} for _, labels in merged for k, _ in labels)


def test_families_not_asked_for_and_unprefixed_ones_are_left_out() -> None:
    local = (
        "# HELP prefloop_requests_total a replica's own registry\n"
        "# TYPE prefloop_requests_total counter\n"
        'prefloop_requests_total{route="/healthz",status="200"} 9\n'
    )
    merged = parsed(
        merge_expositions(
            [local, node_export("10.0.0.1", {"w1": (2, 0, 0)})],
            {"prefloop_requests": FAMILIES["prefloop_requests"]},
        )
    )
    assert list(merged) == [
        ("prefloop_requests_total", (("route", "/v1/chat/completions"), ("status", "200")))
    ]
    assert merged[next(iter(merged))] == 2
