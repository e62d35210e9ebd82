"""The contract refuses the impossible, and decoding is total (issue #11).

Each impossible input of the issue gets a unit test on decoding with its reason asserted; a
hypothesis property test checks that for any bytes or JSON-ish value decoding returns an event
or raises PayloadError (nothing else), and that an accepted event round-trips.
"""

from __future__ import annotations

import json
import types
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Union, get_args, get_origin

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import AfterValidator, BaseModel, StringConstraints

from bloomwire.contract import events as ev
from bloomwire.contract import owntracks as ot
from bloomwire.contract import validate as v
from bloomwire.contract.topics import check_id
from bloomwire.errors import PayloadError
from bloomwire.runtime.settings import Settings
from bloomwire.services.persister.decode import Decoded, Undecodable, decode
from bloomwire.services.persister.projector import Inbound

NOW = datetime.now(UTC).replace(microsecond=0)


def envelope(kind: str, source: str, data: dict[str, Any], **extra: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "specversion": "1.0",
        "id": "01937a4e-1c2b-7d3e-8f40-5a6b7c8d9e0f",
        "type": kind,
        "source": source,
        "time": NOW.isoformat(),
        "data": data,
    }
    obj.update(extra)
    return obj


def chat(text: str = "at the door", **extra: Any) -> dict[str, Any]:
    return envelope("order.chat_posted", "customers/c-o1", {"order": "o1", "text": text}, **extra)


def location(**data: Any) -> dict[str, Any]:
    fields = {"lat": 52.5, "lon": 13.4, "tst": int(NOW.timestamp())} | data
    return envelope("rider.location_reported", "riders/r1", fields)


def incident(eta: str) -> dict[str, Any]:
    return envelope(
        "order.incident_reported", "riders/r1", {"order": "o1", "reason": "flat tyre", "eta": eta}
    )


def refusal(obj: object) -> str:
    payload = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    with pytest.raises(PayloadError) as info:
        ev.decode(payload)
    return str(info.value)


def received_refusal(obj: dict[str, Any], bounds: v.TimeBounds = v.DEFAULT_TIME_BOUNDS) -> str:
    event = ev.decode(json.dumps(obj))
    with pytest.raises(PayloadError) as info:
        ev.check_received(event, NOW, bounds)
    return str(info.value)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# --- nesting and size -------------------------------------------------------------------------------


def test_json_nested_a_thousand_deep_is_refused_without_recursion_error() -> None:
    payload = json.dumps(chat()).encode()[:-1] + b', "x": ' + nested(1000).encode() + b"}"
    assert refusal(payload) == "payload nests deeper than 16 levels of JSON arrays/objects"
    with pytest.raises(PayloadError, match="nests deeper than 16"):
        ev.load_json(nested(1000))
    with pytest.raises(PayloadError, match="nests deeper than 16"):  # never closed
        ev.load_json("[" * 60_000)


def test_nesting_up_to_the_bound_is_accepted_and_brackets_in_strings_do_not_count() -> None:
    assert ev.load_json(nested(v.MAX_DEPTH)) == json.loads(nested(v.MAX_DEPTH))
    with pytest.raises(PayloadError):
        ev.load_json(nested(v.MAX_DEPTH + 1))
    # The envelope is the first level: data fifteen deeper is the limit.
    assert ev.decode(json.dumps(chat(x=json.loads(nested(v.MAX_DEPTH - 1))))).type == "order.chat_posted"
    brackets = '[{"\\"[[' * 40
    assert ev.decode(json.dumps(chat(brackets))).data.text == brackets


def test_huge_integers_are_refused_not_raised() -> None:
    payload = json.dumps(location()).replace('"lat": 52.5', '"lat": ' + "9" * 5000).encode()
    assert refusal(payload).startswith("payload is not usable JSON")


# --- text ---------------------------------------------------------------------------------------------


def test_nul_in_chat_text_is_refused() -> None:
    reason = refusal(chat("hi\u0000there"))
    assert reason == (
        "data.text: text contains a control character (U+0000 at 2); only \\n and \\t are allowed"
    )


@pytest.mark.parametrize("char", ["\x01", "\x1b", "\r", "\x7f", "\x9b"])
def test_control_characters_are_refused(char: str) -> None:
    assert "control character" in refusal(chat(f"a{char}b"))


def test_newline_and_tab_are_kept() -> None:
    assert ev.decode(json.dumps(chat("two\tcolumns\nand lines"))).data.text == "two\tcolumns\nand lines"


def test_lone_surrogates_are_refused() -> None:
    assert refusal(chat("broken \ud800 pair")).startswith("data.text: ")
    assert "lone surrogate" in str(_check_text_error("x\udfff"))


