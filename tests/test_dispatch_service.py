"""Dispatch service end to end: a real broker, the real persister and store, dispatch in-process.

The persister and dispatch run in one asyncio loop on a background thread (each with its own
broker user); the test drives shops and riders through a blocking MQTT client and reads the store
through a read-only engine. Both services share a simulated clock, so offer deadlines are passed
by moving the clock, never by sleeping. No test asserts how long anything took.
"""

from __future__ import annotations

import ast
import asyncio
import json
import math
import secrets
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import sqlalchemy as sa

import bloomwire.services.persister
from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.contract.geo import EARTH_RADIUS_M
from bloomwire.contract.lifecycle import OrderStatus
from bloomwire.runtime.mqtt import Service
from bloomwire.runtime.settings import Settings
from bloomwire.services.dispatch import NAME, DispatchConfig, DispatchService, build, decide
from bloomwire.services.dispatch.decide import Decider
from bloomwire.services.dispatch.planner import RiderCandidate, assign_greedy, assign_joint, total_cost
from bloomwire.services.dispatch.service import (
    Dispatcher,
    OverdueOffer,
    Snapshot,
    WaitingOrder,
    expired_id,
    offer_id,
)
from bloomwire.store import make_engine
from bloomwire.store import models as m

WAIT = 20.0
LAT0, LON0 = 52.5163, 13.3777
M_PER_DEG_LAT = EARTH_RADIUS_M * math.pi / 180
M_PER_DEG_LON = M_PER_DEG_LAT * math.cos(math.radians(LAT0))


def at(east_m: float, north_m: float = 0.0) -> tuple[float, float]:
    """A point ``east_m`` / ``north_m`` metres from the Brandenburg Gate."""
    return LAT0 + north_m / M_PER_DEG_LAT, LON0 + east_m / M_PER_DEG_LON


class Clock:
    """A simulated clock shared by the persister, dispatch and the test (thread-safe)."""

    def __init__(self) -> None:
        self._now = datetime.now(UTC).replace(microsecond=0)
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += timedelta(seconds=seconds)


@dataclass
class Running:
    service: Service
    stop: asyncio.Event
    task: asyncio.Task[None]


class ServiceLoop:
    """One asyncio loop on a background thread running services as tasks."""

    def __init__(self) -> None:
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Event | None = None
        self.running: list[Running] = []
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="services")
        self._thread.start()
        assert self._started.wait(10), "service loop did not start"

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        self._started.set()
        await self._done.wait()

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self, service: Service, settings: Settings) -> Running:
        async def launch() -> Running:
            stop = asyncio.Event()
            task = asyncio.create_task(service.run(settings, stop=stop))
            return Running(service, stop, task)

        running: Running = self.call(launch())
        self.running.append(running)
        deadline = time.monotonic() + WAIT
        while not service.ready.is_set():
            if running.task.done() or time.monotonic() > deadline:
                self.stop(running)
                pytest.fail(f"service {service.name} did not start")
            time.sleep(0.01)
        return running

    def stop(self, running: Running) -> None:
        async def halt() -> None:
            running.stop.set()
            await running.task

        if running in self.running:
            self.running.remove(running)
        self.call(halt())

    def close(self) -> None:
        for running in reversed(list(self.running)):
            self.stop(running)
        if self._loop is not None and self._done is not None:
            self._loop.call_soon_threadsafe(self._done.set)
        self._thread.join(30)


