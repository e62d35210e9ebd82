"""The persister (DESIGN §1, §2, §4): validate, store each event once, then publish.

Two levels, both on SQLite and PostgreSQL (the ``database_url`` fixture):

* :class:`Projector` driven directly (fast): lifecycle, projections, dedupe, every refusal with its
  dead letter, customer chat routing, trail down-sampling, restart reload, commit failure.
* The real service against a real Mosquitto (``fresh_broker``), run in a thread of this process:
  canonical topics only after the commit, retained snapshots for late subscribers, error inboxes,
  restart with republished snapshots.

The crash and offline guarantees (SIGKILL mid-stream, events published while down) run the
persister as a child process in ``test_persister_reliability.py``; ``bloomwire history`` is in
``test_history.py``. Both reuse the builders below.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import sqlalchemy as sa
from conftest import Broker, MqttTestClient
from pydantic import BaseModel
from sqlalchemy import Engine

from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.errors import TopicError
from bloomwire.runtime.mqtt import Service
from bloomwire.runtime.settings import Settings
from bloomwire.services.persister import build
from bloomwire.services.persister.projector import BatchResult, Inbound, Outbound, Projector
from bloomwire.services.persister.riders import (
    LOCATION_EXPIRY_S,
    STATE_REFRESH_FROM_LOCATION_S,
    TRAIL_MIN_DISTANCE_M,
    TRAIL_MIN_INTERVAL_S,
)
from bloomwire.store import open_store
from bloomwire.store.models import CHAT, DEAD_LETTERS, EVENTS, OFFERS, ORDERS, RIDERS, TRAIL

MakeUser = Callable[..., tuple[str, str]]
MakeClient = Callable[..., MqttTestClient]
MakeSettings = Callable[..., Settings]

SHOP = "s1"
#: Degrees of latitude per metre (good enough for test geometry anywhere).
DEG_PER_M = 1 / 111_195
BASE_LAT, BASE_LON = 52.5200, 13.4050


# --- messages as devices send them ---------------------------------------------------------------


@dataclass(frozen=True)
class Msg:
    """One inbound MQTT message: topic, payload and (if it has one) the event id."""

    topic: str
    payload: bytes
    id: str | None = None


def _event(topic: str, event: BaseModel) -> Msg:
    return Msg(topic, ev.encode(event), getattr(event, "id", None))


def raw(topic: str, payload: bytes, event_id: str | None = None) -> Msg:
    """A message whose payload is given as is (bad JSON, failing models)."""
    return Msg(topic, payload, event_id)


def create_order(
    shop: str,
    order: str,
    *,
    customer_username: str | None = None,
    name: str = "Ann",
    lat: float = BASE_LAT + 0.01,
    lon: float = BASE_LON,
) -> Msg:
    """``shops/S/commands/create-order`` with a two-hour promised window from now."""
    start = ev.now()
    data = ev.OrderCreated(
        order=order,
        customer=ev.Customer(name=name, address=f"{order} Rosenweg 1", lat=lat, lon=lon),
        window=ev.Window(start=start, end=start + timedelta(hours=2)),
        items=["12 red roses"],
        customer_username=customer_username,
    )
    return _event(
        topics.shop_command(shop, "create-order"), ev.OrderCreateEvent(source=f"shops/{shop}", data=data)
    )


def cancel_order(shop: str, order: str, reason: str = "customer changed their mind") -> Msg:
    """``shops/S/commands/cancel-order``."""
    data = ev.OrderCancelled(order=order, reason=reason)
    return _event(
        topics.shop_command(shop, "cancel-order"), ev.OrderCancelEvent(source=f"shops/{shop}", data=data)
    )


def offer(
    order: str,
    rider: str,
    *,
    offer_id: str | None = None,
    deadline: datetime | None = None,
    service: str = "dispatch",
) -> Msg:
    """A ``dispatch.offered`` on ``services/N/events`` (deadline: an hour from now)."""
    data = ev.DispatchOffer(
        offer=offer_id or f"of-{order}",
        order=order,
        rider=rider,
        deadline=deadline or ev.now() + timedelta(hours=1),
        cost=120.0,
        candidates=[ev.Candidate(rider=rider, cost=120.0)],
    )
    return _event(
        topics.service_events(service), ev.DispatchOfferedEvent(source=f"services/{service}", data=data)
    )


def reply(rider: str, offer_id: str, order: str, *, accept: bool = True, source: str | None = None) -> Msg:
    """A ``dispatch.reply`` on ``riders/R/replies``."""
    data = ev.DispatchReply(offer=offer_id, order=order, accept=accept)
    return _event(
        topics.rider_replies(rider), ev.DispatchReplyEvent(source=source or f"riders/{rider}", data=data)
    )


def status(
    rider: str,
    order: str,
    new: str,
    *,
    reason: str | None = None,
    source: str | None = None,
    data_order: str | None = None,
) -> Msg:
    """A status the rider reports on ``riders/R/orders/O/status``."""
    data = ev.OrderStatusChanged.model_validate(
        {"order": data_order or order, "status": new, "reason": reason}
    )
    event = ev.OrderStatusChangedEvent(source=source or f"riders/{rider}", data=data)
    return _event(topics.rider_order_status(rider, order), event)


def chat(rider: str, order: str, text: str, *, source: str | None = None, event_id: str | None = None) -> Msg:
    """A rider's chat line on ``riders/R/orders/O/chat``."""
    event = ev.OrderChatPostedEvent(
        source=source or f"riders/{rider}", data=ev.OrderChat(order=order, text=text)
    )
    if event_id is not None:
        event = event.model_copy(update={"id": event_id})
    return _event(topics.rider_order_chat(rider, order), event)


def customer_chat(customer: str, text: str, *, order: str | None = None, source: str | None = None) -> Msg:
    """A customer's chat line on ``customers/C/chat``."""
    event = ev.OrderChatPostedEvent(
        source=source or f"customers/{customer}", data=ev.OrderChat(order=order, text=text)
    )
    return _event(topics.customer_chat(customer), event)


def service_chat(service: str, order: str, text: str) -> Msg:
    """A service writing to an order's chat (e.g. the after-delivery follow-up)."""
    event = ev.OrderChatPostedEvent(source=f"services/{service}", data=ev.OrderChat(order=order, text=text))
    return _event(topics.service_events(service), event)


def location(rider: str, lat: float, lon: float, tst: int, *, vel: float | None = None) -> Msg:
    """A ``rider.location_reported`` CloudEvent on ``riders/R/location``."""
    data = ev.RiderLocation(lat=lat, lon=lon, tst=tst, vel=vel)
    return _event(
        topics.rider_location(rider), ev.RiderLocationReportedEvent(source=f"riders/{rider}", data=data)
    )


def raise_alert(order: str, alert_id: str, message: str, *, shop: str = SHOP) -> Msg:
    """An ``alert.raised`` from the alerts service."""
    data = ev.AlertRaised(
        alert=alert_id,
        rule=ev.AlertRule.OVERDUE,
        severity=ev.Severity.WARNING,
        shop=shop,
        order=order,
        message=message,
    )
    return _event(topics.service_events("alerts"), ev.AlertRaisedEvent(source="services/alerts", data=data))


def ack_alert(shop: str, alert_id: str) -> Msg:
    """``shops/S/commands/ack-alert``."""
    data = ev.AlertAcknowledged(alert=alert_id, by="Mia")
    return _event(
        topics.shop_command(shop, "ack-alert"), ev.AlertAcknowledgeEvent(source=f"shops/{shop}", data=data)
    )


def accepted_order(shop: str, order: str, rider: str, **create: Any) -> list[Msg]:
    """Create ``order``, offer it to ``rider`` (offer ``of-<order>``) and accept it."""
    return [
        create_order(shop, order, **create),
        offer(order, rider),
        reply(rider, f"of-{order}", order),
    ]


def tst_now() -> int:
    """An OwnTracks ``tst`` (epoch seconds) for now."""
    return int(time.time())


