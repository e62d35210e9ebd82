"""The alerts service against a real broker and store, on a simulated clock.

The persister and the alerts service run in-process in one event loop (a background thread);
orders move through the real MQTT path: the shop's create-order command, a test dispatch service
offering on ``services/<name>/events``, the rider's replies, statuses, positions and presence.
Simulated hours pass in seconds: both services read the same injectable clock, and the test waits
for the alerts service's ticks instead of sleeping. Nothing here asserts a duration.
"""

from __future__ import annotations

import asyncio
import json
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import sqlalchemy as sa

from bloomwire.app.bench.alerts import _order_row
from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.contract.events import AlertRule
from bloomwire.contract.lifecycle import FailureReason, OrderStatus
from bloomwire.errors import ConfigError, PayloadError
from bloomwire.runtime.settings import Settings
from bloomwire.services import alerts, persister
from bloomwire.services.alerts.config import RulesConfig
from bloomwire.services.alerts.rules import OrderView
from bloomwire.services.alerts.service import (
    AlertEngine,
    AlertsService,
    _readonly_engine,
    alert_id,
    followup_event_id,
    raised_event_id,
)
from bloomwire.store import make_engine, open_store
from bloomwire.store.models import ALERTS, CHAT, ORDERS

S = OrderStatus
START = datetime(2027, 2, 14, 9, 0, tzinfo=UTC)
TICK_S = 0.15
WAIT = 15.0

# --- harness ----------------------------------------------------------------------------------


class SimClock:
    """The simulated time both services read; the test moves it forward."""

    def __init__(self, start: datetime) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, **delta: float) -> datetime:
        with self._lock:
            self._now += timedelta(**delta)
            return self._now


class Backbone:
    """Persister and alerts in one event loop on a background thread; alerts can be restarted."""

    def __init__(
        self,
        persister_settings: Settings,
        alerts_settings: Settings,
        clock: SimClock,
        rules_path: Path | None,
    ) -> None:
        self.persister_settings = persister_settings
        self.alerts_settings = alerts_settings
        self.clock = clock
        self.rules_path = rules_path
        self.loop: asyncio.AbstractEventLoop | None = None
        self.alerts: AlertsService | None = None
        self._alerts_task: asyncio.Task[None] | None = None
        self._alerts_stop: asyncio.Event | None = None
        self._done: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="backbone", daemon=True)

    # --- in the loop ---

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self._error = exc
            self._started.set()

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        stop = asyncio.Event()
        service = persister.build(self.persister_settings, clock=self.clock)
        task = asyncio.create_task(service.run(self.persister_settings, stop=stop, install_signals=False))
        await _until(lambda: service.ready.is_set() or task.done())
        if task.done():
            await task
        await self._start_alerts()
        self._started.set()
        try:
            await self._done.wait()
        finally:
            await self._stop_alerts()
            stop.set()
            await task

    async def _start_alerts(self) -> None:
        self._alerts_stop = asyncio.Event()
        service = alerts.build(
            self.alerts_settings,
            clock=self.clock,
            rules_path=self.rules_path,
            tick_s=TICK_S,
            followup_s=TICK_S,
        )
        self._alerts_task = asyncio.create_task(
            service.run(self.alerts_settings, stop=self._alerts_stop, install_signals=False)
        )
        await _until(lambda: service.ready.is_set() or self._alerts_task is None or self._alerts_task.done())
        if self._alerts_task.done():
            await self._alerts_task
        self.alerts = service

    async def _stop_alerts(self) -> None:
        if self._alerts_stop is not None and self._alerts_task is not None:
            self._alerts_stop.set()
            await self._alerts_task
        self._alerts_task = self._alerts_stop = None
        self.alerts = None

    # --- from the test thread ---

    def start(self) -> None:
        self._thread.start()
        if not self._started.wait(60):
            raise TimeoutError("backbone did not start")
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        if self.loop is not None and self._done is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._done.set)
        self._thread.join(60)
        assert not self._thread.is_alive(), "backbone did not stop"
        if self._error is not None:
            raise self._error

    def _call(self, coro: Any) -> None:
        assert self.loop is not None
        asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def restart_alerts(self) -> AlertsService:
        """Stop the alerts service and start a new instance (nothing carried over but the store)."""
        self._call(self._stop_alerts())
        self._call(self._start_alerts())
        assert self.alerts is not None
        return self.alerts

    def stop_alerts(self) -> None:
        self._call(self._stop_alerts())

    def start_alerts(self) -> AlertsService:
        self._call(self._start_alerts())
        assert self.alerts is not None
        return self.alerts

    def wait_ticks(self, n: int = 2) -> None:
        """Wait until ``n`` more full ticks of the running alerts service have completed."""
        assert self.alerts is not None and self.alerts.engine is not None
        stats = self.alerts.engine.stats
        target = stats.ticks + n
        deadline = time.monotonic() + WAIT
        while stats.ticks < target:
            assert time.monotonic() < deadline, f"alerts service did not tick {n} times"
            time.sleep(0.02)

    def wait_followup_runs(self, n: int = 2) -> None:
        assert self.alerts is not None and self.alerts.engine is not None
        stats = self.alerts.engine.stats
        target = stats.followup_runs + n
        deadline = time.monotonic() + WAIT
        while stats.followup_runs < target:
            assert time.monotonic() < deadline, "alerts service did not look for follow-ups"
            time.sleep(0.02)


