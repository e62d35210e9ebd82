"""The persister's hot path: what was made faster still writes and says exactly the same."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.contract.validate import DEFAULT_TIME_BOUNDS, check_time
from bloomwire.errors import PayloadError
from bloomwire.services.persister.decode import Decoded, Undecodable, decode
from bloomwire.services.persister.messages import Inbound
from bloomwire.store import make_engine, upgrade
from bloomwire.store.bulk import BulkInsert
from bloomwire.store.models import EVENTS

TIMES = [
    datetime(2026, 2, 14, 9, 30, 1, 5, tzinfo=UTC),
    datetime(2026, 2, 14, 9, 30, 1, tzinfo=UTC),  # no microseconds: still written with them
    datetime(2026, 2, 14, 11, 30, 1, 5, tzinfo=timezone(timedelta(hours=2))),  # the first, in +02:00
    datetime(2026, 2, 13, 22, 0, tzinfo=timezone(timedelta(hours=-5, minutes=-30))),
]


def _row(key: str, at: datetime) -> dict[str, object]:
    return {
        "id": key,
        "type": "order.chat_posted",
        "source": "riders/r1",
        "topic": "riders/r1/orders/o1/chat",
        "shop": None,
        "order_id": "o1",
        "rider": "r1",
        "time": at,
        "recorded_at": TIMES[0],
        "data": {"order": "o1", "text": "x"},
    }


def test_bulk_times_on_sqlite_are_the_text_core_writes_memo_shared_or_not(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'bulk.db'}"
    upgrade(url)
    engine = make_engine(url)
    bulk = BulkInsert(EVENTS, engine.dialect)
    memo: dict[object, object] = {}
    try:
        with engine.begin() as conn:
            conn.execute(EVENTS.insert(), [_row(f"core-{i}", t) for i, t in enumerate(TIMES)])
            bulk.execute(conn, [_row(f"bulk-{i}", t) for i, t in enumerate(TIMES)], memo)
            bulk.execute(conn, [_row(f"again-{i}", t) for i, t in enumerate(TIMES)], memo)
            bulk.execute(conn, [_row(f"own-{i}", t) for i, t in enumerate(TIMES)])
            with pytest.raises(ValueError, match="naive"):
                bulk.execute(conn, [_row("naive", datetime(2026, 2, 14, 9, 30))])
        with engine.connect() as conn:
            raw: dict[str, str] = dict(
                conn.exec_driver_sql("SELECT id, time || ' / ' || recorded_at FROM events").all()
            )
    finally:
        engine.dispose()
    for i in range(len(TIMES)):
        assert raw[f"bulk-{i}"] == raw[f"again-{i}"] == raw[f"own-{i}"] == raw[f"core-{i}"]
    assert raw["core-0"] == raw["core-2"] == "2026-02-14 09:30:01.000005 / 2026-02-14 09:30:01.000005"
    assert raw["core-1"].startswith("2026-02-14 09:30:01.000000 /")
    assert len(memo) == 3, "equal instants are converted once, whatever their offset"


def test_an_inbound_time_is_checked_as_before_and_named_when_refused() -> None:
    now = datetime(2026, 2, 14, 9, 30, tzinfo=UTC)
    bounds = DEFAULT_TIME_BOUNDS
    check_time("time", now + timedelta(seconds=bounds.future_skew_s), now, bounds)
    check_time("time", now - timedelta(seconds=bounds.max_age_s), now, bounds)
    late = now + timedelta(seconds=bounds.future_skew_s + 1)
    with pytest.raises(PayloadError, match=r"time: 2026-02-14T09:35:01\+00:00 is more than 300 s in"):
        check_time("time", late, now, bounds)
    with pytest.raises(PayloadError, match="is more than 604800 s old"):
        check_time("time", now - timedelta(seconds=bounds.max_age_s + 1), now, bounds)


def _decode_location(payload: bytes) -> Decoded | Undecodable:
    msg = Inbound(topics.rider_location("r1"), payload)
    return decode(msg, datetime.now(UTC), DEFAULT_TIME_BOUNDS)


def test_a_position_is_read_as_an_event_or_as_bare_fields_and_refused_as_before() -> None:
    tst = int(datetime.now(UTC).timestamp())
    event = ev.RiderLocationReportedEvent(
        source="riders/r1", data=ev.RiderLocation(lat=52.5, lon=13.4, tst=tst)
    )
    read = _decode_location(ev.encode(event))
    assert isinstance(read, Decoded) and read.event == event
    # bare fields, with "type" inside a string: still bare fields
    bare = json.dumps({"lat": 52.5, "lon": 13.4, "tst": tst, "tid": '"type"'}).encode()
    read = _decode_location(bare)
    assert isinstance(read, Decoded) and isinstance(read.event, ev.RiderLocationReportedEvent)
    assert (read.event.data.lat, read.event.data.tst, read.event.source) == (52.5, tst, "riders/r1")
    wrong = json.loads(ev.encode(event))
    wrong["data"]["lat"] = 91
    refused = _decode_location(json.dumps(wrong).encode())
    assert isinstance(refused, Undecodable) and "data.lat" in refused.reason
    assert refused.event_id == event.id
    not_json = _decode_location(b'{"type": ')
    assert isinstance(not_json, Undecodable) and "not JSON" in not_json.reason