# --- the projector, driven directly -------------------------------------------------------------------


class Clock:
    """The persister's clock: real time plus an offset the test can advance."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return ev.now() + self.offset

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        self.offset += timedelta(seconds=seconds)


def on(result: BatchResult, topic: str) -> list[Outbound]:
    """The messages ``result`` publishes on ``topic``."""
    return [o for o in result.outbound if o.topic == topic]


def payloads(result: BatchResult, topic: str) -> list[dict[str, Any]]:
    """The JSON payloads ``result`` publishes on ``topic``."""
    return [json.loads(o.payload) for o in on(result, topic)]


def acked_ids(result: BatchResult, inbox_topic: str) -> list[str]:
    """Every id acknowledged on ``inbox_topic`` (``riders/R/inbox/acks``, ...)."""
    return [i for p in payloads(result, inbox_topic) for i in p["ids"]]


def refusals(result: BatchResult) -> list[str]:
    """The reasons of every refusal in ``result`` (for assertion messages)."""
    return [p["reason"] for p in payloads(result, topics.DEADLETTER)]


def rows(engine: Engine, table: sa.Table, *where: Any) -> list[dict[str, Any]]:
    """Rows of ``table`` as dicts."""
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.select(table).where(*where))]


def count(engine: Engine, table: sa.Table, *where: Any) -> int:
    """How many rows of ``table`` match."""
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table).where(*where)).scalar_one())


class Desk:
    """A :class:`Projector` over a real store, fed one batch per :meth:`send`."""

    def __init__(self, engine: Engine, clock: Clock) -> None:
        self.engine = engine
        self.clock = clock
        self.projector = self._start()

    def _start(self) -> Projector:
        projector = Projector(self.engine, clock=self.clock)
        projector.load()
        return projector

    def restart(self) -> list[Outbound]:
        """A new projector over the same store (as after a process restart); its start-up messages."""
        self.projector.close()
        self.projector = self._start()
        return self.projector.snapshot_messages()

    def send(self, *msgs: Msg) -> BatchResult:
        """Apply ``msgs`` as one batch."""
        return self.projector.apply([Inbound(m.topic, m.payload) for m in msgs])

    def ok(self, *msgs: Msg) -> BatchResult:
        """Apply ``msgs`` as one batch; each must be stored."""
        result = self.send(*msgs)
        assert (result.stored, result.refused) == (len(msgs), 0), refusals(result)
        return result

    def ok_each(self, msgs: list[Msg]) -> None:
        """Apply ``msgs`` one batch each; each must be stored."""
        for m in msgs:
            self.ok(m)


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """A migrated store on the parametrised database."""
    store = open_store(database_url)
    yield store
    store.dispose()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def desk(engine: Engine, clock: Clock) -> Iterator[Desk]:
    desk = Desk(engine, clock)
    yield desk
    desk.projector.close()


def order_row(engine: Engine, order: str) -> dict[str, Any]:
    found = rows(engine, ORDERS, ORDERS.c.id == order)
    assert len(found) == 1, f"order {order} not in the store"
    return found[0]


def rider_row(engine: Engine, rider: str) -> dict[str, Any]:
    found = rows(engine, RIDERS, RIDERS.c.id == rider)
    assert len(found) == 1, f"rider {rider} not in the store"
    return found[0]


# --- projector: lifecycle and canonical output ----------------------------------------------------


def test_lifecycle_is_stored_and_published_canonically(desk: Desk, engine: Engine) -> None:
    status_topic = topics.order_topic(SHOP, "o1", "status")
    state_topic = topics.order_topic(SHOP, "o1", "state")
    rider_state_topic = topics.shop_rider_state(SHOP, "r1")

    created = create_order(SHOP, "o1")
    r = desk.ok(created)
    [event] = payloads(r, status_topic)
    assert (event["id"], event["type"], event["data"]["status"]) == (
        created.id,
        "order.status_changed",
        "created",
    )
    [state] = on(r, state_topic)
    assert state.retain and state.qos == 1
    assert json.loads(state.payload)["status"] == "created"

    offered = offer("o1", "r1")
    r = desk.ok(offered)
    assert [p["data"]["status"] for p in payloads(r, status_topic)] == ["assigned"]
    assert payloads(r, status_topic)[0]["data"]["rider"] == "r1"
    [to_rider] = on(r, topics.rider_inbox("r1", "offers"))
    body = json.loads(to_rider.payload)
    assert body["id"] == offered.id and body["type"] == "dispatch.offered"
    assert body["data"].get("candidates", []) == [], "a rider is not shown the other candidates"
    assert to_rider.expiry_s is not None and 0 < to_rider.expiry_s <= 3600
    [rider_state] = on(r, rider_state_topic)
    assert rider_state.retain and json.loads(rider_state.payload)["load"] == 1

    accepted = reply("r1", "of-o1", "o1")
    r = desk.ok(accepted)
    assert [p["data"]["status"] for p in payloads(r, status_topic)] == ["accepted"]
    assert acked_ids(r, topics.rider_inbox("r1", "acks")) == [accepted.id]

    for step in ("picked_up", "en_route", "arrived", "delivered"):
        m = status("r1", "o1", step)
        r = desk.ok(m)
        [event] = payloads(r, status_topic)
        assert (event["id"], event["source"], event["data"]["status"]) == (m.id, "riders/r1", step)
        assert json.loads(on(r, state_topic)[0].payload)["status"] == step
        assert acked_ids(r, topics.rider_inbox("r1", "acks")) == [m.id]

    final = json.loads(on(r, state_topic)[0].payload)
    assert [t["status"] for t in final["timeline"]] == [
        "created", "assigned", "accepted", "picked_up", "en_route", "arrived", "delivered",
    ]  # fmt: skip
    # The rider is free again, and the shop's retained view of the rider says so.
    [rider_state] = on(r, rider_state_topic)
    assert json.loads(rider_state.payload)["load"] == 0

    row = order_row(engine, "o1")
    assert (row["status"], row["rider"], row["shop"]) == ("delivered", "r1", SHOP)
    for column in ("assigned_at", "accepted_at", "picked_up_at", "en_route_at", "arrived_at", "delivered_at"):
        assert row[column] is not None, column
    assert row["closed_at"] == row["delivered_at"]
    assert rider_row(engine, "r1")["load"] == 0
    assert [o["status"] for o in rows(engine, OFFERS)] == ["accepted"]
    assert count(engine, EVENTS) == 7
    assert count(engine, DEAD_LETTERS) == 0


def test_requests_are_stored_and_published_as_their_facts(desk: Desk, engine: Engine) -> None:
    created, offered, accepted = create_order(SHOP, "o1"), offer("o1", "r1"), reply("r1", "of-o1", "o1")
    cancelled = cancel_order(SHOP, "o1")
    desk.ok_each([created, offered, accepted, cancelled])
    stored = {r["id"]: r["type"] for r in rows(engine, EVENTS)}
    assert [stored[m.id] for m in (created, accepted, cancelled)] == [
        "order.created",
        "dispatch.replied",
        "order.cancelled",
    ]
    assert not set(stored.values()) & {ev.type_name(t) for t in ev.FACT_OF}, "a request stored as such"
    again = desk.send(created)
    assert (again.duplicates, again.refused) == (1, 0), "a redelivered request is its fact again"
    # A shop asks; only the persister says it happened.
    fact = ev.AlertAcknowledgedEvent(source=f"shops/{SHOP}", data=ev.AlertAcknowledged(alert="al-1"))
    r = desk.send(_event(topics.shop_command(SHOP, "ack-alert"), fact))
    [told] = payloads(r, topics.DEADLETTER)
    assert r.refused == 1 and "send the request 'alert.acknowledge'" in told["reason"]


def test_a_closed_order_leaves_memory_once_committed_and_is_read_back_on_demand(desk: Desk) -> None:
    desk.ok(create_order(SHOP, "o1"))
    desk.ok(create_order(SHOP, "o2"))
    assert {"o1", "o2"} <= set(desk.projector.projections.orders.rows)
    desk.ok(cancel_order(SHOP, "o1"))
    assert "o1" not in desk.projector.projections.orders.rows, "a closed order is not kept in memory"
    assert "o2" in desk.projector.projections.orders.rows, "an open one is"
    closed = desk.projector.projections.orders.get("o1")  # read back from the store when asked for
    assert closed is not None and closed.status == "cancelled"
    desk.ok(create_order(SHOP, "o3"))
    assert "o1" not in desk.projector.projections.orders.rows, "and let go again after the next commit"


def test_rider_state_follows_load_to_every_shop(desk: Desk) -> None:
    """A rider carrying orders of two shops: each shop's retained rider state is kept current."""
    desk.ok_each([*accepted_order("s1", "o1", "r1"), *accepted_order("s2", "o2", "r1")])
    r = desk.ok(cancel_order("s2", "o2"))
    # s2 no longer has an order with r1, but its retained snapshot must not keep saying load 2.
    assert json.loads(on(r, topics.shop_rider_state("s2", "r1"))[0].payload)["load"] == 1
    assert json.loads(on(r, topics.shop_rider_state("s1", "r1"))[0].payload)["load"] == 1


