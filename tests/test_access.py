"""Access control for real: Mosquitto 2.0.11 with the dynamic-security plugin (docs/security.md).

Every assertion is on what the broker DELIVERS (or refuses in a PUBACK/CONNACK), never on a
SUBACK alone. One access-controlled broker serves the module; tests use their own order ids.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import MqttTestClient
from paho.mqtt.reasoncodes import ReasonCode
from typer.testing import CliRunner

from bloomwire.access import Accounts, bootstrap, policy
from bloomwire.access import operations as ops
from bloomwire.access.accounts import OrderAccess, connect_admin, open_accounts
from bloomwire.access.dynsec import ControlClient, DynsecFile, verify_password
from bloomwire.access.enrol import enrol_device
from bloomwire.app.accounts_cli import accounts_app
from bloomwire.app.bench.access import bench_access
from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.contract.lifecycle import OrderStatus
from bloomwire.errors import BrokerError, TopicError
from bloomwire.runtime.broker import (
    Mosquitto,
    broker_env,
    ensure_secret,
    find_dynsec_plugin,
    find_mosquitto,
    render_config,
)
from bloomwire.runtime.settings import Settings
from bloomwire.services.persister.projector import Inbound, Projector
from bloomwire.services.provisioner import Provisioner
from bloomwire.services.provisioner import build as build_provisioner
from bloomwire.services.provisioner.minting import MintQueue, Wanted
from bloomwire.store import open_store
from bloomwire.store.models import ORDERS

MakeClient = Callable[..., MqttTestClient]
NOT_AUTHORIZED = 0x87
SHOPS, RIDERS = ("s1", "s2"), ("r1", "r2")
WRITER = "access-writer"


@dataclass
class Stack:
    root: Path
    broker: Mosquitto
    admin: ControlClient
    prov: ControlClient

    def secret(self, name: str) -> str:
        return (self.root / "secrets" / name).read_text().strip()

    def settings(self, username: str | None = None, **extra: Any) -> Settings:
        values: dict[str, Any] = {
            "data_dir": self.root,
            "broker_host": self.broker.host,
            "broker_port": self.broker.port,
            "broker_ws_port": self.broker.ws_port,
            **extra,
        }
        if username is not None:
            values |= {"broker_username": username, "broker_password": self.secret(username)}
        return Settings(**values)

    @property
    def accounts(self) -> Accounts:
        return Accounts(self.admin, self.root)


def _requirements() -> None:
    try:
        find_mosquitto()
        find_dynsec_plugin()
    except BrokerError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    _requirements()
    root = tmp_path_factory.mktemp("access")
    boot = bootstrap(root, shops=SHOPS, riders=RIDERS)
    # A test identity with the provisioner's topics (not its admin role): the provisioner
    # service under test logs in as "provisioner", and one username is one session.
    store = DynsecFile(boot.config_path)
    store.put_client(WRITER, ensure_secret(root, WRITER), [{"rolename": policy.PROVISIONER}])
    store.save()
    broker = Mosquitto(root / "broker", dynsec_config=boot.config_path)
    broker.start()
    try:
        settings = Settings(data_dir=root)
        admin = connect_admin(settings, broker.host, broker.port)
        prov = connect_admin(settings, broker.host, broker.port, WRITER)
        yield Stack(root, broker, admin, prov)
        admin.close()
        prov.close()
    finally:
        broker.stop()


@pytest.fixture
def login(stack: Stack, mqtt_client: MakeClient) -> Callable[..., MqttTestClient]:
    """``login(name_or_credential, **options)``: a connected client of the module's broker."""

    def make(who: str | tuple[str, str], **options: Any) -> MqttTestClient:
        username, password = (who, stack.secret(who)) if isinstance(who, str) else who
        client = mqtt_client(username, password, broker=stack.broker, **options)
        record_pubacks(client)
        return client

    return make


def record_pubacks(client: MqttTestClient) -> None:
    acks: dict[int, ReasonCode] = {}
    client.paho.on_publish = lambda _c, _u, mid, rc, _p: acks.__setitem__(mid, rc)
    client.pubacks = acks  # type: ignore[attr-defined]


def puback(client: MqttTestClient, topic: str, payload: bytes | str = b"x", *, retain: bool = False) -> int:
    """Publish at QoS 1 and return the PUBACK reason code (MQTT 5)."""
    info = client.publish(topic, payload, qos=1, retain=retain)
    deadline = time.monotonic() + 5
    acks: dict[int, ReasonCode] = client.pubacks  # type: ignore[attr-defined]
    while info.mid not in acks:
        assert time.monotonic() < deadline, f"no PUBACK for {topic}"
        time.sleep(0.005)
    return int(acks[info.mid].value)


def received(client: MqttTestClient, wait: float = 0.4) -> list[tuple[str, bytes]]:
    """Everything delivered to ``client`` within ``wait`` seconds."""
    out = []
    deadline = time.monotonic() + wait
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return out
        try:
            msg = client.messages.get(timeout=left)
        except Exception:
            return out
        out.append((msg.topic, bytes(msg.payload)))


def status_event(order: str, status: OrderStatus, shop: str = "s1") -> bytes:
    return ev.encode(
        ev.OrderStatusChangedEvent(
            source=f"{topics.SHOPS}/{shop}", data=ev.OrderStatusChanged(order=order, status=status)
        )
    )


def uid(prefix: str) -> str:
    return f"{prefix}{os.urandom(4).hex()}"


# --- pure checks and the JSON file (broker stopped) ---------------------------------------------


BAD_IDS = ["a+b", "a#", "a/b", "a\x00b", "x" * 5000, "", "+", "#", "cust@1234"]