class World:
    """One shop, its riders and orders over a fresh store, with the persister running."""

    def __init__(
        self,
        database_url: str,
        make_settings: Callable[..., Settings],
        mqtt_user: Callable[..., tuple[str, str]],
        mqtt_client: Callable[..., Any],
    ) -> None:
        self.tag = secrets.token_hex(3)
        self.shop = f"s-{self.tag}"
        self.url = database_url
        self.clock = Clock()
        self.make_settings = make_settings
        self.mqtt_user = mqtt_user
        self.loop = ServiceLoop()
        self.dispatchers: list[Running] = []
        self.log: list[paho.MQTTMessage] = []
        self.riders: set[str] = set()
        self.orders: set[str] = set()
        self.closed = False

        user, password = mqtt_user(prefix="driver")
        self.client = mqtt_client(user, password)
        for f in (
            topics.shop_filter(self.shop),
            f"{topics.RIDERS}/+/inbox/#",
            topics.DEADLETTER,
            topics.service_events(NAME),
        ):
            self.client.subscribe(f)

        persister_user, _ = mqtt_user(prefix="persister")
        persister = bloomwire.services.persister.build(
            make_settings(persister_user, database_url=database_url), clock=self.clock
        )
        persister.session_expiry_s = 60  # a test's persistent session need not outlive it long
        self.persister = self.loop.start(persister, make_settings(persister_user, database_url=database_url))
        self.engine = make_engine(database_url, readonly=True)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.loop.close()
        finally:
            for order in self.orders:
                self.client.publish(
                    topics.order_topic(self.shop, order, topics.OrderChannel.STATE), b"", retain=True
                )
            for rider in self.riders:
                self.client.publish(topics.shop_rider_state(self.shop, rider), b"", retain=True)
            self.engine.dispose()

    # --- services ---------------------------------------------------------------------------

    def start_dispatch(self, username: str | None = None, **options: Any) -> DispatchService:
        options.setdefault("clock", self.clock)
        options.setdefault("tick_s", 0.1)
        name = username or self.mqtt_user(prefix="dispatch")[0]
        settings = self.make_settings(name, database_url=self.url)
        service = build(settings, **options)
        self.dispatchers.append(self.loop.start(service, settings))
        return service

    def stop_dispatch(self) -> None:
        self.loop.stop(self.dispatchers.pop())

    def passes(self, service: DispatchService, n: int = 2) -> None:
        """Wait until ``service`` has completed ``n`` more passes."""
        target = service.stats.passes + n
        self.wait(lambda: service.stats.passes >= target, f"{n} dispatch passes")

    # --- the store --------------------------------------------------------------------------

    def order(self, order: str) -> dict[str, Any]:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(m.ORDERS).where(m.ORDERS.c.id == order)).one()
        return dict(row._mapping)

    def rider(self, rider: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(m.RIDERS).where(m.RIDERS.c.id == rider)).first()
        return dict(row._mapping) if row is not None else None

    def offers(self, order: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(m.OFFERS).where(m.OFFERS.c.order_id == order)).all()
        return [dict(r._mapping) for r in rows]

    def offer(self, offer: str) -> dict[str, Any]:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(m.OFFERS).where(m.OFFERS.c.id == offer)).one()
        return dict(row._mapping)

    def wait(self, cond: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = cond()
            except sa.exc.NoResultFound:
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}")
            time.sleep(0.02)

    def wait_offered(self, order: str, *, after: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
        """Wait until ``order`` holds a pending offer not in ``after``; return the offer row."""

        def current() -> dict[str, Any] | None:
            o = self.order(order)
            if o["status"] == "assigned" and o["offer_id"] and o["offer_id"] not in after:
                return self.offer(o["offer_id"])
            return None

        found: dict[str, Any] = self.wait(current, f"a new offer of {order}")
        return found

    def wait_status(self, order: str, status: str) -> dict[str, Any]:
        found: dict[str, Any] = self.wait(
            lambda: (o := self.order(order))["status"] == status and o, f"{order} to be {status}"
        )
        return found

    # --- MQTT -------------------------------------------------------------------------------

    def pump(self) -> None:
        while not self.client.messages.empty():
            self.log.append(self.client.messages.get_nowait())

    def mark(self) -> int:
        self.pump()
        return len(self.log)

    def messages(self, topic: str, since: int = 0) -> list[paho.MQTTMessage]:
        self.pump()
        return [msg for msg in self.log[since:] if msg.topic == topic]

    def wait_message(self, topic: str, since: int = 0, what: str = "") -> Any:
        found = self.wait(lambda: self.messages(topic, since), what or f"a message on {topic}")
        return json.loads(found[0].payload)

    def errors(self, rider: str, since: int = 0) -> list[str]:
        return [
            json.loads(msg.payload)["reason"]
            for msg in self.messages(topics.rider_inbox(rider, topics.Inbox.ERRORS), since)
        ]

    def wait_error(self, rider: str, since: int) -> str:
        reasons: list[str] = self.wait(lambda: self.errors(rider, since), f"an error for {rider}")
        return reasons[0]

    def send(self, topic: str, event: Any) -> Any:
        self.client.publish(topic, ev.encode(event) if not isinstance(event, bytes) else event)
        return event

    def rider_id(self, n: int) -> str:
        rider = f"r{n}-{self.tag}"
        self.riders.add(rider)
        return rider

    def online(
        self,
        rider: str,
        east_m: float,
        north_m: float = 0.0,
        *,
        capacity: int | None = None,
        presence: str = "online",
        age_s: float = 0,
    ) -> None:
        """Rider presence (with capacity) and a position; waits until the store has both."""
        status = ev.Presence(presence)
        self.send(
            topics.rider_presence(rider),
            ev.RiderPresenceChangedEvent(
                source=f"riders/{rider}", data=ev.RiderPresence(status=status, capacity=capacity)
            ),
        )
        self.locate(rider, east_m, north_m, age_s=age_s)
        self.wait(
            lambda: (
                (r := self.rider(rider)) is not None
                and r["presence"] == presence
                and r["lat"] is not None
                and (capacity is None or r["capacity"] == capacity)
            ),
            f"rider {rider} in the store",
        )

    def locate(self, rider: str, east_m: float, north_m: float = 0.0, *, age_s: float = 0) -> None:
        lat, lon = at(east_m, north_m)
        tst = int((self.clock() - timedelta(seconds=age_s)).timestamp())
        self.client.publish(topics.rider_location(rider), json.dumps({"lat": lat, "lon": lon, "tst": tst}))

    def create(self, n: int, east_m: float, north_m: float = 0.0, *, wait: bool = True) -> str:
        order = f"o{n}-{self.tag}"
        self.orders.add(order)
        lat, lon = at(east_m, north_m)
        now = self.clock()
        self.send(
            topics.shop_command(self.shop, topics.Command.CREATE_ORDER),
            ev.OrderCreateEvent(
                source=f"shops/{self.shop}",
                data=ev.OrderCreated(
                    order=order,
                    customer=ev.Customer(name="Ada", lat=lat, lon=lon),
                    window=ev.Window(start=now, end=now + timedelta(hours=2)),
                    pickup_lat=lat,
                    pickup_lon=lon,
                ),
            ),
        )
        if wait:
            self.wait(lambda: self.order(order), f"order {order} in the store")
        return order

    def reply(
        self, rider: str, offer: str, order: str, *, accept: bool, event_id: str | None = None
    ) -> ev.DispatchReplyEvent:
        event = ev.DispatchReplyEvent(
            id=event_id or ev.new_id(),
            source=f"riders/{rider}",
            data=ev.DispatchReply(offer=offer, order=order, accept=accept),
        )
        return self.send(topics.rider_replies(rider), event)  # type: ignore[no-any-return]

    def report(self, rider: str, order: str, status: OrderStatus) -> None:
        self.send(
            topics.rider_order_status(rider, order),
            ev.OrderStatusChangedEvent(
                source=f"riders/{rider}", data=ev.OrderStatusChanged(order=order, status=status)
            ),
        )


@pytest.fixture
def make_world(
    make_settings: Callable[..., Settings],
    mqtt_user: Callable[..., tuple[str, str]],
    mqtt_client: Callable[..., Any],
    tmp_path: Any,
) -> Iterator[Callable[[str], World]]:
    made: list[World] = []

    def make(database_url: str = "") -> World:
        world = World(
            database_url or f"sqlite:///{tmp_path / 'store.db'}", make_settings, mqtt_user, mqtt_client
        )
        made.append(world)
        return world

    yield make
    for world in made:
        world.close()


@pytest.fixture
def world(make_world: Callable[[str], World]) -> Iterator[World]:
    """A world on SQLite."""
    w = make_world("")
    yield w
    w.close()


@pytest.fixture
def any_world(database_url: str, make_world: Callable[[str], World]) -> Iterator[World]:
    """A world on SQLite and on PostgreSQL (``database_url`` outlives it)."""
    w = make_world(database_url)
    yield w
    w.close()


# --- normal mode ----------------------------------------------------------------------------------


def test_nearest_available_rider_gets_the_offer(any_world: World) -> None:
    w = any_world
    near, far = w.rider_id(1), w.rider_id(2)
    w.online(near, 800)
    w.online(far, 2500)
    dispatch = w.start_dispatch()
    since = w.mark()
    order = w.create(1, 0)

    offer = w.wait_offered(order)
    assert offer["rider"] == near
    assert offer["mode"] == "single"
    assert offer["id"] == offer_id(order, 0)
    assert offer["deadline"] == w.order(order)["offer_deadline"]
    assert [c["rider"] for c in offer["candidates"]] == [near, far]
    assert offer["candidates"][0]["cost"] < offer["candidates"][1]["cost"]
    assert "cheapest of 2 eligible" in offer["candidates"][0]["note"]
    assert offer["cost"] == offer["candidates"][0]["cost"]
    # The rider receives the offer (without the candidate list) in its inbox, with where to go.
    to_rider = w.wait_message(topics.rider_inbox(near, topics.Inbox.OFFERS), since)
    assert to_rider["data"]["offer"] == offer["id"]
    assert to_rider["data"].get("candidates", []) == []
    row = w.order(order)
    pickup, dropoff = to_rider["data"]["pickup"], to_rider["data"]["dropoff"]
    assert (pickup["lat"], pickup["lon"]) == (row["pickup_lat"], row["pickup_lon"])
    assert (dropoff["lat"], dropoff["lon"]) == (row["lat"], row["lon"])
    # The shop sees the canonical status event.
    status = w.wait_message(topics.order_topic(w.shop, order, topics.OrderChannel.STATUS), since)
    assert status["data"]["status"] == "created"

    w.reply(near, offer["id"], order, accept=True)
    accepted = w.wait_status(order, "accepted")
    assert accepted["rider"] == near
    w.passes(dispatch)
    assert len(w.offers(order)) == 1  # an accepted order is left alone


def test_offline_stale_and_full_riders_are_skipped(world: World) -> None:
    w = world
    busy, offline, stale, free = w.rider_id(1), w.rider_id(2), w.rider_id(3), w.rider_id(4)
    w.online(busy, 100, capacity=1)
    w.start_dispatch()
    first = w.create(1, 0)
    offer = w.wait_offered(first)
    assert offer["rider"] == busy
    w.reply(busy, offer["id"], first, accept=True)
    w.wait_status(first, "accepted")
    w.wait(lambda: w.rider(busy)["load"] == 1, "busy rider's load")  # type: ignore[index]

    w.online(offline, 50, presence="offline")
    w.online(stale, 80, age_s=600)
    w.online(free, 3000)
    second = w.create(2, 0)
    offer = w.wait_offered(second)
    assert offer["rider"] == free
    note = offer["candidates"][0]["note"]
    assert "full" in note
    assert "offline" in note
    assert "position stale" in note
    assert [c["rider"] for c in offer["candidates"]] == [free]


def test_decline_and_timeout_move_on_and_exhausted_orders_wait_for_riders(any_world: World) -> None:
    w = any_world
    r1, r2, r3, r4 = (w.rider_id(i) for i in range(1, 5))
    w.online(r1, 500)
    w.online(r2, 1000)
    w.online(r3, 1500)
    dispatch = w.start_dispatch()
    order = w.create(1, 0)

    first = w.wait_offered(order)
    assert first["rider"] == r1
    w.reply(r1, first["id"], order, accept=False)
    second = w.wait_offered(order, after={first["id"]})
    assert second["rider"] == r2
    assert second["id"] == offer_id(order, 1)
    assert r1 not in [c["rider"] for c in second["candidates"]]

    w.clock.advance(50)  # r2 lets the offer run out; dispatch's tick notices
    third = w.wait_offered(order, after={first["id"], second["id"]})
    assert third["rider"] == r3
    assert w.offer(second["id"])["status"] == "expired"
    assert w.offer(first["id"])["status"] == "declined"
    assert w.order(order)["declined_by"] == [r1, r2]

    w.reply(r3, third["id"], order, accept=False)
    w.wait_status(order, "declined")
    w.passes(dispatch, 3)  # nobody left: the order waits, nobody is asked twice
    assert w.order(order)["status"] == "declined"
    assert len(w.offers(order)) == 3

    w.online(r4, 4000)  # a rider becomes available: the order is offered again
    fourth = w.wait_offered(order, after={first["id"], second["id"], third["id"]})
    assert fourth["rider"] == r4


# --- replies the persister refuses ----------------------------------------------------------------


def test_late_accept_is_refused(world: World) -> None:
    w = world
    r1, r2 = w.rider_id(1), w.rider_id(2)
    w.online(r1, 300)
    w.online(r2, 900)
    w.start_dispatch()
    order = w.create(1, 0)
    offer = w.wait_offered(order)
    assert offer["rider"] == r1

    w.clock.advance(60)
    since = w.mark()
    w.reply(r1, offer["id"], order, accept=True)
    reason = w.wait_error(r1, since)
    assert "expired" in reason
    nxt = w.wait_offered(order, after={offer["id"]})
    assert nxt["rider"] == r2
    assert w.offer(offer["id"])["status"] == "expired"


def test_two_riders_cannot_both_get_an_order(world: World) -> None:
    w = world
    r1, r2 = w.rider_id(1), w.rider_id(2)
    w.online(r1, 300)
    w.online(r2, 400)
    w.start_dispatch()
    order = w.create(1, 0)
    offer = w.wait_offered(order)
    assert offer["rider"] == r1

    since = w.mark()
    w.reply(r2, offer["id"], order, accept=True)  # r2 grabs r1's offer
    assert "another rider" in w.wait_error(r2, since)
    assert w.order(order)["status"] == "assigned"

    w.reply(r1, offer["id"], order, accept=True)
    w.wait_status(order, "accepted")
    since = w.mark()
    w.reply(r2, offer["id"], order, accept=True)
    w.reply(r1, offer["id"], order, accept=True)  # a second accept, new event id
    assert "another rider" in w.wait_error(r2, since)
    assert "already accepted" in w.wait_error(r1, since)
    final = w.order(order)
    assert (final["status"], final["rider"]) == ("accepted", r1)


def test_bad_replies_are_refused_with_a_reason_and_change_nothing(world: World) -> None:
    w = world
    r1, r2 = w.rider_id(1), w.rider_id(2)
    w.online(r1, 300)
    w.online(r2, 900)
    w.start_dispatch()
    order = w.create(1, 0)
    other = w.create(2, 5000)
    offer = w.wait_offered(order)
    w.wait_offered(other)
    assert offer["rider"] == r1
    before = w.order(order)

    cases: list[tuple[bytes | ev.DispatchReplyEvent, str]] = [
        (
            ev.DispatchReplyEvent(
                source=f"riders/{r1}",
                data=ev.DispatchReply(offer="no-such-offer", order=order, accept=True),
            ),
            "unknown offer",
        ),
        (
            ev.DispatchReplyEvent(
                source=f"riders/{r1}", data=ev.DispatchReply(offer=offer["id"], order=other, accept=True)
            ),
            "is for order",
        ),
        (
            ev.DispatchReplyEvent(
                source=f"riders/{r2}", data=ev.DispatchReply(offer=offer["id"], order=order, accept=True)
            ),
            "does not match the sender",
        ),
        (b'{"type": "dispatch.reply", "data": ', "not JSON"),
        (
            json.dumps(
                {"specversion": "1.0", "type": "dispatch.reply", "source": f"riders/{r1}", "data": {}}
            ).encode(),
            "data.offer",
        ),
        (
            ev.encode(ev.OrderChatPostedEvent(source=f"riders/{r1}", data=ev.OrderChat(text="hi"))),
            "not accepted",
        ),
    ]
    for payload, expected in cases:
        since = w.mark()
        w.send(topics.rider_replies(r1), payload)
        reason = w.wait_error(r1, since)
        assert expected in reason, (expected, reason)
    after = w.order(order)
    assert (after["status"], after["rider"], after["offer_id"]) == (
        before["status"],
        before["rider"],
        before["offer_id"],
    )

    accept = w.reply(r1, offer["id"], order, accept=True)
    w.wait_status(order, "accepted")
    since = w.mark()
    w.send(topics.rider_replies(r1), accept)  # the very same event again: acknowledged, not reapplied
    acks = w.wait(
        lambda: [
            json.loads(msg.payload)
            for msg in w.messages(topics.rider_inbox(r1, topics.Inbox.ACKS), since)
            if accept.id in json.loads(msg.payload)["ids"]
        ],
        "the duplicate to be acknowledged",
    )
    assert acks
    assert w.errors(r1, since) == []
    w.reply(r1, offer["id"], order, accept=True)  # another accept, new event id
    assert "already accepted" in w.wait_error(r1, since)
    assert w.order(order)["status"] == "accepted"


# --- restarts, re-sends, manual override ----------------------------------------------------------


def test_dispatch_restarted_mid_offer_resumes(world: World) -> None:
    w = world
    r1, r2 = w.rider_id(1), w.rider_id(2)
    w.online(r1, 300)
    w.online(r2, 900)
    name = w.mqtt_user(prefix="dispatch")[0]
    w.start_dispatch(name)
    order = w.create(1, 0)
    offer = w.wait_offered(order)
    assert offer["rider"] == r1
    w.stop_dispatch()

    again = w.start_dispatch(name)
    w.passes(again, 3)
    assert [o["id"] for o in w.offers(order)] == [offer["id"]]  # the pending offer is left alone
    assert again.stats.offers == 0

    w.clock.advance(50)
    nxt = w.wait_offered(order, after={offer["id"]})
    assert nxt["rider"] == r2
    assert again.stats.expired == 1


def test_resent_decision_has_the_same_ids_and_is_stored_once(world: World) -> None:
    """A dispatch that crashed after publishing, before the persister committed, decides the same
    offer again with the same event id; the persister keeps it once."""
    w = world
    r1 = w.rider_id(1)
    w.online(r1, 300)
    order = w.create(1, 0)

    def decide() -> ev.DispatchOfferedEvent:
        engine = make_engine(w.url, readonly=True)
        try:
            fresh = Dispatcher(engine, clock=w.clock)
            result = fresh.decide(fresh.read(w.clock()), w.clock())
        finally:
            engine.dispose()
        assert len(result.offers) == 1
        return result.offers[0]

    first, second = decide(), decide()
    assert first.id == second.id == first.data.offer == offer_id(order, 0)
    assert first.data == second.data
    since = w.mark()
    topic = topics.service_events(NAME)
    w.send(topic, first)
    w.wait_offered(order)
    w.send(topic, second)
    w.send(topic, first)
    marker = w.create(2, 9000)  # processed after the re-sends
    assert w.order(marker)
    assert len(w.offers(order)) == 1
    assert w.messages(topics.DEADLETTER, since) == []
    with w.engine.connect() as conn:
        stored = conn.execute(
            sa.select(sa.func.count()).select_from(m.EVENTS).where(m.EVENTS.c.id == first.id)
        ).scalar_one()
    assert stored == 1


def test_manual_assignment_overrides_dispatch(world: World) -> None:
    w = world
    r1, r2 = w.rider_id(1), w.rider_id(2)
    w.online(r1, 200)
    w.online(r2, 3000)
    dispatch = w.start_dispatch()
    order = w.create(1, 0)
    auto = w.wait_offered(order)
    assert auto["rider"] == r1

    w.send(
        topics.shop_command(w.shop, topics.Command.ASSIGN),
        ev.OrderAssignEvent(source=f"shops/{w.shop}", data=ev.OrderAssigned(order=order, rider=r2)),
    )
    manual = w.wait_offered(order, after={auto["id"]})
    assert (manual["rider"], manual["mode"]) == (r2, "manual")
    assert w.offer(auto["id"])["status"] == "superseded"
    w.passes(dispatch, 3)
    assert len(w.offers(order)) == 2  # dispatch does not fight the shop

    since = w.mark()
    w.reply(r1, auto["id"], order, accept=True)
    assert "already superseded" in w.wait_error(r1, since)
    w.reply(r2, manual["id"], order, accept=True)
    accepted = w.wait_status(order, "accepted")
    assert accepted["rider"] == r2
    w.passes(dispatch, 2)
    assert len(w.offers(order)) == 2


# --- peak mode ------------------------------------------------------------------------------------


def test_peak_assigns_jointly_and_beats_greedy(any_world: World) -> None:
    """Three orders wait when dispatch starts: it assigns them jointly (mode "batch").

    Orders A (x=0), B (x=2 km), C (x=10 km); riders R1 (x=1 km), R2 (x=-1.5 km), R3 (x=10 km),
    one order each. Oldest-first greedy gives A the nearest rider R1 and leaves B to R2 3.5 km
    away; the joint assignment sends R2 to A and R1 to B (2.5 km in all instead of 4.5 km).
    """
    w = any_world
    r1, r2, r3 = w.rider_id(1), w.rider_id(2), w.rider_id(3)
    w.online(r1, 1000, capacity=1)
    w.online(r2, -1500, capacity=1)
    w.online(r3, 10_000, capacity=1)
    a, b, c = w.create(1, 0), w.create(2, 2000), w.create(3, 10_000)

    engine = make_engine(w.url, readonly=True)
    try:
        reader = Dispatcher(engine, clock=w.clock)
        snap = reader.read(w.clock())
    finally:
        engine.dispose()
    requests = [o.request() for o in snap.orders if o.id in {a, b, c}]
    greedy = {x.order: x.rider for x in assign_greedy(requests, snap.riders, w.clock())}
    joint = assign_joint(requests, snap.riders, w.clock())
    assert greedy == {a: r1, b: r2, c: r3}
    assert total_cost(joint) < total_cost(assign_greedy(requests, snap.riders, w.clock()))

    w.start_dispatch()
    offers = {o: w.wait_offered(o) for o in (a, b, c)}
    assert {o: x["rider"] for o, x in offers.items()} == {a: r2, b: r1, c: r3}
    assert {x["mode"] for x in offers.values()} == {"batch"}
    assert "joint assignment: 3 of 3 waiting orders" in offers[a]["candidates"][0]["note"]
    assert {x.order: x.rider for x in joint} == {a: r2, b: r1, c: r3}


# --- what the customer sees -----------------------------------------------------------------------


def test_customer_sees_position_only_between_pickup_and_delivery(world: World) -> None:
    w = world
    r1 = w.rider_id(1)
    w.online(r1, 300)
    w.start_dispatch()
    order = w.create(1, 0)
    offer = w.wait_offered(order)
    w.reply(r1, offer["id"], order, accept=True)
    w.wait_status(order, "accepted")
    location = topics.order_topic(w.shop, order, topics.OrderChannel.LOCATION)
    state_topic = topics.order_topic(w.shop, order, topics.OrderChannel.STATE)

    since = w.mark()
    w.locate(r1, 200)  # accepted, not picked up: private
    w.report(r1, order, OrderStatus.PICKED_UP)
    w.wait_status(order, "picked_up")
    w.locate(r1, 100)
    seen = w.wait_message(location, since)
    assert seen["rider"] == r1
    assert (seen["position"]["lat"], seen["position"]["lon"]) == pytest.approx(at(100))

    w.report(r1, order, OrderStatus.EN_ROUTE)
    w.locate(r1, 50)
    w.wait(lambda: len(w.messages(location, since)) >= 2, "a second location")
    w.report(r1, order, OrderStatus.DELIVERED)
    w.wait_status(order, "delivered")
    w.locate(r1, 400)  # delivered: private again
    w.wait(lambda: w.rider(r1)["lat"] == pytest.approx(at(400)[0]), "the last position stored")  # type: ignore[index]
    w.send(
        topics.shop_command(w.shop, topics.Command.CHAT),
        ev.OrderChatPostedEvent(source=f"shops/{w.shop}", data=ev.OrderChat(order=order, text="thanks")),
    )
    w.wait_message(topics.order_topic(w.shop, order, topics.OrderChannel.CHAT), since)
    positions = [json.loads(msg.payload)["position"]["lon"] for msg in w.messages(location, since)]
    assert positions == pytest.approx([at(100)[1], at(50)[1]])
    states = [json.loads(msg.payload) for msg in w.messages(state_topic, since)]
    assert states[-1]["status"] == "delivered"
    assert "position" not in states[-1]


# --- the decisions without a broker ---------------------------------------------------------------

NOW = datetime(2027, 2, 14, 9, 30, tzinfo=UTC)


def _rider(rid: str, east_m: float, *, capacity: int = 3, load: int = 0) -> RiderCandidate:
    lat, lon = at(east_m)
    return RiderCandidate(
        id=rid,
        lat=lat,
        lon=lon,
        load=load,
        capacity=capacity,
        online=True,
        on_duty=True,
        position_at=NOW - timedelta(seconds=5),
        speed_kmh=None,
        last_decline_at=None,
        idle_since=None,
    )


def _waiting(oid: str, east_m: float, *, attempt: int = 0, age_s: float = 0) -> WaitingOrder:
    lat, lon = at(east_m)
    return WaitingOrder(
        id=oid,
        shop="s1",
        status="created",
        lat=lat + 0.01,
        lon=lon,
        pickup_lat=lat,
        pickup_lon=lon,
        declined_by=(),
        created_at=NOW - timedelta(seconds=age_s),
        attempt=attempt,
    )


@pytest.fixture
def dispatcher() -> Decider:
    # The decision alone: no store, no clock but the ``now`` and ``mono`` each call is given.
    return Decider(DispatchConfig(resend_after_s=5.0))


def test_sent_offers_hold_the_order_and_the_riders_slot_until_the_store_shows_them(
    dispatcher: Decider,
) -> None:
    riders = [_rider("near", 100, capacity=1), _rider("far", 3000)]
    first = Snapshot([_waiting("o1", 0, age_s=10)], riders, 0, [])
    sent = dispatcher.decide(first, NOW, mono=0.0)
    assert [(o.data.order, o.data.rider, o.id) for o in sent.offers] == [("o1", "near", offer_id("o1", 0))]
    assert sent.offers[0].data.deadline == NOW + timedelta(seconds=45)

    # The persister has not applied it yet: o1 is left alone and near's only slot is taken.
    second = Snapshot([_waiting("o1", 0, age_s=10), _waiting("o2", 0)], riders, 0, [])
    again = dispatcher.decide(second, NOW, mono=1.0)
    assert [(o.data.order, o.data.rider) for o in again.offers] == [("o2", "far")]

    # Still not in the store after resend_after_s: the same decision, the same id, again.
    late = dispatcher.decide(Snapshot([_waiting("o1", 0)], riders, 0, []), NOW, mono=7.0)
    assert [o.id for o in late.offers] == [offer_id("o1", 0)]

    # Refused by the persister: re-planned at the next pass, same attempt, same id.
    dispatcher.refused(offer_id("o1", 0))
    retry = dispatcher.decide(Snapshot([_waiting("o1", 0)], riders, 0, []), NOW, mono=7.5)
    assert [o.id for o in retry.offers] == [offer_id("o1", 0)]

    # The store moved on (the offer was stored, then declined): a new attempt, a new id.
    moved = dispatcher.decide(Snapshot([_waiting("o1", 0, attempt=1)], riders, 0, []), NOW, mono=8.0)
    assert [o.id for o in moved.offers] == [offer_id("o1", 1)]


def test_overdue_offers_expire_once_per_resend_window(dispatcher: Decider) -> None:
    overdue = [OverdueOffer("of1", "o1", "r1", NOW - timedelta(seconds=1))]
    snap = Snapshot([], [], 0, overdue)
    first = dispatcher.decide(snap, NOW, mono=0.0)
    assert [(e.id, e.data.offer, e.data.rider) for e in first.expired] == [(expired_id("of1"), "of1", "r1")]
    assert dispatcher.decide(snap, NOW, mono=1.0).expired == []
    assert [e.id for e in dispatcher.decide(snap, NOW, mono=6.0).expired] == [expired_id("of1")]


def test_peak_threshold_switches_to_batch_mode(dispatcher: Decider) -> None:
    riders = [_rider("r1", 1000, capacity=1), _rider("r2", -1500, capacity=1), _rider("r3", 10_000)]
    two = Snapshot([_waiting("a", 0, age_s=30), _waiting("b", 2000, age_s=20)], riders, 0, [])
    single = dispatcher.decide(two, NOW, mono=0.0)
    assert single.mode == "single"
    assert {o.data.order: o.data.rider for o in single.offers} == {"a": "r1", "b": "r2"}

    fresh = Decider(DispatchConfig())
    three = Snapshot([*two.orders, _waiting("c", 10_000, age_s=10)], riders, 2, [])
    batch = fresh.decide(three, NOW, mono=0.0)
    assert batch.mode == "batch"
    assert {o.data.order: o.data.rider for o in batch.offers} == {"a": "r2", "b": "r1", "c": "r3"}
    assert {o.data.mode for o in batch.offers} == {"batch"}
    note = batch.offers[0].data.candidates[0].note
    assert "joint assignment: 3 of 3 waiting orders" in note
    assert "2 offline riders" in note


def test_pickup_falls_back_to_the_delivery_address() -> None:
    order = replace(_waiting("o1", 0), pickup_lat=None, pickup_lon=None)
    request = order.request()
    assert (request.pickup_lat, request.pickup_lon) == (order.lat, order.lon)
    assert _waiting("o1", 0).request().pickup_lat == at(0)[0]


def test_the_decision_imports_nothing_that_does_io() -> None:
    # decide.py decides over what reads.py read; the store and the broker stay in reads/passes.
    tree = ast.parse(Path(decide.__file__).read_text())
    imported = {n.name for i in ast.walk(tree) if isinstance(i, ast.Import) for n in i.names}
    imported |= {i.module or "" for i in ast.walk(tree) if isinstance(i, ast.ImportFrom)}
    io = {"sqlalchemy", "paho", "asyncio", "apscheduler", "bloomwire.store", "bloomwire.runtime.mqtt"}
    assert {name for name in imported if any(name == x or name.startswith(f"{x}.") for x in io)} == set()
    assert "bloomwire.services.dispatch.reads" in imported  # it does import what it decides over
