"""``bench_access``: how long minting and revoking one customer access takes with N live orders.

The broker runs in access-controlled mode with ``orders`` customer accesses already provisioned
(written into the plugin's JSON before it starts: the same roles and logins the provisioner
mints live). Then, ``repeat`` times, it times what the provisioner does for one order, once on
each path in turn (which goes first alternates):

* ``service``: the provisioner's own -- plugin commands on a runtime
  :class:`~bloomwire.runtime.mqtt.Connection` (:class:`~bloomwire.access.dynsec.ControlChannel`,
  :class:`~bloomwire.access.accounts.AsyncAccounts`), as in the running service;
* ``client``: the blocking :class:`~bloomwire.access.dynsec.ControlClient` of ``bloomwire accounts``.

What is timed:

* mint: ``createRole`` + ``createClient`` in one control message, then the retained access
  publish (PUBACK awaited);
* cut-off: a device logged in with that access; from sending the revocation to its disconnect;
* revoke: ``deleteClient`` + ``deleteRole`` in one control message, then clearing the retained
  access;
* a burst: ``burst`` orders wanting an access at once, on the service path, minted one per
  control message (as the provisioner did) and in batches (as it does now: a
  :class:`~bloomwire.services.provisioner.minting.MintQueue`), in turn: the burst's time, each
  order's wait for its access, and what a connected device saw meanwhile (the PUBACK round
  trip of a QoS 1 publish every 20 ms: the broker holds every client while the plugin works).

Mosquitto 2.0.11's plugin rewrites its whole JSON file after EVERY command, so each command
costs time proportional to the number of provisioned accounts; the figures show how much.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from bloomwire.access import policy
from bloomwire.access.accounts import (
    Accounts,
    AsyncAccounts,
    MintRequest,
    OrderAccess,
    bootstrap,
    connect_admin,
)
from bloomwire.access.dynsec import ControlChannel, ControlClient, DynsecFile, hash_password
from bloomwire.access.operations import Credential
from bloomwire.contract import topics
from bloomwire.runtime.broker import Mosquitto, ensure_secret
from bloomwire.runtime.mqtt import Connection
from bloomwire.runtime.settings import Settings
from bloomwire.services.provisioner.minting import MintQueue, Wanted

SHOPS = 20
#: The service path's login: the provisioner's roles under a name of its own (one username is
#: one session, and the client path logs in as ``provisioner``).
BENCH_SERVICE = "bench-provisioner"


@dataclass
class Timings:
    """What one path took per round (milliseconds)."""

    mint_ms: list[float] = field(default_factory=list)
    revoke_ms: list[float] = field(default_factory=list)
    cutoff_ms: list[float] = field(default_factory=list)


@dataclass
class Burst:
    """One way of minting a burst of orders, over the rounds (milliseconds)."""

    total_ms: list[float] = field(default_factory=list)
    wait_ms: list[float] = field(default_factory=list)
    messages: list[int] = field(default_factory=list)
    probe_ms: list[float] = field(default_factory=list)


@dataclass
class AccessBench:
    """Figures of one :func:`bench_access` run (milliseconds)."""

    orders: int
    repeat: int
    file_bytes: int = 0
    save_ms: list[float] = field(default_factory=list)
    #: The provisioner service's path: commands on its own runtime connection.
    service: Timings = field(default_factory=Timings)
    #: ``bloomwire accounts``' path: the blocking ControlClient.
    client: Timings = field(default_factory=Timings)
    burst: int = 0
    #: A burst minted one order per control message, and in batches.
    single: Burst = field(default_factory=Burst)
    batched: Burst = field(default_factory=Burst)

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
        out = [
            f"customer accesses provisioned: {self.orders} (dynamic-security file "
            f"{self.file_bytes / 1e6:.1f} MB), {self.repeat} rounds per path, paths in turn",
            f"one plugin write (setDefaultACLAccess): {self.summary(self.save_ms)}",
        ]
        for what, attr in (
            ("mint one customer access (role + login + retained access)", "mint_ms"),
            ("revoke it (logins + role + clear access)", "revoke_ms"),
            ("connected device cut off after the revocation is sent", "cutoff_ms"),
        ):
            for path, timings in (("provisioner service", self.service), ("ControlClient", self.client)):
                out.append(f"{what}, {path}: {self.summary(getattr(timings, attr))}")
        for name, b in (("one order per control message", self.single), ("batched", self.batched)):
            if not b.total_ms:
                continue
            rate = self.burst * len(b.total_ms) / (sum(b.total_ms) / 1000)
            out += [
                f"burst of {self.burst} orders, {name}: {rate:.1f} orders/s, "
                f"{statistics.mean(b.messages):.0f} messages per burst; each order's wait for its access "
                f"{self.summary(b.wait_ms)}",
                f"burst of {self.burst} orders, {name}: a connected device's PUBACK round trip meanwhile "
                f"{self.summary(b.probe_ms)}",
            ]
        return out


def populate(path: Path, orders: int) -> str:
    """Add ``orders`` customer accesses (role + one login each) to the JSON (broker stopped);
    return their password (one for all: only their count matters)."""
    store = DynsecFile(path)
    password = policy.new_password()
    fields = hash_password(password)
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
    return password


@dataclass
class _Gone:
    """Set when a bench device is disconnected, with the ``perf_counter`` of that moment."""

    event: threading.Event = field(default_factory=threading.Event)
    at: float = 0.0


def _device(broker: Mosquitto, username: str, password: str) -> tuple[paho.Client, _Gone]:
    """A connected device and what tells of its disconnection."""
    gone = _Gone()
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
        if not gone.event.is_set():
            gone.at = time.perf_counter()
            gone.event.set()

    client.on_connect, client.on_disconnect = on_connect, on_disconnect
    client.connect(broker.host, broker.port, keepalive=30)
    client.loop_start()
    if not up.wait(5):
        raise TimeoutError("bench device could not connect")
    return client, gone


class _Path(Protocol):
    """One way of sending the provisioner's commands and publishes."""

    async def mint(self, shop: str, order: str) -> tuple[OrderAccess, Credential]: ...
    async def revoke(self, access: OrderAccess) -> None: ...
    async def publish(self, topic: str, payload: bytes) -> None: ...