def _check_text_error(text: str) -> ValueError:
    with pytest.raises(ValueError) as info:
        v.check_text(text)
    return info.value


def test_control_characters_are_refused_in_every_text_field_tried() -> None:
    created = envelope(
        "order.create",
        "shops/s1",
        {
            "order": "o1",
            "customer": {"name": "Ana\x00", "lat": 52.5, "lon": 13.4},
            "window": {"start": NOW.isoformat(), "end": (NOW + timedelta(hours=1)).isoformat()},
        },
    )
    assert refusal(created).startswith("data.customer.name: text contains a control character")
    assert refusal(chat() | {"source": "customers/\x00"}).startswith("source: text contains")


#: Patterns that keep control characters out: the text guard's, and the event id's (ASCII).
GUARD_PATTERNS = {v.TEXT_PATTERN, get_args(ev.EventId)[1].pattern}


def _guarded(metadata: list[Any]) -> bool:
    for m in metadata:
        if isinstance(m, AfterValidator) and m.func is check_id:
            return True
        if isinstance(m, StringConstraints) and m.pattern in GUARD_PATTERNS:
            return True
    return False


def _text_fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, bool]]:
    for name, field in model.model_fields.items():
        yield from _walk(prefix + name, field.annotation, list(field.metadata))


def _walk(path: str, ann: Any, metadata: list[Any]) -> Iterator[tuple[str, bool]]:
    origin = get_origin(ann)
    if origin is Annotated:
        base, *more = get_args(ann)
        yield from _walk(path, base, [*metadata, *more])
    elif origin in (Union, types.UnionType):
        for arg in get_args(ann):
            yield from _walk(path, arg, metadata)
    elif origin is list:
        yield from _walk(path + "[]", get_args(ann)[0], [])
    elif isinstance(ann, type) and issubclass(ann, BaseModel):
        yield from _text_fields(ann, path + ".")
    elif ann is str:
        yield path, _guarded(metadata)


@pytest.mark.parametrize("kind", sorted(ev.EVENT_TYPES))
def test_every_inbound_text_field_is_guarded(kind: str) -> None:
    fields = dict(_text_fields(ev.EVENT_TYPES[kind]))
    assert "source" in fields
    assert [path for path, guarded in fields.items() if not guarded] == []


# --- numbers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lat", ["52.5", True])
def test_latitude_must_be_a_number(lat: object) -> None:
    assert refusal(location(lat=lat)) == "data.lat: Input should be a valid number"


def test_infinite_accuracy_is_refused() -> None:
    payload = json.dumps(location()).replace('"lat": 52.5', '"lat": 52.5, "acc": 1e400').encode()
    assert refusal(payload) == "data.acc: Input should be a finite number"


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"lat": 90.5}, "data.lat: Input should be less than or equal to 90"),
        ({"lon": -180.5}, "data.lon: Input should be greater than or equal to -180"),
        ({"acc": -1}, "data.acc: Input should be greater than or equal to 0"),
        ({"batt": 50.5}, "data.batt: Input should be a valid integer"),
        ({"tst": "1700000000"}, "data.tst: Input should be a valid integer"),
        ({"vel": False}, "data.vel: Input should be a valid number"),
    ],
)
def test_positions_out_of_range_are_refused(fields: dict[str, Any], needle: str) -> None:
    assert needle in refusal(location(**fields))


def test_presence_numbers_and_flags_are_strict() -> None:
    presence = envelope("rider.presence_changed", "riders/r1", {"status": "online", "capacity": "3"})
    assert refusal(presence) == "data.capacity: Input should be a valid integer"
    presence["data"] = {"status": "online", "on_duty": "yes"}
    assert refusal(presence) == "data.on_duty: Input should be a valid boolean"


def test_integers_are_still_numbers() -> None:
    event = ev.decode(json.dumps(location(lat=52, lon=13, acc=5)))
    assert isinstance(event, ev.RiderLocationReportedEvent)
    assert (event.data.lat, event.data.acc) == (52.0, 5.0)


# --- time -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("time", ["0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00"])
def test_times_that_cannot_be_put_in_utc_are_refused(time: str) -> None:
    assert refusal(chat(time=time)) == f"time: {time} cannot be expressed in UTC (out of range)"
    assert refusal(incident(time)) == f"data.eta: {time} cannot be expressed in UTC (out of range)"


@pytest.mark.parametrize(
    ("time", "needle"),
    [
        ("2999-01-01T00:00:00+00:00", "is more than 300 s in the future (event_future_skew_s)"),
        ("9999-12-31T23:59:59+00:00", "is more than 300 s in the future (event_future_skew_s)"),
        ("1970-01-01T00:00:00+00:00", "is more than 604800 s old (event_max_age_s)"),
    ],
)
def test_implausible_event_times_are_refused(time: str, needle: str) -> None:
    assert received_refusal(chat(time=time)) == f"time: {time} {needle}" + (
        "; is the sender's clock right?" if "future" in needle else "; too old to be taken as news"
    )