async def _until(cond: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.01)


@dataclass
class Seen:
    topic: str
    payload: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass
class Inbox:
    """Messages of one test client; ``take`` finds the next match, keeping the others for later."""

    client: Any
    backlog: list[Seen] = field(default_factory=list)

    def _pull(self, timeout: float) -> Seen | None:
        try:
            m: mqtt.MQTTMessage = self.client.messages.get(timeout=timeout)
        except queue.Empty:
            return None
        return Seen(m.topic, bytes(m.payload))

    def take(self, match: Callable[[Seen], bool], what: str, timeout: float = WAIT) -> Seen:
        for i, seen in enumerate(self.backlog):
            if match(seen):
                return self.backlog.pop(i)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            pulled = self._pull(left)
            if pulled is None:
                break
            if match(pulled):
                return pulled
            self.backlog.append(pulled)
        pytest.fail(f"never saw {what}; saw: {[(s.topic, s.payload[:160]) for s in self.backlog[-15:]]}")

    def none(self, match: Callable[[Seen], bool], what: str, wait: float = 0.3) -> None:
        found = [s for s in self.backlog if match(s)]
        deadline = time.monotonic() + wait
        while not found and (left := deadline - time.monotonic()) > 0:
            seen = self._pull(left)
            if seen is None:
                break
            self.backlog.append(seen)
            if match(seen):
                found.append(seen)
        assert not found, f"unexpected {what}: {found[0].payload!r}"


def _event(seen: Seen) -> Any:
    try:
        return ev.decode(seen.payload)
    except PayloadError:
        return None


