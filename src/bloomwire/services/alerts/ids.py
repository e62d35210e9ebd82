"""The alerts service's name, topic and deterministic ids: the same decision always gets the same
id, so the persister stores it once however often it is sent (docs/design.md §2)."""

from __future__ import annotations

import uuid
from typing import Final

from bloomwire.contract import topics
from bloomwire.services.alerts.rules import (
    AlertKey,
)

NAME: Final = "alerts"
#: ``services/alerts/events``: where every decision of this service goes.
EVENTS_TOPIC: Final = topics.service_events(NAME)
#: The CloudEvents ``source`` the persister expects on that topic (``services/alerts``).
SOURCE: Final = topics.parse_inbound(EVENTS_TOPIC).source
_NAMESPACE: Final = uuid.uuid5(uuid.NAMESPACE_URL, "https://bloomwire.invalid/alerts")

# --- deterministic ids ------------------------------------------------------------------------


def _uuid(*parts: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, "/".join(parts)))


def alert_id(key: AlertKey, raised_before: int) -> str:
    """The id of the alert raised for ``key`` after ``raised_before`` earlier alerts of that key."""
    rule, shop, order, rider = key
    return _uuid("alert", rule.value, shop, order or "", rider or "", str(raised_before))


def raised_event_id(alert: str) -> str:
    return _uuid("alert.raised", alert)


def escalated_event_id(alert: str, level: int) -> str:
    return _uuid("alert.escalated", alert, str(level))


def resolved_event_id(alert: str) -> str:
    return _uuid("alert.resolved", alert)


def followup_event_id(order: str) -> str:
    """The id of the follow-up chat line of ``order`` (one per order, ever)."""
    return _uuid("followup", order)
