"""Every table of the store, in one module. The persister is their only writer.

``events`` is append-only and keyed by the sender's event id (the idempotency key); the other
tables are projections the persister keeps in step with it in the same transaction.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, DateTime, Index, Integer, Table, Text
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite would hand back naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use timezone-aware UTC")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _ts(*, nullable: bool = True, index: bool = False) -> Any:
    return Field(default=None, sa_column=Column(UTCDateTime(), nullable=nullable, index=index))


class EventRow(SQLModel, table=True):
    """One accepted event, exactly once."""

    __tablename__ = "events"

    seq: int | None = Field(
        default=None,
        sa_column=Column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    )
    id: str = Field(max_length=128, unique=True)
    type: str = Field(max_length=40, index=True)
    source: str = Field(max_length=200)
    topic: str = Field(max_length=512)
    shop: str | None = Field(default=None, max_length=64)
    order_id: str | None = Field(default=None, max_length=64, index=True)
    rider: str | None = Field(default=None, max_length=64)
    time: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    recorded_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class OrderRow(SQLModel, table=True):
    """Current state of an order (projection of its events)."""

    __tablename__ = "orders"
    __table_args__ = (Index("ix_orders_shop_status", "shop", "status"),)

    id: str = Field(primary_key=True, max_length=64)
    shop: str = Field(max_length=64)
    status: str = Field(max_length=20, index=True)
    rider: str | None = Field(default=None, max_length=64, index=True)
    customer_name: str = ""
    customer_phone: str = ""
    address: str = ""
    lat: float = 0.0
    lon: float = 0.0
    pickup_lat: float | None = None
    pickup_lon: float | None = None
    items: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    note: str = ""
    customer_username: str | None = Field(default=None, max_length=64, index=True)
    window_start: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    window_end: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    eta: datetime | None = _ts()
    failure_reason: str | None = None
    offer_id: str | None = Field(default=None, max_length=64)
    offer_deadline: datetime | None = _ts()
    declined_by: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    assigned_at: datetime | None = _ts()
    accepted_at: datetime | None = _ts()
    picked_up_at: datetime | None = _ts()
    en_route_at: datetime | None = _ts()
    arrived_at: datetime | None = _ts()
    delivered_at: datetime | None = _ts()
    closed_at: datetime | None = _ts(index=True)
    #: The customer's rating once delivered (1-5; the events row ``order.rated`` is its record).
    rating: int | None = None
    rating_comment: str = ""
    #: Issue 18: how to hand the order over (an ``InstructionKind`` and free text), a second
    #: number to try, and the last amendment as the retained state shows it (``AmendmentNote``;
    #: the ``order.amended`` events are the record of every change).
    instructions: str = Field(default="none", sa_column=Column(Text, nullable=False, server_default="none"))
    instructions_text: str = Field(default="", sa_column=Column(Text, nullable=False, server_default=""))
    alternate_contact: str = Field(default="", sa_column=Column(Text, nullable=False, server_default=""))
    last_amendment: dict[str, Any] | None = Field(
        default=None, sa_column=Column(JSON(none_as_null=True), nullable=True)
    )
    #: Proof of delivery (issue 16, migration 0008): the code the customer gives the rider,
    #: whether ``delivered`` needs it, the wrong codes entered so far, the delivery photo (a
    #: ``PhotoRef``: its content address in the photo store, ``store/photos.py``).
    handover_code: str | None = Field(default=None, max_length=8)
    handover_code_required: bool = False
    handover_failures: int = 0
    photo: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    #: The customer's language (``contract.events.Language``), the shop's when the order named none.
    language: str = Field(default="en", max_length=16)
    #: The last notice told its customer (``OrderNotice`` and ``at``), for its retained state.
    notice: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    updated_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))


class RiderRow(SQLModel, table=True):
    """A rider's presence, position and load."""

    __tablename__ = "riders"

    id: str = Field(primary_key=True, max_length=64)
    presence: str = "offline"
    presence_at: datetime | None = _ts()
    on_duty: bool = True
    capacity: int = 3
    load: int = 0
    lat: float | None = None
    lon: float | None = None
    speed_kmh: float | None = None
    position_at: datetime | None = _ts()
    last_decline_at: datetime | None = _ts()
    idle_since: datetime | None = _ts()
    updated_at: datetime | None = _ts()


