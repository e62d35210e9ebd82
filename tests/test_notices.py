"""Notices against a real broker and store: the persister and the notices service, each in its
own background loop (the notices one is stopped and started again to test a restart).

Orders go through the real MQTT path (rider online with a position, the shop's create-order and
assign, the rider's accept and pick-up), so the persister computes real ETAs and publishes the
order's location; the notices come back on the order's status topic, which its customer reads.
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import servicekit
import sqlalchemy as sa
from PIL import Image
from servicekit import Running

from bloomwire.app.demo import Told, _told_rows
from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.contract.lifecycle import FailureReason, OrderStatus
from bloomwire.runtime.settings import Settings
from bloomwire.services import notices, persister
from bloomwire.services.notices import decide, texts
from bloomwire.store import make_engine
from bloomwire.store.models import EVENTS

SHOP, RIDER = "s1", "r1"
RIDER_SRC, SHOP_SRC = f"{topics.RIDERS}/{RIDER}", f"{topics.SHOPS}/{SHOP}"
#: Where the customers live (the rider starts about 1.3 km away).
HOME = (52.53, 13.41)


class Watch(servicekit.Watch):
    """A decoded watch with the notices of an order at hand."""

    def notices(self, order: str, kind: str | None = None) -> list[dict[str, Any]]:
        """The notices seen on ``order``'s status topic (of ``kind``)."""
        self.drain()
        status = topics.order_topic(SHOP, order, topics.OrderChannel.STATUS)
        return [
            b
            for t, b in self.seen
            if t == status and b["type"] == "order.notified" and kind in (None, b["data"]["kind"])
        ]

    def notice(self, order: str, kind: str) -> dict[str, Any]:
        """The first notice of ``kind`` on ``order``, waited for."""
        status = topics.order_topic(SHOP, order, topics.OrderChannel.STATUS)
        return self.until(
            lambda t, b: t == status and b["type"] == "order.notified" and b["data"]["kind"] == kind,
            f"{kind} notice on {order}",
        )


@dataclass
class Stack:
    client: Any
    watch: Watch
    notices_settings: Settings
    database_url: str


def _send(client: Any, topic: str, event: Any) -> None:
    client.publish(topic, ev.encode(event), qos=1)


def _stack(
    make_settings: Callable[..., Settings], mqtt_user: Any, mqtt_client: Any, url: str
) -> Iterator[Stack]:
    with Running((persister.build, make_settings(database_url=url))) as running:
        client = mqtt_client(*mqtt_user())
        client.subscribe(topics.shop_filter(SHOP))
        client.subscribe(topics.rider_inbox_filter(RIDER))
        yield Stack(client, Watch(client), make_settings(database_url=url), running.settings.database_url)
        client.close()


@pytest.fixture
def stack(make_settings: Callable[..., Settings], mqtt_user: Any, mqtt_client: Any) -> Iterator[Stack]:
    """The persister running (SQLite), and a client watching shop s1 and rider r1's inbox
    (the notices service: started by each test)."""
    yield from _stack(make_settings, mqtt_user, mqtt_client, "")


@pytest.fixture
def any_stack(
    make_settings: Callable[..., Settings], mqtt_user: Any, mqtt_client: Any, database_url: str
) -> Iterator[Stack]:
    """The same, on SQLite and on PostgreSQL."""
    yield from _stack(make_settings, mqtt_user, mqtt_client, database_url)


def _at(client: Any, lat: float, lon: float) -> None:
    position = ev.RiderLocation(lat=lat, lon=lon, tst=int(time.time()))
    event = ev.RiderLocationReportedEvent(source=RIDER_SRC, data=position)
    _send(client, topics.rider_location(RIDER), event)


def _status(client: Any, order: str, status: OrderStatus, reason: FailureReason | None = None) -> None:
    data = ev.OrderStatusChanged(order=order, status=status, reason=reason)
    _send(
        client,
        topics.rider_order_status(RIDER, order),
        ev.OrderStatusChangedEvent(source=RIDER_SRC, data=data),
    )


