"""Order amendments (issue 18): a shop changes an order after it is placed, under named rules.

Desk tests (the projector over a real store, SQLite and PostgreSQL) for what is stored, refused
and told to whom; one test through a real broker that a new address after pick-up reaches the
rider and the rider's confirmation reaches the shop, and the next ETA points at the new door.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from conftest import Broker, MqttTestClient
from sqlalchemy import Engine
from test_persister import (
    BASE_LAT,
    BASE_LON,
    DEG_PER_M,
    SHOP,
    Clock,
    Desk,
    Devices,
    MakeClient,
    MakeSettings,
    MakeUser,
    Msg,
    Rig,
    Spy,
    accepted_order,
    acked_ids,
    count,
    create_order,
    offer,
    payloads,
    refusals,
    rows,
    status,
    tst_now,
)
from typer.testing import CliRunner

from bloomwire.app.cli import app
from bloomwire.contract import events as ev
from bloomwire.contract import geo, topics
from bloomwire.store import open_store
from bloomwire.store.models import DEAD_LETTERS, EVENTS, OFFERS, ORDERS


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    store = open_store(database_url)
    yield store
    store.dispose()


@pytest.fixture
def desk(engine: Engine) -> Iterator[Desk]:
    d = Desk(engine, Clock())
    yield d
    d.projector.close()


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


def amend(order: str, *, shop: str = SHOP, event_id: str | None = None, **values: Any) -> Msg:
    """A shop's ``order.amend`` on ``shops/S/commands/amend-order`` (only the new values)."""
    event = ev.OrderAmendEvent(source=f"shops/{shop}", data=ev.OrderAmendment(order=order, **values))
    if event_id is not None:
        event = event.model_copy(update={"id": event_id})
    return Msg(topics.shop_command(shop, "amend-order"), ev.encode(event), event.id)


def confirm(rider: str, order: str, amendment: str) -> Msg:
    """The rider's ``order.amendment_confirm`` on ``riders/R/orders/O/status``."""
    data = ev.AmendmentConfirmation(order=order, amendment=amendment, note="got it")
    event = ev.OrderAmendmentConfirmEvent(source=f"riders/{rider}", data=data)
    return Msg(topics.rider_order_status(rider, order), ev.encode(event), event.id)


def picked_up(order: str, rider: str) -> list[Msg]:
    return [*accepted_order(SHOP, order, rider), status(rider, order, "picked_up")]


def stored_data(engine: Engine, event_id: str | None) -> dict[str, Any]:
    [row] = rows(engine, EVENTS, EVENTS.c.id == event_id)
    assert row["type"] == "order.amended"
    data: dict[str, Any] = row["data"]
    return data


NEW_LAT, NEW_LON = BASE_LAT + 2_000 * DEG_PER_M, BASE_LON


def test_an_amendment_is_stored_once_with_old_and_new_values(desk: Desk, engine: Engine) -> None:
    desk.ok_each(accepted_order(SHOP, "o1", "r1"))
    before = rows(engine, ORDERS, ORDERS.c.id == "o1")[0]
    new_end = before["window_end"] + timedelta(hours=1)
    msg = amend(
        "o1",
        window_end=new_end,
        instructions=ev.Instructions(kind=ev.InstructionKind.LEAVE_AT_DOOR, text="behind the blue pot"),
        customer_phone="+49 30 1234",
        note="",  # the same as now: not a change
        asked_by="customer",
        reason="she is out until later",
    )
    r = desk.ok(msg)
    changes = stored_data(engine, msg.id)["changes"]
    assert changes == {
        "window_end": {"old": before["window_end"].isoformat(), "new": new_end.isoformat()},
        "instructions": {
            "old": {"kind": "none", "text": ""},
            "new": {"kind": "leave_at_door", "text": "behind the blue pot"},
        },
        "customer_phone": {"old": "", "new": "+49 30 1234"},
    }
    [published] = payloads(r, topics.order_topic(SHOP, "o1", "status"))
    assert (published["type"], published["data"]["changes"]) == ("order.amended", changes)
    assert published["data"]["asked_by"] == "customer"
    assert acked_ids(r, topics.shop_acks(SHOP)) == [msg.id]

    # The rider holding it hears of it, without the customer's number.
    [told] = payloads(r, topics.rider_inbox("r1", "amendments"))
    assert set(told["data"]["changes"]) == {"window_end", "instructions"}
    assert "customer_phone" not in told["data"]

    [state] = payloads(r, topics.order_topic(SHOP, "o1", "state"))
    assert datetime.fromisoformat(state["window"]["end"]) == new_end
    assert state["instructions"] == {"kind": "leave_at_door", "text": "behind the blue pot"}
    last = state["last_amendment"]
    assert (last["id"], last["asked_by"], last["reason"]) == (msg.id, "customer", "she is out until later")
    assert sorted(last["fields"]) == ["customer_phone", "instructions", "window_end"]
    assert any(t["status"] == "amended" for t in state["timeline"])

    row = rows(engine, ORDERS, ORDERS.c.id == "o1")[0]
    assert (row["window_end"], row["instructions"], row["customer_phone"]) == (
        new_end,
        "leave_at_door",
        "+49 30 1234",
    )
    # The same request again (a shop's outbox re-sending it) is a duplicate, before and after a
    # restart, though what is stored says more than what was sent.
    r = desk.send(msg)
    assert (r.duplicates, r.refused) == (1, 0)
    desk.restart()
    r = desk.send(msg)
    assert (r.duplicates, r.refused) == (1, 0), refusals(r)
    assert count(engine, EVENTS, EVENTS.c.id == msg.id) == 1