class _ServicePath:
    """The running provisioner's: commands on a runtime Connection, nothing blocks the loop."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.accounts = AsyncAccounts(ControlChannel(conn))

    async def mint(self, shop: str, order: str) -> tuple[OrderAccess, Credential]:
        return await self.accounts.mint_customer(shop, order)

    async def revoke(self, access: OrderAccess) -> None:
        await self.accounts.revoke_customer(access)

    async def publish(self, topic: str, payload: bytes) -> None:
        info = self.conn.publish(topic, payload, qos=1, retain=True)
        await asyncio.to_thread(info.wait_for_publish, 5.0)


class _ClientPath:
    """``bloomwire accounts``': the blocking ControlClient (blocking this loop, on purpose)."""

    def __init__(self, ctl: ControlClient) -> None:
        self.ctl = ctl
        self.accounts = Accounts(ctl)

    async def mint(self, shop: str, order: str) -> tuple[OrderAccess, Credential]:
        return self.accounts.mint_customer(shop, order)

    async def revoke(self, access: OrderAccess) -> None:
        self.accounts.revoke_customer(access)

    async def publish(self, topic: str, payload: bytes) -> None:
        self.ctl.publish(topic, payload, retain=True)


async def _round(path: _Path, broker: Mosquitto, order: str, timings: Timings) -> None:
    """Mint, connect a device, revoke: time each step on ``path``."""
    shop = "bench-shop-live"
    access_topic = topics.access_topic(shop, order)
    t0 = time.perf_counter()
    access, login = await path.mint(shop, order)
    await path.publish(access_topic, b"{}")
    timings.mint_ms.append((time.perf_counter() - t0) * 1000)
    device, gone = await asyncio.to_thread(_device, broker, login.username, login.password)
    try:
        t0 = time.perf_counter()
        await path.revoke(access)
        await path.publish(access_topic, b"")
        timings.revoke_ms.append((time.perf_counter() - t0) * 1000)
        if await asyncio.to_thread(gone.event.wait, 5.0):
            timings.cutoff_ms.append((gone.at - t0) * 1000)
    finally:
        device.loop_stop()
        device.disconnect()


class _Probe:
    """A connected customer device publishing at QoS 1 every 20 ms: its PUBACK round trips."""

    def __init__(self, broker: Mosquitto, password: str) -> None:
        self.client, self.gone = _device(broker, f"{policy.DEVICE_PREFIX}bench000000", password)
        self.topic = f"{topics.CUSTOMERS}/{policy.customer_id('bench-o000000')}/chat"
        self.rtts: list[float] = []
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    def _loop(self) -> None:
        while True:
            t0 = time.perf_counter()
            self.client.publish(self.topic, b"{}", qos=1).wait_for_publish(10)
            self.rtts.append((time.perf_counter() - t0) * 1000)
            if self.stopped.wait(0.02):  # the probe's pace; returns at once when stopped
                return

    def start(self) -> None:
        self.rtts = []
        self.stopped.clear()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def stop(self) -> list[float]:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join(15)
        return self.rtts

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