class TrailPoint(SQLModel, table=True):
    """A down-sampled position of the rider carrying an order."""

    __tablename__ = "trail_points"

    id: int | None = Field(default=None, primary_key=True)
    order_id: str = Field(max_length=64, index=True)
    rider: str = Field(max_length=64)
    lat: float
    lon: float
    at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))


class ChatLine(SQLModel, table=True):
    """A chat line on an order, from any party.

    Keyed by (order, time, event id) and, on SQLite, stored without a rowid: an order's lines
    sit together in the order they were said, so a batch of lines dirties about one page per
    order instead of two random pages per line. The event id is unique in ``events`` already.
    """

    __tablename__ = "chat_lines"
    __table_args__ = {"sqlite_with_rowid": False}

    order_id: str = Field(primary_key=True, max_length=64)
    at: datetime = Field(sa_column=Column(UTCDateTime(), primary_key=True, nullable=False))
    id: str = Field(primary_key=True, max_length=128)
    shop: str = Field(max_length=64)
    author_role: str = Field(max_length=20)
    author: str = Field(max_length=200)
    text: str = Field(sa_column=Column(Text, nullable=False))


class OfferRow(SQLModel, table=True):
    """An offer of an order to a rider, and what became of it."""

    __tablename__ = "offers"

    id: str = Field(primary_key=True, max_length=64)
    order_id: str = Field(max_length=64, index=True)
    rider: str = Field(max_length=64, index=True)
    status: str = Field(default="pending", max_length=20)
    mode: str = Field(default="single", max_length=20)
    cost: float = 0.0
    candidates: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    deadline: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    created_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    closed_at: datetime | None = _ts()


class AlertRow(SQLModel, table=True):
    """An alert raised by the alerts service: open, acknowledged or resolved."""

    __tablename__ = "alerts"
    __table_args__ = (Index("ix_alerts_rule_subject", "rule", "order_id", "rider"),)

    id: str = Field(primary_key=True, max_length=64)
    rule: str = Field(max_length=40)
    severity: str = Field(max_length=20)
    shop: str = Field(max_length=64, index=True)
    order_id: str | None = Field(default=None, max_length=64, index=True)
    rider: str | None = Field(default=None, max_length=64)
    message: str = Field(sa_column=Column(Text, nullable=False))
    action: str = ""
    status: str = Field(default="open", max_length=20, index=True)
    level: int = 0
    raised_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False))
    escalated_at: datetime | None = _ts()
    acknowledged_at: datetime | None = _ts()
    acknowledged_by: str | None = None
    resolved_at: datetime | None = _ts()


class DeadLetter(SQLModel, table=True):
    """A refused message: where it came from, why, and its bytes."""

    __tablename__ = "dead_letters"

    id: int | None = Field(default=None, primary_key=True)
    received_at: datetime = Field(sa_column=Column(UTCDateTime(), nullable=False, index=True))
    topic: str = Field(max_length=1024)
    event_id: str | None = Field(default=None, max_length=128)
    sender: str | None = Field(default=None, max_length=200)
    reason: str = Field(sa_column=Column(Text, nullable=False))
    payload: str = Field(sa_column=Column(Text, nullable=False))


# Core tables, for the hot paths that bypass the ORM (the persister's batches, readers' scans).
EVENTS: Table = EventRow.__table__  # type: ignore[attr-defined]
ORDERS: Table = OrderRow.__table__  # type: ignore[attr-defined]
RIDERS: Table = RiderRow.__table__  # type: ignore[attr-defined]
TRAIL: Table = TrailPoint.__table__  # type: ignore[attr-defined]
CHAT: Table = ChatLine.__table__  # type: ignore[attr-defined]
OFFERS: Table = OfferRow.__table__  # type: ignore[attr-defined]
ALERTS: Table = AlertRow.__table__  # type: ignore[attr-defined]
DEAD_LETTERS: Table = DeadLetter.__table__  # type: ignore[attr-defined]