def _picked_up(
    s: Stack,
    order: str,
    *,
    language: ev.Language | None = None,
    window: timedelta = timedelta(hours=2),
    code_required: bool = False,
) -> ev.OrderState:
    """Create, assign, accept and pick up ``order``; its retained state with the ETA."""
    client, watch = s.client, s.watch
    now = ev.now()
    online = ev.RiderPresenceChangedEvent(source=RIDER_SRC, data=ev.RiderPresence(status=ev.Presence.ONLINE))
    _send(client, topics.rider_presence(RIDER), online)
    _at(client, 52.52, 13.40)
    created = ev.OrderCreated(
        order=order,
        customer=ev.Customer(name="Mei", address="Torstr. 1", lat=HOME[0], lon=HOME[1]),
        window=ev.Window(start=now, end=now + window),
        language=language,
        handover_code_required=code_required,
    )
    _send(
        client,
        topics.shop_command(SHOP, topics.Command.CREATE_ORDER),
        ev.OrderCreateEvent(source=SHOP_SRC, data=created),
    )
    state = f"{order}/state"
    watch.until(lambda t, b: t.endswith(state) and b.get("status") == "created", "order created")
    assign = ev.OrderAssignEvent(source=SHOP_SRC, data=ev.OrderAssigned(order=order, rider=RIDER))
    _send(client, topics.shop_command(SHOP, topics.Command.ASSIGN), assign)
    offer = watch.until(
        lambda t, b: t.endswith("/inbox/offers") and b["data"]["order"] == order, f"offer of {order}"
    )
    reply = ev.DispatchReply(offer=offer["data"]["offer"], order=order, accept=True)
    _send(client, topics.rider_replies(RIDER), ev.DispatchReplyEvent(source=RIDER_SRC, data=reply))
    watch.until(lambda t, b: t.endswith(state) and b.get("status") == "accepted", "accepted")
    _status(client, order, OrderStatus.PICKED_UP)
    body = watch.until(
        lambda t, b: t.endswith(state) and b.get("status") == "picked_up" and b.get("eta"), "ETA"
    )
    return ev.OrderState.model_validate(body)


def _stored(database_url: str, order: str) -> list[dict[str, Any]]:
    """The ``order.notified`` events the store holds for ``order``."""
    engine = make_engine(database_url, readonly=True)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(EVENTS.c.data).where(EVENTS.c.order_id == order, EVENTS.c.type == "order.notified")
            ).scalars()
            return list(rows)
    finally:
        engine.dispose()


def test_a_flat_tyre_is_told_with_the_new_eta_before_the_window_ends(stack: Stack) -> None:
    order = "o-notice-tyre"
    with Running((notices.build, stack.notices_settings)):
        state = _picked_up(stack, order)
        stack.watch.notice(order, "picked_up")
        new_eta = ev.now() + timedelta(minutes=40)
        incident = ev.OrderIncidentReportedEvent(
            source=RIDER_SRC, data=ev.OrderIncident(order=order, reason="flat_tyre", eta=new_eta)
        )
        _send(stack.client, topics.rider_order_status(RIDER, order), incident)
        delayed = stack.watch.notice(order, "delayed")
    notice = ev.OrderNotice.model_validate(delayed["data"])
    assert notice.eta is not None and abs(notice.eta - new_eta) < timedelta(milliseconds=1)
    assert notice.reason == "flat_tyre" and notice.language is ev.Language.EN
    assert f"{new_eta:%H:%M}" in notice.text and "flat tyre" in notice.text, notice.text
    assert "still within the promised time" in notice.text  # 40 min late, the window is 2 h
    assert ev.now() < state.window.end  # told while the promise still holds
    assert delayed["id"] == notices.service.notice_id(order, decide.key(ev.NoticeKind.DELAYED, incident.id))