class World:
    """The test's devices: a shop terminal, a dispatch service and riders, all over MQTT."""

    def __init__(
        self,
        backbone: Backbone,
        make_client: Callable[..., Any],
        mqtt_user: Callable[..., tuple[str, str]],
        database_url: str,
        *,
        token: str | None = None,
    ) -> None:
        self.backbone = backbone
        self.clock = backbone.clock
        token = token or secrets.token_hex(3)
        self.shop = f"shop-{token}"
        self.other_shop = f"shop2-{token}"
        self.dispatch = f"dispatch-{token}"
        self.token = token
        self._n = 0
        self._make_client = make_client
        self._mqtt_user = mqtt_user
        self.shop_client = self._client()
        self.shop_client.subscribe(topics.shop_filter(self.shop))
        self.inbox = Inbox(self.shop_client)
        self.devices = self._client()
        self.store = make_engine(database_url, readonly=True)

    def _client(self) -> Any:
        name, password = self._mqtt_user()
        return self._make_client(name, password)

    def close(self) -> None:
        self.store.dispose()

    def new_ids(self) -> tuple[str, str]:
        """A fresh (order, rider) pair."""
        self._n += 1
        return f"o-{self.token}-{self._n}", f"r-{self.token}-{self._n}"

    # --- publishing ---

    def _send(self, client: Any, topic: str, event: Any) -> None:
        client.publish(topic, ev.encode(event), qos=1)

    def status_seen(self, order: str, status: OrderStatus) -> ev.OrderStatusChangedEvent:
        topic = topics.order_topic(self.shop, order, topics.OrderChannel.STATUS)

        def match(s: Seen) -> bool:
            e = _event(s) if s.topic == topic else None
            return isinstance(e, ev.OrderStatusChangedEvent) and e.data.status is status

        found = self.inbox.take(match, f"{order} {status.value}")
        event = _event(found)
        assert isinstance(event, ev.OrderStatusChangedEvent)
        return event

    def create_order(self, order: str, *, start_in_min: float = 30, end_in_min: float = 90) -> None:
        now = self.clock()
        window = ev.Window(
            start=now + timedelta(minutes=start_in_min), end=now + timedelta(minutes=end_in_min)
        )
        event = ev.OrderCreateEvent(
            source=f"shops/{self.shop}",
            time=now,
            data=ev.OrderCreated(
                order=order,
                customer=ev.Customer(name="Ms Zhang", lat=52.5200, lon=13.4050, address="Torstr. 1"),
                window=window,
                items=["12 red roses"],
            ),
        )
        self._send(self.shop_client, topics.shop_command(self.shop, topics.Command.CREATE_ORDER), event)
        self.status_seen(order, S.CREATED)

    def offer(self, order: str, rider: str) -> None:
        now = self.clock()
        event = ev.DispatchOfferedEvent(
            source=f"services/{self.dispatch}",
            time=now,
            data=ev.DispatchOffer(
                offer=f"of-{order}-{rider}", order=order, rider=rider, deadline=now + timedelta(minutes=10)
            ),
        )
        self._send(self.devices, topics.service_events(self.dispatch), event)
        self.status_seen(order, S.ASSIGNED)

    def accept(self, order: str, rider: str) -> None:
        event = ev.DispatchReplyEvent(
            source=f"riders/{rider}",
            time=self.clock(),
            data=ev.DispatchReply(offer=f"of-{order}-{rider}", order=order, accept=True),
        )
        self._send(self.devices, topics.rider_replies(rider), event)
        self.status_seen(order, S.ACCEPTED)

    def rider_status(
        self, order: str, rider: str, status: OrderStatus, reason: FailureReason | None = None
    ) -> None:
        event = ev.OrderStatusChangedEvent(
            source=f"riders/{rider}",
            time=self.clock(),
            data=ev.OrderStatusChanged(order=order, status=status, reason=reason),
        )
        self._send(self.devices, topics.rider_order_status(rider, order), event)
        self.status_seen(order, status)

    def incident(self, order: str, rider: str, eta: datetime) -> None:
        event = ev.OrderIncidentReportedEvent(
            source=f"riders/{rider}",
            time=self.clock(),
            data=ev.OrderIncident(order=order, reason="traffic", eta=eta),
        )
        self._send(self.devices, topics.rider_order_status(rider, order), event)
        topic = topics.order_topic(self.shop, order, topics.OrderChannel.STATUS)
        self.inbox.take(lambda s: s.topic == topic and event.id in s.payload.decode(), "the incident")

    def location(self, order: str, rider: str) -> None:
        """A position fix now, near the customer; waits for the order's canonical location."""
        tst = int(self.clock().timestamp())
        event = ev.RiderLocationReportedEvent(
            source=f"riders/{rider}",
            time=self.clock(),
            data=ev.RiderLocation(lat=52.519, lon=13.404, tst=tst),
        )
        self._send(self.devices, topics.rider_location(rider), event)
        topic = topics.order_topic(self.shop, order, topics.OrderChannel.LOCATION)
        at = datetime.fromtimestamp(tst, tz=UTC)

        def match(s: Seen) -> bool:
            return s.topic == topic and datetime.fromisoformat(s.json["position"]["at"]) == at

        self.inbox.take(match, f"the position of {rider}")

    def presence(self, rider: str, status: ev.Presence) -> None:
        event = ev.RiderPresenceChangedEvent(
            source=f"riders/{rider}", time=self.clock(), data=ev.RiderPresence(status=status)
        )
        self._send(self.devices, topics.rider_presence(rider), event)

    def presence_seen(self, rider: str, status: ev.Presence) -> None:
        topic = topics.shop_rider_state(self.shop, rider)
        self.inbox.take(
            lambda s: s.topic == topic and s.json["presence"] == status.value, f"{rider} {status}"
        )

    def ack(self, alert: str, *, shop: str | None = None, client: Any = None) -> None:
        shop = shop or self.shop
        event = ev.AlertAcknowledgeEvent(
            source=f"shops/{shop}", time=self.clock(), data=ev.AlertAcknowledged(alert=alert, by="Anna")
        )
        self._send(client or self.shop_client, topics.shop_command(shop, topics.Command.ACK_ALERT), event)

    def on_the_way(self, order: str, rider: str, *, start_in_min: float = 30, end_in_min: float = 90) -> None:
        """Created, offered, accepted, picked up and en route, with a first position."""
        self.create_order(order, start_in_min=start_in_min, end_in_min=end_in_min)
        self.presence(rider, ev.Presence.ONLINE)
        self.offer(order, rider)
        self.accept(order, rider)
        self.rider_status(order, rider, S.PICKED_UP)
        self.rider_status(order, rider, S.EN_ROUTE)

    # --- the shop's alert feed ---

    def _alert_match(
        self,
        kind: type[Any],
        *,
        rule: AlertRule | None,
        order: str | None,
        rider: str | None,
        alert: str | None,
    ) -> Callable[[Seen], bool]:
        feed = topics.shop_alerts(self.shop)

        def match(s: Seen) -> bool:
            if s.topic != feed:
                return False
            e = _event(s)
            if not isinstance(e, kind):
                return False
            d = e.data
            if alert is not None and d.alert != alert:
                return False
            if isinstance(e, ev.AlertRaisedEvent):
                return (
                    (rule is None or d.rule is rule)
                    and (order is None or d.order == order)
                    and (rider is None or d.rider == rider)
                )
            return True

        return match

    def expect(
        self,
        kind: type[Any],
        *,
        rule: AlertRule | None = None,
        order: str | None = None,
        rider: str | None = None,
        alert: str | None = None,
    ) -> Any:
        what = f"{kind.__name__} rule={rule} order={order} rider={rider} alert={alert}"
        seen = self.inbox.take(
            self._alert_match(kind, rule=rule, order=order, rider=rider, alert=alert), what
        )
        return _event(seen)

    def expect_none(
        self,
        kind: type[Any],
        *,
        rule: AlertRule | None = None,
        order: str | None = None,
        rider: str | None = None,
        alert: str | None = None,
        wait: float = 0.3,
    ) -> None:
        match = self._alert_match(kind, rule=rule, order=order, rider=rider, alert=alert)
        self.inbox.none(match, f"{kind.__name__} ({rule}, {order}, {rider}, {alert})", wait)

    def error_seen(self, shop: str, contains: str, client: Any = None) -> str:
        inbox = self.inbox if client is None else Inbox(client)
        topic = topics.shop_errors(shop)
        seen = inbox.take(lambda s: s.topic == topic and contains in s.json["reason"], f"error '{contains}'")
        reason: str = seen.json["reason"]
        return reason

    # --- the store ---

    def alert_rows(self, rule: AlertRule, order: str | None = None, rider: str | None = None) -> list[Any]:
        query = sa.select(ALERTS).where(ALERTS.c.rule == rule.value, ALERTS.c.shop == self.shop)
        if order is not None:
            query = query.where(ALERTS.c.order_id == order)
        if rider is not None:
            query = query.where(ALERTS.c.rider == rider)
        with self.store.connect() as conn:
            return list(conn.execute(query.order_by(ALERTS.c.raised_at)).all())

    def chat_rows(self, order: str) -> list[Any]:
        with self.store.connect() as conn:
            return list(conn.execute(sa.select(CHAT).where(CHAT.c.order_id == order)).all())


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    path = tmp_path / "rules.toml"
    path.write_text("[defaults]\nescalate_after_min = 15\nfollowup_after_h = 2\n", encoding="utf-8")
    return path