def test_decline_frees_the_order_for_another_rider(desk: Desk, engine: Engine) -> None:
    desk.ok(create_order(SHOP, "o1"))
    desk.ok(offer("o1", "r1"))
    r = desk.ok(reply("r1", "of-o1", "o1", accept=False))
    assert payloads(r, topics.order_topic(SHOP, "o1", "status"))[0]["data"]["status"] == "declined"
    # Offering it again to the rider who declined is refused; another rider may get it.
    r = desk.send(offer("o1", "r1", offer_id="of-again"))
    assert r.refused == 1 and "already declined" in refusals(r)[0]
    desk.ok(offer("o1", "r2", offer_id="of-r2"))
    desk.ok(reply("r2", "of-r2", "o1"))
    row = order_row(engine, "o1")
    assert (row["status"], row["rider"], row["declined_by"]) == ("accepted", "r2", ["r1"])


def test_refused_failure_leaves_no_trace(desk: Desk, engine: Engine) -> None:
    """A refused ``failed`` (illegal from ``accepted``) must not leave its reason on the order."""
    desk.ok_each(accepted_order(SHOP, "o1", "r1"))
    r = desk.send(status("r1", "o1", "failed", reason="damaged"))
    assert r.refused == 1 and "cannot become failed" in refusals(r)[0]
    desk.ok(status("r1", "o1", "picked_up"))
    assert order_row(engine, "o1")["failure_reason"] is None
    desk.ok(status("r1", "o1", "failed", reason="customer_unreachable"))
    row = order_row(engine, "o1")
    assert (row["status"], row["failure_reason"]) == ("failed", "customer_unreachable")
    desk.ok(status("r1", "o1", "returned"))
    assert order_row(engine, "o1")["status"] == "returned"


# --- projector: positions --------------------------------------------------------------------------


def test_position_goes_to_the_order_only_while_out_for_delivery(desk: Desk, engine: Engine) -> None:
    desk.ok_each([*accepted_order(SHOP, "o1", "r1"), *accepted_order(SHOP, "o2", "r1")])
    loc_o1 = topics.order_topic(SHOP, "o1", "location")
    loc_o2 = topics.order_topic(SHOP, "o2", "location")
    t = tst_now()

    # Accepted but not picked up: the position is stored, not shown to the customer.
    before = location("r1", BASE_LAT, BASE_LON, t)
    r = desk.ok(before)
    assert on(r, loc_o1) == [] and on(r, loc_o2) == []
    assert acked_ids(r, topics.rider_inbox("r1", "acks")) == [before.id]
    rider = rider_row(engine, "r1")
    assert (rider["lat"], rider["lon"]) == (BASE_LAT, BASE_LON)

    desk.ok(status("r1", "o1", "picked_up"))
    r = desk.ok(location("r1", BASE_LAT + 0.001, BASE_LON, t + 5, vel=18))
    [out] = on(r, loc_o1)
    assert on(r, loc_o2) == [], "o2 is not picked up yet"
    assert out.qos == 0 and not out.retain and out.expiry_s == LOCATION_EXPIRY_S
    body = json.loads(out.payload)
    assert (body["order"], body["rider"]) == ("o1", "r1")
    assert body["position"]["lat"] == BASE_LAT + 0.001 and body["eta"] is not None

    for step in ("en_route", "arrived", "delivered"):
        desk.ok(status("r1", "o1", step))
    r = desk.ok(location("r1", BASE_LAT + 0.002, BASE_LON, t + 10))
    assert on(r, loc_o1) == [], "no position after delivery"
    assert rider_row(engine, "r1")["lat"] == BASE_LAT + 0.002

    # An older fix arriving late does not move the rider back.
    desk.ok(location("r1", BASE_LAT - 0.5, BASE_LON, t - 100))
    assert rider_row(engine, "r1")["lat"] == BASE_LAT + 0.002


def test_rider_state_carries_the_position_now_and_then(desk: Desk, clock: Clock) -> None:
    """The shop's retained rider state follows the rider's position, refreshed at most every
    STATE_REFRESH_FROM_LOCATION_S, not on every ping."""
    desk.ok_each(accepted_order(SHOP, "o1", "r1"))
    topic, t = topics.shop_rider_state(SHOP, "r1"), tst_now()
    clock.advance(STATE_REFRESH_FROM_LOCATION_S)  # since the state sent with the offer
    r = desk.ok(location("r1", BASE_LAT, BASE_LON, t))
    [state] = payloads(r, topic)
    assert (state["position"]["lat"], state["load"]) == (BASE_LAT, 1)
    assert on(r, topic)[0].retain
    r = desk.ok(location("r1", BASE_LAT + 0.001, BASE_LON, t + 1))
    assert on(r, topic) == []
    clock.advance(STATE_REFRESH_FROM_LOCATION_S)
    r = desk.ok(location("r1", BASE_LAT + 0.002, BASE_LON, t + 2))
    assert payloads(r, topic)[0]["position"]["lat"] == BASE_LAT + 0.002


def test_trail_is_down_sampled(desk: Desk, engine: Engine) -> None:
    """Trail points at the projector's spacing (50 m or 30 s), not one per ping."""
    assert (TRAIL_MIN_DISTANCE_M, TRAIL_MIN_INTERVAL_S) == (50.0, 30.0)
    desk.ok_each([*accepted_order(SHOP, "o1", "r1"), status("r1", "o1", "picked_up")])
    t0, lat = tst_now() - 600, BASE_LAT
    pings: list[Msg] = []
    # Crawling in traffic: 2 m every 5 s for 100 s -> a point at 0, 30, 60 and 90 s.
    for k in range(20):
        pings.append(location("r1", lat + k * 2 * DEG_PER_M, BASE_LON, t0 + 5 * k))
    # Riding: 80 m every 2 s -> every ping is a point.
    lat, t1 = lat + 200 * DEG_PER_M, t0 + 100
    for k in range(10):
        pings.append(location("r1", lat + k * 80 * DEG_PER_M, BASE_LON, t1 + 2 * k))
    for p in pings[:15]:
        desk.ok(p)
    desk.ok(*pings[15:])  # the same rules inside one batch

    trail = rows(engine, TRAIL, TRAIL.c.order_id == "o1")
    assert len(trail) == 4 + 10, [(p["at"], p["lat"]) for p in trail]
    assert {p["rider"] for p in trail} == {"r1"}
    seconds = sorted(int(p["at"].timestamp()) - t0 for p in trail)
    assert seconds[:4] == [0, 30, 60, 90]
    # No trail before pickup or after delivery.
    desk.ok_each([status("r1", "o1", "en_route"), status("r1", "o1", "delivered")])
    desk.ok(location("r1", lat + 5000 * DEG_PER_M, BASE_LON, t1 + 100))
    assert count(engine, TRAIL) == 14


