"""``bloomwire bench alerts``: the alert tick over a seeded store, and edge-triggered latency.

Two measurements:

* **tick** — a store seeded with a busy state (default 10,000 live orders, 2,000 riders, the
  status mix of :func:`bloomwire.services.alerts.rules.bench_state`, and the alerts that state deserves
  already open, as the persister would have stored them) is read, evaluated and reconciled by the
  real :class:`~bloomwire.services.alerts.service.AlertEngine`, exactly as one scheduled tick does. Reported:
  p50/p95/max of the whole tick and of its parts (store read, rules, reconcile). A cold tick (no
  alerts stored yet: every finding raised) is reported too.
* **latency** — a real Mosquitto, the persister as a child process (as in production) and the
  alerts service in this process. Orders are taken to ``arrived`` through the real MQTT path; then,
  one at a time, the rider reports ``failed`` and an observer measures the time from the canonical
  ``failed`` status (published right after the commit) to the ``alert.raised`` event of the alerts
  service, and to the persisted alert on ``shops/S/alerts``.

The seeded store is a throwaway SQLite file (or the PostgreSQL URL given); seeding writes rows
directly, which only a benchmark may do: in production the persister is the only writer.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from rich.console import Console

from bloomwire.app.bench import private_stack
from bloomwire.app.bench.report import Report
from bloomwire.app.entry import settle_heap
from bloomwire.app.supervisor import service_settings
from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.contract.lifecycle import FailureReason, OrderStatus
from bloomwire.errors import PayloadError
from bloomwire.runtime.mqtt import Connection
from bloomwire.runtime.settings import Settings
from bloomwire.services.alerts.config import RulesConfig
from bloomwire.services.alerts.rules import OrderView, RiderView, bench_state, evaluate
from bloomwire.services.alerts.service import AlertEngine, _readonly_engine, alert_id, build
from bloomwire.store import make_engine, open_store
from bloomwire.store.models import ALERTS, ORDERS, RIDERS

S = OrderStatus
_NOT_LIVE = frozenset({S.DELIVERED, S.CANCELLED})
LATENCY_USERS = ("bench-alerts", "bench-alerts-shop", "bench-alerts-rider", "bench-alerts-watch")


# --- seeding ----------------------------------------------------------------------------------


def _order_row(o: OrderView) -> dict[str, Any]:
    return {
        "id": o.id,
        "shop": o.shop,
        "status": o.status.value,
        "rider": o.rider,
        "customer_name": o.customer_name,
        "customer_phone": "",
        "address": "",
        "lat": 52.52,
        "lon": 13.40,
        "pickup_lat": None,
        "pickup_lon": None,
        "items": [],
        "note": "",
        "customer_username": f"c-{o.id}",
        "window_start": o.window_start,
        "window_end": o.window_end,
        "eta": o.eta,
        "failure_reason": o.failure_reason,
        "offer_id": None,
        "offer_deadline": None,
        "declined_by": [],
        "created_at": o.created_at,
        "assigned_at": None,
        "accepted_at": o.accepted_at,
        "picked_up_at": None,
        "en_route_at": None,
        "arrived_at": None,
        "delivered_at": o.delivered_at,
        "closed_at": o.closed_at,
        "updated_at": o.updated_at,
    }


def _rider_row(r: RiderView, now: datetime) -> dict[str, Any]:
    return {
        "id": r.id,
        "presence": r.presence.value,
        "presence_at": r.presence_at,
        "on_duty": True,
        "capacity": 3,
        "load": r.load,
        "lat": r.lat,
        "lon": r.lon,
        "speed_kmh": 15.0,
        "position_at": r.position_at,
        "last_decline_at": None,
        "idle_since": None,
        "updated_at": now,
    }


def seed_store(
    url: str, n_orders: int, n_riders: int, *, with_alerts: bool = True
) -> tuple[datetime, RulesConfig]:
    """Fill an empty store with ``n_orders`` live orders of :func:`bench_state` (and the delivered
    ones drawn on the way, as history); with the open alerts the state deserves if asked."""
    drawn, riders, now = bench_state(2 * n_orders + 100, n_riders)
    orders: list[OrderView] = []
    live = 0
    for o in drawn:
        if live == n_orders:
            break
        orders.append(o)
        live += o.status not in _NOT_LIVE
    config = RulesConfig()
    engine = open_store(url, sqlite_synchronous="OFF")
    try:
        with engine.begin() as conn:
            conn.execute(ORDERS.insert(), [_order_row(o) for o in orders])
            conn.execute(RIDERS.insert(), [_rider_row(r, now) for r in riders.values()])
            if with_alerts:
                rows = [
                    {
                        "id": alert_id(f.key, 0),
                        "rule": f.rule.value,
                        "severity": f.severity.value,
                        "shop": f.shop,
                        "order_id": f.order,
                        "rider": f.rider,
                        "message": f.message,
                        "action": f.action,
                        "status": "open",
                        "level": 0,
                        "raised_at": now - timedelta(minutes=1),
                        "escalated_at": None,
                        "acknowledged_at": None,
                        "acknowledged_by": None,
                        "resolved_at": None,
                    }
                    for f in evaluate(
                        [o for o in orders if o.status not in _NOT_LIVE], riders, now, config.for_shop
                    )
                ]
                if rows:
                    conn.execute(ALERTS.insert(), rows)
    finally:
        engine.dispose()
    return now, config


# --- the tick ---------------------------------------------------------------------------------


@dataclass
class TickFigures:
    """Seconds per tick and per part, over the measured ticks."""

    orders: int = 0
    riders: int = 0
    open_alerts: int = 0
    total: list[float] = field(default_factory=list)
    read: list[float] = field(default_factory=list)
    rules: list[float] = field(default_factory=list)
    reconcile: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    changes: int = 0
    churned: int = 0
    cold_s: float = 0.0
    cold_raised: int = 0


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def _engine_for(
    url: str, now: datetime, config: RulesConfig, sink: Callable[[str, bytes], None]
) -> AlertEngine:
    return AlertEngine(_readonly_engine(url), config, sink, clock=lambda: now)


def _churn(url: str, now: datetime, step: int) -> int:
    """What live tracking does between two ticks: a new ETA for every order on the way and a new
    position for every rider (the persister writes both on each position fix). The values move
    by a second back and forth, so the findings stay the same. Returns the rows changed."""
    engine = make_engine(url, sqlite_synchronous="OFF")
    jiggle = timedelta(seconds=1 if step % 2 else -1)
    on_the_way = (S.PICKED_UP.value, S.EN_ROUTE.value)
    try:
        with engine.begin() as conn:
            orders = conn.execute(
                sa.select(ORDERS.c.id, ORDERS.c.eta).where(
                    ORDERS.c.status.in_(on_the_way), ORDERS.c.eta.is_not(None)
                )
            ).all()
            riders = conn.execute(
                sa.select(RIDERS.c.id, RIDERS.c.position_at).where(RIDERS.c.position_at.is_not(None))
            ).all()
            if orders:
                conn.execute(
                    ORDERS.update().where(ORDERS.c.id == sa.bindparam("k")),
                    [{"k": i, "eta": eta + jiggle, "updated_at": now} for i, eta in orders],
                )
            if riders:
                conn.execute(
                    RIDERS.update().where(RIDERS.c.id == sa.bindparam("k")),
                    [{"k": i, "position_at": at + jiggle, "updated_at": now} for i, at in riders],
                )
    finally:
        engine.dispose()
    return len(orders) + len(riders)


async def _ticks(url: str, now: datetime, config: RulesConfig, ticks: int, figures: TickFigures) -> None:
    sent: list[str] = []
    core = _engine_for(url, now, config, lambda topic, payload: sent.append(topic))
    try:
        await core.tick()  # warm-up: connections, caches; loads the book
        settle_heap()  # as `bloomwire service run` does once the service is ready
        sent.clear()
        for i in range(ticks):
            figures.churned = await asyncio.to_thread(_churn, url, now, i + 1)
            if not await core.tick():
                raise RuntimeError("tick failed to read the store")
            s = core.stats
            figures.total.append(s.last_tick_s)
            figures.read.append(s.last_read_s)
            figures.rules.append(s.last_evaluate_s)
            figures.reconcile.append(s.last_reconcile_s)
            figures.cpu.append(s.last_tick_cpu_s)
        figures.orders, figures.riders = core.stats.last_orders, core.stats.last_riders
        figures.open_alerts = core.stats.last_open
        figures.changes = len(sent)
    finally:
        core.engine.dispose()


async def _cold(url: str, now: datetime, config: RulesConfig, figures: TickFigures) -> None:
    sent: list[str] = []
    core = _engine_for(url, now, config, lambda topic, payload: sent.append(topic))
    try:
        start = time.perf_counter()
        await core.tick()
        figures.cold_s = time.perf_counter() - start
        figures.cold_raised = core.stats.raised
    finally:
        core.engine.dispose()


def bench_tick(
    n_orders: int = 10_000, n_riders: int = 2_000, *, ticks: int = 20, database_url: str | None = None
) -> TickFigures:
    """Seed a store and time whole ticks (read + rules + reconcile) over it."""
    figures = TickFigures()
    with tempfile.TemporaryDirectory(prefix="bloomwire-bench-alerts-") as tmp:
        url = database_url or f"sqlite:///{Path(tmp) / 'steady.db'}"
        now, config = seed_store(url, n_orders, n_riders, with_alerts=True)
        asyncio.run(_ticks(url, now, config, ticks, figures))
        if database_url is None:
            cold_url = f"sqlite:///{Path(tmp) / 'cold.db'}"
            seed_store(cold_url, n_orders, n_riders, with_alerts=False)
            asyncio.run(_cold(cold_url, now, config, figures))
    return figures


# --- edge-triggered latency -------------------------------------------------------------------


@dataclass
class LatencyFigures:
    """Milliseconds from the committed trigger (canonical status) to the alert."""

    raised_ms: list[float] = field(default_factory=list)
    stored_ms: list[float] = field(default_factory=list)
    missing: int = 0


class _Watch:
    """Arrival times (perf_counter) of the messages one connection receives, by key."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.failed: dict[str, float] = {}
        self.raised: dict[str, float] = {}
        self.stored: dict[str, float] = {}
        self.states: dict[str, str] = {}

    async def pump(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if not await self.conn.wait_message(0.1):
                continue
            for msg in self.conn.drain(1000):
                self.seen(msg.topic, msg.payload, msg.received_at)

    def seen(self, topic: str, payload: bytes, at_wall: float) -> None:
        at = time.perf_counter() - (time.time() - at_wall)
        try:
            event = ev.decode(payload)
        except PayloadError:
            return
        if isinstance(event, ev.OrderStatusChangedEvent):
            self.states[event.data.order] = event.data.status.value
            if event.data.status is S.FAILED:
                self.failed.setdefault(event.data.order, at)
        elif isinstance(event, ev.AlertRaisedEvent) and event.data.order:
            if topic == topics.service_events("alerts"):
                self.raised.setdefault(event.data.order, at)
            else:
                self.stored.setdefault(event.data.order, at)


async def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def _wait_schema(url: str, timeout: float = 60.0) -> None:
    """The persister says online when connected, before its migrations ran: wait for them."""
    engine = make_engine(url, readonly=True)
    try:
        await _wait(lambda: sa.inspect(engine).has_table("alerts"), timeout, "the store's schema")
    finally:
        engine.dispose()


async def _latency(stack_settings: Settings, n: int, figures: LatencyFigures) -> None:
    shop, now = "bench-shop", ev.now()
    await _wait_schema(stack_settings.database_url)
    alerts_settings = service_settings(stack_settings, "bench-alerts")
    service = build(alerts_settings)
    stop = asyncio.Event()
    run = asyncio.ensure_future(service.run(alerts_settings, stop=stop, install_signals=False))
    watch_conn = Connection(service_settings(stack_settings, "bench-alerts-watch"), "bench-alerts-watch")
    for f in (topics.all_orders_filter(topics.OrderChannel.STATUS), topics.service_events("alerts"),
              topics.shop_alerts(shop)):  # fmt: skip
        watch_conn.subscribe(f, qos=1)
    pub = Connection(service_settings(stack_settings, "bench-alerts-shop"), "bench-alerts-shop")
    watch = _Watch(watch_conn)
    pump_stop = asyncio.Event()
    try:
        watch_conn.start()
        pub.start()
        await watch_conn.wait_connected()
        await pub.wait_connected()
        await _wait(service.ready.is_set, 30, "the alerts service")
        await _wait(
            lambda: service.engine is not None and service.engine.loaded,
            30,
            "the alerts service's first tick",
        )
        pump = asyncio.ensure_future(watch.pump(pump_stop))
        window = ev.Window(start=now, end=now + timedelta(hours=2))
        pairs = [(f"bench-r{i}", f"bench-o{i}") for i in range(n)]
        for rider, order in pairs:
            steps: list[tuple[str, Any]] = [
                (
                    topics.shop_command(shop, topics.Command.CREATE_ORDER),
                    ev.OrderCreateEvent(
                        source=f"shops/{shop}",
                        data=ev.OrderCreated(
                            order=order, customer=ev.Customer(name="Bench", lat=52.5, lon=13.4), window=window
                        ),
                    ),
                ),
                (
                    topics.service_events("bench"),
                    ev.DispatchOfferedEvent(
                        source="services/bench",
                        data=ev.DispatchOffer(
                            offer=f"of-{order}", order=order, rider=rider, deadline=now + timedelta(hours=1)
                        ),
                    ),
                ),
                (
                    topics.rider_replies(rider),
                    ev.DispatchReplyEvent(
                        source=f"riders/{rider}",
                        data=ev.DispatchReply(offer=f"of-{order}", order=order, accept=True),
                    ),
                ),
            ]
            for status in (S.PICKED_UP, S.ARRIVED):
                steps.append(
                    (
                        topics.rider_order_status(rider, order),
                        ev.OrderStatusChangedEvent(
                            source=f"riders/{rider}", data=ev.OrderStatusChanged(order=order, status=status)
                        ),
                    )
                )
            for topic, event in steps:
                pub.publish(topic, ev.encode(event))
        await _wait(lambda: all(watch.states.get(o) == "arrived" for _, o in pairs), 60, "orders to arrive")
        for rider, order in pairs:
            failed = ev.OrderStatusChangedEvent(
                source=f"riders/{rider}",
                data=ev.OrderStatusChanged(order=order, status=S.FAILED, reason=FailureReason.ADDRESS_WRONG),
            )
            pub.publish(topics.rider_order_status(rider, order), ev.encode(failed))
            try:
                await _wait(lambda o=order: o in watch.stored, 10, f"the alert of {order}")  # type: ignore[misc]
            except RuntimeError:
                figures.missing += 1
                continue
            await asyncio.sleep(0.02)
        for _, order in pairs:
            if order in watch.failed and order in watch.raised:
                figures.raised_ms.append((watch.raised[order] - watch.failed[order]) * 1000)
            if order in watch.failed and order in watch.stored:
                figures.stored_ms.append((watch.stored[order] - watch.failed[order]) * 1000)
        pump_stop.set()
        await pump
    finally:
        pump_stop.set()
        stop.set()
        await run
        await pub.stop(announce_offline=False)
        await watch_conn.stop(announce_offline=False)


def bench_latency(settings: Settings, n: int = 100) -> LatencyFigures:
    """Edge-triggered latency through a real broker and persister (see the module doc)."""
    figures = LatencyFigures()
    with private_stack(settings, LATENCY_USERS, name="alerts") as (live, _):
        asyncio.run(_latency(live, n, figures))
    return figures


# --- the command ------------------------------------------------------------------------------


def main(
    settings: Settings,
    *,
    orders: int = 10_000,
    riders: int = 2_000,
    ticks: int = 20,
    events: int = 100,
    database_url: str | None = None,
    console: Console | None = None,
) -> list[Report]:
    """Run both measurements, print and return a table of the figures."""
    out = console or Console()
    out.print(f"Seeding a store with {orders:,} live orders and {riders:,} riders; timing {ticks} ticks…")
    tf = bench_tick(orders, riders, ticks=ticks, database_url=database_url)
    result: dict[str, Any] = {
        "orders": tf.orders,
        "riders": tf.riders,
        "open_alerts": tf.open_alerts,
        "tick_p50_ms": round(_pct(tf.total, 50) * 1000, 1),
        "tick_p95_ms": round(_pct(tf.total, 95) * 1000, 1),
        "tick_max_ms": round(max(tf.total) * 1000, 1),
        "tick_cpu_p50_ms": round(_pct(tf.cpu, 50) * 1000, 1),
        "tick_cpu_p95_ms": round(_pct(tf.cpu, 95) * 1000, 1),
        "read_p50_ms": round(_pct(tf.read, 50) * 1000, 1),
        "rules_p50_ms": round(_pct(tf.rules, 50) * 1000, 1),
        "reconcile_p50_ms": round(_pct(tf.reconcile, 50) * 1000, 1),
        "rows_changed_between_ticks": tf.churned,
        "steady_changes": tf.changes,
        "cold_tick_ms": round(tf.cold_s * 1000, 1) if tf.cold_s else None,
        "cold_raised": tf.cold_raised,
    }
    if events > 0:
        out.print(f"Measuring edge-triggered latency over {events} failed deliveries (real broker)…")
        lf = bench_latency(settings, events)
        result |= {
            "events": events,
            "raised_p50_ms": round(_pct(lf.raised_ms, 50), 2),
            "raised_p95_ms": round(_pct(lf.raised_ms, 95), 2),
            "raised_max_ms": round(max(lf.raised_ms, default=float("nan")), 2),
            "stored_p50_ms": round(_pct(lf.stored_ms, 50), 2),
            "stored_p95_ms": round(_pct(lf.stored_ms, 95), 2),
            "missing": lf.missing,
        }
    table = Report("bloomwire bench alerts")
    for k, v in result.items():
        table.add(k, v)
    out.print(table.rich())
    return [table]
