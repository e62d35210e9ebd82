"""The persister's delivery guarantees with the real thing: a child process, a real Mosquitto, both stores.

* SIGKILL in the middle of a 10,000-event QoS 1 stream, then a restart: every event stored once.
* 5,000 events published while the persister is down (its session exists): all stored on start.
* One event id sent three times: stored once, acknowledged to the device each time.

The persister runs exactly as in production (``python -m bloomwire service run persister``, see
:meth:`bloomwire.app.supervisor.Stack.start_service`), as user ``persister`` with its password in the
data dir's secrets folder, on a broker of the test's own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import sqlalchemy as sa
from conftest import Broker, MqttTestClient
from sqlalchemy import Engine
from test_persister import (
    SHOP,
    Devices,
    Msg,
    Seen,
    Spy,
    accepted_order,
    chat,
    count,
)

from bloomwire.contract import topics
from bloomwire.runtime.broker import ensure_secret
from bloomwire.store import open_store
from bloomwire.store.models import CHAT, EVENTS

MakeUser = Callable[..., tuple[str, str]]
MakeClient = Callable[..., MqttTestClient]

PERSISTER = "persister"


class PersisterProcess:
    """``bloomwire service run persister`` as a child process: start, SIGTERM, SIGKILL, restart."""

    def __init__(self, broker: Broker, data_dir: Path, database_url: str) -> None:
        self.data_dir = data_dir
        broker.add_user(PERSISTER, ensure_secret(data_dir, PERSISTER))
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("BLOOMWIRE_")}
        self.env = {
            **inherited,
            "BLOOMWIRE_BROKER_HOST": broker.host,
            "BLOOMWIRE_BROKER_PORT": str(broker.port),
            "BLOOMWIRE_BROKER_USERNAME": PERSISTER,
            "BLOOMWIRE_DATA_DIR": str(data_dir),
            "BLOOMWIRE_DATABASE_URL": database_url,
            "BLOOMWIRE_LOG_LEVEL": "INFO",
        }
        self.log_path = data_dir / "persister.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        with self.log_path.open("ab") as out:
            out.write(f"--- start {self.starts} ---\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bloomwire", "service", "run", PERSISTER],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self) -> int:
        """SIGKILL: no shutdown hook, no clean disconnect, whatever was in flight is cut off."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait(30)

    def stop(self) -> int:
        """SIGTERM: the service finishes its batch, says offline and disconnects."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture
def store(database_url: str) -> Iterator[Engine]:
    """The store, migrated before the persister starts (so two migrations never race)."""
    engine = open_store(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def persister(
    fresh_broker: Broker, database_url: str, store: Engine, tmp_path: Path
) -> Iterator[PersisterProcess]:
    proc = PersisterProcess(fresh_broker, tmp_path / "persister", database_url)
    yield proc
    proc.close()


@pytest.fixture
def client(
    fresh_broker: Broker, mqtt_user: MakeUser, mqtt_client: MakeClient
) -> Callable[..., MqttTestClient]:
    """Factory: a connected client of a new user on the test's broker (``connect=False`` to tune it)."""

    def make(*, connect: bool = True) -> MqttTestClient:
        return mqtt_client(*mqtt_user(broker=fresh_broker), broker=fresh_broker, connect=connect)

    return make


def stored_chat(engine: Engine) -> tuple[int, int]:
    """(rows, distinct ids) of chat events in the store."""
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(sa.func.count(), sa.func.count(sa.distinct(EVENTS.c.id))).where(
                EVENTS.c.type == "order.chat_posted"
            )
        ).one()
    return int(row[0]), int(row[1])


