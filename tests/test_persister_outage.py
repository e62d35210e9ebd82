"""The store unavailable mid-stream: nothing lost or duplicated, ``degraded`` then ``online``.

The persister runs as in production (a child process, a real broker). The outage lasts
``BLOOMWIRE_TEST_OUTAGE_S`` seconds (default 8; the issue's 30 s with ``=30``):

* SQLite: another process holds the database's write lock (``BEGIN EXCLUSIVE``). Making the file
  or its directory unwritable does not stop a process that has it open already (its descriptors
  stay writable), a lock does: every write fails with ``database is locked`` after the
  persister's busy timeout (set to 1 s here).
* PostgreSQL: ``ALTER DATABASE ... ALLOW_CONNECTIONS false`` and its sessions terminated.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
import pytest
from conftest import Broker, MqttTestClient
from psycopg import sql
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from test_persister import Devices, Msg, Seen, Spy
from test_persister_reliability import (
    PersisterProcess,
    all_acknowledged,
    chat_stream,
    fast_publisher,
    send_one_more,
    setup_orders,
    stored_chat,
    stored_chat_ids,
    wait_until,
)

from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.store import open_store
from bloomwire.store.models import DEAD_LETTERS

MakeUser = Callable[..., tuple[str, str]]
MakeClient = Callable[..., MqttTestClient]

OUTAGE_S = float(os.environ.get("BLOOMWIRE_TEST_OUTAGE_S", "8"))
#: The operator alert comes this long into the outage (well inside it).
ALERT_AFTER_S = max(1.0, OUTAGE_S / 3)
RSS_GROWTH_LIMIT_KB = 50 * 1024


@pytest.fixture
def store(database_url: str) -> Iterator[Engine]:
    engine = open_store(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def persister(
    fresh_broker: Broker, database_url: str, store: Engine, tmp_path: Path
) -> Iterator[PersisterProcess]:
    proc = PersisterProcess(fresh_broker, tmp_path / "persister", database_url)
    proc.env["BLOOMWIRE_SQLITE_BUSY_TIMEOUT_S"] = "1"
    proc.env["BLOOMWIRE_PERSISTER_DEGRADED_ALERT_S"] = str(ALERT_AFTER_S)
    yield proc
    proc.close()


@pytest.fixture
def client(
    fresh_broker: Broker, mqtt_user: MakeUser, mqtt_client: MakeClient
) -> Callable[..., MqttTestClient]:
    def make(*, connect: bool = True) -> MqttTestClient:
        return mqtt_client(*mqtt_user(broker=fresh_broker), broker=fresh_broker, connect=connect)

    return make


@contextlib.contextmanager
def sqlite_locked(url: str) -> Iterator[None]:
    """Hold the write lock of the SQLite database at ``url``."""
    path = make_url(url).database
    assert path
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        yield
        conn.execute("ROLLBACK")
    finally:
        conn.close()


@contextlib.contextmanager
def postgres_closed(url: str, admin_url: str) -> Iterator[None]:
    """No connection to the database at ``url``: new ones refused, live ones terminated."""
    name = make_url(url).database
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(name)))
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        try:
            yield
        finally:
            admin.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(name)))


def outage(request: pytest.FixtureRequest, url: str) -> contextlib.AbstractContextManager[None]:
    if url.startswith("sqlite"):
        return sqlite_locked(url)
    admin_url: str = request.getfixturevalue("postgres_admin_url")
    return postgres_closed(url, admin_url)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def status_of(s: Seen) -> ev.ServiceStatus:
    return ev.parse_service_status(s.payload)


def refusal(n: int) -> bytes:
    """A dead letter as another service (dispatch) publishes it."""
    letter = ev.Refusal(
        id=f"dl-{n}", topic="services/dispatch/events", reason=f"refusal {n}", service="dispatch"
    )
    return letter.model_dump_json().encode()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_store_unavailable_mid_stream_loses_nothing_and_recovers(
    request: pytest.FixtureRequest,
    persister: PersisterProcess,
    store: Engine,
    database_url: str,
    client: Callable[..., MqttTestClient],
) -> None:
    spy = Spy(client())
    devices = Devices(client(), spy, store)
    said = Spy(client(), (topics.service_status("persister"),))
    persister.start()
    devices.wait_for_persister()
    pairs = setup_orders(devices, riders=5)
    stream = chat_stream(pairs, 1500)
    pub = fast_publisher(client)
    infos: list[mqtt.MQTTMessageInfo] = []

    def publish(msgs: list[Msg]) -> None:
        for m in msgs:
            infos.append(pub.paho.publish(m.topic, m.payload, qos=1))

    publish(stream[:500])
    wait_until(lambda: stored_chat(store)[0] >= 500, timeout=60, what="the first 500", persister=persister)
    assert persister.proc is not None
    rss_before = rss_kb(persister.proc.pid)
    with outage(request, database_url):
        publish(stream[500:1000])  # the stream goes on during the outage ...
        for n in range(3):  # ... and so do the other services' refusals
            infos.append(pub.paho.publish(topics.DEADLETTER, refusal(n), qos=1))
        said.wait(lambda s: status_of(s).state is ev.ServiceState.DEGRADED, what="degraded", timeout=30)
        deadline = time.monotonic() + OUTAGE_S
        while time.monotonic() < deadline:  # a poll with a deadline: the persister must stay up
            assert persister.alive(), persister.log_tail()
            time.sleep(0.2)
        rss_during = rss_kb(persister.proc.pid)
        stored_during = stored_chat(store)[0] if database_url.startswith("sqlite") else None
    assert stored_during is None or stored_during <= 1000
    publish(stream[1000:])
    all_acknowledged(infos)
    wait_until(lambda: stored_chat(store)[0] >= 1500, timeout=120, what="all 1500", persister=persister)
    last = send_one_more(devices, store, pairs, 1500, persister, "after the outage")

    # 0 lost, 0 duplicated; the other services' dead letters kept.
    assert stored_chat(store) == (1501, 1501)
    assert set(stored_chat_ids(store)) == {m.id for m in stream} | {last.id}
    senders = [r for r in _dead_letters(store) if r["sender"] == "services/dispatch"]
    assert sorted(r["event_id"] for r in senders) == ["dl-0", "dl-1", "dl-2"]

    # degraded (with the reason), the alert past its threshold, then online again.
    said.wait(lambda s: s.payload == b"online", n=2, what="online again", timeout=30)
    states = [status_of(s) for s in said.log]
    words = [s.state.value for s in states]
    first_degraded = words.index("degraded")
    assert words[:first_degraded] == ["online"] and words[-1] == "online", words
    reasons = [s.reason for s in states if s.state is ev.ServiceState.DEGRADED]
    assert reasons[0].startswith("store unavailable: "), reasons
    assert any(r.startswith("ALERT: degraded for over") for r in reasons), reasons

    # One log line per state change, no traceback per retry.
    log = persister.log_path.read_text()
    assert log.count("degraded; retrying") == 1, persister.log_tail(60)
    assert log.count("alert raised") == 1
    assert log.count("recovered") == 1
    assert "Traceback" not in log
    # Memory stays flat: the broker holds what the persister does not take.
    assert rss_during - rss_before < RSS_GROWTH_LIMIT_KB, (rss_before, rss_during)
    print(f"outage {OUTAGE_S} s: RSS {rss_before} -> {rss_during} kB; statuses {words}")


def _dead_letters(engine: Engine) -> list[dict[str, object]]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(DEAD_LETTERS.select())]
