"""``bench_access``: how long minting and revoking one customer access takes with N live orders.

The broker runs in access-controlled mode with ``orders`` customer accesses already provisioned
(written into the plugin's JSON before it starts: the same roles and logins the provisioner
mints live). Then, ``repeat`` times, it times what the provisioner does for one order:

* mint: ``createRole`` + ``createClient`` in one control message, then the retained access
  publish (PUBACK awaited);
* cut-off: a device logged in with that access; from sending the revocation to its disconnect;
* revoke: ``deleteClient`` + ``deleteRole`` in one control message, then clearing the retained
  access.

Mosquitto 2.0.11's plugin rewrites its whole JSON file after EVERY command, so each command
costs time proportional to the number of provisioned accounts; the figures show how much.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from bloomwire.access import policy
from bloomwire.access.accounts import Accounts, bootstrap, connect_admin
from bloomwire.access.dynsec import DynsecFile, hash_password
from bloomwire.contract import topics
from bloomwire.runtime.broker import Mosquitto
from bloomwire.runtime.settings import Settings

SHOPS = 20


@dataclass
class AccessBench:
    """Figures of one :func:`bench_access` run (milliseconds)."""

    orders: int
    repeat: int
    file_bytes: int = 0
    save_ms: list[float] = field(default_factory=list)
    mint_ms: list[float] = field(default_factory=list)
    revoke_ms: list[float] = field(default_factory=list)
    cutoff_ms: list[float] = field(default_factory=list)

    @staticmethod
    def summary(values: list[float]) -> str:
        """``median / p95 / max`` of ``values``."""
        if not values:
            return "-"
        ordered = sorted(values)
        p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
        return f"median {statistics.median(ordered):.0f} ms, p95 {p95:.0f} ms, max {ordered[-1]:.0f} ms"

    def lines(self) -> list[str]:
        """The figures as printable lines."""
        return [
            f"customer accesses provisioned: {self.orders} (dynamic-security file "
            f"{self.file_bytes / 1e6:.1f} MB), {self.repeat} rounds",
            f"one plugin write (setDefaultACLAccess): {self.summary(self.save_ms)}",
            f"mint one customer access (role + login + retained access): {self.summary(self.mint_ms)}",
            f"revoke it (logins + role + clear access): {self.summary(self.revoke_ms)}",
            f"connected device cut off after the revocation is sent: {self.summary(self.cutoff_ms)}",
        ]


def populate(path: Path, orders: int) -> None:
    """Add ``orders`` customer accesses (role + one login each) to the JSON (broker stopped)."""
    store = DynsecFile(path)
    fields = hash_password(policy.new_password())  # one hash for all: only their count matters
    for i in range(orders):
        shop, order = f"bench-shop{i % SHOPS}", f"bench-o{i:06d}"
        role = policy.order_role(shop, order, policy.customer_id(order))
        store.put_role(role.name, [a.to_json() for a in role.acls])
        username = f"{policy.DEVICE_PREFIX}bench{i:06d}"
        client = {
            "username": username,
            "roles": [
                {"rolename": policy.CUSTOMERS_ROLE, "priority": policy.CUSTOMERS_ROLE_PRIORITY},
                {"rolename": role.name},
            ],
            **fields,
        }
        store.clients[username] = client
    store.changed = True
    store.save()


def _device(broker: Mosquitto, username: str, password: str) -> tuple[paho.Client, list[float]]:
    """A connected device; the list receives the ``perf_counter`` of its disconnection."""
    gone: list[float] = []
    up = threading.Event()
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=username,
        protocol=MQTTProtocolVersion.MQTTv5,
        reconnect_on_failure=False,
    )
    client.username_pw_set(username, password)

    def on_connect(*_a: Any) -> None:
        up.set()

    def on_disconnect(*_a: Any) -> None:
        gone.append(time.perf_counter())

    client.on_connect, client.on_disconnect = on_connect, on_disconnect
    client.connect(broker.host, broker.port, keepalive=30)
    client.loop_start()
    if not up.wait(5):
        raise TimeoutError("bench device could not connect")
    return client, gone


def bench_access(
    orders: int = 5_000,
    repeat: int = 15,
    *,
    data_dir: Path | None = None,
    echo: Callable[[str], None] | None = print,
) -> AccessBench:
    """Time mint, revoke and cut-off of one customer access with ``orders`` already live."""
    result = AccessBench(orders, repeat)
    with tempfile.TemporaryDirectory(prefix="bloomwire-bench-access-") as tmp:
        root = Path(data_dir) if data_dir is not None else Path(tmp)
        boot = bootstrap(root)
        populate(boot.config_path, orders)
        result.file_bytes = boot.config_path.stat().st_size
        broker = Mosquitto(root / "broker", dynsec_config=boot.config_path)
        broker.start()
        try:
            settings = Settings(data_dir=root, broker_host=broker.host, broker_port=broker.port)
            with connect_admin(settings, broker.host, broker.port, policy.PROVISIONER) as ctl:
                accounts = Accounts(ctl)
                default = [{"acltype": k, "allow": v} for k, v in policy.DEFAULT_ACL_ACCESS.items()]
                for _ in range(3):
                    t0 = time.perf_counter()
                    ctl.execute([{"command": "setDefaultACLAccess", "acls": default}])
                    result.save_ms.append((time.perf_counter() - t0) * 1000)
                for i in range(repeat):
                    shop, order = "bench-shop-live", f"bench-live-{i}"
                    t0 = time.perf_counter()
                    access, login = accounts.mint_customer(shop, order)
                    ctl.publish(topics.access_topic(shop, order), b"{}", retain=True)
                    result.mint_ms.append((time.perf_counter() - t0) * 1000)
                    device, gone = _device(broker, login.username, login.password)
                    try:
                        t0 = time.perf_counter()
                        accounts.revoke_customer(access)
                        ctl.publish(topics.access_topic(shop, order), b"", retain=True)
                        result.revoke_ms.append((time.perf_counter() - t0) * 1000)
                        deadline = time.monotonic() + 5
                        while not gone and time.monotonic() < deadline:
                            time.sleep(0.005)
                        if gone:
                            result.cutoff_ms.append((gone[0] - t0) * 1000)
                    finally:
                        device.loop_stop()
                        device.disconnect()
        finally:
            broker.stop()
    if echo is not None:
        for line in result.lines():
            echo(line)
    return result


if __name__ == "__main__":  # pragma: no cover
    bench_access()