def test_the_rules_name_themselves(desk: Desk, engine: Engine) -> None:
    desk.ok_each(picked_up("o1", "r1"))
    r = desk.send(amend("o1", items=["12 red roses", "a card"]))
    assert r.refused == 1
    [reason] = refusals(r)
    assert reason.startswith("rule items-until-picked-up:") and "'o1' is picked_up" in reason
    [told] = payloads(r, topics.shop_errors(SHOP))
    assert told["reason"] == reason
    assert count(engine, DEAD_LETTERS, DEAD_LETTERS.c.reason == reason) == 1

    desk.ok(status("r1", "o1", "arrived"))
    r = desk.send(amend("o1", address="Rosenweg 9"))
    assert r.refused == 1 and refusals(r)[0].startswith("rule address-until-arrived:")
    desk.ok(amend("o1", instructions=ev.Instructions(kind=ev.InstructionKind.CALL_FIRST)))  # still fine

    desk.ok(status("r1", "o1", "delivered"))
    for change in ({"note": "late note"}, {"window_end": ev.now() + timedelta(hours=3)}):
        r = desk.send(amend("o1", **change))
        assert r.refused == 1 and refusals(r)[0].startswith("rule nothing-after-final:"), refusals(r)
    assert count(engine, EVENTS, EVENTS.c.type == "order.amended") == 1

    desk.ok(create_order(SHOP, "o2"))
    r = desk.send(amend("o2", window_end=ev.now() - timedelta(days=1)))
    assert r.refused == 1 and "data.window" in refusals(r)[0]
    r = desk.send(amend("o2", note=""))
    assert r.refused == 1 and "nothing to change" in refusals(r)[0]
    r = desk.send(amend("o2", shop="s2", note="not yours"))
    assert r.refused == 1 and "does not belong to shop 's2'" in refusals(r)[0]
    fact = ev.OrderAmendedEvent(source=f"shops/{SHOP}", data=ev.OrderAmendment(order="o2", note="x"))
    r = desk.send(Msg(topics.shop_command(SHOP, "amend-order"), ev.encode(fact), fact.id))
    assert r.refused == 1 and "send the request 'order.amend'" in refusals(r)[0]


def test_a_new_address_after_pickup_is_confirmed_and_the_eta_follows(desk: Desk, engine: Engine) -> None:
    desk.ok_each(picked_up("o1", "r1"))
    desk.ok(Msg(*_location("r1", BASE_LAT, BASE_LON)))
    msg = amend("o1", address="Lindenallee 4", lat=NEW_LAT, lon=NEW_LON)
    r = desk.ok(msg)
    [told] = payloads(r, topics.rider_inbox("r1", "amendments"))
    assert told["id"] == msg.id
    assert told["data"]["changes"]["position"]["new"] == {"lat": NEW_LAT, "lon": NEW_LON}
    [state] = payloads(r, topics.order_topic(SHOP, "o1", "state"))
    assert state["destination"] == {"lat": NEW_LAT, "lon": NEW_LON, "address": "Lindenallee 4"}
    to_new = geo.distance_m(BASE_LAT, BASE_LON, NEW_LAT, NEW_LON)
    row = rows(engine, ORDERS, ORDERS.c.id == "o1")[0]
    assert row["eta"] is not None and (row["lat"], row["lon"]) == (NEW_LAT, NEW_LON)

    # The next position: the ETA is computed to the new door.
    r = desk.ok(Msg(*_location("r1", BASE_LAT, BASE_LON, tst=tst_now() + 1)))
    [located] = payloads(r, topics.order_topic(SHOP, "o1", "location"))
    now = rows(engine, ORDERS, ORDERS.c.id == "o1")[0]["updated_at"]
    expected = geo.eta(BASE_LAT, BASE_LON, NEW_LAT, NEW_LON, now, geo.DEFAULT_SPEED_KMH)
    assert abs((datetime.fromisoformat(located["eta"]) - expected).total_seconds()) < 1.0, to_new

    # The rider confirms: the shop sees who confirmed which amendment.
    r = desk.ok(confirm("r1", "o1", msg.id or ""))
    [seen] = payloads(r, topics.order_topic(SHOP, "o1", "status"))
    assert (seen["type"], seen["data"]["rider"], seen["data"]["amendment"]) == (
        "order.amendment_confirmed",
        "r1",
        msg.id,
    )
    [state] = payloads(r, topics.order_topic(SHOP, "o1", "state"))
    assert state["last_amendment"]["confirmed_by"] == "r1"
    r = desk.send(confirm("r1", "o1", msg.id or ""))  # a second tap changes nothing
    assert (r.ignored, r.refused) == (1, 0)
    r = desk.send(confirm("r1", "o1", "not-an-amendment"))
    assert r.refused == 1 and "is not the last amendment" in refusals(r)[0]
    r = desk.send(confirm("r2", "o1", msg.id or ""))
    assert r.refused == 1 and "not assigned to rider 'r2'" in refusals(r)[0]


