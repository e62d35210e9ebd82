"""``bloomwire bench scale``: how the persister's start-up grows with the open work.

For each step, a fresh SQLite store is seeded with N open orders (half out for delivery, two to a
rider), N/5 open alerts (one per order) and as much delivered history as open orders; then the
persister's start-up work is timed as the service does it before it says ``online``: open (and
migrate) the store, load the projections, build every retained snapshot. The fitted growth
exponent (the slope of log time over log N) is 1.0 when the cost is linear in the open work.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console

from bloomwire.app.bench.report import Report
from bloomwire.services.persister.projector import Projector
from bloomwire.store import open_store
from bloomwire.store.models import ALERTS, ORDERS, RIDERS

#: Rows per insert statement while seeding (bounded memory, few round trips).
SEED_CHUNK = 5_000


def _order(i: int, now: datetime, *, rider: str | None, status: str) -> dict[str, Any]:
    closed = now - timedelta(hours=1) if status == "delivered" else None
    return {
        "id": f"o{i}",
        "shop": f"s{i % 20}",
        "status": status,
        "rider": rider,
        "customer_name": "Customer",
        "customer_phone": "",
        "address": "",
        "lat": 52.52 + (i % 100) * 1e-4,
        "lon": 13.40,
        "pickup_lat": None,
        "pickup_lon": None,
        "items": [],
        "note": "",
        "customer_username": f"c-o{i}",
        "window_start": now,
        "window_end": now + timedelta(hours=2),
        "eta": now + timedelta(minutes=20) if rider else None,
        "failure_reason": None,
        "offer_id": None,
        "offer_deadline": None,
        "declined_by": [],
        "created_at": now - timedelta(minutes=30),
        "assigned_at": None,
        "accepted_at": now - timedelta(minutes=20) if rider else None,
        "picked_up_at": None,
        "en_route_at": now - timedelta(minutes=10) if rider else None,
        "arrived_at": None,
        "delivered_at": closed,
        "closed_at": closed,
        "updated_at": now,
    }


def _rider(i: int, now: datetime) -> dict[str, Any]:
    return {
        "id": f"r{i}",
        "presence": "online",
        "presence_at": now,
        "on_duty": True,
        "capacity": 3,
        "load": 2,
        "lat": 52.5,
        "lon": 13.4,
        "speed_kmh": 15.0,
        "position_at": now,
        "last_decline_at": None,
        "idle_since": None,
        "updated_at": now,
    }


def _alert(i: int, now: datetime) -> dict[str, Any]:
    return {
        "id": f"a{i}",
        "rule": "late",
        "severity": "warning",
        "shop": f"s{i % 20}",
        "order_id": f"o{i}",
        "rider": None,
        "message": "late",
        "action": "",
        "status": "open",
        "level": 0,
        "raised_at": now,
        "escalated_at": None,
        "acknowledged_at": None,
        "acknowledged_by": None,
        "resolved_at": None,
    }


def _chunks(n: int, make: Callable[[int], dict[str, Any]]) -> Sequence[list[dict[str, Any]]]:
    return [[make(i) for i in range(lo, min(n, lo + SEED_CHUNK))] for lo in range(0, n, SEED_CHUNK)]


def seed(url: str, open_orders: int, now: datetime) -> None:
    """Fill an empty store: open orders, their riders, N/5 open alerts and delivered history."""
    half = open_orders // 2

    def order(i: int) -> dict[str, Any]:
        if i >= open_orders:
            return _order(i, now, rider=None, status="delivered")
        if i < half:
            return _order(i, now, rider=f"r{i // 2}", status="en_route")
        return _order(i, now, rider=None, status="created")

    engine = open_store(url, sqlite_synchronous="OFF")
    try:
        with engine.begin() as conn:
            for rows in _chunks(2 * open_orders, order):
                conn.execute(ORDERS.insert(), rows)
            for rows in _chunks((half + 1) // 2, lambda i: _rider(i, now)):
                conn.execute(RIDERS.insert(), rows)
            for rows in _chunks(open_orders // 5, lambda i: _alert(i, now)):
                conn.execute(ALERTS.insert(), rows)
    finally:
        engine.dispose()


def startup(url: str) -> tuple[float, int]:
    """Seconds of the persister's start-up work over ``url``, and the snapshots it built."""
    started = time.perf_counter()
    engine = open_store(url)
    try:
        projector = Projector(engine)
        projector.load()
        snapshots = projector.snapshot_messages()
        elapsed = time.perf_counter() - started
        projector.close()
    finally:
        engine.dispose()
    return elapsed, len(snapshots)


def exponent(points: Sequence[tuple[float, float]]) -> float:
    """The least-squares slope of log(y) over log(x): 1.0 for linear growth."""
    xs = [math.log(x) for x, _ in points]
    ys = [math.log(max(y, 1e-9)) for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else float("nan")


def main(steps: Sequence[int], *, console: Console) -> list[Report]:
    """Seed and time each step; print and return the table."""
    now = datetime.now(UTC).replace(microsecond=0)
    report = Report(
        "persister start-up (open store, load projections, build snapshots) over a SQLite store",
        ("open orders", "open alerts", "riders", "start-up s", "snapshots", "µs per open order"),
    )
    points: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory(prefix="bloomwire-scale-") as tmp:
        for n in steps:
            url = f"sqlite:///{Path(tmp) / f'scale-{n}.db'}"
            console.print(f"[dim]seeding {n} open orders...[/dim]")
            seed(url, n, now)
            console.print(f"[dim]starting over {n} open orders...[/dim]")
            seconds, snapshots = startup(url)
            points.append((n, seconds))
            riders = (n // 2 + 1) // 2
            report.add(n, n // 5, riders, f"{seconds:.2f}", snapshots, f"{seconds / n * 1e6:.0f}")
    if len(points) > 1:
        report.add("growth exponent", "", "", f"{exponent(points):.2f}", "", "")
    console.print(report.rich())
    return [report]
