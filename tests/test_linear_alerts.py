"""The alerts engine reads the store incrementally (#19): the whole live state once, then only the
rows changed since; what it then holds equals a fresh full read, on both backends."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from bloomwire.app.bench import scale
from bloomwire.services.alerts.reads import (
    ACTIVE,
    ORDER_COLUMNS,
    ORDER_UPDATED_AT,
    RIDER_COLUMNS,
    RIDER_LIVE_COLUMNS,
    ChangedRows,
    order_from_raw,
    rider_from_raw,
)
from bloomwire.store import make_engine
from bloomwire.store.models import ORDERS, RIDERS

N = 200  # open orders: 100 en route (r0..r49), 100 created; 200 delivered


def _caches() -> tuple[ChangedRows[object], ChangedRows[object]]:
    o = ORDERS.c
    gone = sa.select(o.id).where(o.closed_at >= sa.bindparam("since", type_=o.closed_at.type))
    orders: ChangedRows[object] = ChangedRows(
        ORDER_COLUMNS, o.status.in_(ACTIVE), order_from_raw, updated_at_index=ORDER_UPDATED_AT, gone=gone
    )
    riders: ChangedRows[object] = ChangedRows(
        RIDER_LIVE_COLUMNS, sa.true(), rider_from_raw, updated_at_index=len(RIDER_COLUMNS)
    )
    return orders, riders


def test_a_read_after_the_first_takes_only_the_changed_rows(database_url: str) -> None:
    now = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    scale.seed(database_url, N, now)
    writer = make_engine(database_url)
    engine = make_engine(database_url, readonly=True)
    try:
        orders, riders = _caches()
        with engine.connect() as conn:
            first = orders.read(conn)
            first_riders = riders.read(conn)
        assert len(first) == N and orders.last_read == N
        assert len(first_riders) == N // 4
        later = now + timedelta(minutes=1)
        with writer.begin() as conn:  # as the persister would: o0 delivered, o150 assigned, r1 moved
            conn.execute(
                ORDERS.update()
                .where(ORDERS.c.id == "o0")
                .values(status="delivered", delivered_at=later, closed_at=later, updated_at=later)
            )
            conn.execute(
                ORDERS.update()
                .where(ORDERS.c.id == "o150")
                .values(status="assigned", rider="r7", updated_at=later)
            )
            conn.execute(RIDERS.update().where(RIDERS.c.id == "r1").values(lat=52.6, updated_at=later))
        with engine.connect() as conn:
            orders.read(conn)  # all of them again: changed within CHANGE_MARGIN of the newest
            riders.read(conn)
        latest = later + timedelta(minutes=1)
        with writer.begin() as conn:
            conn.execute(ORDERS.update().where(ORDERS.c.id == "o151").values(eta=latest, updated_at=latest))
            conn.execute(RIDERS.update().where(RIDERS.c.id == "r2").values(lat=52.7, updated_at=latest))
        with engine.connect() as conn:
            second = orders.read(conn)
            second_riders = riders.read(conn)
        # Only what changed since the newest row seen, less the margin: o150 and o151, r1 and r2.
        assert orders.last_read == 2 and riders.last_read == 2
        assert "o0" not in second and second["o150"].rider == "r7"  # type: ignore[attr-defined]
        assert second["o151"].eta == latest  # type: ignore[attr-defined]
        assert second_riders["r1"].lat == 52.6  # type: ignore[attr-defined]
        unchanged = [k for k in second if k not in ("o150", "o151")]
        assert all(second[k] is first[k] for k in unchanged), "unchanged rows keep their views"
        fresh_orders, fresh_riders = _caches()
        with engine.connect() as conn:
            assert second == fresh_orders.read(conn)
            assert second_riders == fresh_riders.read(conn)
    finally:
        writer.dispose()
        engine.dispose()
