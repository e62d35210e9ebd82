"""The simulator: the seeded plan decides every outcome; a short real run ends exactly as planned."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import datetime
from functools import partial
from pathlib import Path

import pytest
import sqlalchemy as sa
from test_clients import service_online

from bloomwire.app.simulate import Fate, Rates, SimConfig, Simulation, plan_day
from bloomwire.app.simulate.clock import SimClock
from bloomwire.app.simulate.plan import BERLIN_BOX, outcome_of, rename
from bloomwire.app.supervisor import Stack
from bloomwire.contract import geo
from bloomwire.runtime.broker import ensure_secret
from bloomwire.runtime.settings import Settings
from bloomwire.store import make_engine
from bloomwire.store.models import EVENTS, ORDERS

#: A seed whose 6-order day has every fate and the time-only incidents (checked below).
RICH_SEED = 3
RICH_RATES = Rates(
    cancel=0.2,
    unreachable=0.2,
    address_wrong=0.15,
    flat_tyre=0.4,
    app_dies=0.4,
    decline=0.4,
    customer_chat=0.5,
)


def test_same_seed_same_day_and_outcomes() -> None:
    a = plan_day(42, orders=40, riders=8, shops=4)
    b = plan_day(42, orders=40, riders=8, shops=4)
    assert a == b
    assert a.outcomes() == b.outcomes()
    c = plan_day(43, orders=40, riders=8, shops=4)
    assert c.outcomes() != a.outcomes() or [o.lat for o in c.orders] != [o.lat for o in a.orders]


def test_order_prefix_changes_ids_only() -> None:
    plain = plan_day(9, orders=10)
    tagged = plan_day(9, orders=10, order_prefix="run2-")
    assert [o.id for o in tagged.orders] == [f"run2-{o.id}" for o in plain.orders]
    assert [o.outcome for o in tagged.orders] == [o.outcome for o in plain.orders]
    assert [dataclasses.replace(o, id="x") for o in tagged.orders] == [
        dataclasses.replace(o, id="x") for o in plain.orders
    ]


def test_plan_is_a_plausible_berlin_day() -> None:
    plan = plan_day(7, orders=200, riders=10, shops=6, day_minutes=480)
    south, west, north, east = BERLIN_BOX
    assert len({r.id for r in plan.riders}) == 10
    for rider in plan.riders:
        assert 15 <= rider.speed_kmh <= 25
        assert (rider.vehicle == "scooter") == (rider.speed_kmh >= 20)
    created = [o.created_min for o in plan.orders]
    assert created == sorted(created) and created[0] >= 0 and created[-1] <= 480 * 0.8
    for o in plan.orders:
        assert south <= o.lat <= north and west <= o.lon <= east
        shop = plan.shop(o.shop)
        assert 700 <= geo.distance_m(shop.lat, shop.lon, o.lat, o.lon) <= 4600
        assert o.created_min < o.ready_min < o.window_end_min
        assert o.window_start_min % 15 == 0 and o.window_end_min > o.window_start_min
        if o.fate is Fate.CANCELLED:
            assert o.cancel_after_min is not None and o.flat_tyre_delay_min is None
        if o.fate is Fate.UNREACHABLE:
            assert o.customer_chat is None


def test_rates_shape_the_outcomes() -> None:
    plan = plan_day(1, orders=3000, rates=Rates(cancel=0.1, unreachable=0.05, address_wrong=0.02))
    counts = plan.outcome_counts()
    assert counts["cancelled"] == pytest.approx(300, rel=0.2)
    assert counts["failed:customer_unreachable"] == pytest.approx(150, rel=0.25)
    assert counts["failed:address_wrong"] == pytest.approx(60, rel=0.35)
    quiet = plan_day(1, orders=200, rates=Rates(0, 0, 0, 0, 0, 0, 0))
    assert set(quiet.outcome_counts()) == {"delivered"}
    assert all(o.flat_tyre_delay_min is None and not o.decline_first for o in quiet.orders)


def test_rename_keeps_the_day() -> None:
    plan = plan_day(4, orders=30, riders=3, shops=2)
    named = rename(plan, ["s1", "s2"], ["r1", "r2", "r3"])
    assert [s.id for s in named.shops] == ["s1", "s2"] and [r.id for r in named.riders] == ["r1", "r2", "r3"]
    assert {o.shop for o in named.orders} <= {"s1", "s2"}
    assert named.outcomes() == plan.outcomes()
    with pytest.raises(ValueError, match="1 shop id"):
        rename(plan, ["s1"])


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="flat_tyre must be between 0 and 1"):
        Rates(flat_tyre=1.5)
    with pytest.raises(ValueError, match="more than 1"):
        Rates(cancel=0.5, unreachable=0.4, address_wrong=0.2)
    with pytest.raises(ValueError, match="shops"):
        plan_day(1, shops=7)
    with pytest.raises(ValueError, match="at least 30 minutes"):
        plan_day(1, day_minutes=10)


def test_outcome_of_final_status() -> None:
    assert outcome_of("delivered", None) == "delivered"
    assert outcome_of("returned", "customer_unreachable") == Fate.UNREACHABLE.value
    assert outcome_of("failed", "address_wrong") == Fate.ADDRESS_WRONG.value
    assert outcome_of("cancelled", None) == "cancelled"


def test_clock_maps_simulated_minutes_to_real_time() -> None:
    clock = SimClock(speed=300.0, day_start=datetime(2027, 2, 14, 10, 0))
    clock.t0 = 1_000_000.0
    assert clock.real_at(60).timestamp() == pytest.approx(1_000_012.0)  # 60 sim min = 12 real s
    assert clock.real_seconds(5) == pytest.approx(1.0)
    assert clock.label(90) == "11:30"
    assert clock.label_of(clock.real_at(125)) == "12:05"
    with pytest.raises(ValueError):
        SimClock(0, datetime(2027, 1, 1))


def test_rich_seed_covers_every_kind_of_day() -> None:
    plan = plan_day(RICH_SEED, orders=6, riders=3, shops=2, rates=RICH_RATES)
    fates = {o.fate for o in plan.orders}
    assert Fate.DELIVERED in fates and Fate.CANCELLED in fates
    assert fates & {Fate.UNREACHABLE, Fate.ADDRESS_WRONG}
    assert any(o.app_dies_down_min for o in plan.orders if o.fate is not Fate.CANCELLED)
    assert any(o.flat_tyre_delay_min for o in plan.orders)


@pytest.mark.timeout(240)
def test_short_run_ends_exactly_as_planned(tmp_path: Path) -> None:
    """Real broker, real persister, real clients: every order ends as the seed planned."""
    plan = plan_day(RICH_SEED, orders=6, riders=3, shops=2, rates=RICH_RATES)
    settings = Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'store.db'}")
    stack = Stack(settings, services=("persister",), extra_users=Simulation.users(plan))
    try:
        live = stack.start_broker()
        stack.start_service("persister")
        asyncio.run(service_online(live, "persister", ensure_secret(tmp_path, "operator")))
        config = SimConfig(minutes=0.5, assign="shop", outbox_dir=tmp_path / "outboxes", drain_grace_s=60)
        sim = Simulation(live, plan, config, partial(ensure_secret, tmp_path))
        result = asyncio.run(sim.run())
    finally:
        stack.stop()
    assert result.mismatches() == [], (result.outcomes, plan.outcomes())
    assert result.outcomes == plan.outcomes()
    assert result.foreign_messages == 0
    assert result.metrics.counters["rider apps died"] >= 1
    assert sum(result.unacked.values()) == 0
    engine = make_engine(settings.database_url, readonly=True)
    try:
        with engine.connect() as conn:
            stored = {r[0] for r in conn.execute(sa.select(EVENTS.c.id))}
            final = dict(conn.execute(sa.select(ORDERS.c.id, ORDERS.c.status)).all())
    finally:
        engine.dispose()
    assert set(result.metrics.events) <= stored  # every event of record the clients sent is stored
    assert set(final) == {o.id for o in plan.orders}
    assert all(status in ("delivered", "returned", "cancelled") for status in final.values())
