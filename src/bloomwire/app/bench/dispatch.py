"""``bloomwire bench dispatch``: dispatch decisions through a real broker and persister, measured.

Starts its own Mosquitto and persister (a child process, as in production) on a temporary SQLite
store and runs dispatch in this process. Two phases:

normal mode
    ``riders`` riders online around Berlin; ``orders`` orders created one at a time by a shop.
    For each: shop publishes ``create-order`` -> persister commits, publishes the canonical
    ``created`` -> dispatch reads the store, ranks the riders and publishes ``dispatch.offered`` ->
    persister commits the offer and delivers it to the rider's inbox. The shop then cancels the
    order so every measurement starts from the same fleet. Reported: creation -> canonical
    ``created``, creation -> offer published by dispatch (the decision), creation -> offer in the
    rider's inbox, and dispatch's own part (canonical event received -> offer handed to MQTT).

peak mode
    With dispatch stopped, ``peak_orders`` orders and ``peak_riders`` riders (the planner's random
    Berlin instance) are put into the store through the broker; dispatch then starts and its
    first pass assigns them all jointly. Reported: that pass (store read, joint assignment,
    publishing one offer per pair) and the time until the persister has committed every offer;
    plus :func:`planner.bench_batch` on the same sizes (joint vs greedy, planner only).
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import sqlalchemy as sa
from rich.console import Console

from bloomwire.app.bench import private_stack
from bloomwire.app.bench.report import Report
from bloomwire.app.entry import settle_heap
from bloomwire.app.supervisor import service_settings
from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.runtime.mqtt import Connection
from bloomwire.runtime.settings import Settings
from bloomwire.services.dispatch.planner import BERLIN_BBOX, bench_batch, random_instance
from bloomwire.services.dispatch.service import EVENTS_TOPIC, NAME, DispatchService, build
from bloomwire.store import make_engine
from bloomwire.store import models as m

BENCH_USER = "bench"
WATCH_USER = "bench-watch"
BENCH_USERS = (NAME, BENCH_USER, WATCH_USER)
SHOP = "bench-shop"


@dataclass
class Figures:
    """What one run measured (milliseconds unless named otherwise)."""

    orders: int
    riders: int
    created_ms: list[float] = field(default_factory=list)
    decision_ms: list[float] = field(default_factory=list)
    inbox_ms: list[float] = field(default_factory=list)
    in_dispatch_ms: list[float] = field(default_factory=list)
    read_ms: list[float] = field(default_factory=list)
    plan_ms: list[float] = field(default_factory=list)
    missing: int = 0
    peak: dict[str, Any] = field(default_factory=dict)
    planner: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def pct(values: list[float], q: float) -> float:
        """The q-th percentile (0-100) of ``values``."""
        if not values:
            return float("nan")
        return float(np.percentile(np.asarray(values), q))

    def as_dict(self) -> dict[str, Any]:
        """Figures as plain numbers (for JSON output)."""

        def summary(values: list[float]) -> dict[str, float]:
            return {
                "p50": round(self.pct(values, 50), 2),
                "p95": round(self.pct(values, 95), 2),
                "p99": round(self.pct(values, 99), 2),
                "max": round(max(values), 2) if values else float("nan"),
                "mean": round(statistics.fmean(values), 2) if values else float("nan"),
            }

        return {
            "normal": {
                "orders": self.orders,
                "riders": self.riders,
                "missing": self.missing,
                "create_to_created_ms": summary(self.created_ms),
                "create_to_offer_published_ms": summary(self.decision_ms),
                "create_to_rider_inbox_ms": summary(self.inbox_ms),
                "in_dispatch_ms": summary(self.in_dispatch_ms),
                "store_read_ms": summary(self.read_ms),
                "rank_ms": summary(self.plan_ms),
            },
            "peak": self.peak,
            "planner": {k: round(v, 4) for k, v in self.planner.items()},
        }


class _Watch:
    """Arrival times (epoch s, stamped in paho's network thread) of what the benchmark waits for."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.seen: dict[tuple[str, str], float] = {}

    def _drain(self) -> None:
        for msg in self.conn.drain(100_000):
            try:
                obj = json.loads(msg.payload)
                data = obj["data"]
            except (ValueError, KeyError, TypeError):
                continue
            if msg.topic == EVENTS_TOPIC and obj.get("type") == "dispatch.offered":
                key = ("decision", data["order"])
            elif msg.topic.endswith("/inbox/offers"):
                key = ("inbox", data["order"])
            elif obj.get("type") == "order.status_changed" or msg.topic.endswith("/status"):
                key = (f"status:{data.get('status')}", data.get("order", ""))
            else:
                continue
            self.seen.setdefault(key, msg.received_at)

    async def until(self, key: tuple[str, str], timeout: float = 10.0) -> float | None:
        deadline = time.monotonic() + timeout
        self._drain()
        while key not in self.seen:
            if time.monotonic() > deadline:
                return None
            await self.conn.wait_message(0.05)
            self._drain()
        return self.seen[key]


async def _connect(settings: Settings, user: str, *filters: str) -> Connection:
    conn = Connection(service_settings(settings, user), user)
    for f in filters:
        conn.subscribe(f, qos=1)
    conn.start()
    await conn.wait_connected()
    return conn


async def _start_dispatch(settings: Settings) -> tuple[DispatchService, asyncio.Event, asyncio.Task[None]]:
    creds = service_settings(settings, NAME)
    service = build(creds)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(creds, stop=stop))
    deadline = time.monotonic() + 30
    while not service.ready.is_set():
        if task.done() or time.monotonic() > deadline:
            stop.set()
            await task
            raise RuntimeError("dispatch did not start")
        await asyncio.sleep(0.01)
    settle_heap()  # as `bloomwire service run` does once the service is ready
    return service, stop, task