def test_an_eta_slipping_past_the_window_is_told_once_before_it_ends(stack: Stack) -> None:
    order = "o-notice-late"
    with Running((notices.build, stack.notices_settings)):
        # The window closes in 2 minutes; the rider is more than that away.
        state = _picked_up(stack, order, window=timedelta(minutes=2))
        _at(stack.client, 52.5201, 13.4001)
        late = stack.watch.notice(order, "delayed")
        _at(stack.client, 52.5202, 13.4002)
        _status(stack.client, order, OrderStatus.EN_ROUTE)
        stack.watch.until(
            lambda t, b: t.endswith(f"{order}/state") and b.get("status") == "en_route", "en route"
        )
    assert late["data"]["reason"] == decide.LATE and "promised time" in late["data"]["text"]
    assert ev.OrderNotice.model_validate(late["data"]).eta > state.window.end  # type: ignore[operator]
    assert len(stack.watch.notices(order, "delayed")) == 1


def test_a_window_about_to_end_before_pick_up_is_told_before_it_ends(stack: Stack) -> None:
    """Nobody took the order and its window ends in 3 minutes: the clock says it is late, once."""
    order = "o-notice-clock"
    now = ev.now()
    created = ev.OrderCreated(
        order=order,
        customer=ev.Customer(name="Mei", lat=HOME[0], lon=HOME[1]),
        window=ev.Window(start=now - timedelta(minutes=30), end=now + timedelta(minutes=3)),
    )
    create = ev.OrderCreateEvent(source=SHOP_SRC, data=created)
    _send(stack.client, topics.shop_command(SHOP, topics.Command.CREATE_ORDER), create)
    stack.watch.until(lambda t, b: t.endswith(f"{order}/state"), "order created")
    with Running((lambda s: notices.build(s, tick_s=0.2), stack.notices_settings)):
        late = stack.watch.notice(order, "delayed")
        marker = "o-notice-clock-2"  # a second order's notice: the clock went round since
        created = created.model_copy(update={"order": marker})
        _send(
            stack.client,
            topics.shop_command(SHOP, topics.Command.CREATE_ORDER),
            ev.OrderCreateEvent(source=SHOP_SRC, data=created),
        )
        stack.watch.notice(marker, "delayed")
    assert ev.now() < created.window.end
    assert late["data"]["reason"] == decide.LATE and "eta" not in late["data"]
    assert "as soon as we know" in late["data"]["text"]
    assert len(stack.watch.notices(order, "delayed")) == 1


def test_arriving_fires_once_as_the_rider_approaches(stack: Stack) -> None:
    order = "o-notice-near"
    with Running((notices.build, stack.notices_settings)):
        _picked_up(stack, order)
        _at(stack.client, 52.5201, 13.4001)
        stack.watch.notice(order, "on_the_way")
        for lat in (52.527, 52.5292, 52.5295, 52.5297, 52.5299):  # ~330 m, then within 150 m, 4 times
            _at(stack.client, lat, HOME[1])
        stack.watch.notice(order, "arriving")
        _status(stack.client, order, OrderStatus.ARRIVED)
        _status(stack.client, order, OrderStatus.DELIVERED)
        stack.watch.notice(order, "delivered")
    assert len(stack.watch.notices(order, "arriving")) == 1
    assert [n["kind"] for n in _stored(stack.database_url, order)].count("arriving") == 1


