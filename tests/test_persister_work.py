"""The persister's parts on their own: the unit of work over typed rows, the pure decode step."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import Engine

from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.contract.validate import DEFAULT_TIME_BOUNDS
from bloomwire.services.persister import riders
from bloomwire.services.persister.decode import Decoded, decode
from bloomwire.services.persister.messages import Inbound
from bloomwire.services.persister.projections import Projections
from bloomwire.services.persister.rows import Order, Rider
from bloomwire.services.persister.work import Inserts, UnitOfWork
from bloomwire.store import open_store
from bloomwire.store.models import ORDERS, RIDERS

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = open_store(f"sqlite:///{tmp_path / 'work.db'}")
    yield engine
    engine.dispose()


def _order(order_id: str, rider: str | None = None) -> Order:
    return Order(
        id=order_id,
        shop="s1",
        status="accepted" if rider else "created",
        rider=rider,
        lat=52.53,
        lon=13.40,
        window_start=NOW,
        window_end=NOW + timedelta(hours=2),
        created_at=NOW,
        updated_at=NOW,
    )


def _commit(engine: Engine, p: Projections, work: UnitOfWork) -> None:
    with engine.begin() as conn:
        work.flush(conn, p.tables, Inserts(engine.dialect))


def _stored(engine: Engine, table: sa.Table, key: str) -> dict[str, object]:
    with engine.connect() as conn:
        row = conn.execute(sa.select(table).where(table.c.id == key)).one()
    return dict(row._mapping)


def test_a_row_added_then_changed_is_inserted_once_with_its_changes(engine: Engine) -> None:
    p = Projections(engine)
    work = UnitOfWork(NOW)
    order = work.add(p.orders, _order("o1"))
    work.change(p.orders, order, status="assigned", rider="r1", assigned_at=NOW)
    assert work.is_new(p.orders, "o1")
    _commit(engine, p, work)
    stored = _stored(engine, ORDERS, "o1")
    assert (stored["status"], stored["rider"], stored["assigned_at"]) == ("assigned", "r1", NOW)


def test_a_change_is_written_without_a_touch_and_a_failed_commit_forgets_it(engine: Engine) -> None:
    p = Projections(engine)
    first = UnitOfWork(NOW)
    rider = p.rider(first, "r1")  # first mention: added, offline
    _commit(engine, p, first)
    later = NOW + timedelta(seconds=5)
    second = UnitOfWork(later)
    assert not second.is_new(p.riders, "r1")
    second.change(p.riders, rider, presence="online", updated_at=later)
    _commit(engine, p, second)
    assert _stored(engine, RIDERS, "r1")["presence"] == "online"

    third = UnitOfWork(later)
    third.change(p.riders, rider, presence="offline")
    third.rolled_back()  # its commit failed: the row goes, and is read back as stored
    again = p.riders.get("r1")
    assert again is not rider and isinstance(again, Rider) and again.presence == "online"


def test_decode_reads_only_its_arguments_and_leaves_a_transitions_subject_to_the_projections(
    engine: Engine,
) -> None:
    tst = int(NOW.timestamp())
    payload = json.dumps(
        {"_type": "transition", "event": "enter", "desc": "o1", "tst": tst, "lat": 52.53, "lon": 13.40}
    ).encode()
    msg = Inbound(topics.owntracks("r1", "phone", "event"), payload)
    first = decode(msg, NOW, DEFAULT_TIME_BOUNDS)
    assert first == decode(msg, NOW, DEFAULT_TIME_BOUNDS)  # no clock, no state: the same answer
    assert isinstance(first, Decoded) and isinstance(first.event, ev.RiderRegionChangedEvent)
    assert first.event.subject is None

    p = Projections(engine)
    p.orders.put(_order("o1", rider="r1"))
    p.rider_orders["r1"].add("o1")
    found = riders.with_subject(p, first)
    assert isinstance(found.event, ev.RiderRegionChangedEvent) and found.event.subject == "o1"
    assert found.event.id == first.event.id  # the subject is not part of the phone's event