@pytest.fixture
def world(
    database_url: str,
    make_settings: Callable[..., Settings],
    mqtt_user: Callable[..., tuple[str, str]],
    mqtt_client: Callable[..., Any],
    rules_file: Path,
) -> Iterator[World]:
    clock = SimClock(START)
    backbone = Backbone(
        make_settings(None, database_url=database_url),
        make_settings(None, database_url=database_url),
        clock,
        rules_file,
    )
    backbone.start()
    w: World | None = None
    try:
        w = World(backbone, mqtt_client, mqtt_user, database_url)
        yield w
    finally:
        if w is not None:
            w.close()
        backbone.close()


# --- the seven rules --------------------------------------------------------------------------


def test_unassigned_raised_once_escalated_acknowledged_resolved(world: World) -> None:
    w = world
    order, rider = w.new_ids()
    w.create_order(order)
    w.backbone.wait_ticks()
    w.expect_none(ev.AlertRaisedEvent, order=order)

    w.clock.advance(minutes=11)
    raised = w.expect(ev.AlertRaisedEvent, rule=AlertRule.UNASSIGNED, order=order)
    assert raised.data.shop == w.shop and raised.data.severity is ev.Severity.WARNING
    assert "has waited 11 min for a rider" in raised.data.message
    alert = raised.data.alert
    # also on the order's own alert topic
    order_alerts = topics.order_topic(w.shop, order, topics.OrderChannel.ALERTS)
    w.inbox.take(lambda s: s.topic == order_alerts and alert in s.payload.decode(), "the order alert")

    # No duplicate while the condition holds.
    w.clock.advance(minutes=1)
    w.backbone.wait_ticks(3)
    w.expect_none(ev.AlertRaisedEvent, order=order)
    assert len(w.alert_rows(AlertRule.UNASSIGNED, order)) == 1

    # Unacknowledged for more than escalate_after: re-notified once per period, level + 1.
    w.clock.advance(minutes=15)
    escalated = w.expect(ev.AlertEscalatedEvent, alert=alert)
    assert escalated.data.level == 1
    w.backbone.wait_ticks(3)
    w.expect_none(ev.AlertEscalatedEvent, alert=alert)
    w.clock.advance(minutes=16)
    assert w.expect(ev.AlertEscalatedEvent, alert=alert).data.level == 2

    # The shop acknowledges it: no more escalations.
    w.ack(alert)
    acked = w.expect(ev.AlertAcknowledgedEvent, alert=alert)
    assert acked.data.by == "Anna"
    w.clock.advance(minutes=20)
    w.backbone.wait_ticks(3)
    w.expect_none(ev.AlertEscalatedEvent, alert=alert)
    [row] = w.alert_rows(AlertRule.UNASSIGNED, order)
    assert (row.status, row.level, row.acknowledged_by) == ("acknowledged", 2, "Anna")

    # A rider accepts: the condition clears and the alert resolves (edge-triggered).
    w.offer(order, rider)
    w.accept(order, rider)
    resolved = w.expect(ev.AlertResolvedEvent, alert=alert)
    assert "accepted" in resolved.data.reason
    [row] = w.alert_rows(AlertRule.UNASSIGNED, order)
    assert row.status == "resolved"