# --- projector: idempotency -------------------------------------------------------------------------


def test_same_event_id_is_stored_once_and_always_acked(desk: Desk, engine: Engine) -> None:
    desk.ok_each(accepted_order(SHOP, "o1", "r1"))
    line = chat("r1", "o1", "on my way", event_id="dup-1")
    acks, chat_topic = topics.rider_inbox("r1", "acks"), topics.order_topic(SHOP, "o1", "chat")

    first = desk.send(line)
    assert (first.stored, first.duplicates) == (1, 0)
    assert [p["id"] for p in payloads(first, chat_topic)] == ["dup-1"]
    for _ in range(2):
        again = desk.send(line)
        assert (again.stored, again.duplicates) == (0, 1)
        assert acked_ids(again, acks) == ["dup-1"]
        assert on(again, chat_topic) == [], "a duplicate is not republished"
    # Three copies in one batch, and after a restart (the id is then only known to the store).
    assert desk.send(line, line, line).duplicates == 3
    desk.restart()
    again = desk.send(line)
    assert (again.stored, again.duplicates) == (0, 1) and acked_ids(again, acks) == ["dup-1"]

    assert count(engine, EVENTS, EVENTS.c.id == "dup-1") == 1
    assert count(engine, CHAT) == 1

    fresh = chat("r1", "o1", "twice in one batch", event_id="dup-2")
    r = desk.send(fresh, fresh)
    assert (r.stored, r.duplicates) == (1, 1)
    assert acked_ids(r, acks) == ["dup-2", "dup-2"]
    assert count(engine, CHAT) == 2


# --- projector: refusals -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A message the persister must refuse, why, who is told, and the sender's next good event."""

    name: str
    bad: Msg
    reason: str
    inbox: str | None
    good: Msg
    expire_offers: bool = False


def _bad_json(topic: str, obj: dict[str, Any]) -> Msg:
    return raw(topic, json.dumps(obj).encode(), obj.get("id"))


def refusal_world() -> list[Msg]:
    """The orders the refusal cases talk about (send in order, each confirmed)."""
    return [
        *accepted_order(SHOP, "o1", "r1"),  # customer c-o1
        create_order(SHOP, "o2"),
        offer("o2", "r2"),  # pending
        *accepted_order(SHOP, "o3", "r3"),
        create_order(SHOP, "o5"),
        offer("o5", "r5", deadline=ev.now() + timedelta(seconds=60)),
        *accepted_order(SHOP, "o7", "r7"),
        *accepted_order(SHOP, "o8", "r8"),
        create_order(SHOP, "o-free"),
        create_order(SHOP, "o-free2"),
    ]


def refusal_cases() -> list[Case]:
    """Every kind of refusal (build after :func:`refusal_world`: the expired offer comes last)."""
    r1_errors = topics.rider_inbox("r1", "errors")

    def r1_ok() -> Msg:
        return chat("r1", "o1", "still fine")

    created = json.loads(create_order(SHOP, "o-bad").payload)
    created["data"]["window"]["end"] = created["data"]["window"]["start"]
    wrong_type = chat("r1", "o1", "hi")
    unknown_type = {"specversion": "1.0", "id": ev.new_id(), "type": "order.teleport",
                    "source": "riders/r1", "data": {"order": "o1"}}  # fmt: skip
    return [
        Case("bad JSON", raw(topics.rider_order_chat("r1", "o1"), b'{"type": "order.chat_posted", oops'),
             "payload is not JSON", r1_errors, r1_ok()),
        Case("not UTF-8", raw(topics.rider_location("r1"), b"\xff\xfe\x00 position"),
             "not UTF-8", r1_errors, r1_ok()),
        Case("failing model", _bad_json(topics.shop_command(SHOP, "create-order"), created),
             "promised window end must be after its start", topics.shop_errors(SHOP),
             create_order(SHOP, "o-after-bad-model")),
        Case("unknown type", _bad_json(topics.rider_order_status("r1", "o1"), unknown_type),
             "unknown event type 'order.teleport'", r1_errors, r1_ok()),
        Case("type not for this topic", raw(topics.rider_replies("r1"), wrong_type.payload, wrong_type.id),
             "'order.chat_posted' is not accepted on replies topics", r1_errors, r1_ok()),
        Case("illegal transition", status("r1", "o1", "delivered"),
             "an order that is accepted cannot become delivered", r1_errors, r1_ok()),
        Case("rider reports what only dispatch may", status("r1", "o1", "assigned"),
             "a rider cannot report 'assigned'", r1_errors, r1_ok()),
        Case("rider reports on another rider's order", status("r2", "o1", "picked_up"),
             "order 'o1' is not assigned to rider 'r2'", topics.rider_inbox("r2", "errors"),
             chat("r2", "o2", "I will answer the offer soon")),
        Case("forged source on own topic", chat("r8", "o8", "I am r7", source="riders/r7"),
             "source 'riders/r7' does not match the sender 'riders/r8'",
             topics.rider_inbox("r8", "errors"), chat("r8", "o8", "honest again")),
        Case("forged source on r7's topic", status("r7", "o8", "picked_up", source="riders/r7"),
             "order 'o8' is not assigned to rider 'r7'", topics.rider_inbox("r7", "errors"),
             chat("r8", "o8", "r8 speaking")),
        Case("own source on r7's topic", chat("r7", "o7", "r8 here", source="riders/r8"),
             "source 'riders/r8' does not match the sender 'riders/r7'",
             topics.rider_inbox("r7", "errors"), chat("r7", "o7", "r7 speaking")),
        Case("order in data differs from topic", status("r1", "o1", "picked_up", data_order="o7"),
             "data.order 'o7' does not match the topic's order 'o1'", r1_errors, r1_ok()),
        Case("unknown order", chat("r1", "o404", "where is this?"), "unknown order 'o404'",
             r1_errors, r1_ok()),
        Case("shop acts on another shop's order", cancel_order("s2", "o1"),
             "order 'o1' does not belong to shop 's2'", topics.shop_errors("s2"), create_order("s2", "o-s2")),
        Case("order id taken", create_order(SHOP, "o1"), "order 'o1' already exists",
             topics.shop_errors(SHOP), create_order(SHOP, "o-next")),
        Case("unknown offer", reply("r1", "of-404", "o1"), "unknown offer 'of-404'", r1_errors, r1_ok()),
        Case("reply from the wrong rider", reply("r3", "of-o2", "o2"),
             "offer 'of-o2' was made to another rider", topics.rider_inbox("r3", "errors"),
             chat("r3", "o3", "r3 is fine")),
        Case("duplicate accept", reply("r1", "of-o1", "o1"), "offer 'of-o1' is already accepted",
             r1_errors, r1_ok()),
        Case("a second rider for an offered order", offer("o2", "r4", offer_id="of-o2-r4"),
             "order 'o2' is assigned; only unassigned orders get offers", None,
             offer("o-free", "r4", offer_id="of-free")),
        Case("offer deadline already past",
             offer("o-free2", "r4", offer_id="of-late", deadline=ev.now() - timedelta(seconds=5)),
             "has already passed", None, service_chat("followup", "o1", "How were the flowers?")),
        Case("customer without an order", customer_chat("nobody", "hello?"),
             "customer 'nobody' has no order",
             topics.customer_inbox("nobody", "errors"), customer_chat("c-o1", "hello from o1's customer")),
        Case("customer names another order", customer_chat("c-o1", "sneaky", order="o7"),
             "customer 'c-o1' may only chat on its own order", topics.customer_inbox("c-o1", "errors"),
             customer_chat("c-o1", "back to my order")),
        Case("customer forges source", customer_chat("c-o1", "I am o7", source="customers/c-o7"),
             "does not match the sender 'customers/c-o1'", topics.customer_inbox("c-o1", "errors"),
             customer_chat("c-o1", "just me")),
        Case("accept after the offer deadline", reply("r5", "of-o5", "o5"), "too late to answer",
             topics.rider_inbox("r5", "errors"), chat("r5", "o5", "sorry, late"), expire_offers=True),
    ]  # fmt: skip


