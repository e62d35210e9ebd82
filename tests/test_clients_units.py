"""The clients' pure parts: the outbox file, the shop and customer views, input parsing, routes."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from rich.console import Console

from bloomwire.app.clients.access import CustomerAccess, UsernameOnly, customer_username
from bloomwire.app.clients.base import UsageError, parse_point, resolve_password
from bloomwire.app.clients.outbox import Outbox
from bloomwire.app.clients.rider import (
    RiderApp,
    RiderDevice,
    RoutePlayer,
    load_route,
    location_event,
    status_event,
)
from bloomwire.app.clients.shop import OrderDraft, parse_window
from bloomwire.app.clients.track import customer_filters
from bloomwire.app.clients.views import ShopView, TrackView, lateness
from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.contract.lifecycle import OrderStatus
from bloomwire.runtime.settings import Settings

SHOP = "rosen-mitte"
T0 = datetime(2027, 2, 14, 9, 0, tzinfo=ev.now().tzinfo)


# --- outbox -------------------------------------------------------------------------------------


def test_outbox_keeps_events_until_acked_and_moves_refusals_aside(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    try:
        a = status_event("r1", "o1", "picked_up")
        b = status_event("r1", "o1", "en_route")
        for out in (a, b):
            box.add(out.id, out.kind, out.topic, out.payload, now=100.0)
        box.add(a.id, a.kind, a.topic, a.payload)  # the same id twice is kept once
        assert [e.id for e in box.pending()] == [a.id, b.id]
        assert [e.id for e in box.unsent()] == [a.id, b.id]
        box.mark_sent([a.id], now=110.0)
        assert [e.id for e in box.unsent()] == [b.id]
        assert [e.id for e in box.due(5, now=120.0)] == [a.id]
        assert [e.id for e in box.ack([a.id, "unknown"])] == [a.id]
        entry = box.refuse(b.id, "order 'o1' is not assigned to rider 'r1'")
        assert entry is not None and entry.kind == "status"
        assert box.count() == 0
        assert box.refusals() == [(b.id, "status", "order 'o1' is not assigned to rider 'r1'")]
    finally:
        box.close()


def test_outbox_survives_reopening_and_keeps_only_a_fresh_position(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    box = Outbox(path)
    chat = status_event("r1", "o1", "arrived")
    box.add(chat.id, chat.kind, chat.topic, chat.payload)
    first = location_event("r1", 52.5, 13.4, tst=1000)
    second = location_event("r1", 52.6, 13.5, tst=1001)
    box.add(first.id, first.kind, first.topic, first.payload, now=1000.0)
    box.add(second.id, second.kind, second.topic, second.payload, now=1001.0)
    box.close()  # the app is gone …
    again = Outbox(path)  # … and starts again
    try:
        assert [e.kind for e in again.pending()] == ["status", "location"]
        assert again.pending()[1].id == second.id  # a newer position replaces an older one
        assert again.count(records_only=True) == 1
        assert again.drop_stale_positions(60, now=1100.0) == 1
        assert again.drop_stale_positions(60, now=1100.0) == 0
        assert [e.id for e in again.pending()] == [chat.id]  # status is never dropped
    finally:
        again.close()


def test_outbox_lock_admits_one_sender(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    first, second = Outbox(path), Outbox(path)
    try:
        assert first.lock()
        result: list[bool] = []
        t = threading.Thread(target=lambda: result.append(second.lock()))
        t.start()
        t.join()
        assert result == [False]
        first.close()
        assert second.lock()
    finally:
        second.close()


# --- input --------------------------------------------------------------------------------------


def test_parse_window_accepts_times_and_iso_and_names_mistakes() -> None:
    now = datetime(2027, 2, 14, 9, 0).astimezone()
    w = parse_window("14:00-16:30", now=now)
    assert (w.start.hour, w.end.hour, w.end.minute) == (14, 16, 30)
    iso = parse_window("2027-02-14T10:00+01:00/2027-02-14T11:00+01:00", now=now)
    assert iso.end - iso.start == timedelta(hours=1)
    for text, message in (
        ("16:00-14:00", "end must be after its start"),
        ("25:00-26:00", "25:00 is not a time of day"),
        ("tomorrow", "must be HH:MM-HH:MM"),
        ("06:00-07:00", "a new order needs a window in the future"),
        ("2027-02-14T10:00/2027-02-16T10:00", "may not be longer than 24 hours"),
        ("2027-02-14T10:00/soon", "promised window"),
    ):
        with pytest.raises(UsageError, match=message):
            parse_window(text, now=now)


def test_points_and_drafts_name_the_bad_coordinate() -> None:
    assert parse_point(" 52.52 , 13.40 ") == (52.52, 13.40)
    with pytest.raises(UsageError, match=r"longitude 200\.0 is outside"):
        parse_point("52.5,200")
    with pytest.raises(UsageError, match="must be two numbers"):
        parse_point("north,east")
    window = ev.Window(start=T0, end=T0 + timedelta(hours=1))
    with pytest.raises(UsageError, match="customer position: latitude -91"):
        OrderDraft("A", -91, 13.4, window).build(SHOP)
    with pytest.raises(UsageError, match=r"customer\.name: String should have at least 1 character"):
        OrderDraft("  ", 52.5, 13.4, window).build(SHOP)
    event = OrderDraft("Anna", 52.5, 13.4, window, order="o7").build(SHOP)
    assert event.source == f"shops/{SHOP}" and event.data.customer_username == "c-o7"


def test_customer_access_is_pluggable() -> None:
    access = UsernameOnly().issue(SHOP, "o7", customer_username("o7"))
    assert access == CustomerAccess(SHOP, "o7", "c-o7", "c-o7", None)
    assert "no password was issued" in access.describe() and "bloomwire track o7" in access.describe()
    long_a, long_b = customer_username("o" * 64), customer_username("o" * 63 + "p")
    assert len(long_a) <= 64 and long_a != long_b  # never cut into another order's name


def test_password_lookup_order(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    with pytest.raises(UsageError, match="no password for rider 'r1'"):
        resolve_password(settings, "r1", None, "rider")
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "r1").write_text("from-file\n")
    assert resolve_password(settings, "r1", None, "rider") == "from-file"
    env = Settings(data_dir=tmp_path, broker_password="from-env")
    assert resolve_password(env, "r1", None, "rider") == "from-env"
    assert resolve_password(env, "r1", "given", "rider") == "given"
    other = Settings(data_dir=tmp_path, broker_username="someone-else", broker_password="x")
    assert resolve_password(other, "r1", None, "rider") == "from-file"


def test_routes_from_files(tmp_path: Path) -> None:
    csv = tmp_path / "r.txt"
    csv.write_text("lat,lon\n52.50,13.40  # start\n\n52.51,13.41\n")
    assert load_route(csv) == [(52.50, 13.40), (52.51, 13.41)]
    geojson = tmp_path / "r.geojson"
    line = {"type": "LineString", "coordinates": [[13.40, 52.50], [13.41, 52.51]]}
    geojson.write_text(
        json.dumps({"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": line}]})
    )
    assert load_route(geojson) == [(52.50, 13.40), (52.51, 13.41)]
    gpx = tmp_path / "r.gpx"
    gpx.write_text(
        '<gpx xmlns="http://www.topografix.com/GPX/1/1"><trk><trkseg>'
        '<trkpt lat="52.5" lon="13.4"/><trkpt lat="52.6" lon="13.5"/></trkseg></trk></gpx>'
    )
    assert load_route(gpx) == [(52.5, 13.4), (52.6, 13.5)]
    bad = tmp_path / "bad.txt"
    bad.write_text("52.5,13.4\n91,13.4\n")
    with pytest.raises(UsageError, match=r"bad\.txt:2: latitude 91"):
        load_route(bad)
    with pytest.raises(UsageError, match="cannot read route file"):
        load_route(tmp_path / "missing.gpx")


def test_route_player_rides_there_and_back() -> None:
    player = RoutePlayer([(52.50, 13.40), (52.51, 13.40)], speed_kmh=36)  # 10 m/s, ~1112 m
    assert player.at(0)[:2] == (52.50, 13.40)
    lat, _, speed = player.at(player.length / 10 / 2)
    assert lat == pytest.approx(52.505, abs=1e-4) and speed == pytest.approx(36)
    assert player.at(player.length / 10 * 2)[0] == pytest.approx(52.50, abs=1e-6)


# --- views --------------------------------------------------------------------------------------


def _state(order: str, status: OrderStatus, **extra: object) -> bytes:
    state = ev.OrderState(
        order=order,
        shop=SHOP,
        status=status,
        customer=str(extra.pop("customer", "Anna Schmidt")),
        window=ev.Window(start=T0, end=T0 + timedelta(hours=1)),
        updated_at=T0,
        **extra,  # type: ignore[arg-type]
    )
    return ev.encode(state)


def _status(order: str, status: OrderStatus, rider: str | None = None, **extra: object) -> bytes:
    data = ev.OrderStatusChanged(order=order, status=status, rider=rider, **extra)  # type: ignore[arg-type]
    return ev.encode(ev.OrderStatusChangedEvent(source=f"riders/{rider or 'x'}", time=T0, data=data))


def test_shop_view_renders_orders_eta_alerts_and_activity() -> None:
    view = ShopView(SHOP)
    t = topics.order_topic
    view.apply(t(SHOP, "o1", "state"), _state("o1", OrderStatus.CREATED))
    view.apply(t(SHOP, "o2", "state"), _state("o2", OrderStatus.EN_ROUTE, rider="r7", customer="Ben Nowak"))
    view.apply(t(SHOP, "o1", "status"), _status("o1", OrderStatus.ASSIGNED, rider="r3"))
    location = ev.OrderLocation(
        order="o2",
        rider="r7",
        position=ev.Position(lat=52.5, lon=13.4, at=T0 + timedelta(minutes=20)),
        eta=T0 + timedelta(minutes=75),
    )
    view.apply(t(SHOP, "o2", "location"), ev.encode(location))
    alert = ev.AlertRaisedEvent(
        source="services/alerts",
        data=ev.AlertRaised(
            alert="a1", rule=ev.AlertRule.ETA_SLIP, severity=ev.Severity.WARNING, shop=SHOP, order="o2",
            message="Order o2 will be about 15 min late",
        ),
    )  # fmt: skip
    view.apply(topics.shop_alerts(SHOP), ev.encode(alert))
    view.apply(t(SHOP, "o2", "alerts"), ev.encode(alert))  # the same alert on the order topic
    view.apply(
        topics.shop_errors(SHOP), ev.encode(ev.Refusal(id="x", topic="t", reason="unknown rider 'r9'"))
    )
    view.apply("shops/other-shop/orders/o9/state", _state("o9", OrderStatus.CREATED))  # not ours
    view.apply(topics.shop_command(SHOP, "chat"), b"{}")  # our own command echoed: ignored

    console = Console(record=True, width=160)
    console.print(view.render(now=T0 + timedelta(minutes=30)))
    text = console.export_text()
    assert f"Shop {SHOP}" in text and "2 order(s)" in text
    assert "o1" in text and "assigned" in text and "r3" in text
    assert "o2" in text and "en_route" in text and "Ben Nowak" in text
    assert "ETA" in text and "15 min late" in text
    assert "eta_slip" in text and "Open alerts" in text and "a1" in text
    assert "unknown rider 'r9'" in text
    assert "o9" not in text
    assert len(view.open_alerts("o2")) == 1
    resolved = ev.AlertResolvedEvent(source="services/alerts", data=ev.AlertResolved(alert="a1"))
    view.apply(topics.shop_alerts(SHOP), ev.encode(resolved))
    assert view.open_alerts() == []


def test_shop_view_keeps_the_failure_reason_after_return() -> None:
    view = ShopView(SHOP)
    t = topics.order_topic(SHOP, "o1", "status")
    view.apply(t, _status("o1", OrderStatus.FAILED, rider="r1", reason="customer_unreachable"))
    view.apply(t, _status("o1", OrderStatus.RETURNED, rider="r1"))
    assert (view.orders["o1"].status, view.orders["o1"].reason) == ("returned", "customer_unreachable")


def test_track_view_shows_its_order_only_with_eta_and_distance() -> None:
    view = TrackView(SHOP, "o1", destination=(52.52, 13.40))
    assert customer_filters(SHOP, "o1", "c-o1") == [
        f"shops/{SHOP}/orders/o1/status",
        f"shops/{SHOP}/orders/o1/location",
        f"shops/{SHOP}/orders/o1/chat",
        f"shops/{SHOP}/orders/o1/state",
        "customers/c-o1/inbox/#",
    ]
    view.apply(topics.order_topic(SHOP, "o1", "state"), _state("o1", OrderStatus.PICKED_UP, rider="r1"))
    view.apply(topics.order_topic(SHOP, "o1", "status"), _status("o1", OrderStatus.EN_ROUTE, rider="r1"))
    loc = ev.OrderLocation(
        order="o1",
        rider="r1",
        position=ev.Position(lat=52.53, lon=13.40, at=T0),
        eta=T0 + timedelta(minutes=40),
    )
    view.apply(topics.order_topic(SHOP, "o1", "location"), ev.encode(loc))
    chat = ev.OrderChatPostedEvent(
        source="riders/r1", time=T0, data=ev.OrderChat(order="o1", text="5 min!", author="rider:r1")
    )
    view.apply(topics.order_topic(SHOP, "o1", "chat"), ev.encode(chat))
    view.apply(topics.order_topic(SHOP, "o2", "chat"), ev.encode(chat))  # never subscribed; counted
    assert view.foreign == 1
    assert view.distance_m() == pytest.approx(1112, rel=0.01)
    console = Console(record=True, width=120)
    console.print(view.render())
    text = console.export_text()
    assert "Order o1" in text and "en_route" in text and "1.1 km away" in text and "5 min!" in text
    assert "ETA" in text and "on time" in text
    assert (
        lateness(T0 + timedelta(minutes=70), ev.Window(start=T0, end=T0 + timedelta(hours=1)))
        == "10 min late"
    )


def test_track_view_measures_to_the_delivery_address_of_the_state_without_at() -> None:
    view = TrackView(SHOP, "o1")
    home = ev.Place(lat=52.52, lon=13.40, address="Torstraße 1")
    out = ev.Position(lat=52.53, lon=13.40, at=T0)
    view.apply(
        topics.order_topic(SHOP, "o1", "state"),
        _state("o1", OrderStatus.EN_ROUTE, rider="r1", position=out, destination=home),
    )
    assert view.distance_m() == pytest.approx(1112, rel=0.01)
    assert TrackView(SHOP, "o1", destination=(52.53, 13.40)).distance_m() is None, "no rider yet"


def test_shop_view_takes_the_provisioners_customer_access() -> None:
    view = ShopView(SHOP)
    data = ev.CustomerAccess(
        shop=SHOP,
        order="o1",
        customer="c-o1",
        username="cust@0123456789abcdef0123",
        password="secret",
        topics=[f"shops/{SHOP}/orders/o1/status"],
        enrol_topic="customers/c-o1/devices",
        reply_topic="customers/c-o1/inbox/devices",
        max_devices=3,
    )
    topic = f"shops/{SHOP}/orders/o1/{topics.ACCESS}"
    view.apply(topic, ev.encode(ev.CustomerAccessGrantedEvent(source="services/provisioner", data=data)))
    access = CustomerAccess.from_provisioner(view.accesses["o1"])
    assert (access.customer, access.username, access.password) == (
        "c-o1",
        "cust@0123456789abcdef0123",
        "secret",
    )
    assert "--username cust@0123456789abcdef0123" in access.describe()
    view.apply(topic, b"")  # revoked
    assert "o1" not in view.accesses


def test_rider_app_shows_where_to_collect_and_deliver_an_offer(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, broker_port=1)  # never connects
    device = RiderDevice(settings, "r1", "pw", Outbox(tmp_path / "outbox.db"))
    console = Console(record=True, width=120)
    app = RiderApp(device, console, source=None, interval=5, offers="ask", read_commands=False)
    offer = ev.DispatchOfferedEvent(
        source="services/dispatch",
        data=ev.DispatchOffer(
            offer="of-1",
            order="o1",
            rider="r1",
            deadline=ev.now() + timedelta(seconds=60),
            pickup=ev.Place(lat=52.5, lon=13.4),
            dropoff=ev.Place(lat=52.52, lon=13.41, address="Torstraße 1"),
        ),
    )
    app.offer(offer)
    text = console.export_text()
    assert "collect at 52.50000,13.40000" in text
    assert "deliver to Torstraße 1" in text
    assert "accept of-1" in text