def test_steps_are_told_once_also_after_a_restart(any_stack: Stack) -> None:
    """Picked up, delivered, failed: once each. A status redelivered to a restarted service says
    nothing again; a notice sent again (its ack lost) is the same event: a duplicate."""
    stack = any_stack
    done, failed = "o-notice-done", "o-notice-fail"
    with Running((notices.build, stack.notices_settings)):
        _picked_up(stack, done)
        _picked_up(stack, failed)
        first = stack.watch.notice(done, "picked_up")
        stack.watch.notice(failed, "picked_up")
    # While it is down, the broker keeps the statuses for its session; one is a redelivery.
    status = topics.order_topic(SHOP, done, topics.OrderChannel.STATUS)
    picked = next(
        b
        for t, b in stack.watch.seen
        if t == status and b["type"] == "order.status_changed" and b["data"]["status"] == "picked_up"
    )
    stack.client.publish(status, json.dumps(picked).encode(), qos=1)
    _status(stack.client, done, OrderStatus.ARRIVED)
    _status(stack.client, done, OrderStatus.DELIVERED)
    _status(stack.client, failed, OrderStatus.FAILED, FailureReason.CUSTOMER_UNREACHABLE)
    with Running((notices.build, stack.notices_settings)):
        stack.watch.notice(done, "delivered")
        fail = stack.watch.notice(failed, "failed")
    # The same notice again, as after a crash before its ack: the persister takes it as a duplicate.
    _send(stack.client, notices.service.EVENTS_TOPIC, ev.OrderNotifiedEvent.model_validate(first))
    marker = ev.OrderChatPostedEvent(source=SHOP_SRC, data=ev.OrderChat(order=done, text="thanks"))
    _send(stack.client, topics.shop_command(SHOP, topics.Command.CHAT), marker)
    stack.watch.until(lambda t, b: t == topics.shop_acks(SHOP) and marker.id in b["ids"], "marker stored")
    assert not [b for t, b in stack.watch.seen if t == topics.DEADLETTER]
    for order, kinds in ((done, ["picked_up", "delivered"]), (failed, ["picked_up", "failed"])):
        assert sorted(
            n["data"]["kind"] for n in stack.watch.notices(order) if n["data"]["kind"] in kinds
        ) == sorted(kinds)
        stored = [n["kind"] for n in _stored(stack.database_url, order)]
        assert sorted(k for k in stored if k in kinds) == sorted(kinds), stored
    assert "call you" in fail["data"]["text"] and fail["data"]["reason"] == "customer_unreachable"


def _photo() -> bytes:
    """A small real JPEG, as a rider's phone sends it."""
    out = io.BytesIO()
    Image.new("RGB", (64, 48), "red").save(out, "JPEG")
    return out.getvalue()


def _delivered(s: Stack, order: str, code: str | None = None) -> None:
    _status(s.client, order, OrderStatus.ARRIVED)
    data = ev.OrderStatusChanged(order=order, status=OrderStatus.DELIVERED, code=code)
    event = ev.OrderStatusChangedEvent(source=RIDER_SRC, data=data)
    _send(s.client, topics.rider_order_status(RIDER, order), event)


def test_the_delivered_notice_says_the_proof_the_store_holds_then(stack: Stack) -> None:
    """A code the order required and a photo stored before ``delivered``: both said, in both
    languages. A photo stored after it: the notice (said once) did not claim it."""
    proven, later = "o-notice-proof", "o-notice-photo-later"
    with Running((notices.build, stack.notices_settings)):
        state = _picked_up(stack, proven, language=ev.Language.ZH_CN, code_required=True)
        _picked_up(stack, later)
        stack.client.publish(topics.rider_order_photo(RIDER, proven), _photo(), qos=1)
        stack.watch.until(lambda t, b: t.endswith(f"{proven}/state") and b.get("photo"), "photo stored")
        _delivered(stack, proven, state.handover_code)
        said = stack.watch.notice(proven, "delivered")["data"]["text"]
        _delivered(stack, later)
        plain = stack.watch.notice(later, "delivered")["data"]["text"]
        stack.client.publish(topics.rider_order_photo(RIDER, later), _photo(), qos=1)
        stack.watch.until(lambda t, b: t.endswith(f"{later}/state") and b.get("photo"), "late photo stored")
    zh, en = texts.templates()["zh-CN"], texts.templates()["en"]
    assert said == zh["delivered"].format(order=proven) + zh["proof_code"] + zh["proof_photo"]
    assert plain == en["delivered"].format(order=later)
    assert [n["data"]["text"] for n in stack.watch.notices(later, "delivered")] == [plain]
    rendered = texts.render(
        ev.NoticeKind.DELIVERED, ev.Language.EN, order="o", now=ev.now(), tz=UTC,
        window_end=ev.now(), proof=("proof_code", "proof_photo"),
    )  # fmt: skip
    assert "handed over with your code" in rendered
    assert "photo of the delivery is on your order page" in rendered