@pytest.mark.parametrize("bad", BAD_IDS, ids=lambda b: repr(b[:12]))
def test_bad_ids_are_refused_at_provisioning(tmp_path: Path, bad: str) -> None:
    boot = bootstrap(tmp_path)
    before = boot.config_path.read_bytes()
    with open_accounts(Settings(data_dir=tmp_path), offline=True) as accounts:
        for add in (accounts.add_rider, accounts.add_shop, accounts.add_service):
            with pytest.raises(TopicError):
                add(bad)
        if not bad.startswith(policy.DEVICE_PREFIX):
            for args in (("s1", bad), (bad, "o1")):
                with pytest.raises(TopicError):
                    accounts.mint_customer(*args)
            with pytest.raises(TopicError):
                accounts.mint_customer("s1", "o1", bad)
    with pytest.raises(TopicError):
        bootstrap(tmp_path, riders=[bad])
    assert boot.config_path.read_bytes() == before  # nothing was written
    assert not any(bad and bad in p.name for p in (tmp_path / "secrets").iterdir())


def test_reserved_names_are_refused(tmp_path: Path) -> None:
    bootstrap(tmp_path)
    with open_accounts(Settings(data_dir=tmp_path), offline=True) as accounts:
        for name in policy.RESERVED:
            with pytest.raises(TopicError, match="reserved"):
                accounts.add_rider(name)
        with pytest.raises(BrokerError, match="fixed"):
            accounts.remove(policy.PERSISTER)
    with pytest.raises(TopicError):
        bootstrap(tmp_path, shops=["persister"])
    with pytest.raises(TopicError):
        bootstrap(tmp_path, shops=["x1"], riders=["x1"])