def _location(rider: str, lat: float, lon: float, *, tst: int | None = None) -> tuple[str, bytes, str]:
    data = ev.RiderLocation(lat=lat, lon=lon, tst=tst or tst_now())
    event = ev.RiderLocationReportedEvent(source=f"riders/{rider}", data=data)
    return topics.rider_location(rider), ev.encode(event), event.id


def test_a_new_address_withdraws_an_unanswered_dispatch_offer(desk: Desk, engine: Engine) -> None:
    desk.ok_each([create_order(SHOP, "o1"), offer("o1", "r1")])
    r = desk.ok(amend("o1", address="Lindenallee 4", lat=NEW_LAT, lon=NEW_LON))
    statuses = [
        p for p in payloads(r, topics.order_topic(SHOP, "o1", "status")) if p["type"] != "order.amended"
    ]
    assert [(p["data"]["status"], p["data"]["note"]) for p in statuses] == [
        ("declined", "offer to r1 withdrawn: the address changed")
    ]
    assert payloads(r, topics.rider_inbox("r1", "amendments")), "the rider offered it hears why"
    row = rows(engine, ORDERS, ORDERS.c.id == "o1")[0]
    assert (row["status"], row["rider"], row["declined_by"]) == ("declined", None, [])
    assert rows(engine, OFFERS, OFFERS.c.id == "of-o1")[0]["status"] == "withdrawn"
    desk.ok(offer("o1", "r1", offer_id="of-o1-b"))  # dispatch may offer it again, to anyone


def test_an_address_change_after_pickup_through_the_broker(rig: Rig) -> None:
    spy, dev = rig.spy, rig.devices
    status_topic = topics.order_topic(SHOP, "o1", "status")
    with rig.persister():
        dev.confirm(*picked_up("o1", "r1"))
        msg = amend("o1", address="Lindenallee 4", lat=NEW_LAT, lon=NEW_LON, reason="wrong house")
        dev.confirm(msg)
        inbox = topics.rider_inbox("r1", "amendments")
        [told] = spy.wait(lambda s: s.topic == inbox, what="the rider's amendment")
        assert told.json()["data"]["changes"]["address"]["new"] == "Lindenallee 4"
        dev.confirm(confirm("r1", "o1", msg.id or ""))
        [seen] = spy.wait(
            lambda s: s.topic == status_topic and s.json().get("type") == "order.amendment_confirmed",
            what="the rider's confirmation on the shop's topic",
        )
        assert seen.json()["data"]["rider"] == "r1"
        dev.send(Msg(*_location("r1", BASE_LAT, BASE_LON)))
        location = topics.order_topic(SHOP, "o1", "location")
        [located] = spy.wait(lambda s: s.topic == location, what="the next location")
        eta = datetime.fromisoformat(located.json()["eta"])
        at = datetime.fromisoformat(located.json()["position"]["at"])
        old_eta = geo.eta(BASE_LAT, BASE_LON, BASE_LAT + 0.01, BASE_LON, at, geo.DEFAULT_SPEED_KMH)
        assert eta - old_eta > timedelta(seconds=30), "the ETA is to the new door, farther away"
    data = stored_data(rig.engine, msg.id)
    assert data["changes"]["address"] == {"old": "o1 Rosenweg 1", "new": "Lindenallee 4"}


@pytest.fixture
def cli() -> Iterator[CliRunner]:
    """A runner for ``bloomwire``; the CLI sets logging up for the process, undone afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    config = structlog.get_config()
    yield CliRunner()
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.configure(**config)


def test_history_shows_the_amendment_with_old_and_new_values(
    desk: Desk, cli: CliRunner, database_url: str, tmp_path: Path
) -> None:
    desk.ok_each(accepted_order(SHOP, "o1", "r1"))
    desk.ok(amend("o1", address="Lindenallee 4", asked_by="customer", reason="moved in with her sister"))
    env = {"COLUMNS": "250", "BLOOMWIRE_DATABASE_URL": database_url}
    result = cli.invoke(app, ["--data-dir", str(tmp_path / "data"), "history", "o1"], env=env)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "address: 'o1 Rosenweg 1' → 'Lindenallee 4'" in text, result.output
    assert "at the customer's request: moved in with her sister" in text, result.output