def test_every_refusal_is_dead_lettered_and_told_to_the_sender(
    desk: Desk, engine: Engine, clock: Clock
) -> None:
    desk.ok_each(refusal_world())
    cases = refusal_cases()
    stored_before = count(engine, EVENTS)
    for n, case in enumerate(cases, start=1):
        if case.expire_offers:
            clock.advance(120)
        r = desk.send(case.bad)
        assert (r.refused, r.stored) == (1, 0), f"{case.name}: not refused"
        [told] = payloads(r, topics.DEADLETTER)
        assert case.reason in told["reason"], f"{case.name}: {told['reason']!r}"
        assert (told["topic"], told.get("id")) == (case.bad.topic, case.bad.id), case.name
        errors = [o for o in r.outbound if o.topic.endswith("/errors")]
        if case.inbox is None:
            assert errors == [], f"{case.name}: a service has no error inbox"
        else:
            assert [o.topic for o in errors] == [case.inbox], case.name
            assert json.loads(errors[0].payload) == told, case.name
        assert not [o for o in r.outbound if o.topic.startswith(f"{topics.SHOPS}/{SHOP}/orders/")], (
            f"{case.name}: a refused message changed no order"
        )
        [letter] = rows(
            engine,
            DEAD_LETTERS,
            DEAD_LETTERS.c.id == sa.select(sa.func.max(DEAD_LETTERS.c.id)).scalar_subquery(),
        )
        assert case.reason in letter["reason"], case.name
        assert (letter["topic"], letter["event_id"]) == (case.bad.topic, case.bad.id), case.name
        assert letter["sender"] == topics.parse_inbound(case.bad.topic).source, case.name
        assert letter["payload"], case.name
        assert count(engine, DEAD_LETTERS) == n
        # The stream goes on: the next good event is stored normally.
        desk.ok(case.good)
    assert count(engine, EVENTS) == stored_before + len(cases)
    bad_ids = [c.bad.id for c in cases if c.bad.id]
    assert count(engine, EVENTS, EVENTS.c.id.in_(bad_ids)) == 0
    letter = rows(engine, DEAD_LETTERS, DEAD_LETTERS.c.topic == topics.rider_location("r1"))[0]
    assert letter["payload"].startswith("base64:"), "bytes that are not text are kept as base64"
    # Nothing a refusal looked at was changed.
    assert order_row(engine, "o1")["status"] == "accepted"
    assert order_row(engine, "o8")["status"] == "accepted"
    assert order_row(engine, "o2")["rider"] == "r2"


# --- projector: customers ------------------------------------------------------------------------------


def test_customer_chat_lands_on_that_order_only(desk: Desk, engine: Engine) -> None:
    desk.ok_each(
        [
            *accepted_order(SHOP, "o1", "r1", name="Ann"),
            *accepted_order(SHOP, "o2", "r2", name="Bea", customer_username="bea-2027"),
        ]
    )
    r = desk.ok(customer_chat("bea-2027", "Please ring twice"))
    [line] = payloads(r, topics.order_topic(SHOP, "o2", "chat"))
    assert (line["data"]["order"], line["data"]["author"]) == ("o2", "customer:Bea")
    assert payloads(r, topics.rider_inbox("r2", "chat"))[0]["id"] == line["id"]
    assert on(r, topics.order_topic(SHOP, "o1", "chat")) == []
    assert on(r, topics.rider_inbox("r1", "chat")) == []
    assert acked_ids(r, topics.customer_inbox("bea-2027", "acks")) == [line["id"]]

    r = desk.ok(customer_chat("c-o1", "Is it red roses?", order="o1"))
    assert payloads(r, topics.order_topic(SHOP, "o1", "chat"))[0]["data"]["author"] == "customer:Ann"
    # Rider and shop lines on the same order; the rider does not get its own line back.
    r = desk.ok(chat("r1", "o1", "Yes, twelve"))
    assert payloads(r, topics.order_topic(SHOP, "o1", "chat"))[0]["data"]["author"] == "rider:r1"
    assert on(r, topics.rider_inbox("r1", "chat")) == []
    assert {(c["order_id"], c["author_role"]) for c in rows(engine, CHAT)} == {
        ("o2", "customer"),
        ("o1", "customer"),
        ("o1", "rider"),
    }
    # A customer username is one order's access: a second order may not take it.
    r = desk.send(create_order(SHOP, "o3", customer_username="bea-2027"))
    assert r.refused == 1 and "already used" in refusals(r)[0]


def test_customer_keeps_its_order_across_restart_after_delivery(desk: Desk, engine: Engine) -> None:
    """A delivered order's customer may still answer the follow-up, before and after a restart,
    and its username stays taken."""
    desk.ok_each([*accepted_order(SHOP, "o1", "r1"), status("r1", "o1", "picked_up")])
    desk.ok_each(
        [
            status("r1", "o1", "arrived"),
            status("r1", "o1", "delivered"),
            service_chat("followup", "o1", "How were they?"),
        ]
    )
    desk.ok(customer_chat("c-o1", "Lovely, thanks"))
    desk.restart()
    r = desk.send(customer_chat("c-o1", "Really lovely"))
    assert r.stored == 1, refusals(r)
    assert payloads(r, topics.order_topic(SHOP, "o1", "chat"))[0]["data"]["order"] == "o1"
    r = desk.send(create_order(SHOP, "o9", customer_username="c-o1"))
    assert r.refused == 1 and "already used" in refusals(r)[0]
    assert count(engine, CHAT, CHAT.c.author_role == "customer") == 2


# --- projector: restart and failures ----------------------------------------------------------------


def test_projections_reload_after_restart(desk: Desk, engine: Engine) -> None:
    desk.ok_each([*accepted_order(SHOP, "o1", "r1"), create_order(SHOP, "o2"), offer("o2", "r2")])
    desk.ok_each([*accepted_order(SHOP, "o3", "r3"), status("r3", "o3", "picked_up")])
    desk.ok_each([status("r3", "o3", "arrived"), status("r3", "o3", "delivered")])

    snapshots = desk.restart()
    by_topic = {o.topic: o for o in snapshots}
    assert all(o.retain for o in snapshots)
    assert json.loads(by_topic[topics.order_topic(SHOP, "o1", "state")].payload)["status"] == "accepted"
    assert json.loads(by_topic[topics.order_topic(SHOP, "o2", "state")].payload)["status"] == "assigned"
    assert topics.order_topic(SHOP, "o3", "state") not in by_topic, (
        "closed orders keep their last retained state"
    )
    assert json.loads(by_topic[topics.shop_rider_state(SHOP, "r1")].payload)["load"] == 1

    # Orders created before the restart progress after it; pending offers can still be answered.
    desk.ok_each([status("r1", "o1", "picked_up"), status("r1", "o1", "en_route")])
    desk.ok(reply("r2", "of-o2", "o2"))
    r = desk.ok(location("r1", BASE_LAT, BASE_LON, tst_now()))
    assert len(on(r, topics.order_topic(SHOP, "o1", "location"))) == 1
    r = desk.send(status("r3", "o3", "returned"))
    assert r.refused == 1 and "'o3' is delivered; it is closed" in refusals(r)[0]
    assert order_row(engine, "o1")["status"] == "en_route"
    assert order_row(engine, "o2")["status"] == "accepted"