def test_bootstrap_is_idempotent_and_keeps_secrets_private(tmp_path: Path) -> None:
    boot = bootstrap(tmp_path, shops=["s1"], riders=["r1"])
    first = boot.config_path.read_bytes()
    again = bootstrap(tmp_path, shops=["s1"], riders=["r1"])
    assert again.config_path.read_bytes() == first
    assert stat.S_IMODE(boot.config_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(boot.secrets_dir.stat().st_mode) == 0o700
    data = json.loads(first)
    clients = {c["username"]: c for c in data["clients"]}
    assert set(clients) == set(boot.accounts)
    for name in boot.accounts:
        secret = boot.secrets_dir / name
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        password = secret.read_text().strip()
        assert password.encode() not in first  # only PBKDF2 hashes in the file
        assert verify_password(password, clients[name])
    assert data["defaultACLAccess"] == policy.DEFAULT_ACL_ACCESS
    # a lost secret gets a new password, the others are kept
    (boot.secrets_dir / "r1").unlink()
    bootstrap(tmp_path, shops=["s1"], riders=["r1"])
    clients = {c["username"]: c for c in json.loads(boot.config_path.read_text())["clients"]}
    assert verify_password((boot.secrets_dir / "r1").read_text().strip(), clients["r1"])
    assert verify_password((boot.secrets_dir / "s1").read_text().strip(), clients["s1"])


def test_render_config_modes() -> None:
    base = {"port": 11111, "ws_port": 22222, "data_dir": "/d", "log_dest": "stdout"}
    password = render_config(password_file="/p", **base)
    assert "password_file /p" in password.splitlines()
    assert not any(line.startswith("plugin") for line in password.splitlines())
    dyn = render_config(dynsec_config="/d/ds.json", dynsec_plugin="/x/ds.so", **base).splitlines()
    assert "plugin /x/ds.so" in dyn and "plugin_opt_config_file /d/ds.json" in dyn
    assert not any(line.startswith("password_file") for line in dyn)
    assert "allow_anonymous false" in dyn
    assert sum(line == "use_username_as_clientid true" for line in dyn) == 2
    with pytest.raises(BrokerError):
        render_config(dynsec_config="/d/x\nlistener 1883", dynsec_plugin="/x", **base)


def test_access_controlled_broker_takes_no_password_users(tmp_path: Path) -> None:
    with pytest.raises(BrokerError):
        Mosquitto(tmp_path, users={"a": "b"}, dynsec_config=tmp_path / "ds.json")
    broker = Mosquitto(tmp_path, dynsec_config=tmp_path / "ds.json")
    with pytest.raises(BrokerError, match="access-controlled"):
        broker.add_user("a", "b")
    _requirements()
    with pytest.raises(BrokerError, match="bootstrap"):
        broker.start()  # the file does not exist yet


# --- authentication -----------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["tcp", "websockets"])
@pytest.mark.parametrize("credentials", ["anonymous", "wrong-password", "unknown-user", "deleted-customer"])
def test_refused_connections(stack: Stack, mqtt_client: MakeClient, transport: str, credentials: str) -> None:
    if credentials == "deleted-customer":
        access, cred = stack.accounts.mint_customer("s1", uid("o-del-"))
        stack.accounts.revoke_customer(access)
        username, password = cred.username, cred.password
    else:
        username, password = {
            "anonymous": (None, None),
            "wrong-password": ("r1", stack.secret("r1") + "x"),
            "unknown-user": ("nobody", stack.secret("r1")),
        }[credentials]
    client = mqtt_client(username, password, broker=stack.broker, transport=transport, connect=False)
    rc = client.connect()
    assert rc.is_failure and rc.value == NOT_AUTHORIZED, rc
    assert not client.paho.is_connected()


# --- riders and shops ---------------------------------------------------------------------------


def test_rider_cannot_publish_outside_its_prefix(stack: Stack, login: Callable[..., MqttTestClient]) -> None:
    persister = login("persister")
    for f in topics.INBOUND_FILTERS:
        persister.subscribe(f)
    operator = login("operator")
    operator.subscribe("#")
    r1 = login("r1")
    outside = [
        topics.rider_location("r2"),
        topics.rider_order_status("r2", "o1"),
        topics.owntracks("r2", "phone"),
        topics.shop_command("s1", topics.Command.CREATE_ORDER),
        topics.customer_chat("c-o1"),
        topics.service_events("dispatch"),
        topics.order_topic("s1", "o1", topics.OrderChannel.STATE),
        topics.rider_inbox("r1", topics.Inbox.ACKS),  # its own inbox is backbone -> device only
        topics.DEADLETTER,
        topics.DYNSEC_CONTROL,
    ]
    for topic in outside:
        assert puback(r1, topic, b'{"forged": true}') == NOT_AUTHORIZED, topic
    assert received(persister) == []
    assert received(operator, 0.1) == []
    inside = [
        topics.rider_location("r1"),
        topics.owntracks("r1", "phone"),
        topics.rider_order_chat("r1", "o1"),
    ]
    for topic in inside:
        assert puback(r1, topic, b"{}") < 0x80, topic
    assert sorted(t for t, _ in received(persister)) == sorted(inside)


def test_rider_reads_only_its_inbox(stack: Stack, login: Callable[..., MqttTestClient]) -> None:
    r1 = login("r1")
    for f in ("#", "riders/+/inbox/#", topics.rider_inbox_filter("r2"), topics.rider_inbox_filter("r1")):
        r1.subscribe(f)
    persister = login("persister")
    puback(persister, topics.rider_inbox("r2", topics.Inbox.OFFERS), b"r2-offer", retain=True)
    puback(persister, topics.rider_inbox("r2", topics.Inbox.ACKS), b"r2-ack")
    puback(persister, topics.rider_inbox("r1", topics.Inbox.ACKS), b"r1-ack")
    assert received(r1) == [(topics.rider_inbox("r1", topics.Inbox.ACKS), b"r1-ack")]
    puback(persister, topics.rider_inbox("r2", topics.Inbox.OFFERS), b"", retain=True)


def test_shop_receives_nothing_of_another_shop(stack: Stack, login: Callable[..., MqttTestClient]) -> None:
    order1, order2 = uid("o-s1-"), uid("o-s2-")
    persister = login("persister")
    state2 = topics.order_topic("s2", order2, topics.OrderChannel.STATE)
    state1 = topics.order_topic("s1", order1, topics.OrderChannel.STATE)
    puback(persister, state2, b"s2-state", retain=True)
    puback(persister, state1, b"s1-state", retain=True)
    s1 = login("s1")
    for f in ("#", "shops/+/#", "shops/+/orders/+/#", topics.shop_filter("s2"), topics.shop_filter("s1")):
        s1.subscribe(f)
    assert received(s1) == [(state1, b"s1-state")]  # retained: its own only
    puback(persister, topics.order_topic("s2", order2, topics.OrderChannel.STATUS), b"s2-live")
    puback(persister, topics.shop_alerts("s2"), b"s2-alert")
    puback(persister, topics.shop_alerts("s1"), b"s1-alert")
    assert received(s1) == [(topics.shop_alerts("s1"), b"s1-alert")]
    assert puback(s1, topics.shop_command("s2", topics.Command.CANCEL_ORDER), b"{}") == NOT_AUTHORIZED
    assert puback(s1, topics.shop_command("s1", topics.Command.CANCEL_ORDER), b"{}") < 0x80
    assert puback(s1, state1, b"forged") == NOT_AUTHORIZED  # shops read their orders, never write them
    for topic in (state1, state2):
        puback(persister, topic, b"", retain=True)


# --- customers ----------------------------------------------------------------------------------


def test_customer_receives_nothing_of_another_order(
    stack: Stack, login: Callable[..., MqttTestClient]
) -> None:
    oa, ob = uid("oA-"), uid("oB-")
    access_a, cred_a = stack.accounts.mint_customer("s1", oa)
    access_b, _ = stack.accounts.mint_customer("s1", ob)
    ca, cb = access_a.customer, access_b.customer
    persister = login("persister")
    for order in (oa, ob):  # retained state and the shop-only access message of both orders
        puback(
            persister,
            topics.order_topic("s1", order, topics.OrderChannel.STATE),
            f"{order}-state",
            retain=True,
        )
        stack.prov.publish(topics.access_topic("s1", order), f"{order}-access", retain=True)
    customer = login((cred_a.username, cred_a.password))
    filters = [
        "#",
        "shops/+/orders/+/#",
        "shops/+/orders/+/+",
        "shops/s1/#",
        topics.order_topic("s1", ob, topics.OrderChannel.STATE),
        topics.access_topic("s1", ob),
        topics.access_topic("s1", oa),
        "customers/+/inbox/#",
        topics.customer_inbox_filter(cb),
        *(topics.order_topic("s1", oa, ch) for ch in topics.CUSTOMER_CHANNELS),
        topics.customer_inbox_filter(ca),
    ]
    for f in filters:
        customer.subscribe(f)
    got = received(customer)
    assert {t for t, _ in got} == {topics.order_topic("s1", oa, topics.OrderChannel.STATE)}
    assert all(p == f"{oa}-state".encode() for _, p in got)
    for order, cust in ((ob, cb), (oa, ca)):
        for ch in topics.OrderChannel:
            puback(persister, topics.order_topic("s1", order, ch), f"{order}-{ch.value}")
        puback(persister, topics.customer_inbox(cust, topics.Inbox.ERRORS), f"{cust}-inbox")
    got = received(customer)
    assert got and all(oa.encode() in p or ca.encode() in p for _, p in got), got
    assert {t.rsplit("/", 1)[-1] for t, _ in got} == {"status", "location", "chat", "state", "errors"}
    assert not any(ob in t or cb in t or t.endswith(("/alerts", "/access")) for t, _ in got)
    # writes: its own chat only
    assert puback(customer, topics.customer_chat(ca), b"{}") < 0x80
    assert puback(customer, topics.customer_chat(cb), b"{}") == NOT_AUTHORIZED
    assert puback(customer, topics.customer_inbox(ca, topics.Inbox.ACKS), b"{}") == NOT_AUTHORIZED
    assert puback(customer, topics.order_topic("s1", oa, topics.OrderChannel.STATUS), b"{}") == NOT_AUTHORIZED
    for order in (oa, ob):
        puback(persister, topics.order_topic("s1", order, topics.OrderChannel.STATE), b"", retain=True)
        stack.prov.publish(topics.access_topic("s1", order), b"", retain=True)
    for access in (access_a, access_b):
        stack.accounts.revoke_customer(access)


# --- services -----------------------------------------------------------------------------------


def test_service_session_cannot_be_taken_over(stack: Stack, login: Callable[..., MqttTestClient]) -> None:
    session = {"clean_start": False, "session_expiry": 300}
    topic = topics.order_topic("s1", uid("o-svc-"), topics.OrderChannel.STATUS)
    owner = login("dispatch", client_id="dispatch", **session)
    owner.subscribe(topic)
    owner.disconnect()
    persister = login("persister")
    puback(persister, topic, b"one")
    puback(persister, topic, b"two")
    thief = login("r2", client_id="dispatch", **session)
    assert not thief.session_present
    thief.subscribe(topic)  # refused anyway: riders do not read canonical topics
    assert received(thief) == []
    thief.disconnect()
    back = login("dispatch", client_id="something-else", **session)
    assert back.session_present
    assert [p for _, p in received(back)] == [b"one", b"two"]
    back.paho.unsubscribe(topic)


def test_services_read_canonical_topics_but_not_customer_access(
    stack: Stack, login: Callable[..., MqttTestClient]
) -> None:
    order = uid("o-acc-")
    service = login("alerts")
    for f in ("#", "shops/+/orders/+/#", "shops/+/orders/+/+", topics.ALL_ACCESS_FILTER):
        service.subscribe(f)
    service.subscribe(topics.all_orders_filter(topics.OrderChannel.STATUS))
    operator = login("operator")
    operator.subscribe(topics.ALL_ACCESS_FILTER)
    stack.prov.publish(topics.access_topic("s1", order), b"secret", retain=True)
    persister = login("persister")
    status = topics.order_topic("s1", order, topics.OrderChannel.STATUS)
    puback(persister, status, b"created")
    assert received(service) == [(status, b"created")]
    assert received(operator, 0.1) == [(topics.access_topic("s1", order), b"secret")]
    assert puback(service, topics.service_events("alerts"), b"{}") < 0x80
    assert puback(service, topics.service_events("dispatch"), b"{}") == NOT_AUTHORIZED
    assert puback(service, status, b"forged") == NOT_AUTHORIZED
    stack.prov.publish(topics.access_topic("s1", order), b"", retain=True)


def test_admin_role_reads_no_application_topic(stack: Stack, login: Callable[..., MqttTestClient]) -> None:
    persister = login("persister")
    for name in (policy.PROVISIONER, policy.ADMIN):  # the fixture's admin reconnects afterwards
        admin_like = login(name)
        admin_like.subscribe("#")
        puback(persister, topics.rider_inbox("r1", topics.Inbox.ACKS), b"x")
        assert received(admin_like) == []
        assert puback(admin_like, topics.rider_inbox("r1", topics.Inbox.ACKS), b"x") == NOT_AUTHORIZED
        admin_like.disconnect()
    assert stack.admin.connected.wait(15)


# --- account changes ----------------------------------------------------------------------------


def test_rotate_and_remove_disconnect_at_once(stack: Stack, login: Callable[..., MqttTestClient]) -> None:
    shop = uid("shop-")
    cred = stack.accounts.add_shop(shop)
    assert cred.secret_path is not None and stat.S_IMODE(cred.secret_path.stat().st_mode) == 0o600
    client = login((shop, cred.password))
    t0 = time.monotonic()
    rotated = stack.accounts.rotate(shop)
    while not client.disconnects and time.monotonic() - t0 < 2:
        time.sleep(0.005)
    assert client.disconnects and time.monotonic() - t0 < 1.0
    assert client.disconnects[0].value == 0x98  # "Administrative action"
    assert rotated.secret_path is not None and rotated.secret_path.read_text().strip() == rotated.password
    again = login((shop, rotated.password))
    stale = MqttTestClient(stack.broker, shop, cred.password)
    try:
        assert stale.connect().value == NOT_AUTHORIZED
    finally:
        stale.close()
    stack.accounts.remove(shop)
    deadline = time.monotonic() + 1
    while not again.disconnects and time.monotonic() < deadline:
        time.sleep(0.005)
    assert again.disconnects
    assert not (stack.root / "secrets" / shop).exists()
    gone = MqttTestClient(stack.broker, shop, rotated.password)
    try:
        assert gone.connect().value == NOT_AUTHORIZED
    finally:
        gone.close()
    assert stat.S_IMODE(stack.broker.dynsec_config.stat().st_mode) == 0o600  # type: ignore[union-attr]


def test_add_replaces_the_acls_of_a_leftover_role(stack: Stack, login: Callable[..., MqttTestClient]) -> None:
    rider = uid("rider-")
    role = policy.role_name(policy.Kind.RIDER, rider)
    wide = {"acltype": policy.PUBLISH, "topic": "#", "priority": 0, "allow": True}
    stack.admin.execute([{"command": "createRole", "rolename": role, "acls": [wide]}])
    cred = stack.accounts.add_rider(rider)  # createRole fails (exists): modifyRole resets the ACLs
    (answer,) = stack.admin.execute([{"command": "getRole", "rolename": role}])
    assert [a["topic"] for a in answer["data"]["role"]["acls"]] == [
        a.topic for a in policy.rider_role(rider).acls
    ]
    client = login((rider, cred.password))
    assert puback(client, "anything/else", b"x") == NOT_AUTHORIZED
    assert puback(client, topics.rider_location(rider), b"{}") < 0x80
    stack.accounts.remove(rider)


def test_acls_do_not_substitute_username_patterns(stack: Stack, login: Callable[..., MqttTestClient]) -> None:
    """Mosquitto 2.0.11's plugin takes %u/%c literally: hence one role per identity."""
    rider = uid("rider-")
    cred = stack.accounts.add_rider(rider)
    role = uid("pattern-")
    acl = {"acltype": policy.PUBLISH, "topic": "pattern/%u/#", "priority": 5, "allow": True}
    stack.admin.execute(
        [
            {"command": "createRole", "rolename": role, "acls": [acl]},
            {"command": "addClientRole", "username": rider, "rolename": role, "priority": 5},
        ]
    )
    client = login((rider, cred.password))
    assert puback(client, f"pattern/{rider}/x", b"x") == NOT_AUTHORIZED
    assert puback(client, "pattern/%u/x", b"x") < 0x80
    stack.accounts.remove(rider)
    stack.admin.execute([{"command": "deleteRole", "rolename": role}])


def test_role_change_kicks_a_connected_client(stack: Stack, login: Callable[..., MqttTestClient]) -> None:
    rider = uid("rider-")
    cred = stack.accounts.add_rider(rider)
    client = login((rider, cred.password))
    stack.admin.execute([{"command": "addClientRole", "username": rider, "rolename": policy.CUSTOMERS_ROLE}])
    deadline = time.monotonic() + 1
    while not client.disconnects and time.monotonic() < deadline:
        time.sleep(0.005)
    assert client.disconnects and client.disconnects[0].value == 0x98
    stack.accounts.remove(rider)


def test_forged_source_is_refused_by_the_persister(
    stack: Stack, login: Callable[..., MqttTestClient], tmp_path: Path
) -> None:
    persister = login("persister")
    for f in topics.INBOUND_FILTERS:
        persister.subscribe(f)
    r2 = login("r2")
    event = ev.OrderStatusChangedEvent(
        source="riders/r1", data=ev.OrderStatusChanged(order="o-forged", status=OrderStatus.PICKED_UP)
    )
    # on r1's topic the broker refuses it outright ...
    assert puback(r2, topics.rider_order_status("r1", "o-forged"), ev.encode(event)) == NOT_AUTHORIZED
    # ... on its own topic it passes the broker, and the persister refuses the forged source
    assert puback(r2, topics.rider_order_status("r2", "o-forged"), ev.encode(event)) < 0x80
    ((topic, payload),) = received(persister)
    engine = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    projector = Projector(engine)
    try:
        projector.load()
        result = projector.apply([Inbound(topic, payload)])
    finally:
        projector.close()
        engine.dispose()
    assert result.stored == 0 and result.refused == 1
    reasons = [o.payload for o in result.outbound if o.topic == topics.DEADLETTER]
    assert reasons and b"does not match the sender" in reasons[0]


# --- the provisioner ----------------------------------------------------------------------------


class Provisioners:
    """``provisioners(**options)``: the provisioner service (``build``) in an event loop of its
    own thread; returns its decisions (counters, index) once it is ready. ``database_url=`` goes
    to its settings; :meth:`stop` stops the last one started."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.running: list[tuple[asyncio.AbstractEventLoop, asyncio.Event, threading.Thread]] = []

    def __call__(self, **options: Any) -> Provisioner:
        options.setdefault("use_store", False)
        extra = {k: options.pop(k) for k in ("database_url",) if k in options}
        settings = self.stack.settings(policy.PROVISIONER, **extra)
        service = build_provisioner(settings, **options)
        started: queue.Queue[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = queue.Queue()

        async def main() -> None:
            stop = asyncio.Event()
            started.put((asyncio.get_running_loop(), stop))
            await service.run(settings, stop=stop)

        thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
        thread.start()
        loop, stop = started.get(timeout=5)
        self.running.append((loop, stop, thread))
        _until(lambda: service.ready.is_set() or not thread.is_alive(), "the provisioner to start", 10)
        assert service.ready.is_set(), "provisioner did not start"
        assert service.provisioner is not None
        return service.provisioner

    def stop(self) -> None:
        loop, stop, thread = self.running.pop()
        loop.call_soon_threadsafe(stop.set)
        thread.join(15)
        assert not thread.is_alive(), "provisioner did not stop"


@pytest.fixture
def provisioner(stack: Stack) -> Iterator[Provisioners]:
    """A :class:`Provisioners`; every provisioner still running is stopped at teardown."""
    runner = Provisioners(stack)
    yield runner
    while runner.running:
        runner.stop()


def _until(check: Callable[[], object], what: str, timeout: float = 15.0) -> None:
    """Poll ``check`` until it holds; fail saying ``what`` did not happen within ``timeout``."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _wait_access(
    shop_client: MqttTestClient, order: str, timeout: float = 5.0
) -> ev.CustomerAccessGrantedEvent:
    topic = topics.access_topic("s1", order)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for t, payload in received(shop_client, 0.1):
            if t == topic and payload:
                return ev.CustomerAccessGrantedEvent.model_validate_json(payload)
    pytest.fail(f"no access message for {order}")