def stored_chat_ids(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return [
            r[0] for r in conn.execute(sa.select(EVENTS.c.id).where(EVENTS.c.type == "order.chat_posted"))
        ]


def wait_until(
    condition: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    persister: PersisterProcess,
    poll: float = 0.1,
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not reached within {timeout} s; persister log:\n{persister.log_tail()}")
        if persister.proc is not None and persister.proc.poll() not in (None, -signal.SIGKILL, 0):
            pytest.fail(f"persister exited with {persister.proc.returncode}:\n{persister.log_tail()}")
        time.sleep(poll)


def setup_orders(devices: Devices, riders: int) -> list[tuple[str, str]]:
    """One accepted order per rider, through the real MQTT path (create, offer, accept)."""
    pairs = [(f"r{i}", f"o{i}") for i in range(riders)]
    for rider, order in pairs:
        devices.confirm(*accepted_order(SHOP, order, rider))
    return pairs


def chat_stream(pairs: list[tuple[str, str]], n: int) -> list[Msg]:
    """``n`` valid rider chat lines, round robin over the accepted orders."""
    return [chat(*pairs[k % len(pairs)], f"line {k}") for k in range(n)]


def fast_publisher(client: Callable[..., MqttTestClient]) -> MqttTestClient:
    """A client that keeps thousands of QoS 1 publishes in flight."""
    pub = client(connect=False)
    pub.paho.max_inflight_messages_set(20_000)
    pub.paho.max_queued_messages_set(0)
    rc = pub.connect()
    assert not rc.is_failure, rc
    return pub


def publish_all(pub: MqttTestClient, msgs: list[Msg], infos: list[mqtt.MQTTMessageInfo]) -> None:
    for m in msgs:
        infos.append(pub.paho.publish(m.topic, m.payload, qos=1))


def all_acknowledged(infos: list[mqtt.MQTTMessageInfo], timeout: float = 120.0) -> None:
    """Every publish got its PUBACK from the broker."""
    deadline = time.monotonic() + timeout
    for info in infos:
        info.wait_for_publish(max(0.1, deadline - time.monotonic()))
    assert all(i.is_published() for i in infos), "the broker did not acknowledge every publish"


def send_one_more(
    devices: Devices,
    store: Engine,
    pairs: list[tuple[str, str]],
    total: int,
    persister: PersisterProcess,
    text: str,
) -> Msg:
    """One more chat line after ``total``, waited for in the store: once it is stored, so is
    everything before it. (Not on the spy: it may still be draining thousands of canonical
    events.)"""
    last = chat(*pairs[0], text)
    devices.send(last)
    wait_until(
        lambda: stored_chat(store)[0] >= total + 1, timeout=120, what=f"the line {text}", persister=persister
    )
    return last


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_mid_stream_stores_every_event_exactly_once(
    persister: PersisterProcess, store: Engine, client: Callable[..., MqttTestClient]
) -> None:
    total, kill_at = 10_000, 2_500
    spy = Spy(client())
    devices = Devices(client(), spy, store)
    persister.start()
    devices.wait_for_persister()
    pairs = setup_orders(devices, riders=20)
    stream = chat_stream(pairs, total)

    pub = fast_publisher(client)
    infos: list[mqtt.MQTTMessageInfo] = []
    publisher = threading.Thread(target=publish_all, args=(pub, stream, infos), daemon=True)
    publisher.start()
    wait_until(
        lambda: stored_chat(store)[0] >= kill_at, timeout=120, what=f"{kill_at} stored", persister=persister
    )
    assert persister.kill() == -signal.SIGKILL
    at_kill = stored_chat(store)[0]
    assert kill_at <= at_kill < total, f"the kill came too late to prove anything ({at_kill} stored)"

    publisher.join(120)
    assert not publisher.is_alive()
    all_acknowledged(infos)  # the broker holds the rest for the persister's session
    assert stored_chat(store)[0] == at_kill, "nothing is stored while the persister is dead"

    persister.start()
    wait_until(
        lambda: stored_chat(store)[0] >= total, timeout=200, what=f"{total} stored", persister=persister
    )
    # Whatever was committed but not yet acknowledged at the kill is redelivered: wait until the
    # persister has caught up (a last event after the stream is stored) and count again.
    last = send_one_more(devices, store, pairs, total, persister, "after the stream")
    assert stored_chat(store) == (total + 1, total + 1)
    assert set(stored_chat_ids(store)) == {m.id for m in stream} | {last.id}
    assert count(store, CHAT) == total + 1
    assert persister.alive()
    print(f"SIGKILL after {at_kill}/{total} events stored; all {total} stored once after restart")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_events_published_while_down_are_stored_on_start(
    persister: PersisterProcess, store: Engine, client: Callable[..., MqttTestClient]
) -> None:
    total = 5_000
    spy = Spy(client())
    devices = Devices(client(), spy, store)
    service_status = Spy(client(), (topics.service_status(PERSISTER),))
    persister.start()  # creates its persistent session (and the orders the events are about)
    devices.wait_for_persister()
    pairs = setup_orders(devices, riders=10)
    assert persister.stop() == 0, persister.log_tail()
    said = service_status.wait(lambda s: True, n=2, what="online, then offline")
    assert [s.payload for s in said] == [b"online", b"offline"]

    stream = chat_stream(pairs, total)
    pub = fast_publisher(client)
    infos: list[mqtt.MQTTMessageInfo] = []
    publish_all(pub, stream, infos)
    all_acknowledged(infos)
    assert stored_chat(store) == (0, 0)

    persister.start()
    wait_until(
        lambda: stored_chat(store)[0] >= total, timeout=200, what=f"{total} stored", persister=persister
    )
    last = send_one_more(devices, store, pairs, total, persister, "after the backlog")
    assert stored_chat(store) == (total + 1, total + 1)
    assert set(stored_chat_ids(store)) == {m.id for m in stream} | {last.id}
    # The backlog was published canonically too, after the commit.
    canonical = spy.wait(lambda s: s.topic.endswith("/chat") and s.topic.startswith("shops/"), n=total + 1)
    assert {s.json()["id"] for s in canonical} == {m.id for m in stream} | {last.id}


def test_same_event_id_three_times_is_stored_once_and_acked_each_time(
    persister: PersisterProcess, store: Engine, client: Callable[..., MqttTestClient]
) -> None:
    spy = Spy(client())
    devices = Devices(client(), spy, store)
    persister.start()
    devices.wait_for_persister()
    devices.confirm(*accepted_order(SHOP, "o1", "r1"))
    line = chat("r1", "o1", "the same line, sent three times")
    assert line.id is not None

    def acked(s: Seen) -> bool:
        return s.topic == topics.rider_inbox("r1", "acks") and line.id in s.json()["ids"]

    for n in (1, 2, 3):
        devices.send(line)
        spy.wait(acked, n=n, what=f"ack {n} of {line.id}")
    after = chat("r1", "o1", "a new line")
    devices.confirm(after)

    assert count(store, EVENTS, EVENTS.c.id == line.id) == 1
    assert count(store, CHAT, CHAT.c.id == line.id) == 1
    chat_topic = topics.order_topic(SHOP, "o1", "chat")
    assert [s.json()["id"] for s in spy.on(chat_topic)] == [line.id, after.id], (
        "published once, after its commit"
    )
    assert spy.on(topics.DEADLETTER) == []
