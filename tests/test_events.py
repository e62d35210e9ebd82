"""Payloads of docs/design.md §2: CloudEvents envelopes, one pydantic model per ``type``."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from bloomwire.contract import events as ev
from bloomwire.contract.lifecycle import OrderStatus
from bloomwire.errors import PayloadError

T0 = datetime(2027, 2, 14, 9, 30, 0, 123000, tzinfo=UTC)

#: Realistic ``data`` for every event type of the contract, and who would send it.
SAMPLES: dict[str, tuple[str, dict[str, Any]]] = {
    "order.create": (
        "shops/s1",
        {
            "order": "o42",
            "customer": {
                "name": "Ana Ruiz",
                "phone": "+34 600 123 456",
                "address": "Calle Mayor 5, 28013 Madrid",
                "lat": 40.4153,
                "lon": -3.7074,
            },
            "window": {"start": "2027-02-14T10:00:00Z", "end": "2027-02-14T12:00:00+01:00"},
            "items": ["12 red roses", "card: Happy Valentine's"],
            "note": "ring twice",
            "pickup_lat": 40.4168,
            "pickup_lon": -3.7038,
            "customer_username": "c-o42",
        },
    ),
    "order.cancel": ("shops/s1", {"order": "o42", "reason": "customer called to cancel"}),
    "order.status_changed": (
        "riders/r7",
        {"order": "o42", "status": "picked_up", "note": "bouquet on board", "rider": "r7"},
    ),
    "order.incident_reported": (
        "riders/r7",
        {"order": "o42", "reason": "flat tyre", "eta": "2027-02-14T11:15:00Z", "note": "10 min"},
    ),
    "order.chat_posted": (
        "customers/c-o42",
        {"order": "o42", "text": "I'm at the back door", "author": "customer"},
    ),
    "order.assign": ("shops/s1", {"order": "o42", "rider": "r7", "note": "knows the area"}),
    "rider.location_reported": (
        "riders/r7",
        {
            "lat": 40.41,
            "lon": -3.70,
            "tst": 1802597400,
            "acc": 8.0,
            "vel": 17.5,
            "cog": 270.0,
            "batt": 81,
        },
    ),
    "rider.presence_changed": ("riders/r7", {"status": "online", "on_duty": True, "capacity": 4}),
    "dispatch.offered": (
        "services/dispatch",
        {
            "offer": "of-1",
            "order": "o42",
            "rider": "r7",
            "deadline": "2027-02-14T09:31:00Z",
            "cost": 412.5,
            "mode": "batch",
            "candidates": [
                {"rider": "r7", "cost": 412.5, "travel_s": 380.0, "load": 1, "note": "closest"},
                {"rider": "r3", "cost": 655.0, "travel_s": 610.0, "load": 0},
            ],
        },
    ),
    "dispatch.reply": (
        "riders/r7",
        {"offer": "of-1", "order": "o42", "accept": False, "reason": "full"},
    ),
    "dispatch.expired": ("services/dispatch", {"offer": "of-1", "order": "o42", "rider": "r7"}),
    "alert.raised": (
        "services/alerts",
        {
            "alert": "al-9",
            "rule": "eta_slip",
            "severity": "warning",
            "shop": "s1",
            "order": "o42",
            "rider": "r7",
            "message": "ETA 12:20 is past the promised window (12:00)",
            "action": "call the customer",
        },
    ),
    "alert.escalated": ("services/alerts", {"alert": "al-9", "level": 2, "message": "still late"}),
    "alert.resolved": ("services/alerts", {"alert": "al-9", "reason": "delivered"}),
    "alert.acknowledged": ("shops/s1", {"alert": "al-9", "by": "Marta at the counter"}),
    "alert.acknowledge": ("shops/s1", {"alert": "al-9", "by": "Marta at the counter"}),
    "order.rate": ("customers/c-o1", {"order": "o1", "stars": 5, "comment": "On time, lovely"}),
    "order.rated": ("customers/c-o1", {"order": "o1", "stars": 5, "comment": "On time, lovely"}),
    "order.amend": (
        "shops/s1",
        {
            "order": "o42",
            "window_end": "2027-02-14T13:00:00Z",
            "address": "Calle Mayor 7, 28013 Madrid",
            "lat": 40.4155,
            "lon": -3.7071,
            "instructions": {"kind": "leave_at_door", "text": "behind the blue pot"},
            "asked_by": "customer",
            "reason": "she will be out until one",
        },
    ),
    "order.amended": (
        "shops/s1",
        {
            "order": "o42",
            "window_end": "2027-02-14T13:00:00Z",
            "asked_by": "customer",
            "changes": {"window_end": {"old": "2027-02-14T12:00:00Z", "new": "2027-02-14T13:00:00Z"}},
        },
    ),
    "order.amendment_confirm": (
        "riders/r7",
        {"order": "o42", "amendment": "0190f3c2-7d1a-7c2b-9f3e-2a1b0c9d8e7f", "note": "on my way there"},
    ),
    "order.amendment_confirmed": (
        "riders/r7",
        {"order": "o42", "amendment": "0190f3c2-7d1a-7c2b-9f3e-2a1b0c9d8e7f", "rider": "r7"},
    ),
    "order.photo_attached": (
        "riders/r7",
        {
            "order": "o1",
            "photo": {
                "sha256": "ab" * 32,
                "content_type": "image/jpeg",
                "width": 640,
                "height": 480,
                "size": 52000,
            },
        },
    ),
    "order.notified": (
        "services/notices",
        {"order": "o1", "kind": "delayed", "language": "en", "text": "Running late", "reason": "flat_tyre"},
    ),
}


def envelope(kind: str, data: dict[str, Any], **extra: Any) -> dict[str, Any]:
    source = SAMPLES[kind][0] if kind in SAMPLES else "riders/r7"
    obj: dict[str, Any] = {
        "specversion": "1.0",
        "id": "0c5b3f9e-7d1a-4c2b-9f3e-2a1b0c9d8e7f",
        "type": kind,
        "source": source,
        "time": "2027-02-14T09:30:00.123Z",
        "data": data,
    }
    obj.update(extra)
    return obj


def raw(obj: object) -> bytes:
    return json.dumps(obj).encode()


def test_every_event_type_has_a_sample() -> None:
    assert set(SAMPLES) == set(ev.EVENT_TYPES)


@pytest.mark.parametrize("kind", sorted(ev.EVENT_TYPES))
def test_round_trip(kind: str) -> None:
    source, data = SAMPLES[kind]
    decoded = ev.decode(raw(envelope(kind, data)))
    assert type(decoded) is ev.EVENT_TYPES[kind]
    assert decoded.type == kind
    assert decoded.source == source
    assert decoded.time == T0
    assert ev.decode(ev.encode(decoded)) == decoded
    # encode is compact UTF-8 JSON and keeps the CloudEvents attribute names
    out = json.loads(ev.encode(decoded))
    assert {"specversion", "id", "type", "source", "time", "data"} <= set(out)


@pytest.mark.parametrize("kind", sorted(ev.EVENT_TYPES))
def test_models_build_in_python_and_round_trip(kind: str) -> None:
    cls = ev.EVENT_TYPES[kind]
    source, data = SAMPLES[kind]
    built = cls.model_validate({"source": source, "data": data})
    assert built.model_dump()["type"] == kind and built.specversion == "1.0"
    assert built.time.tzinfo is not None
    assert ev.decode(ev.encode(built)) == built


def test_decode_accepts_str_and_ignores_unknown_envelope_attributes() -> None:
    obj = envelope("order.cancel", SAMPLES["order.cancel"][1], traceparent="00-abc")
    decoded = ev.decode(json.dumps(obj))
    assert isinstance(decoded, ev.OrderCancelEvent)


def test_ids_default_to_fresh_uuids() -> None:
    a = ev.OrderCancelEvent(source="shops/s1", data=ev.OrderCancelled(order="o1"))
    b = ev.OrderCancelEvent(source="shops/s1", data=ev.OrderCancelled(order="o1"))
    assert a.id != b.id and len(a.id) == 36


def test_text_is_stripped() -> None:
    decoded = ev.decode(raw(envelope("order.chat_posted", {"order": "o42", "text": "  on my way \n"})))
    assert isinstance(decoded, ev.OrderChatPostedEvent)
    assert decoded.data.text == "on my way"


def _with(kind: str, path: str, value: Any) -> dict[str, Any]:
    """A copy of the sample of ``kind`` with ``data.<path>`` set (or removed when value is ...)."""
    data = json.loads(json.dumps(SAMPLES[kind][1]))
    *parents, leaf = path.split(".")
    node = data
    for p in parents:
        node = node[p]
    if value is ...:
        del node[leaf]
    else:
        node[leaf] = value
    return envelope(kind, data)


BAD_FIELDS: list[tuple[dict[str, Any], str]] = [
    (
        _with("order.create", "window.end", "2027-02-14T09:00:00Z"),
        "data.window: promised window end",
    ),
    (
        _with("order.create", "window.end", "2027-02-16T09:00:00Z"),
        "data.window: promised window may not",
    ),
    (_with("order.create", "window.end", "2027-02-14T12:00:00"), "data.window.end: .*timezone"),
    (_with("order.create", "window.end", "soon"), "data.window.end"),
    (_with("order.create", "window", ...), "data.window: Field required"),
    (_with("order.create", "customer.lat", 91), "data.customer.lat: .*less than or equal to 90"),
    (_with("order.create", "customer.lon", -180.5), "data.customer.lon"),
    (_with("order.create", "customer.name", "   "), "data.customer.name"),
    (_with("order.create", "customer.email", "a@b.c"), "data.customer.email: Extra inputs"),
    (_with("order.create", "order", "o/42"), "data.order: id 'o/42' contains '/'"),
    (_with("order.create", "order", ""), "data.order: id is empty"),
    (_with("order.create", "items", ["x" * 201]), "data.items.0"),
    (_with("order.create", "items", ["rose"] * 51), "data.items"),
    (_with("order.status_changed", "status", "teleported"), "data.status: Input should be"),
    (_with("order.status_changed", "status", "failed"), "data: a failed delivery needs a reason"),
    (_with("order.status_changed", "reason", "bored"), "data.reason"),
    (_with("order.status_changed", "rider", "r 7"), "data.rider: id 'r 7' must start with a letter"),
    (_with("order.incident_reported", "reason", ""), "data.reason"),
    (_with("order.incident_reported", "eta", "2027-02-14T11:15:00"), "data.eta: .*timezone"),
    (_with("order.chat_posted", "text", ""), "data.text"),
    (_with("order.chat_posted", "text", "x" * 2001), "data.text"),
    (_with("rider.location_reported", "lat", -90.1), "data.lat"),
    (_with("rider.location_reported", "tst", -1), "data.tst"),
    (_with("rider.location_reported", "batt", 101), "data.batt"),
    (_with("rider.location_reported", "vel", 401), "data.vel"),
    (_with("rider.location_reported", "lon", ...), "data.lon: Field required"),
    (_with("rider.presence_changed", "status", "busy"), "data.status"),
    (_with("rider.presence_changed", "capacity", 0), "data.capacity"),
    (_with("dispatch.offered", "mode", "auction"), "data.mode"),
    (_with("dispatch.offered", "deadline", "2027-02-14T09:31:00"), "data.deadline: .*timezone"),
    (
        _with("dispatch.offered", "candidates", [{"rider": "r+1", "cost": 1}]),
        "data.candidates.0.rider",
    ),
    (_with("dispatch.reply", "accept", "maybe"), "data.accept"),
    (_with("alert.raised", "severity", "apocalyptic"), "data.severity"),
    (_with("alert.raised", "rule", "vibes"), "data.rule"),
    (_with("alert.escalated", "level", 0), "data.level"),
    (
        {**envelope("order.cancel", {"order": "o1"}), "time": "2027-02-14T09:30:00"},
        "^time: .*timezone",
    ),
    ({**envelope("order.cancel", {"order": "o1"}), "specversion": "0.3"}, "^specversion"),
    ({**envelope("order.cancel", {"order": "o1"}), "id": ""}, "^id"),
    ({**envelope("order.cancel", {"order": "o1"}), "id": "a b"}, "^id"),
    ({**envelope("order.cancel", {"order": "o1"}), "source": ""}, "^source"),
    (
        {**envelope("order.cancel", {"order": "o1"}), "datacontenttype": "text/xml"},
        "^datacontenttype",
    ),
    (
        {k: v for k, v in envelope("order.cancel", {"order": "o1"}).items() if k != "source"},
        "^source: Field required",
    ),
    (
        {k: v for k, v in envelope("order.cancel", {"order": "o1"}).items() if k != "data"},
        "^data: Field required",
    ),
]


@pytest.mark.parametrize(("obj", "needle"), BAD_FIELDS, ids=[n for _, n in BAD_FIELDS])
def test_bad_fields_are_named(obj: dict[str, Any], needle: str) -> None:
    with pytest.raises(PayloadError, match=needle):
        ev.decode(raw(obj))


def test_several_bad_fields_are_all_named() -> None:
    obj = _with("order.create", "customer.lat", 91)
    obj["data"]["window"]["start"] = "nope"
    with pytest.raises(PayloadError) as info:
        ev.decode(raw(obj))
    message = str(info.value)
    assert "data.customer.lat" in message and "data.window.start" in message
    assert "order.create" not in message  # the union tag is not part of the field path


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (b"", "payload is not JSON"),
        (b"{", "payload is not JSON"),
        (b"online", "payload is not JSON"),
        (b'{"type": "order.chat_posted",}', "payload is not JSON"),
        (b'{"type": "rider.location_reported", "data": {"lat": NaN}}', "payload is not JSON: NaN"),
        (b'{"cost": Infinity}', "payload is not JSON: Infinity"),
        (b"\xff\xfe{}", "not UTF-8 text \\(byte 0\\)"),
        ('{"text": "café"}'.encode("latin-1"), "not UTF-8 text"),
        (b'[{"type": "order.chat_posted"}]', "must be a JSON object, not list"),
        (b'"order.chat_posted"', "must be a JSON object, not str"),
        (b"null", "must be a JSON object, not NoneType"),
        (b"42", "must be a JSON object, not int"),
        (
            b'{"type": "order.teleported", "data": {}}',
            "^type: unknown event type 'order.teleported'",
        ),
        (b'{"source": "riders/r7", "data": {}}', "^type: unknown event type None"),
        (b'{"type": ["order.chat_posted"]}', "^type: unknown event type \\['order.chat_posted'\\]"),
        (b'{"type": {"a": 1}}', "^type: unknown event type"),
        (b'{"type": 7}', "^type: unknown event type 7"),
    ],
)
def test_malformed_payloads(payload: bytes, needle: str) -> None:
    with pytest.raises(PayloadError, match=needle):
        ev.decode(payload)


def test_oversized_payload_is_refused_before_parsing() -> None:
    body = raw(envelope("order.chat_posted", {"order": "o1", "text": "x"}))
    padded = body[:-1] + b" " * (ev.MAX_PAYLOAD_BYTES + 1 - len(body)) + b"}"
    assert len(padded) == ev.MAX_PAYLOAD_BYTES + 1
    with pytest.raises(PayloadError, match=f"payload is {ev.MAX_PAYLOAD_BYTES + 1} bytes"):
        ev.decode(padded)
    # exactly at the limit is still read
    assert isinstance(ev.decode(padded[:-2] + b"}"), ev.OrderChatPostedEvent)


def test_oversized_str_payload_is_measured_in_utf8_bytes() -> None:
    text = "\u00e9" * (ev.MAX_PAYLOAD_BYTES // 2 + 1)  # fewer characters than the limit, more bytes
    assert len(text) < ev.MAX_PAYLOAD_BYTES < len(text.encode())
    with pytest.raises(PayloadError, match="bytes \\(max"):
        ev.decode(json.dumps({"type": "order.chat_posted", "text": text}, ensure_ascii=False))


def test_naive_envelope_time_is_refused_in_python_too() -> None:
    with pytest.raises(ValueError, match="timezone"):
        ev.OrderCancelEvent(
            source="shops/s1",
            time=datetime(2027, 2, 14, 9, 30),
            data=ev.OrderCancelled(order="o1"),
        )


def test_failed_status_requires_reason_and_accepts_one() -> None:
    with pytest.raises(ValueError, match="a failed delivery needs a reason"):
        ev.OrderStatusChanged(order="o1", status=OrderStatus.FAILED)
    ok = ev.OrderStatusChanged(order="o1", status=OrderStatus.FAILED, reason="customer_unreachable")
    assert ok.reason == "customer_unreachable"


def test_window_end_must_follow_start() -> None:
    with pytest.raises(ValueError, match="end must be after its start"):
        ev.Window(start=T0, end=T0)
    assert ev.Window(start=T0, end=T0 + timedelta(hours=24)).end > T0


@pytest.mark.parametrize("status", ["picked_up", "en_route", "arrived", "delivered", "returned"])
def test_rider_may_report_delivery_progress(status: str) -> None:
    ev.check_rider_status(ev.OrderStatusChanged(order="o1", status=OrderStatus(status)))


@pytest.mark.parametrize("status", ["created", "assigned", "accepted", "cancelled"])
def test_rider_may_not_report_backbone_statuses(status: str) -> None:
    with pytest.raises(PayloadError, match=f"data.status: a rider cannot report '{status}'"):
        ev.check_rider_status(ev.OrderStatusChanged(order="o1", status=OrderStatus(status)))


def test_new_ids_are_uuid7_ordered_by_creation_time() -> None:
    first = [ev.new_id() for _ in range(1000)]
    time.sleep(0.002)
    later = ev.new_id()
    parsed = uuid.UUID(first[0])
    assert (parsed.version, parsed.variant) == (7, uuid.RFC_4122)
    assert len(set(first)) == len(first), "random bits keep ids of the same millisecond apart"
    assert all(i < later for i in first), "an id made later sorts after: appends to the store's index"
    millis = int(later.replace("-", "")[:12], 16)
    assert abs(millis - time.time() * 1000) < 60_000, "the first 48 bits are the Unix time in ms"
    ev.OrderChatPostedEvent(id=later, source="riders/r1", data=ev.OrderChat(order="o1", text="hi"))


@pytest.mark.parametrize("request_type", sorted(ev.FACT_OF, key=ev.type_name))
def test_a_request_becomes_its_fact_with_the_same_id_source_time_and_data(
    request_type: type[ev._Envelope],
) -> None:
    source, data = SAMPLES[ev.type_name(request_type)]
    request = ev.decode(raw(envelope(ev.type_name(request_type), data)))
    fact = ev.fact_of(request)
    assert type(fact) is ev.FACT_OF[request_type]
    assert fact.type.split(".")[0] == request.type.split(".")[0] and fact.type != request.type
    assert (fact.id, fact.source, fact.time, fact.data) == (request.id, source, T0, request.data)


@pytest.mark.parametrize(
    ("request_type", "fact_type"), sorted(ev.FACT_OF.items(), key=lambda p: ev.type_name(p[0]))
)
def test_a_fact_that_only_a_request_yields_is_refused_as_sent(
    request_type: type[ev._Envelope], fact_type: type[ev._Envelope]
) -> None:
    source, data = SAMPLES[ev.type_name(request_type)]
    fact = fact_type.model_validate({"source": source, "data": data})
    with pytest.raises(PayloadError, match=f"send the request '{ev.type_name(request_type)}'"):
        ev.fact_of(fact)


def test_other_events_are_their_own_fact() -> None:
    chat = ev.decode(raw(envelope("order.chat_posted", SAMPLES["order.chat_posted"][1])))
    assert ev.fact_of(chat) is chat
