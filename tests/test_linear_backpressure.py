"""Backpressure instead of loss (real broker): a burst of QoS 1 publishes beyond the 16-bit
packet-id space from one connection all arrive, in-flight messages stay bounded, and a publish
paho will not take raises instead of vanishing."""

from __future__ import annotations

import asyncio
import queue
import time
import uuid
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
import pytest
from conftest import MqttTestClient
from paho.mqtt.enums import MQTTErrorCode

from bloomwire.errors import BrokerError
from bloomwire.runtime import mqtt
from bloomwire.runtime.settings import Settings

MakeUser = Callable[..., tuple[str, str]]
MakeClient = Callable[..., MqttTestClient]
MakeSettings = Callable[..., Settings]

BURST = 100_000


def _received(client: MqttTestClient, expected: int, timeout: float = 120.0) -> set[int]:
    """Distinct payloads (message numbers) received, until all came or nothing comes for 5 s."""
    got: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(got) < expected and time.monotonic() < deadline:
        try:
            message: paho.MQTTMessage = client.messages.get(timeout=5.0)
        except queue.Empty:
            break
        got.add(int.from_bytes(message.payload, "big"))
    return got


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tuned", [True, False], ids=["tuned", "plain"])
def test_a_burst_past_the_packet_id_space_all_arrives(
    make_settings: MakeSettings, mqtt_user: MakeUser, mqtt_client: MakeClient, tuned: bool
) -> None:
    topic = f"test/burst/{uuid.uuid4().hex[:8]}"
    receiver = mqtt_client(*mqtt_user(prefix="recv"))
    receiver.subscribe(topic, qos=0)  # the sender's QoS 1 is under test; no PUBACKs on the way out
    settings = make_settings()
    peak = 0

    async def burst() -> mqtt.Connection:
        nonlocal peak
        conn = mqtt.Connection(settings, f"burst-{uuid.uuid4().hex[:8]}", tuned=tuned)
        conn.start()
        await conn.wait_connected(10)
        for i in range(BURST):  # one burst, on the loop's thread, as a service publishes
            conn.publish(topic, i.to_bytes(4, "big"), qos=1)
            peak = max(peak, conn.in_flight())
        for _ in range(1200):  # up to a minute for the last acknowledgements
            if not conn.in_flight():
                break
            await asyncio.sleep(0.05)
        await conn.stop(announce_offline=False)
        return conn

    conn = asyncio.run(burst())
    got = _received(receiver, BURST)
    assert len(got) == BURST, f"{BURST - len(got)} of {BURST} lost"
    assert got == set(range(BURST))
    assert 0 < peak <= conn.max_inflight <= mqtt.MAX_INFLIGHT
    assert conn.in_flight() == 0 and conn.refused_publishes == 0


def test_a_publish_paho_will_not_take_raises(
    make_settings: MakeSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An id still in flight (or any other refusal): the caller hears of it."""
    settings = make_settings()
    conn = mqtt.Connection(settings, "refused-publisher", tuned=False)

    def refused(*_args: Any, **_kwargs: Any) -> paho.MQTTMessageInfo:
        info = paho.MQTTMessageInfo(1)
        info.rc = MQTTErrorCode.MQTT_ERR_QUEUE_SIZE
        return info

    monkeypatch.setattr(conn.client, "publish", refused)
    with pytest.raises(BrokerError, match="not taken"):
        conn.publish("test/refused", b"x", qos=1)
    # QoS 0 without a connection: not sent, and counted.
    monkeypatch.undo()
    conn.publish("test/unsent", b"x", qos=0)
    assert conn.unsent_publishes == 1


def test_a_publish_waits_for_room_then_fails_loudly(
    make_settings: MakeSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No connection, so nothing is acknowledged: past the bound, the publish raises."""
    monkeypatch.setattr(mqtt, "INFLIGHT_WAIT_S", 0.2)
    conn = mqtt.Connection(make_settings(), "stuck-publisher", tuned=False)
    conn.max_inflight = 3
    for i in range(3):
        conn.publish("test/stuck", bytes([i]), qos=1)  # kept by paho for the connection to come
    assert conn.in_flight() == 3
    with pytest.raises(BrokerError, match="unacknowledged"):
        conn.publish("test/stuck", b"more", qos=1)
