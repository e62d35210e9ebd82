"""The demo's amendments (issue 18): a short simulated day through a real broker and persister in
which the shops change a few orders (a later window, a corrected address on the way, "leave it
at the door"), the riders confirm what they must, and every order still ends as planned."""

from __future__ import annotations

import asyncio
from functools import partial
from pathlib import Path

import sqlalchemy as sa
from test_clients import service_online

from bloomwire.app.simulate import SimConfig, Simulation, plan_day
from bloomwire.app.simulate.amends import Scene, scenes
from bloomwire.app.supervisor import Stack
from bloomwire.runtime.broker import ensure_secret
from bloomwire.runtime.settings import Settings
from bloomwire.store import make_engine
from bloomwire.store.models import EVENTS

SEED = 3  # an 8-order day with each scene once (checked below)


def test_a_short_day_amends_a_few_orders_and_ends_as_planned(tmp_path: Path) -> None:
    plan = plan_day(SEED, orders=8, riders=3, shops=2)
    planned = scenes(plan.orders)
    assert sorted(planned.values()) == sorted(Scene)
    settings = Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'store.db'}")
    stack = Stack(settings, services=("persister",), extra_users=Simulation.users(plan))
    try:
        live = stack.start_broker()
        stack.start_service("persister")
        asyncio.run(service_online(live, "persister", ensure_secret(tmp_path, "operator")))
        config = SimConfig(minutes=0.5, assign="shop", outbox_dir=tmp_path / "outboxes", drain_grace_s=60)
        result = asyncio.run(Simulation(live, plan, config, partial(ensure_secret, tmp_path)).run())
    finally:
        stack.stop()
    assert result.outcomes == plan.outcomes(), result.mismatches()
    assert result.metrics.counters["orders amended"] == 3
    engine = make_engine(settings.database_url, readonly=True)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.select(EVENTS.c.type, EVENTS.c.order_id, EVENTS.c.data)).all()
    finally:
        engine.dispose()
    amended = {r.order_id: r.data for r in rows if r.type == "order.amended"}
    assert set(amended) == set(planned)
    for order, scene in planned.items():
        changed = set(amended[order]["changes"])
        expected = {
            Scene.LATER_WINDOW: {"window_end"},
            Scene.NEW_ADDRESS: {"address"},
            Scene.LEAVE_AT_DOOR: {"instructions", "alternate_contact"},
        }[scene]
        assert changed == expected, (scene, changed)
    confirmed = {r.order_id for r in rows if r.type == "order.amendment_confirmed"}
    assert confirmed == {o for o, s in planned.items() if s is not Scene.LATER_WINDOW}