def _amend(s: Stack, order: str, **values: Any) -> ev.OrderAmendEvent:
    event = ev.OrderAmendEvent(source=SHOP_SRC, data=ev.OrderAmendment(order=order, **values))
    _send(s.client, topics.shop_command(SHOP, topics.Command.AMEND_ORDER), event)
    return event


def test_an_amendment_is_told_with_what_changed_and_why(stack: Stack) -> None:
    """One notice per amendment (its id from the amendment's): the customer's wish or the shop's
    decision with its reason, the new window and address themselves, in the order's language."""
    order, zh_order = "o-notice-amended", "o-notice-amended-zh"
    with Running((notices.build, stack.notices_settings)):
        state = _picked_up(stack, order)
        _picked_up(stack, zh_order, language=ev.Language.ZH_CN)
        new_end = state.window.end + timedelta(hours=1)
        asked = _amend(stack, order, window_end=new_end, note="Happy birthday", asked_by="customer")
        first = stack.watch.notice(order, "amended")
        door = {"address": "Torstr. 9", "lat": HOME[0] + 0.001, "lon": HOME[1]}
        moved = _amend(stack, order, **door, reason="gate closed")
        status = topics.order_topic(SHOP, order, topics.OrderChannel.STATUS)
        second = stack.watch.until(
            lambda t, b: t == status and b["type"] == "order.notified" and b["id"] != first["id"]
            and b["data"]["kind"] == "amended",
            "the second amendment's notice",
        )  # fmt: skip
        _amend(stack, zh_order, **door, asked_by="customer")
        zh = stack.watch.notice(zh_order, "amended")["data"]["text"]
    end = texts.clock(new_end, stack_tz(stack))
    assert first["id"] == notices.service.notice_id(order, decide.key(ev.NoticeKind.AMENDED, asked.id))
    assert second["id"] == notices.service.notice_id(order, decide.key(ev.NoticeKind.AMENDED, moved.id))
    assert first["data"]["text"] == (
        f"Your order {order} has been changed at your request: the delivery time is now by {end}; "
        "the card's message was changed."
    )
    assert second["data"]["text"] == (
        f"The shop changed your order {order}: the delivery address is now Torstr. 9. Reason: gate closed."
    )
    assert zh == f"应您的要求，您的订单 {zh_order} 已修改：送货地址改为 Torstr. 9。"
    assert len(stack.watch.notices(order, "amended")) == 2
    assert [n["kind"] for n in _stored(stack.database_url, order)].count("amended") == 2


def stack_tz(stack: Stack) -> ZoneInfo:
    """The zone the notices read clock times in (``assistant_timezone``)."""
    return ZoneInfo(stack.notices_settings.assistant_timezone)


def test_the_chinese_template_when_the_order_is_in_chinese(stack: Stack) -> None:
    order = "o-notice-zh"
    with Running((notices.build, stack.notices_settings)):
        state = _picked_up(stack, order, language=ev.Language.ZH_CN)
        picked = stack.watch.notice(order, "picked_up")
    assert state.language is ev.Language.ZH_CN
    assert picked["data"]["language"] == "zh-CN"
    assert picked["data"]["text"] == texts.templates()["zh-CN"]["picked_up"].format(order=order)
    # The retained state keeps the last notice for a page opened later.
    kept = stack.watch.until(
        lambda t, b: t.endswith(f"{order}/state") and (b.get("notice") or {}).get("kind") == "picked_up",
        "notice in the state",
    )
    assert kept["notice"]["text"] == picked["data"]["text"]