def test_ack_refused_for_unknown_alert_and_other_shop(world: World, mqtt_client: Any, mqtt_user: Any) -> None:
    w = world
    order, _ = w.new_ids()
    w.create_order(order)
    w.clock.advance(minutes=11)
    alert = w.expect(ev.AlertRaisedEvent, rule=AlertRule.UNASSIGNED, order=order).data.alert

    w.ack("no-such-alert")
    assert "unknown alert 'no-such-alert'" in w.error_seen(w.shop, "unknown alert")

    name, password = mqtt_user()
    other = mqtt_client(name, password)
    other.subscribe(topics.shop_filter(w.other_shop))
    w.ack(alert, shop=w.other_shop, client=other)
    reason = w.error_seen(w.other_shop, "does not belong", client=other)
    assert f"does not belong to shop '{w.other_shop}'" in reason

    w.expect_none(ev.AlertAcknowledgedEvent, alert=alert)
    [row] = w.alert_rows(AlertRule.UNASSIGNED, order)
    assert row.status == "open"


def test_overdue_raised_then_resolved_on_delivery(world: World) -> None:
    w = world
    order, rider = w.new_ids()
    w.on_the_way(order, rider, start_in_min=0, end_in_min=30)
    w.location(order, rider)
    w.clock.advance(minutes=36)
    raised = w.expect(ev.AlertRaisedEvent, rule=AlertRule.OVERDUE, order=order)
    assert raised.data.severity is ev.Severity.CRITICAL
    assert "past its promise" in raised.data.message
    w.backbone.wait_ticks(3)
    w.expect_none(ev.AlertRaisedEvent, rule=AlertRule.OVERDUE, order=order)

    w.rider_status(order, rider, S.DELIVERED)
    w.expect(ev.AlertResolvedEvent, alert=raised.data.alert)
    assert [r.status for r in w.alert_rows(AlertRule.OVERDUE, order)] == ["resolved"]


def test_eta_slip_raised_resolved_and_raised_again_as_a_new_alert(world: World) -> None:
    w = world
    order, rider = w.new_ids()
    w.on_the_way(order, rider, start_in_min=0, end_in_min=60)
    window_end = w.clock() + timedelta(minutes=60)

    w.incident(order, rider, eta=window_end + timedelta(minutes=20))
    first = w.expect(ev.AlertRaisedEvent, rule=AlertRule.ETA_SLIP, order=order)
    assert "will be about 20 min late" in first.data.message

    w.incident(order, rider, eta=window_end - timedelta(minutes=10))
    w.expect(ev.AlertResolvedEvent, alert=first.data.alert)

    w.incident(order, rider, eta=window_end + timedelta(minutes=30))
    second = w.expect(ev.AlertRaisedEvent, rule=AlertRule.ETA_SLIP, order=order)
    assert second.data.alert != first.data.alert
    rows = w.alert_rows(AlertRule.ETA_SLIP, order)
    assert [(r.id, r.status) for r in rows] == [(first.data.alert, "resolved"), (second.data.alert, "open")]


