"""The Grafana dashboard (k8s/grafana/prefloop-dashboard.json) asks for what the service exports.

Its Prometheus queries name metrics and labels of `service.metrics.Metrics` as Ray's export names
them (`ray_` prefix); its PostgreSQL queries run, with Grafana's macros expanded, against a real
store holding a training run, and return that run's stage times.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from service.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "k8s" / "grafana" / "prefloop-dashboard.json"
SUFFIXES = ("_total", "_bucket", "_count", "_sum")
METRIC = re.compile(r"\bray_(prefloop_[a-z_]+)")


def queries(kind: str) -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    found = [
        t.get("expr") or t.get("rawSql")
        for panel in board["panels"]
        if panel.get("datasource", {}).get("type") == kind
        for t in panel.get("targets", [])
    ]
    found += [
        a["target"]["rawSql"]
        for a in board["annotations"]["list"]
        if a.get("datasource", {}).get("type") == kind
    ]
    return [q for q in found if q]


def family_labels() -> dict[str, tuple[str, ...]]:
    metrics = Metrics(in_flight=lambda: 0.0, mirror=False)
    return {f.name: f.labelnames for f in metrics.families}


def test_every_panel_has_a_query() -> None:
    board = json.loads(DASHBOARD.read_text())
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel.get("targets"), f"panel {panel['title']!r} queries nothing"
    assert len(queries("prometheus")) >= 8


def family_of(sample: str) -> str:
    return next((sample.removesuffix(s) for s in SUFFIXES if sample.endswith(s)), sample)


def test_prometheus_queries_name_exported_metrics_and_labels() -> None:
    families = family_labels()
    for expr in queries("prometheus"):
        named = {family_of(sample) for sample in METRIC.findall(expr)}
        assert named, f"no prefloop metric in {expr!r}"
        assert named <= set(families), f"{expr!r}: {sorted(named - set(families))} not exported"
        allowed = {"le"}.union(*(families[f] for f in named))
        used = {
            label.strip()
            for group in re.findall(r"by \(([^)]*)\)", expr)
            for label in group.split(",")
        }
        used |= set(re.findall(r"[{,](\w+)=", expr))
        assert used <= allowed, f"{expr!r}: labels {sorted(used - allowed)} are not exported"


def grafana_sql(sql: str, start: datetime, end: datetime) -> tuple[str, dict[str, Any]]:
    """Expand the `$__timeFilter(column)` macro as Grafana does, into bound parameters."""
    expanded = re.sub(r"\$__timeFilter\((\w+)\)", r"\1 BETWEEN :start AND :end", sql)
    return expanded, {"start": start, "end": end}


@pytest.mark.postgres
def test_training_queries_return_the_runs_stage_times(postgres_url: str) -> None:
    from sqlalchemy import create_engine, text

    from service.runs import queue_run, update_run
    from service.store import Store

    store = Store(postgres_url)
    store.upgrade()
    now = datetime.now(UTC)
    try:
        run = queue_run(store, "manual", "ops")
        stages = {"snapshot": 0.4, "sft": 170.2, "reward_model": 160.5, "train": 590.0}
        stages |= {"register": 3.1, "gate": 111.0, "promote": 1.2}
        update_run(
            store,
            run.id,
            status="promoted",
            stages=stages,
            started_at=now - timedelta(seconds=1040),
            finished_at=now,
        )
    finally:
        store.close()
    rows: list[list[Any]] = []
    grafana = create_engine(postgres_url)  # Grafana's own connection, as its datasource has
    try:
        with grafana.connect() as conn:
            for sql in queries("grafana-postgresql-datasource"):
                expanded, params = grafana_sql(sql, now - timedelta(hours=1), now + timedelta(1))
                rows.append([dict(r._mapping) for r in conn.execute(text(expanded), params)])
    finally:
        grafana.dispose()
    table = next(r for r in rows if r and "train_s" in r[0])
    assert table[0]["id"] == run.id
    assert {k: table[0][f"{k}_s"] for k in stages} == stages
    assert any(r == [{"status": "promoted", "runs": 1}] for r in rows)
    cycle = next(r for r in rows if r and "cycle_s" in r[0])
    assert float(cycle[0]["cycle_s"]) == pytest.approx(1040, abs=1)
    annotation = next(r for r in rows if r and "text" in r[0])
    assert annotation[0]["text"].startswith(f"run {run.id}: promoted")
