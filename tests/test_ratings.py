"""Ratings (issue 16): a customer rates its delivered order once, 1 to 5 stars with a comment.

Desk tests (the projector over a real store, SQLite and PostgreSQL) for what is accepted and
refused; one test through a real broker that the rating is stored and reaches the shop's topics.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from conftest import Broker, MqttTestClient
from sqlalchemy import Engine
from test_persister import (
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
    payloads,
    raw,
    refusals,
    rows,
    status,
)
from typer.testing import CliRunner

from bloomwire.app.cli import app
from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.store import open_store
from bloomwire.store.models import EVENTS, ORDERS


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


def rate(customer: str, stars: int, comment: str = "", *, order: str | None = None) -> Msg:
    """A customer's ``order.rate`` on ``customers/C/chat``."""
    event = ev.OrderRateEvent(
        source=f"customers/{customer}", data=ev.OrderRating(order=order, stars=stars, comment=comment)
    )
    return Msg(topics.customer_chat(customer), ev.encode(event), event.id)


def delivered(order: str, rider: str, **create: object) -> list[Msg]:
    return [
        *accepted_order(SHOP, order, rider, **create),
        status(rider, order, "picked_up"),
        status(rider, order, "arrived"),
        status(rider, order, "delivered"),
    ]


def test_a_delivered_order_is_rated_once(desk: Desk, engine: Engine) -> None:
    desk.ok_each(delivered("o1", "r1"))
    msg = rate("c-o1", 4, "  Lovely tulips  ")
    r = desk.ok(msg)
    [published] = payloads(r, topics.order_topic(SHOP, "o1", "status"))
    assert (published["type"], published["data"]) == (
        "order.rated",
        {"order": "o1", "stars": 4, "comment": "Lovely tulips"},
    )
    [state] = payloads(r, topics.order_topic(SHOP, "o1", "state"))
    assert (state["rating"], state["rating_comment"]) == (4, "Lovely tulips")
    assert acked_ids(r, topics.customer_inbox("c-o1", "acks")) == [msg.id]
    [row] = rows(engine, ORDERS, ORDERS.c.id == "o1")
    assert (row["rating"], row["rating_comment"]) == (4, "Lovely tulips")
    [stored] = rows(engine, EVENTS, EVENTS.c.id == msg.id)
    assert (stored["type"], stored["order_id"], stored["shop"]) == ("order.rated", "o1", SHOP)

    r = desk.send(rate("c-o1", 1, "changed my mind"))
    assert r.refused == 1 and "already rated (4 stars)" in refusals(r)[0]
    assert payloads(r, topics.customer_inbox("c-o1", "errors")), "the customer hears why"
    assert rows(engine, ORDERS, ORDERS.c.id == "o1")[0]["rating"] == 4

    desk.restart()  # the rating is reloaded with the order: still refused
    r = desk.send(rate("c-o1", 5))
    assert r.refused == 1 and "already rated" in refusals(r)[0]


def test_ratings_refused_with_a_reason(desk: Desk, engine: Engine) -> None:
    desk.ok_each([*accepted_order(SHOP, "o2", "r2"), *delivered("o3", "r3")])
    r = desk.send(rate("c-o2", 5))
    assert r.refused == 1 and "'o2' is accepted; it can be rated once delivered" in refusals(r)[0]
    r = desk.send(rate("c-o3", 5, order="o2"))
    assert r.refused == 1 and "may only rate its own order" in refusals(r)[0]
    r = desk.send(rate("nobody", 5))
    assert r.refused == 1 and "has no order" in refusals(r)[0]
    for stars in (0, 6, "5", 4.5, True):
        body = {
            "specversion": "1.0",
            "id": f"bad-{stars!s}",
            "source": "customers/c-o3",
            "time": ev.now().isoformat(),
            "type": "order.rate",
            "data": {"stars": stars},
        }
        r = desk.send(raw(topics.customer_chat("c-o3"), json.dumps(body).encode(), body["id"]))
        assert r.refused == 1 and "data.stars" in refusals(r)[0], (stars, refusals(r))
    long = {
        "specversion": "1.0",
        "id": "too-long",
        "source": "customers/c-o3",
        "time": ev.now().isoformat(),
        "type": "order.rate",
        "data": {"stars": 3, "comment": "x" * 501},
    }
    r = desk.send(raw(topics.customer_chat("c-o3"), json.dumps(long).encode(), "too-long"))
    assert r.refused == 1 and "data.comment" in refusals(r)[0]
    fact = ev.OrderRatedEvent(source="customers/c-o3", data=ev.OrderRating(stars=5))
    r = desk.send(Msg(topics.customer_chat("c-o3"), ev.encode(fact), fact.id))
    assert r.refused == 1 and "send the request 'order.rate'" in refusals(r)[0]
    assert count(engine, EVENTS, EVENTS.c.type == "order.rated") == 0
    assert [row["rating"] for row in rows(engine, ORDERS)] == [None, None]