def test_provisioner_mints_on_creation_and_cuts_off_after_close(
    stack: Stack, login: Callable[..., MqttTestClient], provisioner: Provisioners
) -> None:
    prov = provisioner(grace_s=0.0)
    order = uid("o-prov-")
    shop = login("s1")
    shop.subscribe(topics.shop_filter("s1"))
    persister = login("persister")
    status = topics.order_topic("s1", order, topics.OrderChannel.STATUS)
    puback(persister, status, status_event(order, OrderStatus.CREATED))
    access = _wait_access(shop, order).data
    assert (access.shop, access.order, access.customer) == ("s1", order, policy.customer_id(order))
    assert access.username.startswith(policy.DEVICE_PREFIX) and access.broker is not None
    assert access.broker.port == stack.broker.port
    customer = login((access.username, access.password))
    for f in access.topics:
        customer.subscribe(f)
    puback(persister, status, status_event(order, OrderStatus.ASSIGNED))
    assert [t for t, _ in received(customer)] == [status]
    puback(persister, status, status_event(order, OrderStatus.DELIVERED))
    _until(lambda: customer.disconnects, "the customer to be disconnected")
    again = MqttTestClient(stack.broker, access.username, access.password)
    try:
        assert again.connect().value == NOT_AUTHORIZED
    finally:
        again.close()
    cleared = [p for t, p in received(shop) if t == topics.access_topic("s1", order)]
    assert cleared == [b""]  # the retained access is gone too
    _until(lambda: not prov.index, "the provisioner to forget the revoked access")
    assert prov.minted == 1 and prov.revoked == 1


