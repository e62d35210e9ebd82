"""Alerts: raised, escalated and resolved by the alerts service, acknowledged by their shop."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.contract.topics import InboundTopic
from bloomwire.services.persister.projections import Projections
from bloomwire.services.persister.rows import Alert
from bloomwire.services.persister.work import RefusedError, UnitOfWork


def raised(p: Projections, work: UnitOfWork, where: InboundTopic, event: ev.AlertRaisedEvent) -> None:
    """A new alert, open."""
    d = event.data
    if p.alerts.get(d.alert) is not None:
        raise RefusedError(f"alert {d.alert!r} already exists")
    alert = Alert(
        id=d.alert,
        rule=d.rule.value,
        severity=d.severity.value,
        shop=d.shop,
        order_id=d.order,
        rider=d.rider,
        message=d.message,
        action=d.action,
        raised_at=event.time,
    )
    work.add(p.alerts, alert)
    _said(p, work, alert, event)


def _unresolved(p: Projections, alert_id: str) -> Alert:
    alert = p.alerts.get(alert_id)
    if alert is None:
        raise RefusedError(f"unknown alert {alert_id!r}")
    if alert.status == "resolved":
        raise RefusedError(f"alert {alert_id!r} is already resolved")
    return alert


def escalated(p: Projections, work: UnitOfWork, where: InboundTopic, event: ev.AlertEscalatedEvent) -> None:
    """An alert raised a level."""
    alert = _unresolved(p, event.data.alert)
    work.change(p.alerts, alert, level=event.data.level, escalated_at=event.time)
    _said(p, work, alert, event)


def resolved(p: Projections, work: UnitOfWork, where: InboundTopic, event: ev.AlertResolvedEvent) -> None:
    """An alert over (it leaves memory after the commit)."""
    alert = _unresolved(p, event.data.alert)
    work.change(p.alerts, alert, status="resolved", resolved_at=event.time)
    _said(p, work, alert, event)


def acknowledged(
    p: Projections, work: UnitOfWork, where: InboundTopic, event: ev.AlertAcknowledgedEvent
) -> None:
    """The shop has seen its open alert."""
    d = event.data
    alert = p.alerts.get(d.alert)
    if alert is None:
        raise RefusedError(f"unknown alert {d.alert!r}")
    if alert.shop != where.sender:
        raise RefusedError(f"alert {d.alert!r} does not belong to shop {where.sender!r}")
    if alert.status != "open":
        raise RefusedError(f"alert {d.alert!r} is already {alert.status}")
    by = d.by or where.sender
    work.change(p.alerts, alert, status="acknowledged", acknowledged_at=event.time, acknowledged_by=by)
    _said(p, work, alert, event)


def _said(p: Projections, work: UnitOfWork, alert: Alert, event: Any) -> None:
    """Index the alert's new status; publish the event to its shop and on its order."""
    p.index_alert(alert)
    payload = ev.encode(event)
    work.publish(topics.shop_alerts(alert.shop), payload)
    order = p.orders.get(alert.order_id) if alert.order_id else None
    if order is not None:
        work.publish(topics.order_topic(order.shop, order.id, topics.OrderChannel.ALERTS), payload)
        work.states[order.id] = None


HANDLERS: Mapping[type[ev._Envelope], Callable[[Projections, UnitOfWork, InboundTopic, Any], None]] = {
    ev.AlertRaisedEvent: raised,
    ev.AlertEscalatedEvent: escalated,
    ev.AlertResolvedEvent: resolved,
    ev.AlertAcknowledgedEvent: acknowledged,
}