def test_time_bounds_are_the_configured_ones() -> None:
    bounds = v.TimeBounds(future_skew_s=10, max_age_s=60)
    ev.check_received(ev.decode(json.dumps(chat(time=(NOW + timedelta(seconds=9)).isoformat()))), NOW, bounds)
    late = chat(time=(NOW + timedelta(seconds=11)).isoformat())
    assert "more than 10 s in the future" in received_refusal(late, bounds)
    assert "more than 60 s old" in received_refusal(
        chat(time=(NOW - timedelta(seconds=61)).isoformat()), bounds
    )
    ev.check_received(
        ev.decode(json.dumps(chat(time=(NOW - timedelta(days=6)).isoformat()))), NOW, v.TimeBounds()
    )


@pytest.mark.parametrize(
    ("tst", "needle"),
    [
        (0, "data.tst: 0 (1970-01-01T00:00:00+00:00) is more than 604800 s old (event_max_age_s)"),
        (
            99_999_999_999,
            "data.tst: 99999999999 (5138-11-16T09:46:39+00:00) is more than 300 s in the future",
        ),
        (10**30, f"data.tst: {10**30} is more than 300 s in the future"),
    ],
)
def test_implausible_fix_times_are_refused(tst: int, needle: str) -> None:
    assert received_refusal(location(tst=tst)).startswith(needle)


def test_an_eta_beyond_the_horizon_is_refused() -> None:
    reason = received_refusal(incident("2999-02-14T11:15:00+00:00"))
    assert reason == (
        "data.eta: 2999-02-14T11:15:00+00:00 is more than 172800 s ahead (ETA horizon); "
        "no delivery is expected that late"
    )
    ev.check_received(
        ev.decode(json.dumps(incident((NOW + timedelta(hours=3)).isoformat()))), NOW, v.TimeBounds()
    )


# --- ids and times are the sender's promise -------------------------------------------------------


def test_missing_id_is_refused() -> None:
    obj = chat()
    del obj["id"]
    assert refusal(obj) == "missing field id: every event carries the sender's id so a retry is deduplicated"


def test_missing_time_is_refused() -> None:
    obj = chat()
    del obj["time"]
    assert refusal(obj) == (
        "missing field time: every event carries the time it happened (RFC 3339 with a UTC offset)"
    )


def test_missing_id_is_refused_on_the_slow_path_too() -> None:
    obj = chat("hi\u0000")
    del obj["id"]
    assert refusal(obj).startswith("missing field id")


@pytest.mark.parametrize("event_id", ["", "x" * 129, "has space", "-leading-dash", "é"])
def test_event_ids_are_bounded(event_id: str) -> None:
    assert refusal(chat(id=event_id)).startswith("id: ")


def test_producers_still_get_an_id_and_a_time() -> None:
    event = ev.OrderChatPostedEvent(source="shops/s1", data=ev.OrderChat(order="o1", text="hello"))
    assert ev.decode(ev.encode(event)) == event


# --- totality ---------------------------------------------------------------------------------------


def json_values() -> st.SearchStrategy[Any]:
    leaves = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    return st.recursive(
        leaves,
        max_leaves=12,
        extend=lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
    )


VALID = [chat(), location(acc=5.0, vel=12.0, batt=80), incident((NOW + timedelta(minutes=30)).isoformat())]
FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def _decode_total(payload: bytes) -> None:
    try:
        event = ev.decode(payload)
    except PayloadError as exc:
        assert str(exc)
        return
    assert ev.decode(ev.encode(event)) == event


@FUZZ
@given(st.binary(max_size=300))
def test_decoding_arbitrary_bytes_is_total(payload: bytes) -> None:
    _decode_total(payload)


@FUZZ
@given(json_values())
def test_decoding_arbitrary_json_is_total(value: Any) -> None:
    _decode_total(json.dumps(value).encode())


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield (*prefix, key)
            yield from _paths(value, (*prefix, key))


@FUZZ
@given(st.sampled_from(VALID), st.data(), json_values())
def test_a_valid_event_with_one_field_replaced_is_decoded_or_refused(
    base: dict[str, Any], data: st.DataObject, value: Any
) -> None:
    obj = json.loads(json.dumps(base))
    path = data.draw(st.sampled_from(list(_paths(obj))))
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    _decode_total(json.dumps(obj).encode())


@FUZZ
@given(st.integers(0, 3000), st.sampled_from(["[", '{"a":', '[{"b":']))
def test_any_nesting_depth_is_decoded_or_refused(depth: int, opener: str) -> None:
    _decode_total((opener * depth).encode())


