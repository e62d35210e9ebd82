"""Device logins of shops and riders (``IDENTITY@LABEL``) on a real access-controlled Mosquitto.

One username is one MQTT session, so a shop's second terminal or a rider's second app needs a
login of its own: a device login holding the identity's role. Every assertion is on what the
broker delivers, refuses (PUBACK/CONNACK 0x87) or disconnects (0x98).
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from conftest import MqttTestClient
from paho.mqtt.reasoncodes import ReasonCode
from typer.testing import CliRunner

from bloomwire.access import Accounts, Kind, bootstrap, open_accounts, policy
from bloomwire.access.accounts import connect_admin
from bloomwire.access.dynsec import ControlClient
from bloomwire.app.cli import app
from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.errors import BrokerError, TopicError
from bloomwire.runtime.broker import Mosquitto, find_dynsec_plugin, find_mosquitto
from bloomwire.runtime.settings import Settings

MakeClient = Callable[..., MqttTestClient]
NOT_AUTHORIZED = 0x87
ADMINISTRATIVE_ACTION = 0x98
WAIT = 5.0


def uid(prefix: str) -> str:
    return f"{prefix}{os.urandom(3).hex()}"


@dataclass
class Broker:
    root: Path
    broker: Mosquitto
    admin: ControlClient

    @property
    def accounts(self) -> Accounts:
        return Accounts(self.admin, self.root)

    def secret(self, name: str) -> str:
        return (self.root / "secrets" / name).read_text().strip()

    def env(self) -> dict[str, str]:
        return {
            "BLOOMWIRE_DATA_DIR": str(self.root),
            "BLOOMWIRE_BROKER_HOST": self.broker.host,
            "BLOOMWIRE_BROKER_PORT": str(self.broker.port),
        }


@pytest.fixture(scope="module")
def access(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    try:
        find_mosquitto()
        find_dynsec_plugin()
    except BrokerError as exc:
        pytest.skip(str(exc))
    root = tmp_path_factory.mktemp("devices")
    boot = bootstrap(root, shops=("s1", "s2"), riders=("r1", "r2"))
    broker = Mosquitto(root / "broker", dynsec_config=boot.config_path)
    broker.start()
    try:
        admin = connect_admin(Settings(data_dir=root), broker.host, broker.port)
        yield Broker(root, broker, admin)
        admin.close()
    finally:
        broker.stop()


@pytest.fixture
def login(access: Broker, mqtt_client: MakeClient) -> Callable[..., MqttTestClient]:
    """``login(username)``: connected with its kept password, PUBACK codes recorded."""

    def make(username: str, password: str | None = None, **options: Any) -> MqttTestClient:
        secret = password or access.secret(username)
        client = mqtt_client(username, secret, broker=access.broker, **options)
        acks: dict[int, ReasonCode] = {}
        client.paho.on_publish = lambda _c, _u, mid, rc, _p: acks.__setitem__(mid, rc)
        client.pubacks = acks  # type: ignore[attr-defined]
        return client

    return make


def puback(client: MqttTestClient, topic: str, payload: bytes = b"{}") -> int:
    info = client.paho.publish(topic, payload, qos=1)
    acks: dict[int, ReasonCode] = client.pubacks  # type: ignore[attr-defined]
    deadline = time.monotonic() + WAIT
    while info.mid not in acks:
        assert time.monotonic() < deadline, f"no PUBACK for {topic}"
        time.sleep(0.005)
    return int(acks[info.mid].value)


def received(client: MqttTestClient, count: int) -> list[tuple[str, bytes]]:
    """The next ``count`` messages (fails the test if they do not come in time)."""
    return [(m.topic, bytes(m.payload)) for m in client.expect(count, WAIT)]


def kicked(client: MqttTestClient, timeout: float = WAIT) -> int:
    """The reason code the broker disconnected ``client`` with."""
    deadline = time.monotonic() + timeout
    while not client.disconnects:
        assert time.monotonic() < deadline, "the broker did not disconnect it"
        time.sleep(0.005)
    return int(client.disconnects[0].value)


def refused(access: Broker, username: str, password: str) -> bool:
    stale = MqttTestClient(access.broker, username, password)
    try:
        return int(stale.connect().value) == NOT_AUTHORIZED
    finally:
        stale.close()


# --- names and kinds (no broker) ----------------------------------------------------------------


def test_device_names() -> None:
    assert policy.device_username("s1", "till-2") == "s1@till-2"
    assert policy.split_device("s1@till-2") == ("s1", "till-2")
    assert policy.split_device("s1") is None and policy.split_device("cust@9f2c") is None
    assert policy.kind_of("s1@till-2", ["shop/s1"]) is Kind.SHOP
    assert policy.kind_of("r1@owntracks", ["rider/r1"]) is Kind.RIDER
    assert policy.kind_of("s1@till-2", ["shop/s2"]) is None  # not the role its name claims
    assert policy.kind_of("cust@9f2c", ["customers", "order/s1/o1"]) is Kind.CUSTOMER
    for identity, label in (("s1", "a@b"), ("s1", "a/b"), ("s1", ""), ("s@1", "x"), ("s1", "x" * 64)):
        with pytest.raises(TopicError):
            policy.device_username(identity, label)
    for name in ("cust", "a@b"):  # "cust@..." are customer logins; "@" starts a device label
        with pytest.raises(TopicError):
            policy.check_account_name(name, "shop")
    assert policy.new_device_label() != policy.new_device_label()


def test_offline_devices_take_their_identitys_role(tmp_path: Path) -> None:
    bootstrap(tmp_path, shops=["s1"], riders=["r1"])
    with open_accounts(Settings(data_dir=tmp_path), offline=True) as accounts:
        till = accounts.add_device("s1", "till-2")
        phone = accounts.add_device("r1")
        assert (till.username, till.kind) == ("s1@till-2", Kind.SHOP)
        assert phone.username.startswith("r1@d-") and phone.kind is Kind.RIDER
        assert till.secret_path is not None and till.secret_path.read_text().strip() == till.password
        info = accounts.get("s1@till-2")
        assert (info.kind, info.identity, info.device, info.roles) == (
            Kind.SHOP,
            "s1",
            "till-2",
            ("shop/s1",),
        )
        assert {d.username for d in accounts.devices()} == {"s1@till-2", phone.username}
        assert [d.username for d in accounts.devices("s1")] == ["s1@till-2"]
        with pytest.raises(BrokerError, match="exists already"):
            accounts.add_device("s1", "till-2")
        with pytest.raises(BrokerError, match="no shop or rider named"):
            accounts.add_device("s9", "x")
        with pytest.raises(BrokerError, match="only shops and riders"):
            accounts.add_device("dispatch", "x")
        with pytest.raises(BrokerError, match="not a device login"):
            accounts.revoke_device("s1")
        accounts.revoke_device("s1@till-2")
        assert not till.secret_path.exists()
        assert [d.username for d in accounts.devices()] == [phone.username]


# --- the done-when: several devices at once, revoking one leaves the others ---------------------


def test_two_devices_of_a_shop_and_of_a_rider_each_receive_everything_live(
    access: Broker, login: Callable[..., MqttTestClient]
) -> None:
    shop_devices = [access.accounts.add_device("s1", uid("till-")) for _ in range(2)]
    rider_devices = [access.accounts.add_device("r1", uid("app-")) for _ in range(2)]
    # the identities' own logins stay connected too: three sessions each; a web page's device
    # logs in over websockets with the same username and password
    shops = [login("s1"), *(login(d.username, d.password) for d in shop_devices)]
    riders = [login("r1"), *(login(d.username, d.password) for d in rider_devices[:1])]
    riders.append(login(rider_devices[1].username, rider_devices[1].password, transport="websockets"))
    for s in shops:
        s.subscribe(topics.shop_filter("s1"))
    for r in riders:
        r.subscribe(topics.rider_inbox_filter("r1"))
    persister = login("persister")
    order = uid("o-dev-")
    shop_live = [
        (topics.order_topic("s1", order, topics.OrderChannel.STATUS), b"created"),
        (topics.shop_alerts("s1"), b"alert"),
        (topics.order_topic("s2", order, topics.OrderChannel.STATUS), b"another shop's"),
    ]
    rider_live = [
        (topics.rider_inbox("r1", topics.Inbox.OFFERS), b"offer"),
        (topics.rider_inbox("r1", topics.Inbox.ACKS), b'{"ids": ["e1"]}'),
        (topics.rider_inbox("r2", topics.Inbox.ACKS), b"another rider's"),
    ]
    for topic, payload in shop_live + rider_live:
        assert puback(persister, topic, payload) < 0x80
    for s in shops:
        assert received(s, 2) == shop_live[:2]
    for r in riders:
        assert received(r, 2) == rider_live[:2]

    # each device has exactly its identity's rights
    for s in shops[1:]:
        assert puback(s, topics.shop_command("s1", topics.Command.CHAT)) < 0x80
        assert puback(s, topics.shop_command("s2", topics.Command.CHAT)) == NOT_AUTHORIZED
    for r in riders[1:]:
        assert puback(r, topics.rider_location("r1")) < 0x80
        assert puback(r, topics.owntracks("r1", "phone")) < 0x80
        assert puback(r, topics.rider_location("r2")) == NOT_AUTHORIZED
        assert puback(r, topics.rider_inbox("r1", topics.Inbox.ACKS)) == NOT_AUTHORIZED
    for s in shops:  # a shop reads its own commands too: both devices' chat commands
        assert [t for t, _ in received(s, 2)] == [topics.shop_command("s1", topics.Command.CHAT)] * 2
    assert not any(c.disconnects for c in shops + riders)  # nobody kicked anybody

    # revoking one device cuts it off at once; the identity's other sessions go on
    access.accounts.revoke_device(shop_devices[0].username)
    access.accounts.revoke_device(rider_devices[1].username)
    assert kicked(shops[1]) == ADMINISTRATIVE_ACTION
    assert kicked(riders[2]) == ADMINISTRATIVE_ACTION
    assert refused(access, shop_devices[0].username, shop_devices[0].password)
    assert refused(access, rider_devices[1].username, rider_devices[1].password)
    later = [
        (topics.order_topic("s1", order, topics.OrderChannel.STATUS), b"assigned"),
        (topics.rider_inbox("r1", topics.Inbox.CHAT), b"chat"),
    ]
    for topic, payload in later:
        assert puback(persister, topic, payload) < 0x80
    for s in (shops[0], shops[2]):
        assert received(s, 1) == later[:1] and not s.disconnects
    for r in (riders[0], riders[1]):
        assert received(r, 1) == later[1:] and not r.disconnects
    access.accounts.revoke_device(shop_devices[1].username)
    access.accounts.revoke_device(rider_devices[0].username)


def test_removing_a_shop_removes_its_devices_for_good(
    access: Broker, login: Callable[..., MqttTestClient]
) -> None:
    shop = uid("shop-")
    access.accounts.add_shop(shop)
    device = access.accounts.add_device(shop, "till")
    terminal = login(device.username, device.password)
    access.accounts.remove(shop)
    assert kicked(terminal) == ADMINISTRATIVE_ACTION
    assert not (access.root / "secrets" / device.username).exists()
    access.accounts.add_shop(shop)  # a new shop of the same name does not revive the old device
    assert refused(access, device.username, device.password)
    assert access.accounts.devices(shop) == []
    access.accounts.remove(shop)


# --- the command line ---------------------------------------------------------------------------


def test_accounts_device_commands(access: Broker, login: Callable[..., MqttTestClient]) -> None:
    runner = CliRunner()
    env = access.env()
    label = uid("till-")
    username = f"s2@{label}"
    added = runner.invoke(app, ["accounts", "device", "add", "s2", "--label", label, "--live"], env=env)
    assert added.exit_code == 0, added.output
    assert username in added.output and "password:" not in added.output
    terminal = login(username)  # the password is kept in DATA_DIR/secrets/s2@till-…
    listed = runner.invoke(app, ["accounts", "device", "list", "s2"], env=env)
    assert listed.exit_code == 0 and username in listed.output, listed.output
    everyone = runner.invoke(app, ["accounts", "list"], env=env)
    assert everyone.exit_code == 0 and "shop device" in everyone.output
    shown = runner.invoke(app, ["accounts", "device", "add", "r2", "--show-password"], env=env)
    assert shown.exit_code == 0 and "r2@d-" in shown.output and "password: " in shown.output
    unknown = runner.invoke(app, ["accounts", "device", "add", "nobody"], env=env)
    assert unknown.exit_code == 1 and "no shop or rider named" in unknown.output
    bad = runner.invoke(app, ["accounts", "device", "add", "s2", "--label", "a/b"], env=env)
    assert bad.exit_code == 1 and "'/'" in bad.output
    revoked = runner.invoke(app, ["accounts", "device", "revoke", username], env=env)
    assert revoked.exit_code == 0 and f"revoked device login {username} of shop s2" in revoked.output
    assert kicked(terminal) == ADMINISTRATIVE_ACTION
    not_a_device = runner.invoke(app, ["accounts", "device", "revoke", "s2"], env=env)
    assert not_a_device.exit_code == 1 and "not a device login" in not_a_device.output
    for d in access.accounts.devices("r2"):
        access.accounts.revoke_device(d.username)


def test_a_shops_second_terminal_and_its_watch_do_not_kick_each_other(
    access: Broker, login: Callable[..., MqttTestClient]
) -> None:
    """``shop watch --device`` beside another terminal of the same shop: both stay connected."""
    till = access.accounts.add_device("s1", uid("till-"))
    watch = access.accounts.add_device("s1", uid("watch-"))
    terminal = login(till.username, till.password)
    terminal.subscribe(topics.shop_filter("s1"))
    label = watch.username.split("@", 1)[1]
    env = access.env()
    result = CliRunner().invoke(app, ["shop", "watch", "--shop", "s1", "--once", "--device", label], env=env)
    assert result.exit_code == 0, result.output
    assert not terminal.disconnects
    clash = CliRunner().invoke(
        app, ["shop", "watch", "--shop", "s1", "--once", "--device", "x", "--username", "s1"], env=env
    )
    assert clash.exit_code == 2 and "not both" in clash.output
    for d in (till, watch):
        access.accounts.revoke_device(d.username)


class Persister:
    """Plays the persister for a rider's status events: acks each one on the rider's inbox."""

    def __init__(self, access: Broker, rider: str) -> None:
        self.acked: queue.Queue[str] = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.username_pw_set("persister", access.secret("persister"))
        subscribed = threading.Event()
        statuses = f"{topics.RIDERS}/+/orders/+/status"  # as the persister's role grants it
        self.client.on_connect = lambda c, *_: c.subscribe(statuses, 1)
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = self._on_message
        self.rider = rider
        self.client.connect(access.broker.host, access.broker.port)
        self.client.loop_start()
        assert subscribed.wait(WAIT), "the persister stand-in could not subscribe"

    def _on_message(self, client: Any, _u: Any, msg: Any) -> None:
        event_id = str(json.loads(msg.payload)["id"])
        ack = ev.Ack(ids=[event_id]).model_dump_json()
        client.publish(topics.rider_inbox(self.rider, topics.Inbox.ACKS), ack, qos=1)
        self.acked.put(event_id)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.client.on_message = None  # no cycle left for the garbage collector (see conftest)


def test_a_riders_second_app_gets_the_acks_of_what_it_sent(
    access: Broker, login: Callable[..., MqttTestClient]
) -> None:
    """``rider status --device`` while the rider's app stays online on its own login: the command
    gets its ack (it used to share the app's login, and the two took the session from each other)."""
    app_login = access.accounts.add_device("r1", uid("app-"))
    cli_login = access.accounts.add_device("r1", uid("cli-"))
    phone = login(app_login.username, app_login.password)
    phone.subscribe(topics.rider_inbox_filter("r1"))
    persister = Persister(access, "r1")
    try:
        label = cli_login.username.split("@", 1)[1]
        result = CliRunner().invoke(
            app,
            ["rider", "status", "r1", uid("o-"), "picked_up", "--device", label, "--wait", "10"],
            env=access.env(),
        )
        assert result.exit_code == 0, result.output
        assert "stored" in result.output
        event_id = persister.acked.get(timeout=WAIT)
        ((topic, payload),) = received(phone, 1)  # the app sees the ack too, still connected
        assert topic == topics.rider_inbox("r1", topics.Inbox.ACKS) and event_id in payload.decode()
        assert not phone.disconnects
        outbox = access.root / "clients" / "riders" / cli_login.username / "outbox.db"
        assert outbox.exists()  # a device keeps an outbox of its own
    finally:
        persister.close()
        for d in (app_login, cli_login):
            access.accounts.revoke_device(d.username)
