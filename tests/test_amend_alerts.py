"""Amendments and the alert rules (issue 18): the rules judge the new window at once, and an
alert the change made moot is resolved, saying so. The persister and the alerts service run on a
simulated clock against a real broker and store (the harness of tests/test_alerts_service.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from test_alerts_service import START, Backbone, Seen, SimClock, World, _event

from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.contract.events import AlertRule
from bloomwire.runtime.settings import Settings


@pytest.fixture
def world(
    database_url: str,
    make_settings: Callable[..., Settings],
    mqtt_user: Callable[..., tuple[str, str]],
    mqtt_client: Callable[..., Any],
    tmp_path: Path,
) -> Iterator[World]:
    rules = tmp_path / "rules.toml"
    rules.write_text("[defaults]\nescalate_after_min = 15\n", encoding="utf-8")
    settings = make_settings(None, database_url=database_url)
    backbone = Backbone(settings, make_settings(None, database_url=database_url), SimClock(START), rules)
    backbone.start()
    w: World | None = None
    try:
        w = World(backbone, mqtt_client, mqtt_user, database_url)
        yield w
    finally:
        if w is not None:
            w.close()
        backbone.close()


def amend_window(w: World, order: str, end: datetime) -> None:
    """The shop moves the window's end (at the customer's request); waits for the stored amendment."""
    event = ev.OrderAmendEvent(
        source=f"shops/{w.shop}",
        time=w.clock(),
        data=ev.OrderAmendment(order=order, window_end=end, asked_by="customer", reason="she is late home"),
    )
    w.shop_client.publish(topics.shop_command(w.shop, topics.Command.AMEND_ORDER), ev.encode(event), qos=1)
    status = topics.order_topic(w.shop, order, topics.OrderChannel.STATUS)

    def match(s: Seen) -> bool:
        e = _event(s) if s.topic == status else None
        return isinstance(e, ev.OrderAmendedEvent) and e.id == event.id

    w.inbox.take(match, f"the amendment of {order}")


def test_a_later_window_moves_the_overdue_alert_to_the_new_end(world: World) -> None:
    w = world
    order, rider = w.new_ids()
    w.on_the_way(order, rider, start_in_min=0, end_in_min=30)
    w.location(order, rider)
    amend_window(w, order, w.clock() + timedelta(minutes=60))

    w.clock.advance(minutes=36)  # past the old end and its grace: nothing, the promise moved
    w.backbone.wait_ticks(3)
    w.expect_none(ev.AlertRaisedEvent, rule=AlertRule.OVERDUE, order=order)
    assert w.alert_rows(AlertRule.OVERDUE, order) == []

    w.clock.advance(minutes=30)  # past the new end and its grace
    raised = w.expect(ev.AlertRaisedEvent, rule=AlertRule.OVERDUE, order=order)
    assert "past its promise" in raised.data.message


def test_an_overdue_alert_the_amendment_made_moot_is_resolved(world: World) -> None:
    w = world
    order, rider = w.new_ids()
    w.on_the_way(order, rider, start_in_min=0, end_in_min=30)
    w.location(order, rider)
    w.clock.advance(minutes=36)
    raised = w.expect(ev.AlertRaisedEvent, rule=AlertRule.OVERDUE, order=order)

    amend_window(w, order, w.clock() + timedelta(minutes=45))
    resolved = w.expect(ev.AlertResolvedEvent, alert=raised.data.alert)
    assert "amended (window_end)" in resolved.data.reason
    assert [r.status for r in w.alert_rows(AlertRule.OVERDUE, order)] == ["resolved"]
