"""The book of alerts that are not resolved, as the service believes them: what the store holds
plus the changes it sent that the store may not show yet (docs in :mod:`.engine`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Final

from bloomwire.services.alerts.rules import (
    AlertKey,
)
from bloomwire.services.alerts.watch import Subject

OPEN: Final = "open"
ACKNOWLEDGED: Final = "acknowledged"


@dataclass(frozen=True, slots=True)
class Tracked:
    """An alert that is not resolved (open or acknowledged)."""

    id: str
    key: AlertKey
    status: str
    level: int
    #: When the shop was last told: raised_at, or escalated_at after an escalation.
    notified_at: datetime


@dataclass(slots=True)
class Change:
    """A change the store may not show yet; ``target`` None means resolved."""

    key: AlertKey
    target: Tracked | None
    at: float  # time.monotonic()


def merge(row: Tracked, newer: Tracked) -> Tracked:
    """Statuses and levels only move forward: acknowledged wins, the higher level wins."""
    status = ACKNOWLEDGED if ACKNOWLEDGED in (row.status, newer.status) else OPEN
    return Tracked(
        row.id, row.key, status, max(row.level, newer.level), max(row.notified_at, newer.notified_at)
    )


def reflects(row: Tracked | None, change: Change) -> bool:
    """True if the store's ``row`` (None: not open) already shows ``change``."""
    if change.target is None:
        return row is None
    if row is None:
        return False
    return row.level >= change.target.level and (change.target.status == OPEN or row.status == ACKNOWLEDGED)


def subject_of(key: AlertKey) -> Subject:
    _, _, order, rider = key
    return ("order", order) if order is not None else ("rider", rider or "")