def test_devices_enrol_and_do_not_kick_each_other(
    stack: Stack, login: Callable[..., MqttTestClient], provisioner: Provisioners
) -> None:
    prov = provisioner(grace_s=0.3, max_devices=3)
    order = uid("o-dev-")
    shop = login("s1")
    shop.subscribe(topics.access_topic("s1", order))
    persister = login("persister")
    status = topics.order_topic("s1", order, topics.OrderChannel.STATUS)
    puback(persister, status, status_event(order, OrderStatus.CREATED))
    access = _wait_access(shop, order).data
    host, port = stack.broker.host, stack.broker.port
    phone = enrol_device(host, port, access.username, access.password, access.customer, label="phone")
    laptop = enrol_device(
        host, stack.broker.ws_port, access.username, access.password, access.customer, transport="websockets"
    )
    assert len({phone.username, laptop.username, access.username}) == 3
    with pytest.raises(BrokerError, match="already has 3 logins"):
        enrol_device(host, port, access.username, access.password, access.customer)
    devices = [login((c.username, c.password)) for c in (phone, laptop)]
    for d in devices:
        d.subscribe(status)
    puback(persister, status, status_event(order, OrderStatus.ASSIGNED))
    for d in devices:
        assert [t for t, _ in received(d)] == [status]
        assert not d.disconnects  # nobody kicked anybody
    t0 = time.monotonic()
    puback(persister, status, status_event(order, OrderStatus.CANCELLED))
    _until(lambda: all(d.disconnects for d in devices), "both devices to be disconnected")
    assert time.monotonic() - t0 > 0.25  # not before the grace period
    # The plugin disconnects the devices before it answers the provisioner.
    _until(lambda: order not in {a.order for a in prov.index.values()}, "the access to leave the index")
    assert prov.devices == 2


