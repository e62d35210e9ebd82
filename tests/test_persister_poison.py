"""Messages the database refuses, reused ids, retained inbound publishes, refusal wording.

The database is made to refuse one message with a test-only trigger on its own store: a chat line
containing :data:`POISON` is refused by SQLite (``RAISE(ABORT)``) and PostgreSQL (a trigger
function raising an exception) alike, whatever the contract accepts.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from conftest import Broker, MqttTestClient
from sqlalchemy import Engine
from test_persister import (
    SHOP,
    Clock,
    Desk,
    Devices,
    Msg,
    Spy,
    accepted_order,
    chat,
    count,
    customer_chat,
    on,
    raw,
    refusals,
    rows,
    status,
)
from test_persister_reliability import PersisterProcess, wait_until

from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.services.persister.poison import apply_isolating
from bloomwire.services.persister.projector import BatchResult, Inbound, Outbound
from bloomwire.store import open_store
from bloomwire.store.models import CHAT, DEAD_LETTERS, EVENTS

MakeUser = Callable[..., tuple[str, str]]
MakeClient = Callable[..., MqttTestClient]

POISON = "POISON-PILL"
TRIGGER_MESSAGE = "refused by the test trigger"


def refuse_poison(engine: Engine) -> None:
    """Make the store refuse any chat line containing :data:`POISON` (both backends)."""
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql(
                "CREATE TRIGGER refuse_poison BEFORE INSERT ON chat_lines "
                f"WHEN NEW.text LIKE '%{POISON}%' "
                f"BEGIN SELECT RAISE(ABORT, '{TRIGGER_MESSAGE}'); END"
            )
            return
        conn.exec_driver_sql(
            "CREATE FUNCTION refuse_poison() RETURNS trigger AS $$ BEGIN "
            f"IF strpos(NEW.text, '{POISON}') > 0 THEN RAISE EXCEPTION '{TRIGGER_MESSAGE}'; END IF; "
            "RETURN NEW; END $$ LANGUAGE plpgsql"
        )
        conn.exec_driver_sql(
            "CREATE TRIGGER refuse_poison BEFORE INSERT ON chat_lines "
            "FOR EACH ROW EXECUTE FUNCTION refuse_poison()"
        )


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """A migrated store on the parametrised database that refuses :data:`POISON`."""
    store = open_store(database_url)
    refuse_poison(store)
    yield store
    store.dispose()


@pytest.fixture
def desk(engine: Engine) -> Iterator[Desk]:
    desk = Desk(engine, Clock())
    yield desk
    desk.projector.close()


def isolate(desk: Desk, msgs: Sequence[object]) -> tuple[BatchResult, list[Outbound]]:
    """Apply ``msgs`` as one batch the way the service does; what it published, in order."""
    published: list[Outbound] = []
    batch = [Inbound(m.topic, m.payload) for m in msgs]  # type: ignore[attr-defined]
    result = apply_isolating(desk.projector, batch, published.extend)
    return result, published


# --- poison isolation, the projector driven directly ---------------------------------------------


@pytest.mark.parametrize("at", [0, 3, 6])
def test_a_message_the_database_refuses_is_dead_lettered_and_the_rest_stored(
    desk: Desk, engine: Engine, at: int
) -> None:
    desk.ok_each(accepted_order(SHOP, "o1", "r1"))
    lines = [chat("r1", "o1", f"line {k}") for k in range(7)]
    bad = chat("r1", "o1", f"a {POISON} here")
    batch = [*lines[:at], bad, *lines[at:]]

    result, published = isolate(desk, batch)

    assert (result.stored, result.refused) == (7, 1)
    stored = [r["id"] for r in rows(engine, EVENTS, EVENTS.c.type == "order.chat_posted")]
    assert sorted(stored) == sorted(m.id for m in lines)
    assert count(engine, EVENTS, EVENTS.c.id == bad.id) == 0
    [letter] = rows(engine, DEAD_LETTERS)
    assert letter["event_id"] == bad.id and letter["sender"] == "riders/r1"
    assert letter["reason"].startswith("the database refused it: ") and TRIGGER_MESSAGE in letter["reason"]
    assert "\n" not in letter["reason"]
    errors = [json.loads(o.payload) for o in published if o.topic == topics.rider_inbox("r1", "errors")]
    assert [(e["id"], e["reason"]) for e in errors] == [(bad.id, letter["reason"])]
    # Order kept: the canonical chat goes out in the order the lines came, each once.
    canonical = [json.loads(o.payload)["id"] for o in published if o.topic.endswith("/o1/chat")]
    assert canonical == [m.id for m in lines]
    acked = [i for o in published if o.topic.endswith("/inbox/acks") for i in json.loads(o.payload)["ids"]]
    assert sorted(acked) == sorted(m.id for m in lines)
    # The projections are whole: the order goes on.
    desk.ok(status("r1", "o1", "picked_up"))


def test_several_refused_messages_and_the_good_ones_in_between(desk: Desk, engine: Engine) -> None:
    desk.ok_each(accepted_order(SHOP, "o1", "r1"))
    batch = [chat("r1", "o1", f"{POISON} {k}" if k % 5 == 0 else f"ok {k}") for k in range(40)]
    result, _ = isolate(desk, batch)
    assert (result.stored, result.refused) == (32, 8)
    assert count(engine, CHAT) == 32
    assert count(engine, DEAD_LETTERS) == 8
    # Sent again (a redelivery): the good ones are duplicates, the bad ones refused again.
    result, _ = isolate(desk, batch)
    assert (result.stored, result.duplicates, result.refused) == (0, 32, 8)
    assert count(engine, CHAT) == 32


def test_a_refusal_whose_payload_has_a_nul_is_stored(desk: Desk, engine: Engine) -> None:
    """A NUL in the refused payload must not make the dead letter itself unstorable (PostgreSQL)."""
    desk.ok_each(accepted_order(SHOP, "o1", "r1"))
    # The contract refuses a NUL in text before the database sees it (its id is echoed); a raw
    # NUL byte makes the payload unreadable JSON (no id to echo). Either dead letter must store.
    line = chat("r1", "o1", f"{POISON}-marker")
    escaped = raw(line.topic, line.payload.replace(b"-marker", b"\\u0000nul"), line.id)
    byte = raw(line.topic, line.payload.replace(b"-marker", b"\x00nul"), line.id)
    result, _ = isolate(desk, [escaped, byte, chat("r1", "o1", "fine")])
    assert (result.stored, result.refused) == (1, 2)
    letters = rows(engine, DEAD_LETTERS)
    assert [x["event_id"] for x in letters] == [line.id, None]
    assert all("\x00" not in x["payload"] for x in letters)
    assert "control character" in letters[0]["reason"]


# --- ids are the sender's promise ----------------------------------------------------------------


def test_a_known_id_with_other_content_is_a_conflict(desk: Desk, engine: Engine) -> None:
    desk.ok_each(accepted_order(SHOP, "o1", "r1"))
    first = chat("r1", "o1", "the first line", event_id="ev-1")
    desk.ok(first)
    r = desk.send(first)
    assert (r.duplicates, r.refused) == (1, 0), "the same event again is a duplicate"
    other = chat("r1", "o1", "something else entirely", event_id="ev-1")
    r = desk.send(other)
    assert r.refused == 1
    assert refusals(r) == ["id 'ev-1' already used for a different event"]
    assert on(r, topics.rider_inbox("r1", "errors"))
    # Within one batch too, and for ids only the store still knows (after a restart).
    r = desk.send(chat("r1", "o1", "a", event_id="ev-2"), chat("r1", "o1", "b", event_id="ev-2"))
    assert (r.stored, r.refused) == (1, 1)
    desk.restart()
    assert desk.send(first).duplicates == 1
    r = desk.send(other)
    assert refusals(r) == ["id 'ev-1' already used for a different event"]
    assert [row["text"] for row in rows(engine, CHAT, CHAT.c.id == "ev-1")] == ["the first line"]
    assert count(engine, DEAD_LETTERS) == 3


# --- retained inbound publishes ------------------------------------------------------------------


def test_a_retained_publish_on_an_inbound_topic_is_refused_and_cleared(desk: Desk, engine: Engine) -> None:
    desk.ok_each(accepted_order(SHOP, "o1", "r1"))
    line = chat("r1", "o1", "left retained")
    r = desk.projector.apply([Inbound(line.topic, line.payload, retain=True)])
    assert r.refused == 1
    assert refusals(r) == [f"retained publishes are not events on {line.topic}"]
    [clear] = on(r, line.topic)
    assert (clear.payload, clear.retain) == (b"", True)
    assert on(r, topics.rider_inbox("r1", "errors"))
    assert count(engine, CHAT) == 0
    # The clearing comes back to the persister: nothing to do.
    r = desk.projector.apply([Inbound(line.topic, b"", retain=True)])
    assert (r.ignored, r.refused, r.outbound) == (1, 0, [])
    # Presence stays retained (its Last Will and online/offline are state).
    presence = topics.rider_presence("r1")
    r = desk.projector.apply([Inbound(presence, b"offline", retain=True)])
    assert r.refused == 0 and not on(r, presence)


# --- refusal reasons name the real rule ----------------------------------------------------------


def test_a_rider_reporting_on_its_own_closed_order_is_told_it_is_closed(desk: Desk) -> None:
    desk.ok_each(accepted_order(SHOP, "o1", "r1"))
    desk.ok_each([status("r1", "o1", s) for s in ("picked_up", "arrived", "delivered")])
    r = desk.send(status("r1", "o1", "picked_up"))
    assert refusals(r) == ["order 'o1' is delivered; it is closed"]
    r = desk.send(chat("r1", "o1", "one more thing"))
    assert refusals(r) == ["order 'o1' is delivered; it is closed"]
    r = desk.send(status("r2", "o1", "picked_up"))
    assert refusals(r) == ["order 'o1' is not assigned to rider 'r2'"]


def test_other_refusals_name_their_rule(desk: Desk) -> None:
    desk.ok_each(accepted_order(SHOP, "o1", "r1"))
    r = desk.send(customer_chat("nobody", "hello?"))
    assert refusals(r) == ["customer 'nobody' has no order"]
    expired = ev.DispatchExpiredEvent(
        source="services/dispatch", data=ev.DispatchExpired(offer="of-none", order="o1", rider="r1")
    )
    r = desk.send(Msg(topics.service_events("dispatch"), ev.encode(expired), expired.id))
    assert refusals(r) == ["unknown offer 'of-none'"]
    expired = expired.model_copy(
        update={"id": "ev-x", "data": expired.data.model_copy(update={"offer": "of-o1"})}
    )
    r = desk.send(Msg(topics.service_events("dispatch"), ev.encode(expired), expired.id))
    assert refusals(r) == ["offer 'of-o1' is already accepted"]


# --- over MQTT: the persister process, a real broker ---------------------------------------------


@pytest.fixture
def store(engine: Engine) -> Engine:
    """The store, migrated (and poisoned) before the persister starts."""
    return engine


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


@pytest.mark.timeout(120)
def test_over_mqtt_a_poison_message_is_isolated_and_not_replayed(
    persister: PersisterProcess, store: Engine, client: Callable[[], MqttTestClient]
) -> None:
    spy = Spy(client())
    devices = Devices(client(), spy, store)
    persister.start()
    devices.wait_for_persister()
    devices.confirm(*accepted_order(SHOP, "o1", "r1"))

    before = chat("r1", "o1", "before")
    bad = chat("r1", "o1", f"{POISON} in the middle")
    after = chat("r1", "o1", "after")
    devices.send(before, bad, after)
    spy.wait(lambda s: s.topic == topics.rider_inbox("r1", "errors") and s.json()["id"] == bad.id)
    wait_until(lambda: count(store, CHAT) == 2, timeout=20, what="the good lines", persister=persister)
    [letter] = rows(store, DEAD_LETTERS, DEAD_LETTERS.c.event_id == bad.id)
    assert TRIGGER_MESSAGE in letter["reason"]

    # A restart replays nothing: the refused message was acknowledged.
    assert persister.stop() == 0, persister.log_tail()
    persister.start()
    devices.wait_for_persister()
    devices.confirm(chat("r1", "o1", "after the restart"))
    assert count(store, DEAD_LETTERS) == 1
    assert count(store, CHAT) == 3
    assert "Traceback" not in persister.log_path.read_text()


@pytest.mark.timeout(120)
def test_over_mqtt_a_retained_publish_is_refused_cleared_and_not_replayed(
    persister: PersisterProcess, store: Engine, client: Callable[[], MqttTestClient]
) -> None:
    spy = Spy(client())
    devices = Devices(client(), spy, store)
    persister.start()
    devices.wait_for_persister()
    devices.confirm(*accepted_order(SHOP, "o1", "r1"))

    line = chat("r1", "o1", "left on the topic")
    devices.client.publish(line.topic, line.payload, qos=1, retain=True)
    spy.wait(lambda s: s.topic == topics.rider_inbox("r1", "errors") and s.json()["id"] == line.id)
    reason = f"retained publishes are not events on {line.topic}"
    wait_until(
        lambda: count(store, DEAD_LETTERS, DEAD_LETTERS.c.reason == reason) == 1,
        timeout=20,
        what="the dead letter",
        persister=persister,
    )
    # Cleared: a new subscriber gets nothing retained there.
    late = client()
    late.subscribe(line.topic)
    late.expect_none(1.0)
    # Resubscribing (a restart) replays nothing either.
    assert persister.stop() == 0
    persister.start()
    devices.wait_for_persister()
    devices.confirm(chat("r1", "o1", "a live line"))
    assert count(store, DEAD_LETTERS) == 1
    assert count(store, CHAT) == 1