def test_stale_position_raised_and_resolved_by_a_new_fix(world: World) -> None:
    w = world
    order, rider = w.new_ids()
    w.on_the_way(order, rider)
    w.location(order, rider)
    w.clock.advance(minutes=6)
    raised = w.expect(ev.AlertRaisedEvent, rule=AlertRule.STALE_POSITION, order=order, rider=rider)
    assert "No position from rider" in raised.data.message
    w.backbone.wait_ticks(3)
    w.expect_none(ev.AlertRaisedEvent, rule=AlertRule.STALE_POSITION, order=order)

    w.location(order, rider)  # positions are not status events: the tick resolves it
    w.expect(ev.AlertResolvedEvent, alert=raised.data.alert)
    assert [r.status for r in w.alert_rows(AlertRule.STALE_POSITION, order, rider)] == ["resolved"]


def test_rider_offline_raised_and_resolved_when_back_online(world: World) -> None:
    w = world
    order, rider = w.new_ids()
    w.on_the_way(order, rider)
    w.location(order, rider)
    w.presence(rider, ev.Presence.OFFLINE)
    w.presence_seen(rider, ev.Presence.OFFLINE)
    w.backbone.wait_ticks()
    w.expect_none(ev.AlertRaisedEvent, rule=AlertRule.RIDER_OFFLINE)  # not before rider_offline_min

    w.clock.advance(minutes=3)
    w.location(order, rider)  # a late fix from the phone's queue: keeps stale_position out
    raised = w.expect(ev.AlertRaisedEvent, rule=AlertRule.RIDER_OFFLINE, rider=rider)
    assert raised.data.order is None
    assert f"while carrying order {order}" in raised.data.message
    w.backbone.wait_ticks(3)
    w.expect_none(ev.AlertRaisedEvent, rule=AlertRule.RIDER_OFFLINE, rider=rider)

    w.presence(rider, ev.Presence.ONLINE)
    w.expect(ev.AlertResolvedEvent, alert=raised.data.alert)
    assert [r.status for r in w.alert_rows(AlertRule.RIDER_OFFLINE, rider=rider)] == ["resolved"]


def test_customer_unreachable_then_returned_becomes_delivery_failed(world: World) -> None:
    w = world
    order, rider = w.new_ids()
    w.on_the_way(order, rider)
    w.rider_status(order, rider, S.ARRIVED)
    w.rider_status(order, rider, S.FAILED, reason=FailureReason.CUSTOMER_UNREACHABLE)
    unreachable = w.expect(ev.AlertRaisedEvent, rule=AlertRule.CUSTOMER_UNREACHABLE, order=order)
    assert "cannot reach Ms Zhang" in unreachable.data.message
    w.backbone.wait_ticks(3)
    w.expect_none(ev.AlertRaisedEvent, order=order, rule=AlertRule.CUSTOMER_UNREACHABLE)
    w.expect_none(ev.AlertRaisedEvent, order=order, rule=AlertRule.DELIVERY_FAILED)

    w.rider_status(order, rider, S.RETURNED)
    w.expect(ev.AlertResolvedEvent, alert=unreachable.data.alert)
    failed = w.expect(ev.AlertRaisedEvent, rule=AlertRule.DELIVERY_FAILED, order=order)
    assert "was returned to the shop" in failed.data.message


def test_delivery_failed_raised_once_even_across_an_alerts_restart(world: World) -> None:
    w = world
    order, rider = w.new_ids()
    w.on_the_way(order, rider)
    w.rider_status(order, rider, S.FAILED, reason=FailureReason.ADDRESS_WRONG)
    raised = w.expect(ev.AlertRaisedEvent, rule=AlertRule.DELIVERY_FAILED, order=order)
    assert "address wrong" in raised.data.message

    restarted = w.backbone.restart_alerts()
    w.backbone.wait_ticks(3)
    w.expect_none(ev.AlertRaisedEvent, order=order)
    assert restarted.engine is not None and restarted.engine.stats.raised == 0
    assert len(w.alert_rows(AlertRule.DELIVERY_FAILED, order)) == 1


# --- follow-up ------------------------------------------------------------------------------


