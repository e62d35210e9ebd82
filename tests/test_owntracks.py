"""OwnTracks in full (issue #14) and its fix times (issue #11): every ``_type`` has an outcome.

* Units: :func:`owntracks.parse` on each ``_type``, with the refusal reasons asserted.
* The projector over a real store (both backends): lwt, transitions (stored once, linked to the
  order whose destination they are, the "arrived?" prompt), ignored types counted, retained publishes.
* Over MQTT with the persister running (both backends): lwt -> offline in the retained rider
  state; a transition sent twice stored once; a waypoint counted and not stored; a fix in
  milliseconds dead-lettered and the good fix (published retained) after it stored; a retained
  fix left before the persister subscribed is never replayed to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
import structlog
from conftest import Broker, MqttTestClient
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine
from structlog.testing import LogCapture
from test_persister import (
    BASE_LAT,
    BASE_LON,
    SHOP,
    Clock,
    Desk,
    Devices,
    Msg,
    Spy,
    accepted_order,
    count,
    refusals,
    rider_row,
    status,
)

from bloomwire.app.history import load_history
from bloomwire.contract import events as ev
from bloomwire.contract import owntracks as ot
from bloomwire.contract import topics
from bloomwire.errors import PayloadError, TopicError
from bloomwire.runtime.metrics import ServiceMetrics
from bloomwire.runtime.mqtt import Service
from bloomwire.runtime.settings import Settings
from bloomwire.services.persister import build, projector
from bloomwire.services.persister.metrics import PersisterMetrics
from bloomwire.services.persister.projector import BatchResult, Inbound
from bloomwire.store import open_store
from bloomwire.store.models import DEAD_LETTERS, EVENTS, RIDERS

MakeUser = Callable[..., tuple[str, str]]
MakeClient = Callable[..., MqttTestClient]
MakeSettings = Callable[..., Settings]

#: The order's destination in test_persister's builders (create_order's default).
DEST_LAT, DEST_LON = BASE_LAT + 0.01, BASE_LON
#: As the OwnTracks iOS app publishes it on owntracks/USER/DEVICE (values made up).
IOS_LOCATION = (
    b'{"_type":"location","acc":10,"alt":394,"batt":75,"bs":1,"cog":136,"conn":"m",'
    b'"lat":47.72337962412063,"lon":9.227956132971894,"m":1,"t":"u","tid":"r7",'
    b'"topic":"owntracks/r7/iphone","tst":1494851972,"vac":4,"vel":18}'
)
IOS_NOW = datetime.fromtimestamp(1494851972 + 60, tz=UTC)


def now_tst() -> int:
    return int(time.time())


def payload(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def fix(tst: int, lat: float = BASE_LAT, lon: float = BASE_LON, **extra: Any) -> bytes:
    return payload(_type="location", lat=lat, lon=lon, tst=tst, acc=12, **extra)


def transition(event: str, tst: int, lat: float = DEST_LAT, lon: float = DEST_LON, **extra: Any) -> bytes:
    fields = {"wtst": tst - 3600, "acc": 20, "desc": "Rosenweg 1", "rid": "a1b2", "t": "c", **extra}
    return payload(_type="transition", event=event, tst=tst, lat=lat, lon=lon, **fields)


def base(rider: str = "r1") -> str:
    return topics.owntracks(rider, "phone")


def event_topic(rider: str = "r1") -> str:
    return topics.owntracks(rider, "phone", "event")


# --- units: parsing each _type ----------------------------------------------------------------------


def test_location_keeps_the_fields_bloomwire_uses() -> None:
    loc = ot.parse(IOS_LOCATION, IOS_NOW)
    assert loc == ev.RiderLocation(
        lat=47.72337962412063, lon=9.227956132971894, tst=1494851972, acc=10, vel=18, cog=136, batt=75
    )


def test_minimal_android_location() -> None:
    raw = b'{"_type":"location","lat":-42.89,"lon":147.33,"tst":1420860181,"acc":30.0,"batt":93}'
    loc = ot.parse(raw, datetime.fromtimestamp(1420860181, tz=UTC))
    assert isinstance(loc, ev.RiderLocation) and loc.vel is None and loc.acc == 30.0


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (fix(now_tst() * 1000), "^tst: \\d+ looks like milliseconds; OwnTracks sends epoch seconds$"),
        (
            fix(99_999_999_999),
            "^tst: 99999999999 \\(5138-11-16T09:46:39\\+00:00\\) is more than 300 s in the future "
            "\\(event_future_skew_s\\)",
        ),
        (fix(0), "^tst: 0 is not a time; OwnTracks sends epoch seconds"),
        (fix(-5), "^tst: -5 is not a time"),
        (fix(now_tst() - 8 * 86400), "^tst: .* is more than 604800 s old \\(event_max_age_s\\)"),
        (fix(now_tst() + 3600), "^tst: .* is more than 300 s in the future"),
        (fix(now_tst() + 0.5), "^tst: must be whole epoch seconds"),
        (fix(now_tst(), lat=95), "^lat: "),
        (fix(now_tst(), lon=-181), "^lon: "),
        (fix(now_tst(), lat="52.5"), "^lat: must be a number, not str"),
        (fix(now_tst(), lat=True), "^lat: must be a number, not bool"),
        (fix(now_tst()).replace(b'"acc": 12', b'"acc": 1e400'), "^acc: must be a finite number"),
        (fix(now_tst(), alt=float("inf")).replace(b"Infinity", b"1e999"), "^alt: must be a finite number"),
        (fix(now_tst(), vel="fast"), "^vel: must be a number"),
        (fix(now_tst(), batt=-3), "^batt: "),
        (payload(_type="location", lon=9.2, tst=now_tst()), "^lat: Field required"),
        (b"[1, 2]", "^OwnTracks payload must be a JSON object, not list"),
        (b'{"lat": 47.7, "lon": 9.2, "tst": 1}', "^_type: missing; every OwnTracks payload names its _type"),
        (b'{"_type": 7}', "^_type: missing"),
        (b"\xc3", "not UTF-8"),
        (b"C2,561ebac3,v,50123456", "^payload is not JSON"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_payloads_are_refused_with_their_reason(raw: bytes, needle: str) -> None:
    with pytest.raises(PayloadError, match=needle):
        ot.parse(raw, ev.now())


def test_lwt_is_the_app_going_offline() -> None:
    assert ot.parse(b'{"_type":"lwt","tst":1700000000}', ev.now()) == ot.Lwt(1700000000)
    assert ot.parse(b'{"_type":"lwt"}', ev.now()) == ot.Lwt(None)


def test_transition_is_read_with_its_region() -> None:
    t = now_tst()
    got = ot.parse(transition("enter", t), ev.now())
    assert got == ot.Transition(
        event="enter", tst=t, lat=DEST_LAT, lon=DEST_LON, acc=20.0, desc="Rosenweg 1", rid="a1b2", trigger="c"
    )
    bare = ot.parse(payload(_type="transition", event="leave", tst=t, lat=1.0, lon=2.0), ev.now())
    assert bare == ot.Transition("leave", t, 1.0, 2.0, None, "", None, None)


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (transition("wander", now_tst()), "^event: must be 'enter' or 'leave', not 'wander'"),
        (payload(_type="transition", event="enter", lat=1, lon=2), "^tst: required in a transition"),
        (payload(_type="transition", event="enter", tst=now_tst(), lon=2), "^lat: required in a transition"),
        (transition("enter", now_tst() * 1000), "^tst: \\d+ looks like milliseconds"),
        (transition("enter", now_tst(), lat=91), "^lat/lon: 91.0, .* is not a place on Earth"),
        (transition("enter", now_tst(), acc=-1), "^acc: must be >= 0"),
        (transition("enter", now_tst(), desc=["x"]), "^desc: must be text, not list"),
        (transition("enter", now_tst(), rid="r" * 101), "^rid: 101 characters long \\(max 100\\)"),
        (transition("enter", now_tst(), desc="a\x00b"), "^desc: contains control characters"),
    ],
)
def test_bad_transitions_are_refused_with_their_reason(raw: bytes, needle: str) -> None:
    with pytest.raises(PayloadError, match=needle):
        ot.parse(raw, ev.now())


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (b'{"_type":"waypoint","desc":"Home","lat":1,"lon":2,"rad":50,"tst":1}', "waypoint"),
        (b'{"_type":"waypoints","waypoints":[]}', "waypoints"),
        (b'{"_type":"card","name":"Rider 1","face":"iVBOR"}', "card"),
        (b'{"_type":"cmd","action":"reportLocation"}', "cmd"),
        (b'{"_type":"status","iOS":{}}', "status"),
        (b'{"_type":"steps","steps":100,"from":1,"to":2}', "steps"),
        (b'{"_type":"beacon","uuid":"x","major":1,"minor":2}', "beacon"),
        (b'{"_type":"encrypted","data":"c2VjcmV0"}', "encrypted"),
        (b'{"_type":"configuration","mode":0}', "configuration"),
        (b'{"_type":"dump"}', "dump"),
        (b'{"_type":"teleport"}', "unknown"),
        (b"", "empty"),
    ],
)
def test_other_types_are_ignored_with_a_label(raw: bytes, kind: str) -> None:
    got = ot.parse(raw, ev.now())
    assert isinstance(got, ot.Ignored) and got.kind == kind and got.why


def test_transition_ids_are_derived_from_rider_device_time_and_event() -> None:
    t = ot.Transition("enter", 1_700_000_000, 1.0, 2.0, None, "", None, None)
    same = ot.Transition("enter", 1_700_000_000, 1.5, 2.5, 9.0, "x", None, None)
    ids = {
        ot.transition_id("r1", "phone", t),
        ot.transition_id("r1", "phone", t.__class__("leave", t.tst, 1.0, 2.0, None, "", None, None)),
        ot.transition_id("r2", "phone", t),
        ot.transition_id("r1", "tablet", t),
    }
    assert len(ids) == 4
    assert ot.transition_id("r1", "phone", same) == ot.transition_id("r1", "phone", t)
    event = ot.transition_event("r1", "phone", t, "o1")
    assert (event.source, event.time.timestamp(), event.subject) == ("riders/r1", t.tst, "o1")


def test_owntracks_topics() -> None:
    assert topics.owntracks("r1", "phone", "event") == "owntracks/r1/phone/event"
    with pytest.raises(TopicError, match="unknown OwnTracks subtopic 'teleport'"):
        topics.owntracks("r1", "phone", "teleport")
    assert topics.parse_inbound("owntracks/r1/phone/waypoint").kind is topics.InboundKind.OWNTRACKS
    for sub in topics.OWNTRACKS_SUBTOPICS:  # each is delivered to the persister by exactly one filter
        assert sum(topics.matches(f, f"owntracks/r1/phone/{sub}") for f in topics.INBOUND_FILTERS) == 1


def test_ignored_messages_are_counted_by_type() -> None:
    registry = CollectorRegistry()
    figures = PersisterMetrics(registry)
    result = BatchResult(ignored=3)
    result.owntracks_ignored["waypoint", "_type 'waypoint' is not used by Bloomwire"] = 2
    result.owntracks_ignored["unknown", "unknown _type 'teleport'"] = 1
    figures.observe([], result, time.perf_counter())
    got = {
        (s.labels["type"], s.labels["reason"]): s.value
        for m in registry.collect()
        for s in m.samples
        if s.name == "bloomwire_owntracks_ignored_total"
    }
    assert got == {("waypoint", "_type … is not used by Bloomwire"): 2.0, ("unknown", "unknown _type …"): 1.0}


# --- the projector over a real store ------------------------------------------------------------


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    store = open_store(database_url)
    yield store
    store.dispose()


@pytest.fixture
def desk(engine: Engine) -> Iterator[Desk]:
    d = Desk(engine, Clock())
    yield d
    d.projector.close()


def ot_msg(topic: str, raw: bytes) -> Msg:
    return Msg(topic, raw)


def test_lwt_marks_the_rider_offline_like_its_last_will(desk: Desk, engine: Engine) -> None:
    desk.ok_each(accepted_order(SHOP, "o1", "r1"))
    desk.ok(Msg(topics.rider_presence("r1"), b"online"))
    result = desk.send(ot_msg(base(), b'{"_type":"lwt","tst":1700000000}'))
    assert (result.stored, result.refused) == (1, 0), refusals(result)
    [state] = [
        json.loads(o.payload) for o in result.outbound if o.topic == topics.shop_rider_state(SHOP, "r1")
    ]
    assert state["presence"] == "offline"
    assert rider_row(engine, "r1")["presence"] == "offline"
    again = desk.send(ot_msg(base(), b'{"_type":"lwt","tst":1700000000}'))
    assert (again.stored, again.ignored) == (0, 1)  # already offline: nothing changes


def test_transition_into_the_destination_is_stored_once_and_prompts_arrival(
    desk: Desk, engine: Engine, database_url: str
) -> None:
    desk.ok_each([*accepted_order(SHOP, "o1", "r1"), status("r1", "o1", "picked_up")])
    t = now_tst()
    enter = ot_msg(event_topic(), transition("enter", t, lat=DEST_LAT + 0.0005))  # ~55 m off the door
    first = desk.send(enter)
    assert (first.stored, first.refused) == (1, 0), refusals(first)
    [prompt] = [json.loads(o.payload) for o in first.outbound if o.topic == topics.rider_inbox("r1", "chat")]
    assert prompt["data"]["order"] == "o1" and "Report 'arrived'?" in prompt["data"]["text"]
    assert prompt["source"] == "services/persister"
    tid = ot.transition_id("r1", "phone", ot.Transition("enter", t, 0, 0, None, "", None, None))
    [ack] = [json.loads(o.payload) for o in first.outbound if o.topic == topics.rider_inbox("r1", "acks")]
    assert ack["ids"] == [tid]
    second = desk.send(enter)
    assert (second.stored, second.duplicates) == (0, 1)
    assert not [o for o in second.outbound if o.topic == topics.rider_inbox("r1", "chat")]
    # Re-sent after the order is delivered (no longer carried): still the same event, not a conflict.
    desk.ok_each([status("r1", "o1", s) for s in ("en_route", "arrived", "delivered")])
    desk.restart()  # and compared with the stored event, not this process's memory
    late = desk.send(enter)
    assert (late.stored, late.duplicates, late.refused) == (0, 1, 0), refusals(late)
    [row] = [r for r in _events(engine) if r["type"] == "rider.region_changed"]
    assert (row["id"], row["order_id"], row["rider"], row["shop"]) == (tid, "o1", "r1", SHOP)
    assert row["time"] == datetime.fromtimestamp(t, tz=UTC)
    assert row["data"]["event"] == "enter" and row["data"]["region"] == "Rosenweg 1"
    found = load_history(database_url, "o1")
    assert [(e.kind, e.what) for e in found.entries if e.kind == "region"] == [
        ("region", "entered Rosenweg 1 (phone)")
    ]


def test_transition_elsewhere_belongs_to_the_only_carried_order_without_a_prompt(
    desk: Desk, engine: Engine
) -> None:
    desk.ok_each([*accepted_order(SHOP, "o1", "r1"), status("r1", "o1", "picked_up")])
    t = now_tst()
    far = desk.send(ot_msg(event_topic(), transition("enter", t, lat=DEST_LAT + 0.05)))  # 5.5 km away
    leave = desk.send(ot_msg(event_topic(), transition("leave", t + 1, desc="o1")))  # named after o1
    idle = desk.send(ot_msg(event_topic("r2"), transition("enter", t)))  # r2 carries nothing
    assert (far.stored, leave.stored, idle.stored) == (1, 1, 1)
    for result in (far, leave, idle):
        assert not [o for o in result.outbound if "/inbox/chat" in o.topic]
    stored = [r for r in _events(engine) if r["type"] == "rider.region_changed"]
    assert [(r["rider"], r["data"]["event"], r["order_id"]) for r in stored] == [
        ("r1", "enter", "o1"),
        ("r1", "leave", "o1"),
        ("r2", "enter", None),
    ]


def test_ignored_types_are_logged_once_not_stored_and_bad_ones_dead_lettered(
    desk: Desk, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    waypoint = ot_msg(topics.owntracks("r1", "phone", "waypoint"), b'{"_type":"waypoint","desc":"Home"}')
    ms_fix = ot_msg(base(), fix(now_tst() * 1000))
    # The projector's own logger, not the global configuration (which other tests change).
    capture = LogCapture()
    monkeypatch.setattr(projector, "log", structlog.wrap_logger(None, processors=[capture]))
    result = desk.send(waypoint, ms_fix, ot_msg(base(), fix(now_tst())))
    logs = capture.entries
    assert (result.stored, result.refused, result.ignored) == (1, 1, 1)
    assert dict(result.owntracks_ignored) == {("waypoint", "_type 'waypoint' is not used by Bloomwire"): 1}
    ignored = [entry for entry in logs if entry["event"] == "owntracks message ignored"]
    assert [(e["topic"], e["type"]) for e in ignored] == [("owntracks/r1/phone/waypoint", "waypoint")]
    assert refusals(result) == [
        f"tst: {json.loads(ms_fix.payload)['tst']} looks like milliseconds; OwnTracks sends epoch seconds"
    ]
    assert count(engine, EVENTS) == 0  # positions are not events of record; the waypoint is nothing
    assert count(engine, DEAD_LETTERS, DEAD_LETTERS.c.topic == base()) == 1


def test_a_location_published_retained_is_used_not_refused(desk: Desk, engine: Engine) -> None:
    """The app publishes retained by default; the persister's refusal of retained inbound
    publishes (presence aside) has OwnTracks as its other exception."""
    t = now_tst()
    result = desk.projector.apply([Inbound(base("r2"), fix(t, lat=BASE_LAT + 0.002), retain=True)])
    assert (result.stored, result.refused) == (1, 0), refusals(result)
    assert not [o for o in result.outbound if o.topic == base("r2")]  # not cleared either
    assert rider_row(engine, "r2")["lat"] == BASE_LAT + 0.002
    desk.ok(Msg(topics.rider_presence("r2"), b"online"))
    lwt = desk.projector.apply([Inbound(base("r2"), b'{"_type":"lwt"}', retain=True)])
    assert (lwt.stored, lwt.refused) == (1, 0) and rider_row(engine, "r2")["presence"] == "offline"


def test_bare_fields_on_the_location_topic_get_the_same_tst_rules(desk: Desk, engine: Engine) -> None:
    t = now_tst()
    bare = topics.rider_location("r3")
    bad = desk.send(Msg(bare, payload(lat=BASE_LAT, lon=BASE_LON, tst=t * 1000)))
    assert refusals(bad) == [f"tst: {t * 1000} looks like milliseconds; OwnTracks sends epoch seconds"]
    desk.ok(Msg(bare, payload(lat=BASE_LAT, lon=BASE_LON, tst=t)))
    assert rider_row(engine, "r3")["position_at"] == datetime.fromtimestamp(t, tz=UTC)


def _events(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.select(EVENTS).order_by(EVENTS.c.seq))]


# --- over MQTT, the persister running ------------------------------------------------------------


@contextlib.contextmanager
def persister_with_metrics(settings: Settings, registry: CollectorRegistry) -> Iterator[Service]:
    """The persister service with its metrics, in a thread of this process, stopped on exit."""
    service = build(settings, metrics=ServiceMetrics("persister", registry))
    holder: dict[str, Any] = {}
    started = threading.Event()

    def main() -> None:
        async def run() -> None:
            holder["loop"], holder["stop"] = asyncio.get_running_loop(), asyncio.Event()
            started.set()
            await service.run(settings, stop=holder["stop"], install_signals=False)

        try:
            asyncio.run(run())
        except BaseException as exc:  # surfaced in the test thread
            holder["error"] = exc
        finally:
            started.set()

    thread = threading.Thread(target=main, name="persister-owntracks", daemon=True)
    thread.start()
    try:
        started.wait(10)
        deadline = time.monotonic() + 60
        while not service.ready.is_set():
            assert "error" not in holder and thread.is_alive(), f"persister died: {holder.get('error')!r}"
            assert time.monotonic() < deadline, "persister did not start within 60 s"
            time.sleep(0.02)
        yield service
    finally:
        if "loop" in holder:
            with contextlib.suppress(RuntimeError):
                holder["loop"].call_soon_threadsafe(holder["stop"].set)
        thread.join(30)
    assert not thread.is_alive() and "error" not in holder, holder.get("error")


def ignored_count(registry: CollectorRegistry, kind: str) -> float:
    return sum(
        s.value
        for m in registry.collect()
        for s in m.samples
        if s.name == "bloomwire_owntracks_ignored_total" and s.labels["type"] == kind
    )


def wait_until(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout} s for {what}")
        time.sleep(0.05)


def test_owntracks_over_mqtt(
    fresh_broker: Broker,
    database_url: str,
    engine: Engine,
    make_settings: MakeSettings,
    mqtt_user: MakeUser,
    mqtt_client: MakeClient,
) -> None:
    def client() -> MqttTestClient:
        return mqtt_client(*mqtt_user(broker=fresh_broker), broker=fresh_broker)

    settings = make_settings(database_url=database_url, broker=fresh_broker)
    spy = Spy(client())
    dev = Devices(client(), spy, engine)
    phone = dev.client
    registry = CollectorRegistry()
    t = now_tst()
    # Left retained by r2's app before the persister ever subscribed: never replayed to it.
    phone.publish(base("r2"), fix(t - 30), qos=1, retain=True).wait_for_publish(5)
    with persister_with_metrics(settings, registry):
        dev.wait_for_persister()
        dev.confirm(*accepted_order(SHOP, "o1", "r1"), status("r1", "o1", "picked_up"))
        dev.send(Msg(topics.rider_presence("r1"), b"online"))
        rider_state = topics.shop_rider_state(SHOP, "r1")

        def presence(word: str) -> Callable[[Any], bool]:
            return lambda s: s.topic == rider_state and s.json()["presence"] == word

        spy.wait(presence("online"), what="rider online")

        # lwt: the rider goes offline in its retained rider state
        phone.publish(base(), b'{"_type":"lwt","tst":1700000000}', qos=1)
        spy.wait(presence("offline"), what="rider offline after the app's lwt")
        late = Spy(client(), (rider_state,))
        [retained] = late.wait(lambda s: s.topic == rider_state, what="retained rider state")
        assert retained.retain and retained.json()["presence"] == "offline"

        # a transition sent twice is stored once (both acknowledged), and prompts "arrived?"
        enter = transition("enter", t, lat=DEST_LAT + 0.0003)
        tid = ot.transition_id("r1", "phone", ot.Transition("enter", t, 0, 0, None, "", None, None))
        for _ in range(2):
            phone.publish(event_topic(), enter, qos=1)
        acks = topics.rider_inbox("r1", "acks")
        wait_until(
            lambda: (
                sum(
                    s.json()["ids"].count(tid)
                    for s in spy.collect(lambda s: s.topic == acks, n=99, timeout=0.1)
                )
                == 2
            ),
            "both sends of the transition acknowledged",
        )
        [prompt] = spy.wait(lambda s: s.topic == topics.rider_inbox("r1", "chat"), what="arrival prompt")
        assert prompt.json()["data"]["order"] == "o1"
        assert count(engine, EVENTS, EVENTS.c.id == tid) == 1

        # a waypoint is counted and not stored; a fix in ms is dead-lettered; the good one stored
        phone.publish(topics.owntracks("r1", "phone", "waypoint"), b'{"_type":"waypoint","desc":"x"}', qos=1)
        ms = fix(t * 1000)
        phone.publish(base(), ms, qos=1)
        good_lat = BASE_LAT + 0.003
        phone.publish(base(), fix(t + 1, lat=good_lat), qos=1, retain=True)  # the app's default: retained
        [told] = spy.wait(
            lambda s: s.topic == topics.rider_inbox("r1", "errors"), what="refusal of the fix in ms"
        )
        assert (
            told.json()["reason"] == f"tst: {t * 1000} looks like milliseconds; OwnTracks sends epoch seconds"
        )
        wait_until(lambda: rider_row(engine, "r1")["lat"] == good_lat, "the good fix after the bad one")
        wait_until(lambda: ignored_count(registry, "waypoint") == 1, "the waypoint counted")
        # the retained fix stays on the broker for the rider's other OwnTracks devices
        [kept] = Spy(client(), (base(),)).wait(lambda s: s.topic == base(), what="retained fix")
        assert kept.retain and json.loads(kept.payload)["lat"] == good_lat
    assert count(engine, DEAD_LETTERS) == 1
    with engine.connect() as conn:
        [dead] = [dict(r) for r in conn.execute(sa.select(DEAD_LETTERS)).mappings()]
    assert (dead["topic"], dead["sender"]) == (base(), "riders/r1")
    assert "looks like milliseconds" in dead["reason"] and dead["payload"] == ms.decode()
    assert count(engine, RIDERS, RIDERS.c.id == "r2") == 0
    assert count(engine, EVENTS, EVENTS.c.type.in_(["waypoint", "rider.region_changed"])) == 1
    assert rider_row(engine, "r1")["position_at"] == datetime.fromtimestamp(t + 1, tz=UTC)