def test_a_device_enrols_after_the_order_closed_until_its_grace_ends(
    stack: Stack, login: Callable[..., MqttTestClient], provisioner: Provisioners
) -> None:
    """The link works until close + grace: a phone opening it first after delivery gets a login."""
    prov = provisioner(grace_s=3.0)
    order = uid("o-late-")
    shop = login("s1")
    shop.subscribe(topics.access_topic("s1", order))
    persister = login("persister")
    status = topics.order_topic("s1", order, topics.OrderChannel.STATUS)
    puback(persister, status, status_event(order, OrderStatus.CREATED))
    access = _wait_access(shop, order).data
    puback(persister, status, status_event(order, OrderStatus.CANCELLED))
    _until(lambda: bool(prov.due), "the revocation to be scheduled")
    host, port = stack.broker.host, stack.broker.port
    phone = enrol_device(host, port, access.username, access.password, access.customer, label="late")
    device = login((phone.username, phone.password))
    _until(lambda: bool(device.disconnects), "the late device to go with the order's access")
    _until(lambda: order not in {a.order for a in prov.index.values()}, "the access to leave the index")


def test_a_burst_of_orders_is_minted_in_batches_each_checked(
    stack: Stack, login: Callable[..., MqttTestClient], provisioner: Provisioners
) -> None:
    """Orders created at once share control messages; each gets its own working login."""
    prov = provisioner()
    # Batches are bounded by the broker time a mint took; on a loaded host that bound alone would
    # send one order per message: a generous budget leaves the count as the bound under test.
    prov.queue.budget_s = 60.0
    orders = [uid(f"o-burst{i}-") for i in range(24)]
    shop = login("s1")
    shop.subscribe(topics.shop_filter("s1"))
    persister = login("persister")
    for order in orders:
        status = topics.order_topic("s1", order, topics.OrderChannel.STATUS)
        persister.paho.publish(status, status_event(order, OrderStatus.CREATED), qos=1)
    found: dict[str, ev.CustomerAccess] = {}
    deadline = time.monotonic() + 30
    while len(found) < len(orders) and time.monotonic() < deadline:
        for t, payload in received(shop, 0.1):
            if t.endswith("/access") and payload:
                access = ev.CustomerAccessGrantedEvent.model_validate_json(payload).data
                found[access.order] = access
    assert set(found) == set(orders), f"{len(found)}/{len(orders)} accesses"
    accesses = [found[order] for order in orders]
    assert len({a.username for a in accesses}) == len(orders)
    assert prov.minted == len(orders) and prov.given_up == 0
    assert prov.batches < len(orders), "orders waiting together went in shared messages"
    customer = login((accesses[-1].username, accesses[-1].password))
    for f in accesses[-1].topics:
        customer.subscribe(f)
    puback(
        persister,
        topics.order_topic("s1", orders[-1], topics.OrderChannel.STATUS),
        status_event(orders[-1], OrderStatus.ASSIGNED),
    )
    assert [t for t, _ in received(customer)] == [
        topics.order_topic("s1", orders[-1], topics.OrderChannel.STATUS)
    ]


