"""``bloomwire bench scale``: how the backbone's per-step costs grow with the open work.

For each step, a fresh SQLite store is seeded with N open orders (half out for delivery, two to a
rider), N/5 open alerts (one per order), as much delivered history as open orders and the status
events of all of them; then, over that store:

- the persister's start-up work as the service does it before it says ``online`` (open and
  migrate the store, load the projections; the retained snapshots are repaired after, paced),
  and the memory the loaded projections and every snapshot hold per open order;
- one dispatch round (:class:`~bloomwire.services.dispatch.service.Dispatcher`'s pass: read the
  waiting orders and online riders, plan, build the offers; publishing is a no-op);
- the retained messages the broker holds once the snapshots are published (a private Mosquitto,
  counted back with ``mosquitto_sub --retained-only``);
- the store's bytes per stored event, on SQLite and (when reachable) PostgreSQL.

The alert tick is :func:`bloomwire.app.bench.alerts.bench_tick` over N live orders of its own
(the alerts bench's realistic state). The fitted growth exponent of each column (the slope of
log value over log N) is 1.0 when the cost is linear in the open work.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import statistics
import subprocess
import tempfile
import time
import tracemalloc
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from rich.console import Console

from bloomwire.app.bench import alerts as alerts_bench
from bloomwire.app.bench import temporary_settings
from bloomwire.app.bench.report import Report
from bloomwire.app.supervisor import Stack, service_settings
from bloomwire.contract import events as ev
from bloomwire.runtime.mqtt import Connection
from bloomwire.runtime.settings import Settings
from bloomwire.services.dispatch.service import Dispatcher
from bloomwire.services.persister.projector import Outbound, Projector
from bloomwire.services.persister.repair import Repair
from bloomwire.store import make_engine, open_store, retention
from bloomwire.store.models import ALERTS, EVENTS, ORDERS, RIDERS

#: The broker account that publishes and counts the retained snapshots.
SCALE_USER = "bench-scale"
#: The account ending the count (its own: the broker takes the username as the client id).
SENTINEL_USER = "bench-scale-end"

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


#: The status events an order has been through, by its current status.
_PATH = {
    "created": ("created",),
    "en_route": ("created", "assigned", "accepted", "picked_up", "en_route"),
    "delivered": ("created", "assigned", "accepted", "picked_up", "en_route", "arrived", "delivered"),
}


def _events(row: dict[str, Any], now: datetime) -> list[dict[str, Any]]:
    """The status events of one seeded order, as the persister stores them."""
    order, shop = row["id"], row["shop"]
    topic = f"shops/{shop}/orders/{order}/status"
    return [
        {
            "id": ev.new_id(),
            "type": "order.status_changed",
            "source": f"riders/{row['rider']}" if row["rider"] else f"shops/{shop}",
            "topic": topic,
            "shop": shop,
            "order_id": order,
            "rider": row["rider"],
            "time": now,
            "recorded_at": now,
            "data": {"order": order, "status": status, "note": ""},
        }
        for status in _PATH[row["status"]]
    ]


def seed(url: str, open_orders: int, now: datetime) -> int:
    """Fill an empty store: open orders, their riders, N/5 open alerts, delivered history and the
    status events of every order; return the events stored."""
    half = open_orders // 2

    def order(i: int) -> dict[str, Any]:
        if i >= open_orders:
            return _order(i, now, rider=None, status="delivered")
        if i < half:
            return _order(i, now, rider=f"r{i // 2}", status="en_route")
        return _order(i, now, rider=None, status="created")

    events = 0
    engine = open_store(url, sqlite_synchronous="OFF")
    try:
        with engine.begin() as conn:
            for rows in _chunks(2 * open_orders, order):
                conn.execute(ORDERS.insert(), rows)
                history = [e for r in rows for e in _events(r, now)]
                conn.execute(EVENTS.insert(), history)
                events += len(history)
            for rows in _chunks((half + 1) // 2, lambda i: _rider(i, now)):
                conn.execute(RIDERS.insert(), rows)
            for rows in _chunks(open_orders // 5, lambda i: _alert(i, now)):
                conn.execute(ALERTS.insert(), rows)
    finally:
        engine.dispose()
    return events


def startup(url: str) -> float:
    """Seconds of the persister's start-up work over ``url`` before it says ``online`` (open the
    store, load the projections, list the orders and riders whose retained snapshots it
    republishes after, :mod:`~bloomwire.services.persister.repair`)."""
    started = time.perf_counter()
    engine = open_store(url)
    try:
        projector = Projector(engine)
        projector.load()
        Repair(projector)
        elapsed = time.perf_counter() - started
        projector.close()
    finally:
        engine.dispose()
    return elapsed


def snapshots_of(url: str) -> tuple[list[Outbound], int]:
    """The retained snapshots the persister would publish at start over ``url``, and the bytes
    the loaded projections and those snapshots hold (traced: a second load, not the timed one)."""
    engine = make_engine(url, readonly=True)
    try:
        tracemalloc.start()
        try:
            projector = Projector(engine)
            projector.load()
            out = projector.snapshot_messages()
            held = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        projector.close()
    finally:
        engine.dispose()
    return out, held


def dispatch_round(url: str, now: datetime) -> tuple[float, int]:
    """Seconds of one dispatch pass over ``url`` at the seed's ``now`` (riders' positions fresh;
    nothing published) and the orders it saw waiting."""
    # One line per order left without a rider would bury the figures.
    logging.getLogger("bloomwire.dispatch").setLevel(logging.WARNING)
    engine = make_engine(url, readonly=True)
    try:
        result = Dispatcher(engine, clock=lambda: now).run_pass(lambda _topic, _payload: None)
    finally:
        engine.dispose()
    return result.read_s + result.plan_s + result.publish_s, result.waiting


def exponent(points: Sequence[tuple[float, float]]) -> float:
    """The least-squares slope of log(y) over log(x): 1.0 for linear growth."""
    xs = [math.log(x) for x, _ in points]
    ys = [math.log(max(y, 1e-9)) for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else float("nan")


# --- the broker's retained messages -----------------------------------------------------------


def _send_all(conn: Connection, messages: Sequence[Outbound]) -> None:
    """Publish every message and wait (off the event loop) until the broker has acknowledged them."""
    for m in messages:
        conn.publish(m.topic, m.payload, qos=1, retain=m.retain)
    deadline = time.monotonic() + 120
    while conn.in_flight() and time.monotonic() < deadline:
        time.sleep(0.05)


async def _publish_retained(settings: Settings, messages: Sequence[Outbound]) -> None:
    conn = Connection(service_settings(settings, SCALE_USER), SCALE_USER)
    conn.start()
    try:
        await conn.wait_connected()
        await asyncio.to_thread(_send_all, conn, messages)
    finally:
        await conn.stop(announce_offline=False)


def _count_retained(settings: Settings) -> int:
    """Retained messages the broker sends a new subscriber on ``shops/#`` and ``riders/#``: it
    sends them before anything published after the subscription, so a plain publish ends the count."""

    def login(user: str) -> list[str]:
        creds = service_settings(settings, user)
        password = creds.broker_password.get_secret_value() if creds.broker_password else ""
        return ["-h", settings.broker_host, "-p", str(settings.broker_port), "-u", user, "-P", password]

    with tempfile.TemporaryFile() as out:
        sub = subprocess.Popen(
            [
                *("mosquitto_sub", *login(SCALE_USER), "-t", "shops/#", "-t", "riders/#"),
                *("--retained-only", "-F", "%r", "-W", "300"),
            ],
            stdout=out,
        )
        time.sleep(1.0)  # subscribed: what the sentinel follows is every retained message
        subprocess.run(["mosquitto_pub", *login(SENTINEL_USER), "-t", "shops/zz-scale-end", "-n"], check=True)
        sub.wait(timeout=310)
        out.seek(0)
        return out.read().count(b"1")


def retained_held(settings: Settings, messages: Sequence[Outbound]) -> int:
    """Publish ``messages`` to a private broker; the retained messages it then holds."""
    with tempfile.TemporaryDirectory(prefix="bloomwire-scale-broker-") as tmp:
        own = temporary_settings(settings, Path(tmp))
        stack = Stack(own, services=(), extra_users=(SCALE_USER, SENTINEL_USER))
        try:
            live = stack.start()
            asyncio.run(_publish_retained(live, messages))
            return _count_retained(live)
        finally:
            stack.stop()


# --- PostgreSQL ---------------------------------------------------------------------------------


@contextlib.contextmanager
def postgres_database(admin_url: str) -> Iterator[str | None]:
    """A fresh PostgreSQL database (its URL), dropped afterwards; None when none is reachable."""
    name = f"bloomwire_scale_{secrets.token_hex(4)}"
    try:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=3) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.Error:
        yield None
        return
    parts = urllib.parse.urlsplit(admin_url)
    try:
        yield urllib.parse.urlunsplit(parts._replace(scheme="postgresql+psycopg", path=f"/{name}"))
    finally:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=3) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _store_bytes(url: str) -> int:
    engine = make_engine(url, readonly=True)
    try:
        return retention.size(engine).bytes
    finally:
        engine.dispose()


def postgres_bytes_per_event(admin_url: str, open_orders: int, now: datetime) -> float | None:
    """Bytes the seeded store adds to an empty, migrated PostgreSQL database, per stored event."""
    with postgres_database(admin_url) as url:
        if url is None:
            return None
        open_store(url).dispose()
        empty = _store_bytes(url)
        events = seed(url, open_orders, now)
        return (_store_bytes(url) - empty) / events


# --- the sweep ------------------------------------------------------------------------------------


@dataclass
class Step:
    """What one step measured."""

    orders: int
    alerts: int = 0
    riders: int = 0
    events: int = 0
    startup_s: float = 0.0
    snapshots: int = 0
    memory_per_order_b: float = 0.0
    alert_tick_ms: float = 0.0
    dispatch_round_ms: float = 0.0
    dispatch_waiting: int = 0
    retained: int | None = None
    sqlite_bytes_per_event: float = 0.0
    postgres_bytes_per_event: float | None = None


#: Columns with a growth exponent: (attribute, heading).
COLUMNS = (
    ("startup_s", "persister start-up s"),
    ("memory_per_order_b", "memory B per open order"),
    ("alert_tick_ms", "alert tick ms"),
    ("dispatch_round_ms", "dispatch round ms"),
    ("retained", "retained msgs held"),
    ("sqlite_bytes_per_event", "SQLite B/event"),
    ("postgres_bytes_per_event", "PostgreSQL B/event"),
)


def measure(n: int, tmp: Path, now: datetime, *, postgres: str | None, say: Callable[[str], None]) -> Step:
    """Seed and measure one step."""
    step = Step(n, alerts=n // 5, riders=(n // 2 + 1) // 2)
    url = f"sqlite:///{tmp / f'scale-{n}.db'}"
    say(f"{n} open orders: seeding SQLite ...")
    step.events = seed(url, n, now)
    step.sqlite_bytes_per_event = _store_bytes(url) / step.events
    say(f"{n}: persister start-up ...")
    step.startup_s = startup(url)
    say(f"{n}: dispatch round ...")
    seconds, step.dispatch_waiting = dispatch_round(url, now)
    step.dispatch_round_ms = seconds * 1000
    say(f"{n}: alert tick (the alerts bench's state, {n} live orders) ...")
    ticks = alerts_bench.bench_tick(
        n, step.riders, ticks=3, database_url=f"sqlite:///{tmp / f'alerts-{n}.db'}"
    )
    step.alert_tick_ms = statistics.median(ticks.total) * 1000
    say(f"{n}: retained messages on a private broker ...")
    snapshots, held = snapshots_of(url)
    step.snapshots = len(snapshots)
    step.memory_per_order_b = held / n
    step.retained = retained_held(Settings(data_dir=tmp), snapshots)
    if postgres:
        say(f"{n}: seeding PostgreSQL ...")
        step.postgres_bytes_per_event = postgres_bytes_per_event(postgres, n, now)
    return step


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if value < 10 else f"{value:,.0f}"


def report(steps: Sequence[Step]) -> Report:
    """The steps as one table, the growth exponents as its last row."""
    out = Report(
        "per step: seeded SQLite store (and PostgreSQL for its bytes); alert tick over the alerts "
        "bench's state of as many live orders",
        ("open orders", "open alerts", "riders", *(h for _, h in COLUMNS)),
    )
    for s in steps:
        out.add(s.orders, s.alerts, s.riders, *(_fmt(getattr(s, a)) for a, _ in COLUMNS))
    if len(steps) > 1:
        fits = []
        for attr, _ in COLUMNS:
            points = [(float(s.orders), float(v)) for s in steps if (v := getattr(s, attr)) is not None]
            fits.append(f"{exponent(points):.2f}" if len(points) > 1 else "–")
        out.add("growth exponent", "", "", *fits)
    return out


def main(
    steps: Sequence[int],
    *,
    console: Console,
    postgres: str | None = None,
    json_path: Path | None = None,
) -> list[Report]:
    """Seed and measure each step; print the table and its JSON; return the table."""
    now = datetime.now(UTC).replace(microsecond=0)
    done: list[Step] = []

    def say(message: str) -> None:
        console.print(f"[dim]{message}[/dim]")

    with tempfile.TemporaryDirectory(prefix="bloomwire-scale-") as tmp:
        for n in steps:
            done.append(
                measure(n, Path(tmp), now, postgres=postgres, say=lambda m: console.print(f"[dim]{m}[/dim]"))
            )
    table = report(done)
    console.print(table.rich())
    text = json.dumps([asdict(s) for s in done])
    console.print_json(text)
    if json_path is not None:
        json_path.write_text(text + "\n", encoding="utf-8")
    return [table]