async def _burst(accounts: AsyncAccounts, n: int, batched: bool, tag: str, out: Burst, probe: _Probe) -> None:
    """Mint ``n`` waiting orders (one per message, or as the provisioner batches them), then
    revoke them again (untimed) so every round starts with the same live count."""
    queue = MintQueue(batch=1) if not batched else MintQueue()
    for i in range(n):
        queue.add(f"{tag}-{i}", Wanted("bench-shop-burst", f"bench-burst-{tag}-{i}"))
    minted: list[OrderAccess] = []
    messages = 0
    probe.start()
    t0 = time.perf_counter()
    while len(queue):
        batch = queue.take()
        sent = time.perf_counter()
        results = await accounts.mint_customers([MintRequest(w.shop, w.order) for _, w in batch])
        done = time.perf_counter()
        queue.measured(len(batch), done - sent)
        messages += 1
        for r in results:
            if r.access is None:
                raise RuntimeError(f"bench burst mint failed: {r.error}")
            minted.append(r.access)
            out.wait_ms.append((done - t0) * 1000)
    out.total_ms.append((time.perf_counter() - t0) * 1000)
    out.probe_ms += probe.stop()
    out.messages.append(messages)
    for access in minted:
        await accounts.revoke_customer(access)


async def _measure(result: AccessBench, broker: Mosquitto, root: Path, probe_password: str) -> None:
    settings = Settings(data_dir=root, broker_host=broker.host, broker_port=broker.port)
    password = ensure_secret(root, BENCH_SERVICE)
    conn = Connection(settings.as_identity(BENCH_SERVICE, password), BENCH_SERVICE)
    conn.start()
    try:
        await conn.wait_connected(10)
        with connect_admin(settings, broker.host, broker.port, policy.PROVISIONER) as ctl:
            default = [{"acltype": k, "allow": v} for k, v in policy.DEFAULT_ACL_ACCESS.items()]
            for _ in range(3):
                t0 = time.perf_counter()
                ctl.execute([{"command": "setDefaultACLAccess", "acls": default}])
                result.save_ms.append((time.perf_counter() - t0) * 1000)
            service = _ServicePath(conn)  # one ControlChannel per connection: it takes the answers
            paths: list[tuple[str, _Path, Timings]] = [
                ("service", service, result.service),
                ("client", _ClientPath(ctl), result.client),
            ]
            for i in range(result.repeat):
                for name, path, timings in paths if i % 2 == 0 else paths[::-1]:
                    await _round(path, broker, f"bench-live-{name}-{i}", timings)
            if result.burst:
                await _bursts(result, service.accounts, broker, probe_password)
    finally:
        await conn.stop(announce_offline=False)


async def _bursts(result: AccessBench, accounts: AsyncAccounts, broker: Mosquitto, password: str) -> None:
    """Three rounds of each burst way, in turn (which goes first alternates)."""
    probe = await asyncio.to_thread(_Probe, broker, password)
    try:
        ways = [(False, result.single), (True, result.batched)]
        for i in range(3):
            for batched, out in ways if i % 2 == 0 else ways[::-1]:
                await _burst(accounts, result.burst, batched, f"{'b' if batched else 's'}{i}", out, probe)
    finally:
        probe.close()


def bench_access(
    orders: int = 5_000,
    repeat: int = 15,
    *,
    burst: int = 0,
    data_dir: Path | None = None,
    echo: Callable[[str], None] | None = print,
) -> AccessBench:
    """Time mint, revoke and cut-off of one customer access with ``orders`` already live."""
    result = AccessBench(orders, repeat, burst=burst)
    with tempfile.TemporaryDirectory(prefix="bloomwire-bench-access-") as tmp:
        root = Path(data_dir) if data_dir is not None else Path(tmp)
        boot = bootstrap(root)
        password = populate(boot.config_path, max(orders, 1))
        store = DynsecFile(boot.config_path)
        roles = [{"rolename": r.name} for r in policy.roles_for(policy.Kind.PROVISIONER, BENCH_SERVICE)]
        store.put_client(BENCH_SERVICE, ensure_secret(root, BENCH_SERVICE), roles)
        store.save()
        result.file_bytes = boot.config_path.stat().st_size
        broker = Mosquitto(root / "broker", dynsec_config=boot.config_path)
        broker.start()
        try:
            asyncio.run(_measure(result, broker, root, password))
        finally:
            broker.stop()
    if echo is not None:
        for line in result.lines():
            echo(line)
    return result


if __name__ == "__main__":  # pragma: no cover
    bench_access()
