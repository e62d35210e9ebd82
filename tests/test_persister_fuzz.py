"""A few thousand random and broken messages over MQTT from a rider and a customer login.

Hypothesis draws them (random bytes, random JSON, JSON nested far too deep, valid events with a
field replaced by anything or removed, valid events as they are) on every inbound topic rider
``r1`` and customer ``c-o1`` may write. Between them, good events from rider ``r2`` and customer
``c-o2`` must be stored; the persister must stay up and ``online`` (never take a bad message for
an unavailable store), and every refusal must carry a reason. Bounded: a fixed number of examples,
no shrinking (a failing example is reported as drawn).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from conftest import Broker, MqttTestClient, postgres_database
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine
from test_persister import (
    SHOP,
    Clock,
    Desk,
    Devices,
    Spy,
    accepted_order,
    chat,
    count,
    customer_chat,
    refusals,
    rows,
    tst_now,
)
from test_persister_reliability import PersisterProcess, all_acknowledged

from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.services.persister.poison import apply_isolating
from bloomwire.services.persister.projector import Inbound, Outbound
from bloomwire.store import open_store
from bloomwire.store.models import DEAD_LETTERS, EVENTS

MakeUser = Callable[..., tuple[str, str]]
MakeClient = Callable[..., MqttTestClient]

EXAMPLES = 12
RIDER_TOPICS = (
    topics.rider_location("r1"),
    topics.rider_order_status("r1", "o1"),
    topics.rider_order_chat("r1", "o1"),
    topics.rider_replies("r1"),
    topics.rider_presence("r1"),
    topics.owntracks("r1", "phone"),
)
CUSTOMER_TOPICS = (topics.customer_chat("c-o1"),)
STATUSES = ("accepted", "picked_up", "en_route", "arrived", "delivered", "failed", "declined", "returned")

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _bases(event_id: str) -> list[dict[str, Any]]:
    """Valid payloads of what r1 and c-o1 may send (as dicts, to be broken)."""
    at = ev.now().isoformat()
    envelope = {"specversion": "1.0", "id": event_id, "time": at}
    return [
        {
            **envelope,
            "type": "order.chat_posted",
            "source": "riders/r1",
            "data": {"order": "o1", "text": "hi"},
        },
        {
            **envelope,
            "type": "order.chat_posted",
            "source": "customers/c-o1",
            "data": {"text": "where are you?"},
        },
        {
            **envelope,
            "type": "order.status_changed",
            "source": "riders/r1",
            "data": {"order": "o1", "status": "picked_up"},
        },
        {
            **envelope,
            "type": "rider.location_reported",
            "source": "riders/r1",
            "data": {"lat": 52.52, "lon": 13.405, "tst": tst_now()},
        },
        {"_type": "location", "lat": 52.52, "lon": 13.405, "tst": tst_now(), "acc": 5},
        {
            **envelope,
            "type": "dispatch.reply",
            "source": "riders/r1",
            "data": {"offer": "of-o1", "order": "o1", "accept": True},
        },
    ]


@st.composite
def broken_event(draw: st.DrawFn) -> bytes:
    """A valid payload with one field (top level or in ``data``) replaced or removed."""
    base = draw(st.sampled_from(_bases(str(draw(st.uuids())))))
    target = base["data"] if "data" in base and draw(st.booleans()) else base
    key = draw(st.sampled_from(sorted(target)) | st.text(max_size=6))
    if draw(st.booleans()):
        target[key] = draw(json_values)
    else:
        target.pop(key, None)
    if "data" in base and isinstance(base["data"], dict) and base.get("type") == "order.status_changed":
        base["data"]["status"] = draw(st.sampled_from(STATUSES))
    return json.dumps(base).encode()


@st.composite
def valid_event(draw: st.DrawFn) -> bytes:
    return json.dumps(draw(st.sampled_from(_bases(str(draw(st.uuids())))))).encode()


def _nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


payloads = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.integers(min_value=50, max_value=5000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(min_value=50, max_value=5000).map(_nested),
    broken_event(),
    broken_event(),
    valid_event(),
    st.sampled_from([b"online", b"offline", b"", b"null", b"{}", b"[]", b'"\\u0000"']),
)
messages = st.tuples(st.sampled_from(RIDER_TOPICS + CUSTOMER_TOPICS), payloads)


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
    yield proc
    proc.close()


@pytest.fixture
def client(
    fresh_broker: Broker, mqtt_user: MakeUser, mqtt_client: MakeClient
) -> Callable[[], MqttTestClient]:
    def make() -> MqttTestClient:
        return mqtt_client(*mqtt_user(broker=fresh_broker), broker=fresh_broker)

    return make


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.filterwarnings("ignore:Generating overly large repr")
def test_random_and_broken_messages_never_stop_the_persister(
    persister: PersisterProcess, store: Engine, client: Callable[[], MqttTestClient]
) -> None:
    spy = Spy(client())
    errors = Spy(client(), (topics.rider_inbox("r1", "errors"), topics.customer_inbox("c-o1", "errors")))
    said = Spy(client(), (topics.service_status("persister"),))
    devices = Devices(client(), spy, store)
    rider, customer = client(), client()
    persister.start()
    devices.wait_for_persister()
    devices.confirm(*accepted_order(SHOP, "o1", "r1"), *accepted_order(SHOP, "o2", "r2"))
    sent = {"bad": 0, "good": 0}

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(st.lists(messages, min_size=150, max_size=300))
    def one_round(batch: list[tuple[str, bytes]]) -> None:
        infos: list[mqtt.MQTTMessageInfo] = []
        half = len(batch) // 2
        good = [chat("r2", "o2", f"good {sent['good']}"), customer_chat("c-o2", f"good {sent['good']}")]
        for k, (topic, payload) in enumerate(batch):
            if k == half:
                devices.send(good[0])
            sender = customer if topic in CUSTOMER_TOPICS else rider
            infos.append(sender.paho.publish(topic, payload, qos=1))
        devices.send(good[1])
        all_acknowledged(infos, timeout=60)
        sent["bad"] += len(batch)
        sent["good"] += 1
        for m in good:  # stored, whatever came before and between
            assert m.id is not None
            spy.wait(lambda s, i=m.id: s.topic.endswith("/inbox/acks") and i in s.json()["ids"], timeout=60)
            assert count(store, EVENTS, EVENTS.c.id == m.id) == 1
        assert persister.alive(), persister.log_tail()

    one_round()

    assert sent["bad"] >= EXAMPLES * 150
    letters = rows(store, DEAD_LETTERS)
    assert letters, "some of the messages were refused"
    assert all(r["reason"].strip() for r in letters), "every refusal has a reason"
    errors.settle(1.0)
    told = [e.json() for e in errors.log]
    assert told and all(t["reason"].strip() for t in told)
    assert persister.alive()
    log = persister.log_path.read_text()
    assert "degraded; retrying" not in log, "a bad message was taken for an unavailable store"
    said.settle(0.5)
    assert [s.payload for s in said.log] == [b"online"], "never degraded"
    print(f"{sent['bad']} random messages, {len(letters)} refused; {2 * sent['good']} good events stored")


def _verdict(desk: Desk, batch: list[tuple[str, bytes]]) -> tuple[int, int, int, int, list[str]]:
    """How one backend judged ``batch``, applied as the service does (poison isolated)."""
    published: list[Outbound] = []
    result = apply_isolating(desk.projector, [Inbound(t, p) for t, p in batch], published.extend)
    return result.stored, result.refused, result.ignored, result.duplicates, refusals(result)


@pytest.mark.timeout(300)
@pytest.mark.filterwarnings("ignore:Generating overly large repr")
def test_the_same_input_gets_the_same_verdict_on_sqlite_and_postgresql(
    tmp_path: Path, postgres_admin_url: str
) -> None:
    """Hypothesis-drawn batches through the persister on both backends: the same verdicts, the
    same reasons (PostgreSQL refuses what SQLite stores, e.g. a NUL, unless the contract does)."""
    with postgres_database(postgres_admin_url) as pg_url:
        engines = [open_store(f"sqlite:///{tmp_path / 'store.db'}"), open_store(pg_url)]
        desks = [Desk(engine, Clock()) for engine in engines]
        try:
            for desk in desks:
                desk.ok_each(accepted_order(SHOP, "o1", "r1"))

            @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            @given(st.lists(messages, min_size=1, max_size=40))
            def same_verdict(batch: list[tuple[str, bytes]]) -> None:
                sqlite, postgresql = (_verdict(desk, batch) for desk in desks)
                assert sqlite == postgresql

            same_verdict()
            stored = [count(engine, EVENTS) for engine in engines]
            assert stored[0] == stored[1]
        finally:
            for desk in desks:  # the projector keeps a connection of its own
                desk.projector.close()
                desk.engine.dispose()
