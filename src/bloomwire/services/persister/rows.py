"""The rows the persister keeps in memory: one typed class per projected table.

Each class has exactly its table's columns (``store/models.py``), so a row is read with
``Order(**mapping)`` and written back column by column.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(slots=True, eq=False)
class Order:
    """An order (``orders``): what the shop created, where it stands, who carries it."""

    id: str
    shop: str
    status: str
    window_start: datetime
    window_end: datetime
    created_at: datetime
    updated_at: datetime
    rider: str | None = None
    customer_name: str = ""
    customer_phone: str = ""
    address: str = ""
    lat: float = 0.0
    lon: float = 0.0
    pickup_lat: float | None = None
    pickup_lon: float | None = None
    items: list[str] = field(default_factory=list)
    note: str = ""
    customer_username: str | None = None
    eta: datetime | None = None
    failure_reason: str | None = None
    offer_id: str | None = None
    offer_deadline: datetime | None = None
    declined_by: list[str] = field(default_factory=list)
    assigned_at: datetime | None = None
    accepted_at: datetime | None = None
    picked_up_at: datetime | None = None
    en_route_at: datetime | None = None
    arrived_at: datetime | None = None
    delivered_at: datetime | None = None
    closed_at: datetime | None = None
    rating: int | None = None
    rating_comment: str = ""
    instructions: str = "none"
    instructions_text: str = ""
    alternate_contact: str = ""
    last_amendment: dict[str, Any] | None = None
    handover_code: str | None = None
    handover_code_required: bool = False
    handover_failures: int = 0
    photo: dict[str, Any] | None = None
    language: str = "en"
    notice: dict[str, Any] | None = None


@dataclass(slots=True, eq=False)
class Rider:
    """A rider (``riders``): presence, capacity and load, last position."""

    id: str
    presence: str = "offline"
    presence_at: datetime | None = None
    on_duty: bool = True
    capacity: int = 3
    load: int = 0
    lat: float | None = None
    lon: float | None = None
    speed_kmh: float | None = None
    position_at: datetime | None = None
    last_decline_at: datetime | None = None
    idle_since: datetime | None = None
    updated_at: datetime | None = None


@dataclass(slots=True, eq=False)
class Offer:
    """A dispatch offer (``offers``): one order to one rider until a deadline."""

    id: str
    order_id: str
    rider: str
    deadline: datetime
    created_at: datetime
    status: str = "pending"
    mode: str = "single"
    cost: float = 0.0
    candidates: list[dict[str, Any]] = field(default_factory=list)
    closed_at: datetime | None = None


@dataclass(slots=True, eq=False)
class Alert:
    """An alert (``alerts``): raised by the alerts service, acknowledged by a shop, resolved."""

    id: str
    rule: str
    severity: str
    shop: str
    message: str
    raised_at: datetime
    order_id: str | None = None
    rider: str | None = None
    action: str = ""
    status: str = "open"
    level: int = 0
    escalated_at: datetime | None = None
    acknowledged_at: datetime | None = None
    acknowledged_by: str | None = None
    resolved_at: datetime | None = None