def _presence(rider: str, capacity: int, online: bool = True) -> bytes:
    status = ev.Presence.ONLINE if online else ev.Presence.OFFLINE
    return ev.encode(
        ev.RiderPresenceChangedEvent(
            source=f"riders/{rider}", data=ev.RiderPresence(status=status, capacity=capacity)
        )
    )


def _position(lat: float, lon: float) -> bytes:
    return json.dumps({"lat": lat, "lon": lon, "tst": int(time.time())}).encode()


def _created(shop: str, order: str, lat: float, lon: float) -> bytes:
    now = ev.now()
    return ev.encode(
        ev.OrderCreateEvent(
            source=f"shops/{shop}",
            data=ev.OrderCreated(
                order=order,
                customer=ev.Customer(name="Bench", lat=lat + 0.01, lon=lon + 0.01),
                window=ev.Window(start=now, end=now + timedelta(hours=2)),
                pickup_lat=lat,
                pickup_lon=lon,
            ),
        )
    )


async def _wait_store(url: str, query: sa.Select[Any], target: int, what: str, timeout: float = 120) -> None:
    engine = make_engine(url, readonly=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with engine.connect() as conn:
                    n = int(conn.execute(query).scalar_one())
            except sa.exc.OperationalError:  # the persister is still creating the schema
                n = 0
            if n >= target:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {n}/{target} {what} after {timeout:.0f} s")
            await asyncio.sleep(0.1)
    finally:
        engine.dispose()


async def _normal(settings: Settings, figures: Figures, seed: int) -> None:
    rng = np.random.default_rng(seed)
    lat0, lon0, lat1, lon1 = BERLIN_BBOX
    # A city centre: riders within ~5 km of the shop, as for one busy flower shop.
    clat, clon = (lat0 + lat1) / 2, (lon0 + lon1) / 2
    pub = await _connect(settings, BENCH_USER)
    watch = _Watch(
        await _connect(
            settings,
            WATCH_USER,
            EVENTS_TOPIC,
            f"{topics.RIDERS}/+/inbox/offers",
            topics.all_orders_filter(topics.OrderChannel.STATUS, shop=SHOP),
        )
    )
    riders = [
        (f"n{j}", clat + float(rng.uniform(-0.045, 0.045)), clon + float(rng.uniform(-0.07, 0.07)))
        for j in range(figures.riders)
    ]

    def positions() -> None:
        for rider, lat, lon in riders:
            pub.publish(topics.rider_location(rider), _position(lat, lon))

    for rider, _, _ in riders:
        pub.publish(topics.rider_presence(rider), _presence(rider, 3))
    positions()
    count_riders = sa.select(sa.func.count()).select_from(m.RIDERS).where(m.RIDERS.c.lat.is_not(None))
    await _wait_store(settings.database_url, count_riders, figures.riders, "riders")

    service, stop, task = await _start_dispatch(settings)
    try:
        await asyncio.sleep(0.5)
        last_refresh = time.monotonic()
        create_topic = topics.shop_command(SHOP, topics.Command.CREATE_ORDER)
        cancel_topic = topics.shop_command(SHOP, topics.Command.CANCEL_ORDER)
        for i in range(figures.orders):
            if time.monotonic() - last_refresh > 30:  # keep positions fresh (stale after 120 s)
                positions()
                last_refresh = time.monotonic()
                await asyncio.sleep(0.2)
            order = f"n-o{i}"
            lat = clat + float(rng.uniform(-0.02, 0.02))
            lon = clon + float(rng.uniform(-0.03, 0.03))
            payload = _created(SHOP, order, lat, lon)
            t0 = time.time()
            pub.publish(create_topic, payload)
            inbox = await watch.until(("inbox", order))
            created = watch.seen.get(("status:created", order))
            decision = watch.seen.get(("decision", order))
            if inbox is None or created is None or decision is None:
                figures.missing += 1
                continue
            figures.created_ms.append((created - t0) * 1000)
            figures.decision_ms.append((decision - t0) * 1000)
            figures.inbox_ms.append((inbox - t0) * 1000)
            cancel = ev.OrderCancelEvent(source=f"shops/{SHOP}", data=ev.OrderCancelled(order=order))
            pub.publish(cancel_topic, ev.encode(cancel))
            await watch.until(("status:cancelled", order))
            await asyncio.sleep(0.01)
        for p in service.stats.recent:
            if p.offers and p.mode == "single" and p.trigger_at and p.published_at:
                figures.in_dispatch_ms.append((p.published_at - p.trigger_at) * 1000)
                figures.read_ms.append(p.read_s * 1000)
                figures.plan_ms.append(p.plan_s * 1000)
    finally:
        stop.set()
        await task
        await pub.stop()
        await watch.conn.stop()


async def _peak(settings: Settings, figures: Figures, n_orders: int, n_riders: int, seed: int) -> None:
    orders, riders = random_instance(n_orders, n_riders, seed, ev.now())
    pub = await _connect(settings, BENCH_USER)
    try:
        for r in riders:
            # The instance's load is taken as slots already used: capacity = free slots.
            pub.publish(topics.rider_presence(r.id), _presence(r.id, max(r.capacity - r.load, 1), r.online))
            assert r.lat is not None and r.lon is not None
            pub.publish(topics.rider_location(r.id), _position(r.lat, r.lon))
        for o in orders:
            shop = f"bench-{o.shop}"
            pub.publish(
                topics.shop_command(shop, topics.Command.CREATE_ORDER),
                _created(shop, f"p-{o.id}", o.pickup_lat, o.pickup_lon),
            )
        positioned = (
            sa.select(sa.func.count())
            .select_from(m.RIDERS)
            .where(m.RIDERS.c.id.like("r%"), m.RIDERS.c.lat.is_not(None))
        )
        await _wait_store(settings.database_url, positioned, n_riders, "peak riders")
        waiting = (
            sa.select(sa.func.count())
            .select_from(m.ORDERS)
            .where(m.ORDERS.c.id.like("p-%"), m.ORDERS.c.status == "created")
        )
        await _wait_store(settings.database_url, waiting, n_orders, "peak orders")
    finally:
        await pub.stop()

    t0 = time.perf_counter()
    service, stop, task = await _start_dispatch(settings)
    try:
        deadline = time.monotonic() + 60
        first = None
        while first is None and time.monotonic() < deadline:
            first = next((p for p in service.stats.recent if p.offers), None)
            await asyncio.sleep(0.01)
        if first is None:
            raise RuntimeError("dispatch made no offers in peak mode")
        assigned = (
            sa.select(sa.func.count())
            .select_from(m.ORDERS)
            .where(m.ORDERS.c.id.like("p-%"), m.ORDERS.c.status == "assigned")
        )
        await _wait_store(settings.database_url, assigned, len(first.offers), "peak offers stored")
        committed_s = time.perf_counter() - t0
    finally:
        stop.set()
        await task
    figures.peak = {
        "orders": n_orders,
        "riders": n_riders,
        "online_riders": first.riders,
        "mode": first.mode,
        "waiting": first.waiting,
        "offers": len(first.offers),
        "pass_read_s": round(first.read_s, 4),
        "pass_plan_s": round(first.plan_s, 4),
        "pass_publish_s": round(first.publish_s, 4),
        "pass_total_s": round(first.read_s + first.plan_s + first.publish_s, 4),
        "start_to_all_offers_committed_s": round(committed_s, 3),
    }


def run(
    settings: Settings,
    *,
    orders: int = 200,
    riders: int = 50,
    peak_orders: int = 1000,
    peak_riders: int = 500,
    seed: int = 0,
) -> Figures:
    """Run both phases on a private broker and store; return the figures."""
    figures = Figures(orders=orders, riders=riders)
    # One "dispatch pass" line per order would bury the figures.
    logging.getLogger("bloomwire.dispatch").setLevel(logging.WARNING)
    if peak_orders and peak_riders:
        figures.planner = bench_batch(peak_orders, peak_riders, seed=seed)
    with private_stack(settings, BENCH_USERS, name="dispatch") as (live, _):
        if orders:
            asyncio.run(_normal(live, figures, seed))
        if peak_orders:
            asyncio.run(_peak(live, figures, peak_orders, peak_riders, seed))
    return figures


def main(
    settings: Settings,
    *,
    console: Console,
    orders: int = 200,
    riders: int = 50,
    peak_orders: int = 1000,
    peak_riders: int = 500,
    seed: int = 0,
) -> list[Report]:
    """Run, print the figures (tables, then JSON) and return the tables."""
    console.print(
        f"bench dispatch: {orders} orders one at a time over {riders} riders; "
        f"peak {peak_orders} orders x {peak_riders} riders …"
    )
    figures = run(
        settings, orders=orders, riders=riders, peak_orders=peak_orders, peak_riders=peak_riders, seed=seed
    )
    d = figures.as_dict()
    table = Report("Bloomwire dispatch benchmark (ms)", ("figure", "P50", "P95", "P99", "max"))
    labels = {
        "create_to_created_ms": "create → canonical created (persister)",
        "create_to_offer_published_ms": "create → dispatch.offered published",
        "create_to_rider_inbox_ms": "create → offer in rider inbox",
        "in_dispatch_ms": "in dispatch: event received → offer sent",
        "store_read_ms": "  of which store read",
        "rank_ms": "  of which rank + build events",
    }
    for key, label in labels.items():
        s = d["normal"][key]
        table.add(label, *(f"{s[q]:.2f}" for q in ("p50", "p95", "p99", "max")))
    console.print(table.rich())
    if d["normal"]["missing"]:
        console.print(f"[yellow]{d['normal']['missing']} orders got no offer within 10 s[/yellow]")
    peak = Report("Peak mode")
    for k, v in d["peak"].items():
        peak.add(k, v)
    for k, v in d["planner"].items():
        peak.add(f"planner.{k}", v)
    console.print(peak.rich())
    console.print_json(json.dumps(d))
    return [table, peak]
