"""Linear state in the persister: open alerts indexed by order, memory following the open work,
and a store seeded by ``bench alerts`` (a rider position without its time) loading cleanly."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import Engine

from bloomwire.app.bench import alerts as alerts_bench
from bloomwire.app.bench import scale
from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.contract.lifecycle import OUT_FOR_DELIVERY
from bloomwire.services.persister.projector import Inbound, Outbound, Projector
from bloomwire.services.persister.repair import Repair, repair_states
from bloomwire.store import open_store
from bloomwire.store.models import ALERTS, ORDERS, RIDERS

N = 200


@pytest.fixture
def seeded(tmp_path: Path) -> Iterator[tuple[Engine, datetime]]:
    now = datetime.now(UTC).replace(microsecond=0)
    url = f"sqlite:///{tmp_path / 'scale.db'}"
    scale.seed(url, N, now)
    engine = open_store(url)
    yield engine, now
    engine.dispose()


def _service(event: ev.Event) -> Inbound:
    return Inbound(topics.service_events("alerts"), ev.encode(event))


def _raised(alert: str, order: str, shop: str) -> Inbound:
    data = ev.AlertRaised(
        alert=alert,
        rule=ev.AlertRule.OVERDUE,
        severity=ev.Severity.WARNING,
        shop=shop,
        order=order,
        message="m",
    )
    return _service(ev.AlertRaisedEvent(source="services/alerts", data=data))


def _resolved(alert: str) -> Inbound:
    return _service(ev.AlertResolvedEvent(source="services/alerts", data=ev.AlertResolved(alert=alert)))


def _acked(alert: str, shop: str) -> Inbound:
    event = ev.AlertAcknowledgeEvent(source=f"shops/{shop}", data=ev.AlertAcknowledged(alert=alert))
    return Inbound(topics.shop_command(shop, "ack-alert"), ev.encode(event))


def test_open_alerts_are_indexed_by_order_through_raise_ack_resolve_and_load(
    seeded: tuple[Engine, datetime],
) -> None:
    engine, _ = seeded
    projector = Projector(engine)
    projector.load()
    assert len(projector.projections.open_alerts) == N // 5
    o1 = projector.projections.orders.rows["o1"]
    shop = o1.shop
    assert projector.order_state(o1).open_alerts == 1
    assert projector.order_state(projector.projections.orders.rows[f"o{N - 1}"]).open_alerts == 0

    result = projector.apply([_raised("x1", "o1", shop), _raised("x2", "o1", shop)])
    assert result.stored == 2
    assert projector.order_state(o1).open_alerts == 3
    projector.apply([_acked("x1", shop)])  # acknowledged: no longer open
    assert projector.order_state(o1).open_alerts == 2
    projector.apply([_resolved("x2"), _resolved("a1")])
    assert projector.order_state(o1).open_alerts == 0
    assert "o1" not in projector.projections.open_alerts
    # Resolved alerts leave memory; named again, they are read back and refused as resolved.
    assert "x2" not in projector.projections.alerts.rows and "a1" not in projector.projections.alerts.rows
    assert projector.apply([_resolved("x2")]).refused == 1

    # The index is rebuilt from the store after a restart: the same counts.
    again = Projector(engine)
    again.load()
    assert again.order_state(again.projections.orders.rows["o1"]).open_alerts == 0
    assert again.order_state(again.projections.orders.rows["o2"]).open_alerts == 1
    with engine.connect() as conn:
        still_open = conn.execute(
            sa.select(sa.func.count()).select_from(ALERTS).where(ALERTS.c.status == "open")
        ).scalar()
    assert sum(len(ids) for ids in again.projections.open_alerts.values()) == still_open
    projector.close()
    again.close()


def test_snapshots_at_start_up_count_each_orders_open_alerts(seeded: tuple[Engine, datetime]) -> None:
    engine, _ = seeded
    projector = Projector(engine)
    projector.load()
    snapshots = {
        m.topic: ev.OrderState.model_validate_json(m.payload)
        for m in projector.snapshot_messages()
        if "/orders/" in m.topic
    }
    assert len(snapshots) == N
    counts = {s.order: s.open_alerts for s in snapshots.values()}
    assert counts == {f"o{i}": int(i < N // 5) for i in range(N)}
    projector.close()


def test_a_store_seeded_by_bench_alerts_loads_and_snapshots(tmp_path: Path) -> None:
    """A rider row with a position but no time (as ``bench alerts`` seeds) crashed the persister."""
    url = f"sqlite:///{tmp_path / 'alerts.db'}"
    alerts_bench.seed_store(url, 300, 60)
    engine = open_store(url)
    try:
        with engine.begin() as conn:
            conn.execute(RIDERS.update().values(position_at=None, lat=52.5, lon=13.4))
        projector = Projector(engine)
        projector.load()
        out = projector.snapshot_messages()
        assert len(out) >= 300
        states = [ev.OrderState.model_validate_json(m.payload) for m in out if "/orders/" in m.topic]
        carried = [s for s in states if s.rider and s.status in OUT_FOR_DELIVERY]
        assert carried  # the case that crashed: an order out for delivery, its rider's fix timeless
        assert all(s.position is None for s in carried)
        projector.close()
    finally:
        engine.dispose()


def test_closed_orders_leave_their_per_order_memory(seeded: tuple[Engine, datetime]) -> None:
    engine, now = seeded
    projector = Projector(engine)
    projector.load()
    order = projector.projections.orders.rows["o0"]
    rider = order.rider
    assert rider is not None
    projector.projections.last_trail["o0"] = (52.5, 13.4, now)
    projector.projections.state_sent_at["o0"] = now
    for step in ("arrived", "delivered"):
        data = ev.OrderStatusChanged.model_validate({"order": "o0", "status": step})
        event = ev.OrderStatusChangedEvent(
            source=f"riders/{rider}", data=data, time=now + timedelta(seconds=1)
        )
        assert (
            projector.apply([Inbound(topics.rider_order_status(rider, "o0"), ev.encode(event))]).stored == 1
        )
    assert "o0" not in projector.projections.orders.rows
    assert "o0" not in projector.projections.last_trail and "o0" not in projector.projections.state_sent_at
    assert "c-o0" not in projector.projections.customer_orders
    assert projector.projections.customer_order("c-o0") == "o0"  # still known: from the store
    projector.close()


def test_a_closed_orders_state_expires_with_its_grace_and_is_dated_again_after_a_restart(
    seeded: tuple[Engine, datetime],
) -> None:
    engine, _ = seeded
    projector = Projector(engine, state_grace_s=600)
    projector.load()
    order = projector.projections.orders.rows[f"o{N - 1}"]
    shop = order.shop
    event = ev.OrderCancelEvent(source=f"shops/{shop}", data=ev.OrderCancelled(order=order.id))
    result = projector.apply([Inbound(topics.shop_command(shop, "cancel-order"), ev.encode(event))])
    state_topic = topics.order_topic(shop, order.id, topics.OrderChannel.STATE)
    (state,) = [o for o in result.outbound if o.topic == state_topic]
    assert state.retain and state.payload and state.expiry_s is not None and 590 <= state.expiry_s <= 600
    assert projector.due_clearings() == []
    later = datetime.now(UTC) + timedelta(seconds=601)
    assert [(o.topic, o.payload, o.retain) for o in projector.due_clearings(later)] == [
        (state_topic, b"", True)
    ]
    assert projector.due_clearings(later) == []  # once

    again = Projector(engine, state_grace_s=600)
    again.load()  # closed within the grace: its clearing is dated again
    assert [o.topic for o in again.due_clearings(later)] == [state_topic]
    projector.close()
    again.close()


def test_the_repair_after_online_republishes_every_snapshot_newest_first_paced(
    seeded: tuple[Engine, datetime],
) -> None:
    """What the persister published before ``online`` at start-up it now sends after, in slices
    that wait while the broker has not acknowledged enough, the most recently changed first."""
    engine, now = seeded
    with engine.begin() as conn:  # o7 changed last
        conn.execute(ORDERS.update().where(ORDERS.c.id == "o7").values(updated_at=now + timedelta(seconds=5)))
    projector = Projector(engine)
    projector.load()
    expected = {(m.topic, m.payload) for m in projector.snapshot_messages()}
    repair = Repair(projector)
    assert repair.total == N + len(projector.projections.riders.rows)
    slices: list[list[Outbound]] = []
    waits = iter([5, 0, 2_000, 0])  # in flight as each slice is due: one slice held back

    def in_flight() -> int:
        return next(waits, 0)

    asyncio.run(repair_states(repair, slices.append, in_flight, slice_size=50, max_in_flight=1_000))
    assert repair.done
    sent = [m for s in slices for m in s]
    assert slices[0][0].topic == topics.order_topic("s7", "o7", topics.OrderChannel.STATE)
    assert {(m.topic, m.payload) for m in sent} == expected and len(sent) == len(expected)
    projector.close()