def test_followup_sent_once_after_delivery_across_restarts(world: World) -> None:
    w = world
    order, rider = w.new_ids()
    w.on_the_way(order, rider)
    w.rider_status(order, rider, S.DELIVERED)
    chat = topics.order_topic(w.shop, order, topics.OrderChannel.CHAT)

    w.backbone.wait_followup_runs()
    w.inbox.none(lambda s: s.topic == chat, "an early follow-up")

    # Down while it becomes due: the next instance derives it from the store.
    w.backbone.stop_alerts()
    w.clock.advance(hours=2, minutes=1)
    second = w.backbone.start_alerts()
    line = w.inbox.take(lambda s: s.topic == chat, "the follow-up")
    sent = ev.decode(line.payload)
    assert isinstance(sent, ev.OrderChatPostedEvent)
    assert sent.id == followup_event_id(order)
    assert sent.data.text == "How were the flowers? Reply here if anything was not perfect."
    assert sent.data.author.startswith(f"shop:{w.shop}")
    [row] = w.chat_rows(order)
    assert (row.author_role, row.id) == ("shop", followup_event_id(order))
    assert second.engine is not None and second.engine.stats.followups == 1

    # Another restart: the store says it was sent; nothing goes out again.
    third = w.backbone.restart_alerts()
    w.clock.advance(minutes=30)
    w.backbone.wait_followup_runs(3)
    assert third.engine is not None and third.engine.stats.followups == 0

    # Even a double send is one line: the persister dedupes the deterministic event id.
    w._send(w.devices, topics.service_events(alerts.NAME), sent.model_copy(update={"time": w.clock()}))
    w.backbone.wait_followup_runs(2)
    w.inbox.none(lambda s: s.topic == chat, "a second follow-up", wait=0.5)
    assert len(w.chat_rows(order)) == 1


# --- configuration ----------------------------------------------------------------------------


def test_shop_override_of_a_threshold(
    database_url: str,
    make_settings: Callable[..., Settings],
    mqtt_user: Callable[..., tuple[str, str]],
    mqtt_client: Callable[..., Any],
    tmp_path: Path,
) -> None:
    clock = SimClock(START)
    path = tmp_path / "shop.toml"
    backbone = Backbone(
        make_settings(None, database_url=database_url),
        make_settings(None, database_url=database_url),
        clock,
        path,
    )
    token = secrets.token_hex(3)
    path.write_text(f'[shops."shop-{token}"]\nunassigned_min = 3\n', encoding="utf-8")
    backbone.start()
    w: World | None = None
    try:
        w = World(backbone, mqtt_client, mqtt_user, database_url, token=token)
        order, _ = w.new_ids()
        w.create_order(order)
        w.clock.advance(minutes=4)
        raised = w.expect(ev.AlertRaisedEvent, rule=AlertRule.UNASSIGNED, order=order)
        assert "has waited 4 min" in raised.data.message
    finally:
        if w is not None:
            w.close()
        backbone.close()


