"""Bounded broker state (real broker): closed orders' retained states go when their grace ends,
so the broker holds open orders plus a constant, whatever the history."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as mqtt
from conftest import Broker, MqttTestClient
from test_persister import running_persister

from bloomwire.app.bench import scale
from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.runtime.settings import Settings

MakeUser = Callable[..., tuple[str, str]]
MakeClient = Callable[..., MqttTestClient]
MakeSettings = Callable[..., Settings]

OPEN = 2_000
#: Of the seeded open orders, the second half is not yet assigned: these are cancelled.
CLOSE = 1_000
GRACE_S = 2.0


def retained_count(client: MqttTestClient, quiet_s: float = 0.5) -> int:
    """Retained messages a fresh ``#`` subscriber is handed (until the broker goes quiet)."""
    client.subscribe("#", qos=0)
    seen = 0
    while True:
        try:
            message: mqtt.MQTTMessage = client.messages.get(timeout=quiet_s)
        except queue.Empty:
            client.disconnect()
            return seen
        seen += bool(message.retain)


def settled_count(fresh: Callable[[], MqttTestClient], timeout: float = 30.0) -> int:
    """The retained count once two looks in a row agree (start-up snapshots still arriving)."""
    deadline = time.monotonic() + timeout
    last = -1
    while True:
        got = retained_count(fresh(), quiet_s=1.0)
        if got == last or time.monotonic() > deadline:
            return got
        last = got


def wait_for_count(fresh: Callable[[], MqttTestClient], expected: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        got = retained_count(fresh(), quiet_s=1.0)
        if got == expected or time.monotonic() > deadline:
            return got


def test_retained_states_of_closed_orders_are_cleared_when_the_grace_ends(
    fresh_broker: Broker,
    tmp_path: Path,
    make_settings: MakeSettings,
    mqtt_user: MakeUser,
    mqtt_client: MakeClient,
) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    scale.seed(url, OPEN, datetime.now(UTC).replace(microsecond=0))
    settings = make_settings(database_url=url, broker=fresh_broker, customer_access_grace_s=GRACE_S)

    def fresh() -> MqttTestClient:
        return mqtt_client(*mqtt_user(broker=fresh_broker), broker=fresh_broker)

    with running_persister(settings):
        # Start-up: every open order's state, plus riders' states and service statuses.
        base = settled_count(fresh)
        assert base > OPEN
        constant = base - OPEN
        shop = fresh()
        for i in range(OPEN - CLOSE, OPEN):
            order = f"o{i}"
            data = ev.OrderCancelled(order=order, reason="test")
            event = ev.OrderCancelEvent(source=f"shops/s{i % 20}", data=data)
            info = shop.paho.publish(
                topics.shop_command(f"s{i % 20}", "cancel-order"), ev.encode(event), qos=1
            )
            assert info.rc == mqtt.MQTT_ERR_SUCCESS
        info.wait_for_publish(30)
        # Once each cancelled order's grace has ended, only the open ones' states remain.
        assert wait_for_count(fresh, OPEN - CLOSE + constant) == OPEN - CLOSE + constant
        topic = topics.order_topic("s19", f"o{OPEN - 1}", topics.OrderChannel.STATE)
        probe = fresh()
        probe.subscribe(topic)
        probe.expect_none(0.5)
        probe.disconnect()