def test_failed_commit_publishes_nothing_and_the_retry_is_complete(desk: Desk, engine: Engine) -> None:
    """The store refuses a commit (disk full, connection lost): nothing is published, the batch
    is retried, and the projections are as good as before."""
    desk.ok_each([*accepted_order(SHOP, "o1", "r1"), status("r1", "o1", "picked_up")])
    desk.ok(location("r1", BASE_LAT, BASE_LON, tst_now() - 20))
    batch = [location("r1", BASE_LAT + 0.001, BASE_LON, tst_now() - 10), chat("r1", "o1", "almost there")]

    def fail_chat_insert(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO CHAT_LINES"):
            raise RuntimeError("disk full (injected)")

    sa.event.listen(engine, "before_cursor_execute", fail_chat_insert)
    try:
        with pytest.raises(Exception, match="disk full"):
            desk.send(*batch)
    finally:
        sa.event.remove(engine, "before_cursor_execute", fail_chat_insert)
    assert count(engine, EVENTS, EVENTS.c.id == batch[1].id) == 0

    r = desk.ok(*batch)  # the service retries the same batch
    assert [p["id"] for p in payloads(r, topics.order_topic(SHOP, "o1", "chat"))] == [batch[1].id]
    # The order is still known to be out with r1: positions reach it, its customer can chat.
    r = desk.ok(location("r1", BASE_LAT + 0.002, BASE_LON, tst_now()))
    assert len(on(r, topics.order_topic(SHOP, "o1", "location"))) == 1
    desk.ok(customer_chat("c-o1", "see you"))
    desk.ok_each([status("r1", "o1", "arrived"), status("r1", "o1", "delivered")])
    assert rider_row(engine, "r1")["load"] == 0


# --- the service against a real broker -------------------------------------------------------------------


@dataclass
class Seen:
    """A message a test client received."""

    topic: str
    payload: bytes
    retain: bool
    qos: int
    expiry: int | None

    def json(self) -> Any:
        return json.loads(self.payload)


def _is_inbound(topic: str) -> bool:
    try:
        topics.parse_inbound(topic)
    except TopicError:
        return False
    return True


def confirms(event_id: str) -> Callable[[Seen], bool]:
    """True for the persister's answer to ``event_id``: a device ack or a canonical event."""

    def match(s: Seen) -> bool:
        if (
            not s.payload
            or _is_inbound(s.topic)
            or s.topic == topics.DEADLETTER
            or s.topic.endswith("/errors")
        ):
            return False
        body = s.json()
        if s.topic.endswith("/inbox/acks"):
            return event_id in body["ids"]
        return isinstance(body, dict) and body.get("id") == event_id

    return match


class Spy:
    """A client subscribed to everything the backbone publishes; keeps every message it got."""

    FILTERS = (
        f"{topics.SHOPS}/#",
        f"{topics.RIDERS}/+/inbox/#",
        f"{topics.CUSTOMERS}/+/inbox/#",
        topics.DEADLETTER,
    )

    def __init__(self, client: MqttTestClient, filters: tuple[str, ...] = FILTERS) -> None:
        self.client = client
        self.log: list[Seen] = []
        for f in filters:
            client.subscribe(f, qos=1)

    def _take(self, timeout: float) -> None:
        try:
            m: mqtt.MQTTMessage = self.client.messages.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            props = getattr(m, "properties", None)
            expiry = getattr(props, "MessageExpiryInterval", None) if props is not None else None
            self.log.append(Seen(m.topic, bytes(m.payload), bool(m.retain), m.qos, expiry))
            try:
                m = self.client.messages.get_nowait()
            except queue.Empty:
                return

    def collect(self, match: Callable[[Seen], bool], *, n: int = 1, timeout: float = 15.0) -> list[Seen]:
        """Up to the first ``n`` messages matching ``match``, received so far or within ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            found = [s for s in self.log if match(s)]
            left = deadline - time.monotonic()
            if len(found) >= n or left <= 0:
                return found[:n]
            self._take(min(left, 0.2))

    def wait(
        self, match: Callable[[Seen], bool], *, n: int = 1, timeout: float = 15.0, what: str = ""
    ) -> list[Seen]:
        """The first ``n`` messages matching ``match``; fails the test if they do not come in time."""
        found = self.collect(match, n=n, timeout=timeout)
        if len(found) < n:
            tail = [(s.topic, s.payload[:120]) for s in self.log[-8:]]
            pytest.fail(f"waited {timeout} s for {n} x {what or match}; got {len(found)}; last: {tail}")
        return found

    def settle(self, seconds: float = 0.3) -> None:
        """Collect whatever arrives within ``seconds``."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._take(left)

    def on(self, topic: str) -> list[Seen]:
        return [s for s in self.log if s.topic == topic]


@contextlib.contextmanager
def running_persister(settings: Settings, clock: Callable[[], datetime] = ev.now) -> Iterator[Service]:
    """The persister service in a thread of this process, stopped (cleanly) on exit."""
    service = build(settings, clock=clock)
    holder: dict[str, Any] = {}
    loop_ready = threading.Event()

    def main() -> None:
        async def run() -> None:
            holder["loop"] = asyncio.get_running_loop()
            holder["stop"] = stop = asyncio.Event()
            loop_ready.set()
            await service.run(settings, stop=stop, install_signals=False)

        try:
            asyncio.run(run())
        except BaseException as exc:  # surfaced in the test thread
            holder["error"] = exc
        finally:
            loop_ready.set()

    thread = threading.Thread(target=main, name="persister-under-test", daemon=True)
    thread.start()
    try:
        loop_ready.wait(10)
        deadline = time.monotonic() + 60
        while not service.ready.is_set():
            if "error" in holder or not thread.is_alive():
                raise AssertionError(f"persister did not start: {holder.get('error')!r}")
            if time.monotonic() > deadline:
                raise AssertionError("persister did not start within 60 s")
            time.sleep(0.02)
        yield service
        assert service.failed == 0, "a batch handler raised"
    finally:
        loop, stop = holder.get("loop"), holder.get("stop")
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        assert not thread.is_alive(), "persister did not stop"
    if "error" in holder:
        raise AssertionError("persister failed") from holder["error"]


class Devices:
    """One MQTT client publishing for every identity (the broker has no ACLs yet), in order."""

    def __init__(self, client: MqttTestClient, spy: Spy, engine: Engine) -> None:
        self.client = client
        self.spy = spy
        self.engine = engine

    def send(self, *msgs: Msg) -> None:
        """Publish at QoS 1 (PUBACK awaited), in order."""
        for m in msgs:
            info = self.client.publish(m.topic, m.payload, qos=1)
            assert info.is_published(), m.topic

    def confirm(self, *msgs: Msg) -> None:
        """Publish, and wait for each message's ack or canonical event; it is then in the store."""
        self.send(*msgs)
        for m in msgs:
            assert m.id is not None
            self.spy.wait(confirms(m.id), what=f"confirmation of {m.topic}")
            # Persist, then publish: whatever a client sees is already committed (positions are
            # not events of record: they update the rider and the trail).
            if not m.topic.endswith("/location"):
                assert count(self.engine, EVENTS, EVENTS.c.id == m.id) == 1, m.topic

    def wait_for_persister(self, timeout: float = 30.0) -> None:
        """Probe until the persister answers. Until its subscriptions are in place (the first start
        creates its session) whatever devices publish is not queued for it."""
        probe = ev.RiderPresenceChangedEvent(
            source="riders/probe", data=ev.RiderPresence(status=ev.Presence.ONLINE)
        )
        msg = _event(topics.rider_presence("probe"), probe)
        deadline = time.monotonic() + timeout
        while not self.spy.collect(confirms(probe.id), timeout=0.5):
            if time.monotonic() > deadline:
                pytest.fail(f"the persister did not answer a probe within {timeout} s")
            self.send(msg)  # the same id again: stored once, acknowledged every time

    def clear_retained(self, *topic_names: str) -> None:
        """Erase retained messages."""
        for t in topic_names:
            self.client.publish(t, b"", qos=1, retain=True)


@dataclass
class Rig:
    """A private broker, a store, devices and a spy: everything but the persister."""

    broker: Broker
    settings: Settings
    engine: Engine
    spy: Spy
    devices: Devices
    client: Callable[[], MqttTestClient]
    clock: Clock = field(default_factory=Clock)

    @contextlib.contextmanager
    def persister(self) -> Iterator[Service]:
        """The persister running, its subscriptions in place."""
        with running_persister(self.settings, self.clock) as service:
            self.devices.wait_for_persister()
            yield service


@pytest.fixture
def rig(
    fresh_broker: Broker,
    database_url: str,
    engine: Engine,
    make_settings: MakeSettings,
    mqtt_user: MakeUser,
    mqtt_client: MakeClient,
) -> Rig:
    def client() -> MqttTestClient:
        return mqtt_client(*mqtt_user(broker=fresh_broker), broker=fresh_broker)

    settings = make_settings(database_url=database_url, broker=fresh_broker)
    spy = Spy(client())
    return Rig(fresh_broker, settings, engine, spy, Devices(client(), spy, engine), client)


def test_service_publishes_canonical_topics_after_commit(rig: Rig) -> None:
    spy, dev = rig.spy, rig.devices
    status_topic = topics.order_topic(SHOP, "o1", "status")
    chat_topic = topics.order_topic(SHOP, "o1", "chat")
    loc_topic = topics.order_topic(SHOP, "o1", "location")
    with rig.persister():
        dev.confirm(*accepted_order(SHOP, "o1", "r1"))
        [sent_offer] = spy.wait(lambda s: s.topic == topics.rider_inbox("r1", "offers"), what="offer")
        assert sent_offer.json()["data"]["offer"] == "of-o1"
        assert sent_offer.expiry is not None and sent_offer.expiry <= 3600

        t = tst_now()
        before = location("r1", BASE_LAT, BASE_LON, t - 30)
        dev.confirm(before, status("r1", "o1", "picked_up"))
        out = [location("r1", BASE_LAT + 0.001 * k, BASE_LON, t - 20 + k) for k in (1, 2)]
        dev.confirm(*out)

        rider_line, customer_line = chat("r1", "o1", "Leaving the shop"), customer_chat("c-o1", "Thanks!")
        dev.confirm(rider_line, customer_line)
        [to_rider] = spy.wait(lambda s: s.topic == topics.rider_inbox("r1", "chat"), what="chat to rider")
        assert to_rider.json()["id"] == customer_line.id
        [ack] = spy.wait(lambda s: s.topic == topics.customer_inbox("c-o1", "acks"), what="customer ack")
        assert ack.json()["ids"] == [customer_line.id]

        dev.confirm(raise_alert("o1", "al-1", "running late"))
        dev.confirm(ack_alert(SHOP, "al-1"))
        for step in ("en_route", "arrived", "delivered"):
            dev.confirm(status("r1", "o1", step))
        after = location("r1", BASE_LAT + 0.01, BASE_LON, t)
        dev.confirm(after, customer_chat("c-o1", "Got them, thank you"))

        statuses = [s.json()["data"]["status"] for s in spy.on(status_topic)]
        assert statuses == [
            "created",
            "assigned",
            "accepted",
            "picked_up",
            "en_route",
            "arrived",
            "delivered",
        ]
        assert [s.json()["id"] for s in spy.on(chat_topic)][:2] == [rider_line.id, customer_line.id]
        assert [s.json()["data"]["author"] for s in spy.on(chat_topic)] == [
            "rider:r1",
            "customer:Ann",
            "customer:Ann",
        ]
        # Positions only between pickup and delivery; none before, none after.
        positions = [s.json()["position"]["lat"] for s in spy.on(loc_topic)]
        assert positions == [BASE_LAT + 0.001, BASE_LAT + 0.002]
        assert all(s.expiry is not None and s.expiry <= LOCATION_EXPIRY_S for s in spy.on(loc_topic))
        alerts = spy.on(topics.order_topic(SHOP, "o1", "alerts"))
        assert [a.json()["type"] for a in alerts] == ["alert.raised", "alert.acknowledged"]
        assert len(spy.on(topics.shop_alerts(SHOP))) == 2
        assert spy.on(topics.DEADLETTER) == []

        # A late subscriber gets the whole order at once, and the rider's current state.
        late = Spy(
            rig.client(), (topics.order_topic(SHOP, "o1", "state"), topics.shop_rider_state(SHOP, "r1"))
        )
        [state] = late.wait(lambda s: s.topic.endswith("/orders/o1/state"), what="retained order state")
        [rider_state] = late.wait(lambda s: s.topic.endswith("/riders/r1/state"), what="retained rider state")
    assert state.retain and rider_state.retain
    body = state.json()
    assert (body["status"], body["rider"], body["customer"], body["shop"]) == ("delivered", "r1", "Ann", SHOP)
    assert [t["status"] for t in body["timeline"]] == statuses
    assert body["window"]["end"] > body["window"]["start"]
    assert body["destination"] == {"lat": BASE_LAT + 0.01, "lon": BASE_LON, "address": "o1 Rosenweg 1"}
    assert rider_state.json()["load"] == 0


def refusal_of(case: Case, topic: str) -> Callable[[Seen], bool]:
    """True for the refusal of ``case.bad`` on ``topic``."""

    def match(s: Seen) -> bool:
        body = s.json() if s.topic == topic and s.payload.startswith(b"{") else {}
        return (
            body.get("topic") == case.bad.topic
            and case.reason in body.get("reason", "")
            and body.get("id") == case.bad.id
        )

    return match


def test_refusals_reach_the_sender_and_the_deadletter_topic(rig: Rig) -> None:
    spy, dev = rig.spy, rig.devices
    with rig.persister():
        dev.confirm(*refusal_world())
        cases = refusal_cases()
        for case in cases:
            if case.expire_offers:
                rig.clock.advance(120)
            dev.send(case.bad)
            [told] = spy.wait(refusal_of(case, topics.DEADLETTER), what=case.name)
            if case.inbox is not None:
                [inbox] = spy.wait(refusal_of(case, case.inbox), what=f"{case.name} inbox")
                assert inbox.json() == told.json()
            dev.confirm(case.good)
        spy.settle()
    assert len(spy.on(topics.DEADLETTER)) == len(cases)
    assert count(rig.engine, DEAD_LETTERS) == len(cases)
    errors = [s for s in spy.log if s.topic.endswith("/errors")]
    assert len(errors) == sum(1 for c in cases if c.inbox is not None)


def test_other_services_dead_letters_are_stored_an_unreadable_one_too(rig: Rig) -> None:
    dev = rig.devices
    own = ev.Refusal(topic="riders/r1/location", reason="its own, stored with its batch", service="persister")
    other = ev.Refusal(
        id="ev-7",
        topic=topics.order_topic(SHOP, "o1", "status"),
        reason="ValueError: no such rule",
        service="alerts",
        payload='{"id": "ev-7", "type": "order.status_changed"}',
    )
    with rig.persister():
        dev.client.publish(topics.DEADLETTER, ev.encode(own), qos=1)
        dev.client.publish(topics.DEADLETTER, ev.encode(other), qos=1)
        dev.client.publish(topics.DEADLETTER, b"\xffnot a refusal", qos=1)
        deadline = time.monotonic() + 15
        while count(rig.engine, DEAD_LETTERS) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        dev.confirm(*accepted_order(SHOP, "o1", "r1"))  # everything before it is handled too
    with rig.engine.connect() as conn:
        rows = conn.execute(sa.select(DEAD_LETTERS).order_by(DEAD_LETTERS.c.id)).mappings().all()
    assert [(r["sender"], r["event_id"], r["topic"]) for r in rows] == [
        ("services/alerts", "ev-7", other.topic),
        (None, None, topics.DEADLETTER),
    ]
    assert rows[0]["reason"] == other.reason and rows[0]["payload"] == other.payload
    assert rows[1]["reason"].startswith("unreadable dead letter")
    assert rows[1]["payload"].startswith("base64:")


def test_restart_reloads_projections_and_republishes_snapshots(rig: Rig) -> None:
    spy, dev = rig.spy, rig.devices
    state_topic = topics.order_topic(SHOP, "o1", "state")
    rider_state_topic = topics.shop_rider_state(SHOP, "r1")
    with rig.persister():
        dev.confirm(*accepted_order(SHOP, "o1", "r1"))
    # A crash between commit and publish would leave these behind; here they are simply erased.
    dev.clear_retained(state_topic, rider_state_topic)
    late = Spy(rig.client(), (state_topic, rider_state_topic))
    late.settle(0.3)
    assert [s for s in late.log if s.payload] == [], "the retained snapshots were erased"

    with rig.persister():
        [state] = late.wait(lambda s: s.topic == state_topic and bool(s.payload), what="republished state")
        assert state.json()["status"] == "accepted"
        [rider] = late.wait(lambda s: s.topic == rider_state_topic and bool(s.payload), what="rider state")
        assert rider.json()["load"] == 1
        # The order made before the restart moves on after it.
        dev.confirm(status("r1", "o1", "picked_up"), customer_chat("c-o1", "Still coming?"))
        dev.confirm(location("r1", BASE_LAT, BASE_LON, tst_now()))
        spy.wait(lambda s: s.topic == topics.order_topic(SHOP, "o1", "location"), what="position")
        dev.confirm(status("r1", "o1", "arrived"), status("r1", "o1", "delivered"))
    assert order_row(rig.engine, "o1")["status"] == "delivered"
    assert spy.on(topics.DEADLETTER) == []


# --- #11: each impossible message alone, over MQTT ------------------------------------------------


def _edit(msg: Msg, change: Callable[[dict[str, Any]], None], *, new_id: bool = True) -> Msg:
    """``msg`` with its JSON changed by ``change`` (and a fresh id unless told otherwise)."""
    obj = json.loads(msg.payload)
    if new_id:
        obj["id"] = ev.new_id()
    change(obj)
    return raw(msg.topic, json.dumps(obj).encode(), obj.get("id"))


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(obj: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for key in parents:
            obj = obj[key]
        obj[last] = value

    return change


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda obj: obj.pop(key)


def _impossible(now: int, first: Msg) -> list[tuple[str, Msg, str]]:
    """(what, message, a fragment of the reason it must be refused with): the issue's list.

    ``first``: a chat line already stored, whose id is then reused with other content.
    """
    line = chat("r1", "o1", "hello")
    fix = location("r1", BASE_LAT, BASE_LON, now)
    slow = ev.OrderIncidentReportedEvent(
        source="riders/r1", data=ev.OrderIncident(order="o1", reason="flat tyre")
    )
    incident = _event(topics.rider_order_status("r1", "o1"), slow)
    owntracks = json.dumps({"_type": "location", "lat": BASE_LAT, "lon": BASE_LON, "tst": now * 1000})
    deep = b'{"specversion":"1.0","data":' + b'{"a":' * 1000 + b"1" + b"}" * 1001
    return [
        ("JSON nested 1,000 deep", raw(topics.customer_chat("c-o1"), deep), "deeper than 16"),
        ("OwnTracks tst in ms", raw(topics.owntracks("r1", "phone"), owntracks.encode()), "milliseconds"),
        ("time not in UTC", _edit(line, _set("time", "0001-01-01T00:00:00+05:00")), "cannot be expressed"),
        ("time past UTC", _edit(line, _set("time", "9999-12-31T23:59:59-05:00")), "cannot be expressed"),
        ("NUL in chat", _edit(line, _set("data.text", "hi\u0000there")), "control character"),
        ("fix in 5138", _edit(fix, _set("data.tst", 99999999999)), "in the future"),
        ("time in 2999", _edit(line, _set("time", "2999-01-01T00:00:00+00:00")), "in the future"),
        ("time in 1970", _edit(line, _set("time", "1970-01-01T00:00:00+00:00")), "old"),
        ("ETA in 2999", _edit(incident, _set("data.eta", "2999-01-01T00:00:00+00:00")), "ETA horizon"),
        ('lat "52.5"', _edit(fix, _set("data.lat", "52.5")), "valid number"),
        ("lat true", _edit(fix, _set("data.lat", True)), "valid number"),
        ("acc 1e400", raw(fix.topic, fix.payload.replace(b'"tst"', b'"acc":1e400,"tst"')), "finite"),
        ("tst 0", _edit(fix, _set("data.tst", 0)), "old"),
        ("no id", _edit(line, _drop("id"), new_id=False), "missing field id"),
        ("an id reused", _edit(first, _set("data.text", "other"), new_id=False), "already used"),
        ("retained", first, "retained publishes are not events"),
    ]


def test_each_impossible_message_is_refused_alone_and_never_replayed(rig: Rig) -> None:
    """Issue #11's messages one by one: each refused with its reason, dead-lettered, its sender
    told; a good event after each is stored; a restart of the persister replays nothing bad."""
    spy, dev = rig.spy, rig.devices
    errors = Spy(rig.client(), (topics.rider_inbox("r1", "errors"), topics.customer_inbox("c-o1", "errors")))
    with rig.persister():
        dev.confirm(*accepted_order(SHOP, "o1", "r1"))
        first = chat("r1", "o1", "hello")
        dev.confirm(first)
        cases = _impossible(tst_now(), first)
        for k, (what, bad, _) in enumerate(cases):
            if what == "retained":
                left = chat("r1", "o1", "left on the broker")
                dev.client.publish(left.topic, left.payload, qos=1, retain=True)
            else:
                dev.send(bad)
            dev.confirm(chat("r1", "o1", f"good after {what}"))
            errors.wait(lambda s: True, n=k + 1, what=f"the refusal of {what}")
    letters = sorted(rows(rig.engine, DEAD_LETTERS), key=lambda r: r["id"])
    reasons = [r["reason"] for r in letters]
    assert len(reasons) == len(cases), reasons
    for (what, _, fragment), reason in zip(cases, reasons, strict=True):
        assert fragment in reason, f"{what}: {reason}"
    told = [e.json()["reason"] for e in errors.log]
    assert told == reasons, "each sender's error inbox is told, in order"
    chats = EVENTS.c.type == "order.chat_posted"
    stored = count(rig.engine, EVENTS, chats)
    with rig.persister():  # a restart: nothing bad comes back
        dev.confirm(chat("r1", "o1", "after the restart"))
        spy.settle(1.0)
    assert [r["reason"] for r in rows(rig.engine, DEAD_LETTERS)] == reasons
    assert count(rig.engine, EVENTS, chats) == stored + 1


def test_a_rider_handing_back_an_offered_order_releases_its_offer(desk: Desk, engine: Engine) -> None:
    """Declined by status while the offer is still pending: the offer is closed as released, not
    left pending until it expires (the order's next offer would otherwise race the old one)."""
    desk.ok(create_order(SHOP, "o1"))
    desk.ok(offer("o1", "r1"))
    desk.ok(status("r1", "o1", "declined"))
    with engine.connect() as conn:
        row = conn.execute(sa.select(OFFERS.c.status).where(OFFERS.c.id == "of-o1")).one()
    assert row.status == "released"
    assert order_row(engine, "o1")["declined_by"] == ["r1"]


def test_a_fix_applied_again_is_acked_but_not_shown_twice(desk: Desk) -> None:
    """A batch retried after a partial commit (the store failed between its halves) brings fixes
    already applied and published: acknowledged again, not published to the customer again. A
    different fix in the same second still moves the rider."""
    desk.ok_each(accepted_order(SHOP, "o1", "r1"))
    desk.ok(status("r1", "o1", "picked_up"))
    loc = topics.order_topic(SHOP, "o1", "location")
    t = tst_now()
    fix = location("r1", BASE_LAT, BASE_LON, t)
    assert len(on(desk.ok(fix), loc)) == 1
    again = desk.ok(fix)
    assert on(again, loc) == [], "the same fix is not shown twice"
    assert acked_ids(again, topics.rider_inbox("r1", "acks")) == [fix.id]
    moved = desk.ok(location("r1", BASE_LAT + 0.001, BASE_LON, t))
    assert json.loads(on(moved, loc)[0].payload)["position"]["lat"] == BASE_LAT + 0.001
