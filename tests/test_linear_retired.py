"""A removed rider or device leaves nothing retained (real access-controlled Mosquitto): its
presence (its Last Will included), location, OwnTracks topics and each shop's view of it
are cleared, counted back by the operator's fresh ``#`` subscriber."""

from __future__ import annotations

import os
import queue
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from conftest import MqttTestClient

from bloomwire.access import Accounts, bootstrap, policy
from bloomwire.access.accounts import connect_admin
from bloomwire.access.dynsec import ControlClient
from bloomwire.contract import topics
from bloomwire.errors import BrokerError
from bloomwire.runtime.broker import Mosquitto, find_dynsec_plugin, find_mosquitto
from bloomwire.runtime.settings import Settings

MakeClient = Callable[..., MqttTestClient]


@dataclass
class Access:
    root: Path
    broker: Mosquitto
    admin: ControlClient

    @property
    def accounts(self) -> Accounts:
        return Accounts(self.admin, self.root)

    def secret(self, name: str) -> str:
        return (self.root / "secrets" / name).read_text().strip()


@pytest.fixture(scope="module")
def access(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Access]:
    try:
        find_mosquitto()
        find_dynsec_plugin()
    except BrokerError as exc:
        pytest.skip(str(exc))
    root = tmp_path_factory.mktemp("retired")
    boot = bootstrap(root, shops=("s1", "s2"), riders=("r-stays",))
    broker = Mosquitto(root / "broker", dynsec_config=boot.config_path)
    broker.start()
    try:
        admin = connect_admin(Settings(data_dir=root), broker.host, broker.port)
        yield Access(root, broker, admin)
        admin.close()
    finally:
        broker.stop()


def retained(access: Access, mqtt_client: MakeClient, quiet_s: float = 0.5) -> set[str]:
    """The topics a fresh ``#`` subscriber (the operator) is handed retained messages on."""
    client = mqtt_client(policy.OPERATOR, access.secret(policy.OPERATOR), broker=access.broker)
    client.subscribe("#", qos=0)
    seen: set[str] = set()
    while True:
        try:
            message: mqtt.MQTTMessage = client.messages.get(timeout=quiet_s)
        except queue.Empty:
            client.disconnect()
            return seen
        if message.retain:
            seen.add(message.topic)


def test_a_removed_riders_and_revoked_devices_retained_messages_are_cleared(
    access: Access, mqtt_client: MakeClient
) -> None:
    rider = f"r{os.urandom(3).hex()}"
    accounts = access.accounts
    accounts.add_rider(rider)
    device = accounts.add_device(rider, "phone")

    def login(username: str, password: str, **options: Any) -> MqttTestClient:
        return mqtt_client(username, password, broker=access.broker, **options)

    persister = login(policy.PERSISTER, access.secret(policy.PERSISTER))
    others = {topics.rider_presence("r-stays"), topics.shop_rider_state("s1", "r-stays")}
    stays = login("r-stays", access.secret("r-stays"))
    stays.publish(topics.rider_presence("r-stays"), b"online", retain=True)
    persister.publish(topics.shop_rider_state("s1", "r-stays"), b"{}", retain=True)

    # The rider's app: presence with its Last Will, a location; its second device's OwnTracks.
    app = login(rider, access.secret(rider), connect=False)
    app.paho.will_set(topics.rider_presence(rider), b"offline", qos=1, retain=True)
    assert not app.connect().is_failure
    app.publish(topics.rider_presence(rider), b"online", retain=True)
    app.publish(topics.rider_location(rider), b'{"lat": 1}', retain=True)
    phone = login(device.username, device.password)
    phone.publish(topics.owntracks(rider, "phone"), b'{"_type": "location"}', retain=True)
    # The persister's: the rider's state for two shops.
    for shop in ("s1", "s2"):
        persister.publish(topics.shop_rider_state(shop, rider), b"{}", retain=True)
    mine = {
        topics.rider_presence(rider),
        topics.rider_location(rider),
        topics.owntracks(rider, "phone"),
        topics.shop_rider_state("s1", rider),
        topics.shop_rider_state("s2", rider),
    }
    before = retained(access, mqtt_client)
    assert mine | others <= before

    # One device revoked: its OwnTracks topic goes; the rider's own presence stays.
    accounts.revoke_device(device.username)
    assert accounts.cleared == [topics.owntracks(rider, "phone")]
    assert retained(access, mqtt_client) == before - {topics.owntracks(rider, "phone")}

    # The rider removed: its app is disconnected (its Last Will published), then all of it goes.
    accounts.remove(rider)
    assert set(accounts.cleared) == mine - {topics.owntracks(rider, "phone")}
    after = retained(access, mqtt_client)
    assert after == before - mine
    assert others <= after
