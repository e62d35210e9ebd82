"""The assistant against a real broker and store: persister and assistant in one background loop.

An order goes through the real MQTT path (rider online with a position, the shop's create-order
and assign, the rider's accept and pick-up) so the persister computes a real ETA; then the
customer asks in the order chat and the answer comes back on the canonical chat topic.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from datetime import UTC, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from servicekit import Running, Watch

from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.contract.lifecycle import OrderStatus
from bloomwire.runtime.settings import Settings
from bloomwire.services import assistant, persister
from bloomwire.services.assistant import answers
from bloomwire.services.assistant.intents import Intent, Lang, classify
from bloomwire.store import make_engine
from bloomwire.store.models import ALERTS, CHAT

SHOP, RIDER, ORDER = "s1", "r1", "o-assist-1"
CUSTOMER = topics.customer_for_order(ORDER)


def _send(client: Any, topic: str, event: Any) -> None:
    client.publish(topic, ev.encode(event), qos=1)


@pytest.fixture
def wired(
    make_settings: Callable[..., Settings], mqtt_user: Any, mqtt_client: Any
) -> Iterator[tuple[Any, Watch]]:
    """The backbone running, and a client watching shop s1 and rider r1's inbox."""
    with Running((persister.build, make_settings()), (assistant.build, make_settings())):
        client = mqtt_client(*mqtt_user())
        client.subscribe(topics.shop_filter(SHOP))
        client.subscribe(topics.rider_inbox_filter(RIDER))
        yield client, Watch(client)
        client.close()


def _order_out_for_delivery(client: Any, watch: Watch) -> dict[str, Any]:
    """Create, assign, accept and pick up ORDER; its retained state with the ETA."""
    now = ev.now()
    rider_src, shop_src = f"{topics.RIDERS}/{RIDER}", f"{topics.SHOPS}/{SHOP}"
    online = ev.RiderPresenceChangedEvent(source=rider_src, data=ev.RiderPresence(status=ev.Presence.ONLINE))
    _send(client, topics.rider_presence(RIDER), online)
    position = ev.RiderLocation(lat=52.52, lon=13.40, tst=int(now.timestamp()))
    _send(
        client, topics.rider_location(RIDER), ev.RiderLocationReportedEvent(source=rider_src, data=position)
    )
    created = ev.OrderCreated(
        order=ORDER,
        customer=ev.Customer(name="Mei", phone="+49 30 1234 5678", address="Torstr. 1", lat=52.53, lon=13.41),
        window=ev.Window(start=now, end=now + timedelta(hours=2)),
        items=["12 red roses"],
    )
    create = ev.OrderCreateEvent(source=shop_src, data=created)
    _send(client, topics.shop_command(SHOP, topics.Command.CREATE_ORDER), create)
    watch.until(lambda t, b: t.endswith(f"{ORDER}/state") and b.get("status") == "created", "order created")
    assign = ev.OrderAssignEvent(source=shop_src, data=ev.OrderAssigned(order=ORDER, rider=RIDER))
    _send(client, topics.shop_command(SHOP, topics.Command.ASSIGN), assign)
    offer = watch.until(lambda t, b: t.endswith("/inbox/offers"), "offer to the rider")
    reply = ev.DispatchReply(offer=offer["data"]["offer"], order=ORDER, accept=True)
    _send(client, topics.rider_replies(RIDER), ev.DispatchReplyEvent(source=rider_src, data=reply))
    watch.until(lambda t, b: t.endswith(f"{ORDER}/state") and b.get("status") == "accepted", "accepted")
    picked = ev.OrderStatusChanged(order=ORDER, status=OrderStatus.PICKED_UP)
    _send(
        client,
        topics.rider_order_status(RIDER, ORDER),
        ev.OrderStatusChangedEvent(source=rider_src, data=picked),
    )
    return watch.until(
        lambda t, b: t.endswith(f"{ORDER}/state") and b.get("status") == "picked_up" and b.get("eta"), "ETA"
    )


def _ask(client: Any, watch: Watch, text: str) -> dict[str, Any]:
    """The customer says ``text``; the assistant's answer to it."""
    line = ev.OrderChatPostedEvent(source=f"{topics.CUSTOMERS}/{CUSTOMER}", data=ev.OrderChat(text=text))
    _send(client, topics.customer_chat(CUSTOMER), line)
    wanted = assistant.service.answer_id(line.id)
    return watch.until(
        lambda t, b: t.endswith(f"{ORDER}/chat") and b.get("id") == wanted, f"answer to {text!r}"
    )