# --- the persister's decode step --------------------------------------------------------------------


def refused(msg: Inbound, bounds: v.TimeBounds = v.DEFAULT_TIME_BOUNDS) -> Undecodable:
    """The persister's decode step at ``NOW``, expected to refuse ``msg``."""
    result = decode(msg, NOW, bounds)
    assert isinstance(result, Undecodable), result
    return result


def test_projector_decode_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(raw: bytes | str) -> ev.Event:
        raise RuntimeError("validator bug")

    monkeypatch.setattr(ev, "decode", broken)
    reason = refused(Inbound("customers/c-o1/chat", json.dumps(chat()).encode())).reason
    assert reason == "undecodable payload: RuntimeError: validator bug"


def test_projector_decode_applies_the_time_bounds() -> None:
    future = refused(
        Inbound("customers/c-o1/chat", json.dumps(chat(time="2999-01-01T00:00:00+00:00")).encode())
    )
    event_id, reason = future.event_id, future.reason
    assert event_id == chat()["id"]
    assert reason is not None and reason.startswith("time: 2999-01-01T00:00:00+00:00 is more than 300 s")
    strict = v.TimeBounds(max_age_s=30)
    old = chat(time=(NOW - timedelta(seconds=31)).isoformat())
    assert "more than 30 s old" in str(
        refused(Inbound("customers/c-o1/chat", json.dumps(old).encode()), strict).reason
    )


@pytest.mark.parametrize("word", [b"online", b"offline"])
def test_bare_presence_words_are_still_accepted(word: bytes) -> None:
    decoded = decode(Inbound("riders/r1/presence", word), NOW, v.DEFAULT_TIME_BOUNDS)
    assert isinstance(decoded, Decoded)
    event = decoded.event
    assert isinstance(event, ev.RiderPresenceChangedEvent)
    assert event.time == NOW


def test_deep_json_on_a_customer_topic_is_refused_by_the_persister() -> None:
    deep = refused(Inbound("customers/c-o1/chat", nested(1000).encode()))
    assert (deep.event_id, deep.reason) == (
        None,
        "payload nests deeper than 16 levels of JSON arrays/objects",
    )


def test_settings_give_the_persister_its_time_bounds() -> None:
    settings = Settings(event_future_skew_s=10, event_max_age_s=60)
    assert settings.time_bounds == v.TimeBounds(future_skew_s=10, max_age_s=60)
    assert Settings().time_bounds == v.DEFAULT_TIME_BOUNDS


def test_a_missing_id_is_named_with_the_other_problems() -> None:
    obj = envelope("dispatch.reply", "riders/r1", {})
    del obj["id"], obj["time"]
    reason = refusal(obj)
    assert reason.startswith(
        "missing field id: every event carries the sender's id so a retry is deduplicated"
    )
    assert "; missing field time: " in reason
    assert "; data.offer: Field required" in reason


def test_a_refused_payload_echoes_only_a_well_formed_id() -> None:
    bad = chat("hi\u0000")
    assert refused(Inbound("customers/c-o1/chat", json.dumps(bad).encode())).event_id == bad["id"]
    bad["id"] = "id\u0000with a NUL"
    nul = refused(Inbound("customers/c-o1/chat", json.dumps(bad).encode()))
    event_id, reason = nul.event_id, nul.reason
    assert event_id is None
    assert reason is not None and reason.startswith("id: ")


INBOUND = [
    "customers/c-o1/chat",
    "riders/r1/location",
    "riders/r1/presence",
    "riders/r1/orders/o1/status",
    "riders/r1/replies",
    "owntracks/r1/phone",
    "shops/s1/commands/create-order",
    "services/dispatch/events",
]


@FUZZ
@given(
    st.sampled_from(INBOUND),
    st.one_of(
        st.binary(max_size=200),
        json_values().map(lambda value: json.dumps(value).encode()),
        st.builds(
            lambda fields: json.dumps({"_type": "location", **fields}).encode(),
            st.dictionaries(st.sampled_from(["lat", "lon", "tst", "acc", "vel", "batt"]), json_values()),
        ),
    ),
)
@example("owntracks/r1/phone", b"")  # an ignored OwnTracks message: neither an event nor refused
def test_the_persister_decode_step_is_total(topic: str, payload: bytes) -> None:
    result = decode(Inbound(topic, payload), NOW, v.DEFAULT_TIME_BOUNDS)
    assert result.msg.payload == payload and result.where is not None
    if isinstance(result, Decoded):
        assert result.event is None or isinstance(result.event, (ev._Envelope, ot.Ignored))
    else:
        assert result.reason and (result.event_id is None or ev.is_event_id(result.event_id))
