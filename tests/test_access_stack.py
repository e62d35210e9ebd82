"""The whole stack in access-control mode: ``Stack(settings, access=True, shops=..., riders=...)``.

What ``bloomwire up`` runs by default: Mosquitto with the dynamic-security plugin, bootstrapped
on start, and persister, dispatch, alerts and the provisioner each under its own identity. A
shop creates orders through the real MQTT path, receives each customer's access on the
shop-only ``shops/S/orders/O/access``, and the customer sees its own order and nothing else.
"""

from __future__ import annotations

import asyncio
import os
import queue
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import MqttTestClient

from bloomwire.access import Kind, open_accounts
from bloomwire.app.supervisor import Stack, wait_online
from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.contract.lifecycle import OrderStatus
from bloomwire.errors import BrokerError
from bloomwire.runtime.broker import find_dynsec_plugin, find_mosquitto
from bloomwire.runtime.settings import Settings

MakeClient = Callable[..., MqttTestClient]
NOT_AUTHORIZED = 0x87


def _requirements() -> None:
    try:
        find_mosquitto()
        find_dynsec_plugin()
    except BrokerError as exc:
        pytest.skip(str(exc))


def _until(client: MqttTestClient, found: Callable[[str, bytes], bool], timeout: float = 10.0) -> bytes:
    """The payload of the first message delivered to ``client`` for which ``found`` is true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = client.messages.get(timeout=0.1)
        except queue.Empty:
            continue
        if found(msg.topic, bytes(msg.payload)):
            return bytes(msg.payload)
    pytest.fail("expected message never arrived")


def _drain(client: MqttTestClient, wait: float) -> list[tuple[str, bytes]]:
    out = []
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        try:
            msg = client.messages.get(timeout=left)
        except queue.Empty:
            break
        out.append((msg.topic, bytes(msg.payload)))
    return out


def _create(shop: MqttTestClient, order: str) -> None:
    start = ev.now() + timedelta(minutes=30)
    event = ev.OrderCreateEvent(
        source=f"{topics.SHOPS}/s1",
        data=ev.OrderCreated(
            order=order,
            customer=ev.Customer(name="Ada", lat=52.52, lon=13.40),
            window=ev.Window(start=start, end=start + timedelta(hours=1)),
        ),
    )
    info = shop.publish(topics.shop_command("s1", topics.Command.CREATE_ORDER), ev.encode(event))
    assert info.rc == 0


def _puback(client: MqttTestClient, topic: str) -> int:
    """Publish at QoS 1 and return the PUBACK reason code."""
    acks: dict[int, int] = {}
    client.paho.on_publish = lambda _c, _u, mid, rc, _p: acks.__setitem__(mid, int(rc.value))
    info = client.paho.publish(topic, b"{}", qos=1)
    deadline = time.monotonic() + 5
    while info.mid not in acks:
        assert time.monotonic() < deadline, f"no PUBACK for {topic}"
        time.sleep(0.005)
    return acks[info.mid]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_stack_in_access_mode(tmp_path: Path, mqtt_client: MakeClient) -> None:
    _requirements()
    settings = Settings(data_dir=tmp_path, broker_port=0, broker_ws_port=0, database_url="")
    stack = Stack(settings, access=True, shops=["s1"], riders=["r1"])
    assert stack.services[-1] == "provisioner"
    pids: list[int] = []
    try:
        live = stack.start(timeout=40)
        assert stack.broker is not None and stack.broker.access_controlled
        assert live.broker_ws_port == stack.broker.ws_port != 0
        pids = [stack.broker.pid or 0, *(p.pid for p in stack.children.values())]
        assert set(stack.children) == {"persister", "dispatch", "alerts", "provisioner"}

        # Each service is online under its own identity: only N's role may write services/N/status.
        seen = asyncio.run(wait_online(live, list(stack.children), timeout=5))
        assert {n: seen[n] for n in stack.children} == dict.fromkeys(stack.children, "online")
        with open_accounts(live, offline=False) as accounts:
            kinds = {a.username: a.kind for a in accounts.list()}
        assert kinds["dispatch"] is Kind.SERVICE and kinds["alerts"] is Kind.SERVICE
        assert kinds["persister"] is Kind.PERSISTER and kinds["provisioner"] is Kind.PROVISIONER
        assert kinds["s1"] is Kind.SHOP and kinds["r1"] is Kind.RIDER

        secret = tmp_path / "secrets"
        shop = mqtt_client("s1", (secret / "s1").read_text().strip(), broker=stack.broker)
        shop.subscribe(topics.shop_filter("s1"))
        order_a, order_b = "o-stack-a", "o-stack-b"
        _create(shop, order_a)
        _create(shop, order_b)
        access_topic = topics.access_topic("s1", order_a)
        raw = _until(shop, lambda t, p: t == access_topic and bool(p))
        access = ev.CustomerAccessGrantedEvent.model_validate_json(raw).data
        assert (access.shop, access.order) == ("s1", order_a)
        assert access.customer == topics.customer_for_order(order_a)
        assert access.broker is not None and access.broker.ws_port == stack.broker.ws_port

        customer = mqtt_client(access.username, access.password, broker=stack.broker)
        for f in (
            "#",
            topics.all_orders_filter(topics.OrderChannel.STATE),
            topics.order_topic("s1", order_b, topics.OrderChannel.STATE),
            topics.access_topic("s1", order_a),
            *access.topics,
        ):
            customer.subscribe(f)
        state_a = topics.order_topic("s1", order_a, topics.OrderChannel.STATE)
        raw = _until(customer, lambda t, _p: t == state_a)
        state = ev.OrderState.model_validate_json(raw)
        assert (state.order, state.shop, state.status) == (order_a, "s1", OrderStatus.CREATED)
        others = _drain(customer, 1.0)
        assert all(t in access.topics for t, _ in others), others  # its order only, no access
        assert not any(order_b in t or order_b.encode() in p for t, p in others)
        assert _puback(customer, topics.customer_chat(access.customer)) < 0x80
        assert _puback(customer, topics.shop_command("s1", "create-order")) == NOT_AUTHORIZED

        # add_user works live: a new rider gets its role, an existing one keeps its password.
        with pytest.raises(BrokerError, match="kind"):
            stack.add_user("r2")
        password = stack.add_user("r2", "rider")
        assert (secret / "r2").read_text().strip() == password and "r2" in stack.riders
        assert stack.add_user("r1") == (secret / "r1").read_text().strip()
        rider = mqtt_client("r2", password, broker=stack.broker)
        assert _puback(rider, topics.rider_location("r2")) < 0x80
        assert _puback(rider, topics.rider_location("r1")) == NOT_AUTHORIZED
    finally:
        stack.stop()
    assert stack.broker is None and not stack.children
    deadline = time.monotonic() + 5
    while not all(_gone(pid) for pid in pids if pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_gone(pid) for pid in pids if pid), "a process of the stack is still running"


def test_access_mode_argument_checks(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, broker_port=0, database_url="")
    with pytest.raises(BrokerError, match="access-control mode"):
        Stack(settings, services=("persister", "provisioner"))
    with pytest.raises(BrokerError, match="extra_users"):
        Stack(settings, access=True, shops=["s1"], extra_users=["s1", "c-o1"])
    with pytest.raises(BrokerError, match="unknown service"):
        Stack(settings, services=("persister", "teleporter"))
    stack = Stack(settings, access=True, services=("persister",), extra_users=["s1"], shops=["s1"])
    assert stack.services == ("persister", "provisioner")
    # before the start, add_user just queues the account for the bootstrap
    password = stack.add_user("r5", "rider")
    assert stack.riders == ("r5",) and (tmp_path / "secrets" / "r5").read_text().strip() == password