def test_a_batch_mint_fails_orders_one_by_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad id and a refused login fail their own order only; the others are minted."""
    boot = bootstrap(tmp_path)
    store = DynsecFile(boot.config_path)
    ops.run(ops.mint_customers([ops.MintRequest("s1", "o-taken")]), store)
    taken = next(u for u in store.clients if u.startswith(policy.DEVICE_PREFIX))
    names = iter([policy.new_device_username(), taken, policy.new_device_username()])
    monkeypatch.setattr(policy, "new_device_username", lambda: next(names))
    requests = [
        ops.MintRequest("s1", "o1"),
        ops.MintRequest("s1", "o2"),
        ops.MintRequest("s1", "bad/id"),
        ops.MintRequest("s1", "o3", "c-own"),
    ]
    results = ops.run(ops.mint_customers(requests), store)
    assert [r.error is None for r in results] == [True, False, False, True]
    assert results[1].error == "createClient: Client already exists"
    assert results[3].access is not None and results[3].access.customer == "c-own"
    assert "order/s1/o3" in store.roles and results[0].login is not None
    assert results[0].login.username in store.clients


def test_mint_queue_bounds_a_batch_by_count_and_broker_time() -> None:
    queue_ = MintQueue(batch=8, budget_s=0.25, attempts=2)
    for i in range(20):
        assert queue_.add(f"order/s1/o{i}", Wanted("s1", f"o{i}"))
    assert not queue_.add("order/s1/o0", Wanted("s1", "o0")), "a role waits once"
    assert [w.order for _, w in queue_.take()] == ["o0"], "one until the broker's cost is known"
    queue_.measured(1, 0.01)
    assert [w.order for _, w in queue_.take()] == [f"o{i}" for i in range(1, 9)]
    queue_.measured(8, 8 * 0.12)  # 120 ms of broker time per order: 2 fit the budget
    assert len(queue_.take()) == 2
    queue_.measured(2, 2 * 0.6)
    role, wanted = queue_.take()[0]
    assert queue_.retry(role, wanted) and role in queue_
    queue_.take()
    assert not queue_.retry(role, wanted), "given up after its tries"


def test_provisioner_restart_finds_its_accesses(
    stack: Stack, provisioner: Provisioners, login: Callable[..., MqttTestClient]
) -> None:
    order = uid("o-restart-")
    access, cred = stack.accounts.mint_customer("s1", order)
    prov = provisioner(grace_s=0.0)
    role = policy.role_name(policy.Kind.CUSTOMER, "s1", order)
    assert prov.index[role].usernames == {cred.username}
    customer = login((cred.username, cred.password))
    persister = login("persister")
    puback(
        persister,
        topics.order_topic("s1", order, topics.OrderChannel.STATUS),
        status_event(order, OrderStatus.CANCELLED),
    )
    _until(lambda: customer.disconnects, "the customer to be disconnected")
    _until(lambda: role not in prov.index, "the access to leave the index")
    assert Accounts(stack.admin).order_access("s1", order) is None
    assert isinstance(access, OrderAccess)


def test_provisioner_catches_up_after_a_restart_from_its_session(
    stack: Stack, login: Callable[..., MqttTestClient], provisioner: Provisioners
) -> None:
    """Statuses published while it is down wait in its persistent session."""
    first = provisioner()
    provisioner.stop()
    order = uid("o-down-")
    shop = login("s1")
    shop.subscribe(topics.access_topic("s1", order))
    persister = login("persister")
    puback(
        persister,
        topics.order_topic("s1", order, topics.OrderChannel.STATUS),
        status_event(order, OrderStatus.CREATED),
    )
    assert first.minted == 0
    second = provisioner()
    access = _wait_access(shop, order).data
    assert access.order == order and second.minted == 1


def test_a_malformed_device_request_is_dead_lettered_and_the_next_one_answered(
    stack: Stack, login: Callable[..., MqttTestClient], provisioner: Provisioners
) -> None:
    provisioner(max_devices=2)
    order = uid("o-bad-")
    shop = login("s1")
    shop.subscribe(topics.access_topic("s1", order))
    operator = login("operator")
    operator.subscribe(topics.DEADLETTER)
    persister = login("persister")
    puback(
        persister,
        topics.order_topic("s1", order, topics.OrderChannel.STATUS),
        status_event(order, OrderStatus.CREATED),
    )
    access = _wait_access(shop, order).data
    customer = login((access.username, access.password))
    assert puback(customer, access.enrol_topic, b'{"no": "id"}') < 0x80
    letters = [json.loads(p) for t, p in received(operator, 2.0) if t == topics.DEADLETTER]
    ours = [d for d in letters if d.get("topic") == access.enrol_topic]
    assert ours and ours[0]["service"] == policy.PROVISIONER
    assert ours[0]["reason"].startswith("undecodable payload: ValidationError"), "the runtime decodes"
    assert "\nsource\n" in ours[0]["reason"], "the decode error names the missing field"
    customer.disconnect()
    device = enrol_device(
        stack.broker.host, stack.broker.port, access.username, access.password, access.customer
    )
    assert device.username.startswith(policy.DEVICE_PREFIX)


def test_provisioner_reconciles_with_the_store(
    stack: Stack, login: Callable[..., MqttTestClient], provisioner: Provisioners, tmp_path: Path
) -> None:
    """Open orders without access get one (customer id from the store); the accesses of closed
    orders and of orders the store does not know are revoked once their grace is over."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    opened, closed, orphan = uid("o-open-"), uid("o-closed-"), uid("o-orphan-")
    now = ev.now()
    engine = open_store(url)
    row = {
        "shop": "s1",
        "window_start": now,
        "window_end": now + timedelta(hours=1),
        "created_at": now - timedelta(hours=3),
        "updated_at": now,
        "items": [],
        "declined_by": [],
    }
    with engine.begin() as conn:
        conn.execute(
            ORDERS.insert(), [{**row, "id": opened, "status": "created", "customer_username": "c-custom"}]
        )
        conn.execute(
            ORDERS.insert(),
            [{**row, "id": closed, "status": "delivered", "closed_at": now - timedelta(hours=2)}],
        )
    engine.dispose()
    _, closed_login = stack.accounts.mint_customer("s1", closed)
    _, orphan_login = stack.accounts.mint_customer("s1", orphan)
    devices = [login((c.username, c.password)) for c in (closed_login, orphan_login)]
    shop = login("s1")
    shop.subscribe(topics.access_topic("s1", opened))
    prov = provisioner(use_store=True, database_url=url, grace_s=1.0)
    access = _wait_access(shop, opened).data
    assert access.customer == "c-custom"
    _until(lambda: all(d.disconnects for d in devices), "the closed and orphaned accesses to be revoked", 10)
    roles = {policy.role_name(policy.Kind.CUSTOMER, "s1", o) for o in (closed, orphan)}
    _until(lambda: not roles & set(prov.index), "the revoked accesses to leave the index")
    assert prov.revoked >= 2  # other tests leave orphans too