def test_answers_with_the_real_eta_and_hands_a_complaint_to_the_shop(wired: tuple[Any, Watch]) -> None:
    client, watch = wired
    state = _order_out_for_delivery(client, watch)
    eta = ev.OrderState.model_validate(state).eta
    assert eta is not None
    clock = f"{eta:%H:%M}"

    en = _ask(client, watch, "where are my flowers?")
    assert en["data"]["author"] == f"assistant:{SHOP}"
    assert RIDER in en["data"]["text"] and clock in en["data"]["text"], en
    assert en["data"]["text"].startswith("Rider r1 has your order")

    zh = _ask(client, watch, "我的花到哪了？")
    assert f"骑手 {RIDER}" in zh["data"]["text"] and clock in zh["data"]["text"], zh

    wilted = _ask(client, watch, "the roses are wilted")
    assert wilted["data"]["text"] == answers.sentences()["en"]["handover"]
    alert = watch.until(lambda t, b: t == topics.shop_alerts(SHOP) and b["type"] == "alert.raised", "alert")
    assert alert["data"]["rule"] == "needs_person" and alert["data"]["order"] == ORDER
    assert "the roses are wilted" in alert["data"]["message"]

    # A second complaint while a person has the chat: no second alert, the customer is told so.
    again = _ask(client, watch, "and the vase is broken")
    assert again["data"]["text"] == answers.sentences()["en"]["handover_again"]

    # A person of the shop replies: the hand-over is resolved.
    reply = ev.OrderChatPostedEvent(
        source=f"{topics.SHOPS}/{SHOP}", data=ev.OrderChat(order=ORDER, text="So sorry!")
    )
    _send(client, topics.shop_command(SHOP, topics.Command.CHAT), reply)
    watch.until(lambda t, b: t == topics.shop_alerts(SHOP) and b["type"] == "alert.resolved", "resolved")
    raised = [b for t, b in watch.seen if t == topics.shop_alerts(SHOP) and b["type"] == "alert.raised"]
    assert len(raised) == 1


def test_answers_are_stored_as_the_assistants_lines(
    wired: tuple[Any, Watch], make_settings: Callable[..., Settings]
) -> None:
    client, watch = wired
    _order_out_for_delivery(client, watch)
    _ask(client, watch, "who is bringing it?")
    _ask(client, watch, "can I change the address to 5 Park Lane?")
    watch.until(lambda t, b: t == topics.shop_alerts(SHOP) and b["type"] == "alert.raised", "alert")
    engine = make_engine(make_settings().database_url, readonly=True)
    try:
        with engine.connect() as conn:
            roles = conn.execute(
                sa.select(CHAT.c.author_role, CHAT.c.text).where(CHAT.c.order_id == ORDER)
            ).all()
            rules = conn.execute(sa.select(ALERTS.c.rule, ALERTS.c.status)).all()
    finally:
        engine.dispose()
    assert [r for r, _ in roles].count("assistant") == 2
    assert any(t == f"Your order is with rider {RIDER}." for _, t in roles)
    assert rules == [("needs_person", "open")]


@pytest.mark.parametrize(
    ("text", "intent", "lang"),
    [
        ("where are my flowers?", Intent.WHERE, Lang.EN),
        ("我的花到哪了？", Intent.WHERE, Lang.ZH),
        ("the roses are wilted", Intent.COMPLAINT, Lang.EN),
        ("wen will it arive", Intent.ETA, Lang.EN),
        ("rider能call我吗", Intent.CALL, Lang.ZH),
        ("tell me a joke", Intent.OTHER, Lang.EN),
    ],
)
def test_classify(text: str, intent: Intent, lang: Lang) -> None:
    reading = classify(text)
    assert (reading.intent, reading.lang) == (intent, lang)


def test_every_sentence_exists_in_every_language() -> None:
    said = answers.sentences()
    assert set(said) == {lang.value for lang in Lang}
    assert set(said["en"]) == set(said["zh-CN"])


def test_a_redelivered_line_gives_the_very_same_events(
    wired: tuple[Any, Watch], make_settings: Callable[..., Settings]
) -> None:
    """After a crash before the ack the broker delivers the line again: the same bytes go out, so
    the persister takes them as duplicates (a different time or text would be a conflict)."""
    client, watch = wired
    _order_out_for_delivery(client, watch)
    complaint = _ask(client, watch, "the flowers are dead")
    assert complaint["data"]["text"] == answers.sentences()["en"]["handover"]
    watch.until(lambda t, b: t == topics.shop_alerts(SHOP) and b["type"] == "alert.raised", "alert stored")
    line = next(
        (t, b)
        for t, b in watch.seen
        if t.endswith(f"{ORDER}/chat") and b["data"]["author"].startswith("customer:")
    )
    engine = make_engine(make_settings().database_url, readonly=True)
    sent: list[tuple[str, bytes]] = []
    core = assistant.service.Assistant(
        assistant.service.Store(engine), lambda t, p: sent.append((t, p)), clock=ev.now, tz=UTC
    )
    event = ev.decode(json.dumps(line[1]).encode())
    try:
        asyncio.run(core.on_chat(ORDER, event))
        first = list(sent)
        core.handed.clear()  # a restarted process remembers nothing
        sent.clear()
        asyncio.run(core.on_chat(ORDER, event))
    finally:
        engine.dispose()
    said = [json.loads(p) for _, p in first]
    assert [e["type"] for e in said] == ["order.chat_posted", "alert.raised"]
    assert said[0]["id"] == complaint["id"] and said[0]["data"]["text"] == complaint["data"]["text"]
    assert sent == first