def test_broken_rules_file_stops_start_up_naming_line_and_key(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text("[defaults]\nunassigned_min = 10\nstale_posiiton_min = 5\n", encoding="utf-8")
    settings = Settings(data_dir=tmp_path)
    with pytest.raises(ConfigError) as caught:
        alerts.build(settings, rules_path=path)
    message = str(caught.value)
    assert "line 3" in message and "stale_posiiton_min" in message and "stale_position_min" in message

    path.write_text("[defaults]\nunassigned_min = -1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"line 2: key 'unassigned_min' .* must be a positive number"):
        alerts.build(settings, rules_path=path)


# --- the engine's bookkeeping, without a broker ---------------------------------------------------


@dataclass
class _Sink:
    sent: list[Any] = field(default_factory=list)

    def __call__(self, topic: str, payload: bytes) -> None:
        assert topic == topics.service_events(alerts.NAME)
        self.sent.append(ev.decode(payload))

    def take(self) -> list[Any]:
        out, self.sent = self.sent, []
        return out


def _store_with_waiting_order(
    tmp_path: Path, *, alerts_rows: Sequence[dict[str, Any]] = (), more_orders: Sequence[str] = ()
) -> str:
    """A store with order o1 (shop s1) waiting for a rider since START, and more such orders
    created 10 minutes later."""
    url = f"sqlite:///{tmp_path / 'engine.db'}"
    engine = open_store(url)
    orders = [
        OrderView(
            id=oid,
            shop="s1",
            status=S.CREATED,
            customer_name="Ms Zhang",
            window_start=START + timedelta(hours=1),
            window_end=START + timedelta(hours=2),
            created_at=START + timedelta(minutes=10 if oid != "o1" else 0),
            updated_at=START,
        )
        for oid in ("o1", *more_orders)
    ]
    with engine.begin() as conn:
        conn.execute(ORDERS.insert(), [_order_row(o) for o in orders])
        if alerts_rows:
            conn.execute(ALERTS.insert(), list(alerts_rows))
    engine.dispose()
    return url


def _alert_row(alert: str, *, status: str = "open", raised_min: float = 11, level: int = 0) -> dict[str, Any]:
    return {
        "id": alert,
        "rule": "unassigned",
        "severity": "warning",
        "shop": "s1",
        "order_id": "o1",
        "rider": None,
        "message": "waiting",
        "action": "",
        "status": status,
        "level": level,
        "raised_at": START + timedelta(minutes=raised_min),
        "escalated_at": None,
        "acknowledged_at": None,
        "acknowledged_by": None,
        "resolved_at": None,
    }


def _engine(url: str, clock: SimClock, sink: _Sink, grace_s: float = 30.0) -> AlertEngine:
    return AlertEngine(_readonly_engine(url), RulesConfig(), sink, clock=clock, grace_s=grace_s)


def test_engine_does_not_raise_twice_while_the_store_lags_and_resends_the_same_ids(tmp_path: Path) -> None:
    url = _store_with_waiting_order(tmp_path)
    clock, sink = SimClock(START + timedelta(minutes=11)), _Sink()
    core = _engine(url, clock, sink)

    async def run() -> None:
        try:
            assert await core.tick()
            [first] = sink.take()
            assert isinstance(first, ev.AlertRaisedEvent) and first.data.rule is AlertRule.UNASSIGNED
            key = (AlertRule.UNASSIGNED, "s1", "o1", None)
            assert first.data.alert == alert_id(key, 0) and first.id == raised_event_id(first.data.alert)
            # The persister has not stored it yet: the overlay keeps it open, no second alert.
            assert await core.tick()
            assert sink.take() == []
            # Past the grace period it is sent again, with the same ids (the persister dedupes).
            core.grace_s = 0.0
            assert await core.tick()
            [again] = sink.take()
            assert (again.id, again.data.alert) == (first.id, first.data.alert)
        finally:
            core.engine.dispose()

    asyncio.run(run())


def test_engine_resolves_extra_open_alerts_of_one_key_and_escalates_from_the_store(tmp_path: Path) -> None:
    url = _store_with_waiting_order(
        tmp_path,
        alerts_rows=[_alert_row("a-old", raised_min=11), _alert_row("a-new", raised_min=12)],
    )
    clock, sink = SimClock(START + timedelta(minutes=20)), _Sink()
    core = _engine(url, clock, sink)

    async def run() -> None:
        try:
            assert await core.tick()
            [resolved] = sink.take()
            assert isinstance(resolved, ev.AlertResolvedEvent)
            assert resolved.data.alert == "a-new" and "duplicate of alert a-old" in resolved.data.reason
            assert core.book[(AlertRule.UNASSIGNED, "s1", "o1", None)].id == "a-old"
            assert await core.tick()
            assert sink.take() == []  # the pending resolve is not sent again
            clock.advance(minutes=7)  # raised at +11 min, now +27: unacknowledged for 16 min
            assert await core.tick()
            [escalated] = sink.take()
            assert isinstance(escalated, ev.AlertEscalatedEvent)
            assert (escalated.data.alert, escalated.data.level) == ("a-old", 1)
        finally:
            core.engine.dispose()

    asyncio.run(run())


def test_engine_edge_evaluation_only_touches_what_it_read(tmp_path: Path) -> None:
    url = _store_with_waiting_order(tmp_path, more_orders=["o2"])
    clock, sink = SimClock(START + timedelta(minutes=11)), _Sink()
    core = _engine(url, clock, sink)

    async def run() -> None:
        try:
            assert await core.tick()
            [raised] = sink.take()
            assert raised.data.order == "o1"  # o2 has waited 1 minute only
            # An event about o2 (nothing to say about it) must not resolve o1's alert.
            core.apply(await asyncio.to_thread(core.read_subjects, [("order", "o2")]))
            assert sink.take() == []
            # A read older than the last tick is ignored: the tick already knew more.
            stale = await asyncio.to_thread(core.read_subjects, [("order", "o1")])
            clock.advance(minutes=1)
            assert await core.tick()
            core.apply(replace(stale, findings={}))  # would resolve o1's alert if applied
            assert sink.take() == []
            assert (AlertRule.UNASSIGNED, "s1", "o1", None) in core.book
        finally:
            core.engine.dispose()

    asyncio.run(run())