def test_a_rating_reaches_the_shop_through_the_broker(rig: Rig) -> None:
    spy, dev = rig.spy, rig.devices
    status_topic = topics.order_topic(SHOP, "o1", "status")
    state_topic = topics.order_topic(SHOP, "o1", "state")
    with rig.persister():
        dev.confirm(*delivered("o1", "r1"))
        msg = rate("c-o1", 5, "On time, thank you")
        dev.confirm(msg)
        [rated] = spy.wait(
            lambda s: s.topic == status_topic and s.json()["type"] == "order.rated", what="order.rated"
        )
        assert rated.json()["data"] == {"order": "o1", "stars": 5, "comment": "On time, thank you"}
        spy.wait(lambda s: s.topic == state_topic and s.json().get("rating") == 5, what="rated state")
    assert count(rig.engine, EVENTS, EVENTS.c.id == msg.id, EVENTS.c.type == "order.rated") == 1


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


def test_shop_ratings_averages_per_rider_and_day(
    desk: Desk, engine: Engine, cli: CliRunner, database_url: str, tmp_path: Path
) -> None:
    desk.ok_each([*delivered("o1", "r1"), *delivered("o2", "r1"), *delivered("o3", "r2")])
    desk.ok_each([rate("c-o1", 5), rate("c-o2", 2, "late"), rate("c-o3", 4)])
    env = {"COLUMNS": "200", "BLOOMWIRE_DATABASE_URL": database_url}
    argv = ["--data-dir", str(tmp_path / "data"), "shop", "ratings", "--shop", SHOP]
    result = cli.invoke(app, argv, env=env)
    assert result.exit_code == 0, result.output
    assert f"Shop {SHOP}: 3.67 stars over 3 rated orders" in result.output
    lines = [" ".join(line.replace("│", " ").split()) for line in result.output.splitlines()]
    assert "r1 2 3.50" in lines and "r2 1 4.00" in lines
    days = {row["delivered_at"].date() for row in rows(engine, ORDERS)}
    # Each rated order too, beside the averages (rider, day, stars, comment).
    on = {row["id"]: row["delivered_at"].date().isoformat() for row in rows(engine, ORDERS)}
    listed = [f"o1 r1 {on['o1']} 5", f"o2 r1 {on['o2']} 2 late", f"o3 r2 {on['o3']} 4"]
    assert all(line in lines for line in listed), lines
    titles = [line for line in lines if line in ("Rated orders", "Per rider", "Per day")]
    assert titles == ["Rated orders", "Per rider", "Per day"], lines
    expected = [f"{d.isoformat()} 3 3.67" for d in days] if len(days) == 1 else []  # one day, unless midnight
    assert not expected or expected[0] in lines, lines
    result = cli.invoke(app, [*argv[:-1], "s404"], env=env)
    assert result.exit_code == 0 and "Shop s404: no ratings yet." in result.output
    result = cli.invoke(app, ["--data-dir", str(tmp_path / "data"), "history", "o2"], env=env)
    assert result.exit_code == 0 and "2 of 5 stars: late" in result.output, result.output