def test_an_order_without_a_language_has_the_shops(
    make_settings: Callable[..., Settings], mqtt_user: Any, mqtt_client: Any
) -> None:
    with Running((persister.build, make_settings(shop_language="zh-CN"))):
        client = mqtt_client(*mqtt_user())
        client.subscribe(topics.shop_filter(SHOP))
        s = Stack(client, Watch(client), make_settings(), "")
        now = ev.now()
        created = ev.OrderCreated(
            order="o-notice-default",
            customer=ev.Customer(name="Mei", lat=HOME[0], lon=HOME[1]),
            window=ev.Window(start=now, end=now + timedelta(hours=1)),
        )
        _send(
            client,
            topics.shop_command(SHOP, topics.Command.CREATE_ORDER),
            ev.OrderCreateEvent(source=SHOP_SRC, data=created),
        )
        body = s.watch.until(lambda t, b: t.endswith("o-notice-default/state"), "state")
        client.close()
    assert body["language"] == "zh-CN"


def test_every_template_exists_in_every_language() -> None:
    said = texts.templates()
    assert set(said) == {lang.value for lang in ev.Language}
    assert set(said["en"]) == set(said["zh-CN"])
    for kind in ev.NoticeKind:
        assert kind.value in said["en"] or kind is ev.NoticeKind.DELAYED
    for key in ("proof_code", "proof_photo", "amended_customer", "amended_shop", "amended_reason"):
        assert key in said["en"]
    assert {f"change_{f.value}" for f in ev.AmendField} - {"change_window_start", "change_window_end"} <= set(
        said["en"]
    )


def test_the_demo_summary_shows_a_delay_notice_a_rating_and_an_answer() -> None:
    told = Told(
        notices=Counter({"delayed": 1, "picked_up": 2}),
        delay_example="o1: Your order o1 is running late",
        ratings=[5, 4],
        rating_example="o2: 5/5 “Lovely”",
        answers=3,
        answer_example="o3: Rider r1 has your order o3 and is on the way.",
    )
    rows = dict(_told_rows(told))
    assert rows["notices"] == "delayed 1 · picked_up 2; e.g. o1: Your order o1 is running late"
    assert rows["ratings"] == "2, average 4.5; e.g. o2: 5/5 “Lovely”"
    assert rows["assistant"].startswith("3 answers; e.g. o3: Rider r1")


def test_a_delay_says_whether_the_promise_still_holds_in_each_language() -> None:
    end = ev.now().replace(hour=15, minute=0, second=0, microsecond=0)
    common = {"order": "o1", "now": end - timedelta(minutes=30), "tz": UTC, "window_end": end}
    kind = ev.NoticeKind.DELAYED
    late = texts.render(kind, ev.Language.EN, eta=end + timedelta(minutes=20), reason="traffic", **common)
    assert late == "Your order o1 is running late (heavy traffic); it should now arrive around 15:20."
    held = texts.render(kind, ev.Language.ZH_CN, eta=end - timedelta(minutes=5), reason="flat_tyre", **common)
    assert held == "您的订单 o1 耽搁了一下（骑手的车爆胎了），现在预计 14:55 左右送达，仍在承诺的时间内。"
    unknown = texts.render(kind, ev.Language.EN, reason="crane on the road", **common)
    assert "(crane on the road)" in unknown and "as soon as we know" in unknown
    failed = texts.render(ev.NoticeKind.FAILED, ev.Language.ZH_CN, reason="address_wrong", **common)
    assert failed == "您的订单 o1 未能送达：找不到地址。店里会联系您核对地址后重新配送。"