# --- offline edits, the CLI, the benchmark -----------------------------------------------------


def test_offline_edits_apply_at_the_next_start(tmp_path: Path, mqtt_client: MakeClient) -> None:
    _requirements()
    settings = Settings(data_dir=tmp_path)
    runner = CliRunner()
    result = runner.invoke(accounts_app, ["add-rider", "r9", "--offline"], obj=settings)
    assert result.exit_code == 0, result.output
    assert "r9" in result.output and "password:" not in result.output  # not printed unless asked
    result = runner.invoke(accounts_app, ["add-shop", "bad/shop", "--offline"], obj=settings)
    assert result.exit_code == 1 and "'/'" in result.output
    result = runner.invoke(accounts_app, ["list", "--offline"], obj=settings)
    assert result.exit_code == 0 and "rider/r9" in result.output
    password = (tmp_path / "secrets" / "r9").read_text().strip()
    broker = Mosquitto(tmp_path / "broker", dynsec_config=tmp_path / "broker" / "dynamic-security.json")
    broker.start()
    try:
        rider = mqtt_client("r9", password, broker=broker)
        record_pubacks(rider)
        assert puback(rider, topics.rider_location("r9"), b"{}") < 0x80
        assert puback(rider, topics.rider_location("r1"), b"{}") == NOT_AUTHORIZED
        rider.close()
        live = runner.invoke(accounts_app, ["rotate", "r9", "--live", "--show-password"], obj=settings)
        assert live.exit_code == 0, live.output
        new = (tmp_path / "secrets" / "r9").read_text().strip()
        assert new != password and f"password: {new}" in live.output
        gone = runner.invoke(accounts_app, ["remove", "r9"], obj=settings)  # finds the running broker
        assert gone.exit_code == 0, gone.output
        refused = mqtt_client("r9", new, broker=broker, connect=False)
        assert refused.connect().value == NOT_AUTHORIZED
    finally:
        broker.stop()


def test_bench_access_reports_figures() -> None:
    _requirements()
    lines: list[str] = []
    result = bench_access(orders=200, repeat=3, burst=4, echo=lines.append)
    for path in (result.service, result.client):
        assert len(path.mint_ms) == 3 and len(path.revoke_ms) == 3 and len(path.cutoff_ms) == 3
        assert max(path.cutoff_ms) < 1000
    assert any("mint one customer access" in line and "provisioner service" in line for line in lines)
    for way in (result.single, result.batched):
        assert len(way.total_ms) == 3 and len(way.wait_ms) == 12 and way.probe_ms
    assert result.single.messages == [4, 4, 4] and max(result.batched.messages) < 4
    assert any(line.startswith("burst of 4 orders, batched") for line in lines)


def test_the_broker_runs_with_glibc_fast_bins_off_unless_told_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The plugin's file rewrite spends a third of its time consolidating fast bins (see
    docs/performance.md, access control); an operator's own tunables win."""
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert broker_env()["GLIBC_TUNABLES"] == "glibc.malloc.mxfast=0"
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert broker_env()["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"
