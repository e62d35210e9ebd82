"""Every payload of the contract (docs/design.md §2): one pydantic model per event ``type``.

Messages are CloudEvents in structured mode. :data:`Event` is the discriminated union on ``type``;
:func:`decode` and :func:`encode` are the only JSON entry and exit points.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Final, Literal, TypeAlias

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic_core import ErrorDetails

from bloomwire.contract.lifecycle import RIDER_REPORTABLE, FailureReason, OrderStatus
from bloomwire.contract.topics import Command, Identity, InboundKind, InboundTopic, check_id
from bloomwire.contract.validate import (
    MAX_DEPTH,
    TEXT_GUARD,
    TEXT_PATTERN,
    UTC_LIMITS,
    Count,
    Instant,
    Number,
    TimeBounds,
    check_depth,
    check_epoch,
    check_eta,
    check_time,
    text_problem,
    utc_problem,
)
from bloomwire.errors import PayloadError

#: Largest payload accepted anywhere (the broker's ``max_packet_size`` is a little above it).
MAX_PAYLOAD_BYTES = 64 * 1024
SPECVERSION: Final = "1.0"

Id = Annotated[str, AfterValidator(check_id)]
EVENT_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$"
EventId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=EVENT_ID_PATTERN)]
_EVENT_ID = re.compile(EVENT_ID_PATTERN.replace("*$", "{0,127}"))


def is_event_id(value: object) -> bool:
    """Whether ``value`` is a well-formed event id (safe to echo in a refusal and to store)."""
    return isinstance(value, str) and _EVENT_ID.fullmatch(value) is not None


# Every inbound text field ends with TEXT_GUARD (no control characters but \n and \t, no lone
# surrogates): tests/test_contract_guards.py checks that no model forgets it.
Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000), TEXT_GUARD]
ShortText = Annotated[str, StringConstraints(strip_whitespace=True, max_length=500), TEXT_GUARD]
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200), TEXT_GUARD]
Label = Annotated[str, StringConstraints(max_length=200), TEXT_GUARD]
Latitude = Annotated[Number, Field(ge=-90, le=90)]
Longitude = Annotated[Number, Field(ge=-180, le=180)]
Flag = Annotated[bool, Strict()]
_CODE = re.compile(r"[0-9]{4,8}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _match(pattern: re.Pattern[str], what: str) -> AfterValidator:
    def check(value: str) -> str:
        if not pattern.fullmatch(value):
            raise ValueError(f"{what} must be {pattern.pattern}")
        return value

    return AfterValidator(check)


#: An order's handover code as the customer reads it out (digits; see the proof block below).
HandoverCode = Annotated[
    str, StringConstraints(strip_whitespace=True, max_length=8), TEXT_GUARD, _match(_CODE, "a handover code")
]


def now() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def new_id() -> str:
    """A fresh event id: a UUIDv7 (RFC 9562), random but ordered by creation time.

    Ids are the store's unique key; random ones (UUID4) land on a random page of its index,
    so a commit of N events rewrote N pages of it. Time-ordered ids share the last few pages.
    """
    millis = (time.time_ns() // 1_000_000) & ((1 << 48) - 1)
    rand = int.from_bytes(os.urandom(10), "big")  # 74 of its 80 bits are used
    rand_a, rand_b = (rand >> 62) & 0xFFF, rand & ((1 << 62) - 1)
    # 48 bits of milliseconds, version 7, 12 random bits, variant 0b10, 62 random bits
    return str(uuid.UUID(int=(millis << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b))


class _Data(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- data models ------------------------------------------------------------------------------


class Language(StrEnum):
    """A customer's language (issue 16): notices and pages speak it; the shop's is the default."""

    EN = "en"
    ZH_CN = "zh-CN"


class Customer(_Data):
    name: Name
    phone: Annotated[str, StringConstraints(max_length=40), TEXT_GUARD] = ""
    address: ShortText = ""
    lat: Latitude
    lon: Longitude


class Place(_Data):
    """A point a rider rides to, with its street address when known."""

    lat: Latitude
    lon: Longitude
    address: ShortText = ""


class Window(_Data):
    """The promised delivery window."""

    start: Instant
    end: Instant

    @model_validator(mode="after")
    def _ordered(self) -> Window:
        if self.end <= self.start:
            raise ValueError("promised window end must be after its start")
        if (self.end - self.start).total_seconds() > 24 * 3600:
            raise ValueError("promised window may not be longer than 24 hours")
        return self


class OrderCreated(_Data):
    order: Id
    customer: Customer
    window: Window
    items: list[Label] = Field(default_factory=list, max_length=50)
    note: ShortText = ""
    pickup_lat: Latitude | None = None
    pickup_lon: Longitude | None = None
    #: Filled in by the backbone: the customer's MQTT username for this order.
    customer_username: Id | None = None
    #: The rider must enter the order's handover code to report it delivered (issue 16).
    handover_code_required: Flag = False
    #: The customer's language; absent: the shop's (``Settings.shop_language``).
    language: Language | None = None


class OrderCancelled(_Data):
    order: Id
    reason: ShortText = ""


class OrderStatusChanged(_Data):
    order: Id
    status: OrderStatus
    reason: FailureReason | None = None
    note: ShortText = ""
    #: Filled in by the backbone on canonical events: the rider holding the order.
    rider: Id | None = None
    #: The handover code the customer gave the rider (``delivered`` only; never published).
    code: HandoverCode | None = None

    @model_validator(mode="after")
    def _reason(self) -> OrderStatusChanged:
        if self.status is OrderStatus.FAILED and self.reason is None:
            raise ValueError("a failed delivery needs a reason")
        return self


class OrderIncident(_Data):
    """Something slowed the delivery down (flat tyre, traffic); not a status."""

    order: Id
    reason: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100), TEXT_GUARD]
    eta: Instant | None = None
    note: ShortText = ""


class OrderChat(_Data):
    order: Id | None = None
    text: Text
    #: Set by the backbone from the topic: rider, shop, customer or service.
    author: Label = ""


class OrderRating(_Data):
    """A customer rates its delivered order: 1 to 5 stars, with an optional comment."""

    #: The customer's own order; the backbone fills it in from the customer's access when absent.
    order: Id | None = None
    stars: Annotated[int, Strict(), Field(ge=1, le=5)]
    comment: ShortText = ""


class OrderAssigned(_Data):
    """A shop assigns (or reassigns) an order to a named rider."""

    order: Id
    rider: Id
    note: ShortText = ""


class RiderLocation(_Data):
    """A position, OwnTracks field names (``vel`` in km/h, ``tst`` epoch seconds)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    lat: Latitude
    lon: Longitude
    tst: Count = Field(ge=0)
    acc: Number | None = Field(default=None, ge=0)
    vel: Number | None = Field(default=None, ge=0, le=400)
    cog: Number | None = Field(default=None, ge=0, le=360)
    batt: Count | None = Field(default=None, ge=0, le=100)


class RiderRegionChanged(_Data):
    """A rider's phone entered or left one of its regions (an OwnTracks ``transition``)."""

    event: Literal["enter", "leave"]
    #: The region's name on the phone (OwnTracks ``desc``) and its id (``rid``), when given.
    region: ShortText = ""
    region_id: Annotated[str, StringConstraints(max_length=100)] | None = None
    #: The device that saw it (the last level of ``owntracks/R/DEVICE``).
    device: Id
    #: Where the phone was, and how sure it was (metres).
    lat: Latitude
    lon: Longitude
    acc: float | None = Field(default=None, ge=0)
    #: OwnTracks ``t``: ``c`` a circular region, ``b`` a beacon, ``l`` from a location.
    trigger: Annotated[str, StringConstraints(max_length=10)] | None = None


class Presence(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"


class RiderPresence(_Data):
    status: Presence
    on_duty: Flag | None = None
    capacity: Count | None = Field(default=None, ge=1, le=20)


class Candidate(_Data):
    rider: Id
    cost: Number
    travel_s: Number = 0.0
    load: Count = 0
    note: Annotated[str, TEXT_GUARD] = ""


class DispatchOffer(_Data):
    offer: Id
    order: Id
    rider: Id
    deadline: Instant
    cost: Number = 0.0
    mode: Literal["single", "batch", "manual"] = "single"
    candidates: list[Candidate] = Field(default_factory=list, max_length=50)
    #: Where to collect the order (absent when the shop gave no pickup point).
    pickup: Place | None = None
    #: Where to deliver it.
    dropoff: Place | None = None


class DispatchReply(_Data):
    offer: Id
    order: Id
    accept: Flag
    reason: ShortText = ""


class DispatchExpired(_Data):
    offer: Id
    order: Id
    rider: Id


class AlertRule(StrEnum):
    OVERDUE = "overdue"
    ETA_SLIP = "eta_slip"
    STALE_POSITION = "stale_position"
    RIDER_OFFLINE = "rider_offline"
    UNASSIGNED = "unassigned"
    CUSTOMER_UNREACHABLE = "customer_unreachable"
    DELIVERY_FAILED = "delivery_failed"
    #: The customer's chat needs a person at the shop (raised by the assistant service).
    NEEDS_PERSON = "needs_person"
    #: A rider entered a wrong handover code too many times (issue 16).
    HANDOVER_CODE = "handover_code"


#: Rules the assistant raises and resolves; the alerts service leaves their alerts alone.
ASSISTANT_RULES: Final = frozenset({AlertRule.NEEDS_PERSON})


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class AlertRaised(_Data):
    alert: Id
    rule: AlertRule
    severity: Severity
    shop: Id
    order: Id | None = None
    rider: Id | None = None
    message: Text
    action: ShortText = ""


class AlertEscalated(_Data):
    alert: Id
    level: Count = Field(ge=1)
    message: ShortText = ""


class AlertResolved(_Data):
    alert: Id
    reason: ShortText = ""


class AlertAcknowledged(_Data):
    alert: Id
    by: Label = ""


# --- proof of delivery (issue 16): the handover code and the delivery photo ---------------------

#: Photo formats a rider's device may send, as Pillow names them -> their media type.
PHOTO_FORMATS: Final = {"JPEG": "image/jpeg", "PNG": "image/png"}
Sha256 = Annotated[str, StringConstraints(max_length=64), TEXT_GUARD, _match(_SHA256, "a sha256")]


class PhotoRef(_Data):
    """A stored delivery photo: its content address and what it is."""

    sha256: Sha256
    content_type: Literal["image/jpeg", "image/png"]
    width: Count = Field(ge=1)
    height: Count = Field(ge=1)
    size: Count = Field(ge=1)


class OrderPhoto(_Data):
    """The rider's photo of a delivery, checked and stored by the backbone."""

    order: Id
    photo: PhotoRef


# --- notices (issue 16): what the backbone tells a customer without being asked -------------------


class NoticeKind(StrEnum):
    """What a notice says: the order's steps a customer cares about, and a delay before it bites."""

    PICKED_UP = "picked_up"
    ON_THE_WAY = "on_the_way"
    ARRIVING = "arriving"
    DELAYED = "delayed"
    DELIVERED = "delivered"
    FAILED = "failed"
    # --- told (#18): an amendment, what changed and why ---
    AMENDED = "amended"


class OrderNotice(_Data):
    """A notice to the order's customer, in its language; the shop sees the same."""

    order: Id
    kind: NoticeKind
    language: Language
    #: The sentence, from the notices service's templates in ``language``.
    text: Text
    #: The arrival estimate it speaks of (on the way, arriving, delayed).
    eta: Instant | None = None
    #: Why it is late (delayed: the incident's reason, ``traffic``, ``late``), why it failed.
    reason: ShortText = ""


# --- envelopes --------------------------------------------------------------------------------


class _Envelope(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    specversion: Literal["1.0"] = SPECVERSION
    id: EventId = Field(default_factory=new_id)
    #: Who sent it: ``riders/R``, ``shops/S``, ``customers/C`` or ``services/N`` (the topic's sender).
    source: Annotated[str, StringConstraints(min_length=1, max_length=200), TEXT_GUARD]
    #: Required on the wire (:func:`decode`); the defaults serve producers building a model.
    time: Instant = Field(default_factory=now)
    subject: Label | None = None
    datacontenttype: Literal["application/json"] | None = None


class OrderCreatedEvent(_Envelope):
    type: Literal["order.created"] = "order.created"
    data: OrderCreated


class OrderCancelledEvent(_Envelope):
    type: Literal["order.cancelled"] = "order.cancelled"
    data: OrderCancelled


class OrderStatusChangedEvent(_Envelope):
    type: Literal["order.status_changed"] = "order.status_changed"
    data: OrderStatusChanged


class OrderIncidentReportedEvent(_Envelope):
    type: Literal["order.incident_reported"] = "order.incident_reported"
    data: OrderIncident


class OrderChatPostedEvent(_Envelope):
    type: Literal["order.chat_posted"] = "order.chat_posted"
    data: OrderChat


class OrderRatedEvent(_Envelope):
    type: Literal["order.rated"] = "order.rated"
    data: OrderRating


class OrderPhotoAttachedEvent(_Envelope):
    """A delivery photo was stored (issue 16). Made by the backbone from the rider's binary
    payload on ``riders/R/orders/O/photo``: its id is :func:`photo_event_id`, so a re-send is
    the same event."""

    type: Literal["order.photo_attached"] = "order.photo_attached"
    data: OrderPhoto


def photo_event_id(rider: str, order: str, sha256: str) -> str:
    """The id of a photo's ``order.photo_attached``: what the rider's device waits to see acked."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"bloomwire/photo/{rider}/{order}/{sha256}"))


class StateNotice(OrderNotice):
    """The last notice of an order, in its retained state: what was said, and when."""

    at: Instant


class OrderNotifiedEvent(_Envelope):
    """Sent by the notices service (uuid5 ids: at most one per order and kind [and key]);
    stored by the persister and published on the order's status topic."""

    type: Literal["order.notified"] = "order.notified"
    data: OrderNotice


class OrderAssignedEvent(_Envelope):
    type: Literal["order.assigned"] = "order.assigned"
    data: OrderAssigned


class RiderLocationReportedEvent(_Envelope):
    type: Literal["rider.location_reported"] = "rider.location_reported"
    data: RiderLocation


class RiderRegionChangedEvent(_Envelope):
    """``subject``: the order it is about, set by the backbone: the carried order whose destination
    the region is, else the rider's only carried order (kept out of ``data``, the phone's own
    report, so that a re-send is the same event)."""

    type: Literal["rider.region_changed"] = "rider.region_changed"
    data: RiderRegionChanged


class RiderPresenceChangedEvent(_Envelope):
    type: Literal["rider.presence_changed"] = "rider.presence_changed"
    data: RiderPresence


class DispatchOfferedEvent(_Envelope):
    type: Literal["dispatch.offered"] = "dispatch.offered"
    data: DispatchOffer


class DispatchRepliedEvent(_Envelope):
    """The rider's accept or decline, as recorded (the fact of a ``dispatch.reply``)."""

    type: Literal["dispatch.replied"] = "dispatch.replied"
    data: DispatchReply


class DispatchExpiredEvent(_Envelope):
    type: Literal["dispatch.expired"] = "dispatch.expired"
    data: DispatchExpired


class AlertRaisedEvent(_Envelope):
    type: Literal["alert.raised"] = "alert.raised"
    data: AlertRaised


class AlertEscalatedEvent(_Envelope):
    type: Literal["alert.escalated"] = "alert.escalated"
    data: AlertEscalated


class AlertResolvedEvent(_Envelope):
    type: Literal["alert.resolved"] = "alert.resolved"
    data: AlertResolved


class AlertAcknowledgedEvent(_Envelope):
    type: Literal["alert.acknowledged"] = "alert.acknowledged"
    data: AlertAcknowledged


# --- requests: what a shop or rider asks, and the persister may refuse ----------------------------
#
# Imperative names. Never stored nor published under their own name: once the persister accepts
# one, it records and publishes the fact it asks for (:data:`FACT_OF`, :func:`fact_of`).


class OrderCreateEvent(_Envelope):
    """A shop asks for a new order (recorded as ``order.created``)."""

    type: Literal["order.create"] = "order.create"
    data: OrderCreated


class OrderCancelEvent(_Envelope):
    """A shop asks to cancel one of its orders (recorded as ``order.cancelled``)."""

    type: Literal["order.cancel"] = "order.cancel"
    data: OrderCancelled


class OrderAssignEvent(_Envelope):
    """A shop asks to offer an order to a named rider (recorded as ``order.assigned``)."""

    type: Literal["order.assign"] = "order.assign"
    data: OrderAssigned


class OrderRateEvent(_Envelope):
    """A customer rates its delivered order (recorded as ``order.rated``)."""

    type: Literal["order.rate"] = "order.rate"
    data: OrderRating


class AlertAcknowledgeEvent(_Envelope):
    """A shop acknowledges one of its open alerts (recorded as ``alert.acknowledged``)."""

    type: Literal["alert.acknowledge"] = "alert.acknowledge"
    data: AlertAcknowledged


class DispatchReplyEvent(_Envelope):
    """A rider accepts or declines an offer (recorded as ``dispatch.replied``)."""

    type: Literal["dispatch.reply"] = "dispatch.reply"
    data: DispatchReply


# --- order amendments (issue 18): a shop changes an order after it is placed ----------------------


class InstructionKind(StrEnum):
    """How the rider hands the order over (a first-class field; ``other``: the text says)."""

    NONE = "none"
    CALL_FIRST = "call_first"
    LEAVE_AT_DOOR = "leave_at_door"
    HAND_TO_RECEPTION = "hand_to_reception"
    OTHER = "other"


class Instructions(_Data):
    """Delivery instructions: a kind, and free text (required for ``other``)."""

    kind: InstructionKind = InstructionKind.NONE
    text: ShortText = ""

    @model_validator(mode="after")
    def _text(self) -> Instructions:
        if self.kind is InstructionKind.OTHER and not self.text:
            raise ValueError("instructions of kind 'other' need a text")
        return self


class AmendField(StrEnum):
    """What an amendment may change; the keys of :attr:`OrderAmendment.changes`."""

    WINDOW_START = "window_start"
    WINDOW_END = "window_end"
    ADDRESS = "address"
    POSITION = "position"
    ITEMS = "items"
    NOTE = "note"
    CUSTOMER_PHONE = "customer_phone"
    ALTERNATE_CONTACT = "alternate_contact"
    INSTRUCTIONS = "instructions"


#: Fields the rider is told the values of (never the customer's numbers, docs/design.md §4).
RIDER_SEES: Final = frozenset(AmendField) - {AmendField.CUSTOMER_PHONE, AmendField.ALTERNATE_CONTACT}
#: A change of these after pick-up asks the rider to confirm it (issue 18).
RIDER_CONFIRMS: Final = frozenset({AmendField.ADDRESS, AmendField.POSITION, AmendField.INSTRUCTIONS})


class FieldChange(_Data):
    """One changed field: its value before and after (JSON values; a window bound as RFC 3339)."""

    old: Any = None
    new: Any = None


Phone = Annotated[str, StringConstraints(strip_whitespace=True, max_length=40), TEXT_GUARD]


class OrderAmendment(_Data):
    """A shop changes its order: only the fields given change (``None``: unchanged).

    ``asked_by`` says whose wish it is (the customer asks through chat; the shop decides and
    sends it). ``changes`` is filled in by the backbone: each field that changed, old and new.
    """

    order: Id
    window_start: Instant | None = None
    window_end: Instant | None = None
    address: ShortText | None = None
    lat: Latitude | None = None
    lon: Longitude | None = None
    items: list[Label] | None = Field(default=None, max_length=50)
    note: ShortText | None = None
    customer_phone: Phone | None = None
    alternate_contact: ShortText | None = None
    instructions: Instructions | None = None
    asked_by: Literal["shop", "customer"] = "shop"
    reason: ShortText = ""
    changes: dict[AmendField, FieldChange] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _position(self) -> OrderAmendment:
        if (self.lat is None) != (self.lon is None):
            raise ValueError("a new position needs both lat and lon")
        return self


class AmendmentConfirmation(_Data):
    """A rider confirms it has seen an amendment (the id of the ``order.amended`` event)."""

    order: Id
    amendment: EventId
    note: ShortText = ""
    #: Filled in by the backbone: the rider who confirmed.
    rider: Id | None = None


class AmendmentNote(BaseModel):
    """The last amendment of an order, in its retained state."""

    id: str
    at: datetime
    fields: list[str]
    asked_by: str = "shop"
    reason: str = ""
    #: Which rider confirmed it, and when (an address or instructions change after pick-up).
    confirmed_by: str | None = None
    confirmed_at: datetime | None = None


class OrderAmendEvent(_Envelope):
    """A shop asks to change one of its orders (recorded as ``order.amended``)."""

    type: Literal["order.amend"] = "order.amend"
    data: OrderAmendment


class OrderAmendedEvent(_Envelope):
    """An order changed: each field with its old and new value, and who asked."""

    type: Literal["order.amended"] = "order.amended"
    data: OrderAmendment


class OrderAmendmentConfirmEvent(_Envelope):
    """A rider confirms an amendment of an order it holds (recorded as ``order.amendment_confirmed``)."""

    type: Literal["order.amendment_confirm"] = "order.amendment_confirm"
    data: AmendmentConfirmation


class OrderAmendmentConfirmedEvent(_Envelope):
    """The rider has seen the amendment ("r2 confirmed the new address")."""

    type: Literal["order.amendment_confirmed"] = "order.amendment_confirmed"
    data: AmendmentConfirmation


# --- customer access (access-control mode, the provisioner's topics; docs/security.md) ------------
#
# CloudEvents like the rest, but NOT members of :data:`Event`: the persister never decodes or
# stores them (``customer.access_granted`` and ``customer.enrolment_answered`` carry a password),
# and no inbound topic accepts them. :data:`ACCESS_EVENT_TYPES` lists them for the AsyncAPI document.


class BrokerEndpoint(_Data):
    """Where a customer device connects (as the provisioner knows it)."""

    host: str
    port: int = Field(ge=1, le=65535)
    ws_port: int | None = Field(default=None, ge=1, le=65535)
    tls: bool = False


class CustomerAccess(_Data):
    """The tracking access of one order, for the shop to hand to its customer."""

    shop: Id
    order: Id
    #: The customer id C: names the customer's topics (``customers/C/...``), not its login.
    customer: Id
    #: The order's first login (``cust@...``); use it to enrol devices, see ``enrol_topic``.
    username: Id
    password: str = Field(repr=False)
    #: Exactly these topics may be subscribed to (and are delivered).
    topics: list[str]
    #: Publish a ``customer.enrol_device`` here to get a login per device ...
    enrol_topic: str
    #: ... and read the answer here (``customers/C/inbox/devices``).
    reply_topic: str
    max_devices: int
    broker: BrokerEndpoint | None = None


class CustomerAccessGrantedEvent(_Envelope):
    """Retained on ``shops/S/orders/O/access`` (shop S only); cleared when revoked."""

    type: Literal["customer.access_granted"] = "customer.access_granted"
    data: CustomerAccess


class DeviceRequest(_Data):
    """A device asks for a login of its own; the topic names the customer, the login proves it."""

    label: Annotated[str, StringConstraints(max_length=100), TEXT_GUARD] = ""


class DeviceRequestEvent(_Envelope):
    type: Literal["customer.enrol_device"] = "customer.enrol_device"
    data: DeviceRequest = DeviceRequest()


class DeviceLogin(_Data):
    """The answer to a device request: its ``id``, then a login or the reason for none."""

    request: EventId
    username: Id | None = None
    password: str | None = Field(default=None, repr=False)
    error: str | None = None


class DeviceLoginEvent(_Envelope):
    type: Literal["customer.enrolment_answered"] = "customer.enrolment_answered"
    data: DeviceLogin


#: type string -> envelope class of the customer-access flow (not decoded by :func:`decode`).
ACCESS_EVENT_TYPES: dict[str, type[_Envelope]] = {
    cls.model_fields["type"].default: cls
    for cls in (CustomerAccessGrantedEvent, DeviceRequestEvent, DeviceLoginEvent)
}


Event: TypeAlias = Annotated[
    OrderStatusChangedEvent
    | OrderIncidentReportedEvent
    | OrderChatPostedEvent
    | RiderLocationReportedEvent
    | RiderPresenceChangedEvent
    | DispatchOfferedEvent
    | DispatchExpiredEvent
    | AlertRaisedEvent
    | AlertEscalatedEvent
    | AlertResolvedEvent
    | AlertAcknowledgedEvent
    | OrderRatedEvent
    | OrderPhotoAttachedEvent
    | OrderNotifiedEvent
    | OrderCreateEvent
    | OrderCancelEvent
    | OrderAssignEvent
    | OrderRateEvent
    | AlertAcknowledgeEvent
    | DispatchReplyEvent
    | OrderAmendEvent
    | OrderAmendedEvent
    | OrderAmendmentConfirmEvent
    | OrderAmendmentConfirmedEvent,
    Field(discriminator="type"),
]

_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)

#: type string -> envelope class, e.g. for the AsyncAPI document.
EVENT_TYPES: dict[str, type[_Envelope]] = {
    cls.model_fields["type"].default: cls
    for cls in (
        OrderStatusChangedEvent,
        OrderIncidentReportedEvent,
        OrderChatPostedEvent,
        RiderLocationReportedEvent,
        RiderPresenceChangedEvent,
        DispatchOfferedEvent,
        DispatchExpiredEvent,
        AlertRaisedEvent,
        AlertEscalatedEvent,
        AlertResolvedEvent,
        AlertAcknowledgedEvent,
        OrderRatedEvent,
        OrderPhotoAttachedEvent,
        OrderNotifiedEvent,
        OrderCreateEvent,
        OrderCancelEvent,
        OrderAssignEvent,
        OrderRateEvent,
        AlertAcknowledgeEvent,
        DispatchReplyEvent,
        OrderAmendEvent,
        OrderAmendedEvent,
        OrderAmendmentConfirmEvent,
        OrderAmendmentConfirmedEvent,
    )
}

#: Events the backbone records but nobody sends or publishes: OwnTracks transitions (from payloads
#: that are not CloudEvents, contract/owntracks.py) and the facts of requests whose effect is
#: published as the order's status (:data:`FACT_OF`; ``alert.acknowledged`` and ``order.rated`` are
#: published as such).
#: Stored and shown in history, never decoded from the wire by :func:`decode`.
RECORDED_EVENT_TYPES: dict[str, type[_Envelope]] = {
    cls.model_fields["type"].default: cls
    for cls in (
        RiderRegionChangedEvent,
        OrderCreatedEvent,
        OrderCancelledEvent,
        OrderAssignedEvent,
        DispatchRepliedEvent,
    )
}


#: Which event types each inbound topic accepts, by (sender identity, topic kind).
ACCEPTED: dict[tuple[Identity, InboundKind], tuple[type[_Envelope], ...]] = {
    (Identity.RIDER, InboundKind.LOCATION): (RiderLocationReportedEvent,),
    # What an OwnTracks payload becomes (contract/owntracks.py): a position, the app's Last Will
    # (offline) or a region transition.
    (Identity.RIDER, InboundKind.OWNTRACKS): (
        RiderLocationReportedEvent,
        RiderPresenceChangedEvent,
        RiderRegionChangedEvent,
    ),
    (Identity.RIDER, InboundKind.STATUS): (
        OrderStatusChangedEvent,
        OrderIncidentReportedEvent,
        OrderAmendmentConfirmEvent,
    ),
    (Identity.RIDER, InboundKind.CHAT): (OrderChatPostedEvent,),
    (Identity.RIDER, InboundKind.REPLY): (DispatchReplyEvent,),
    (Identity.RIDER, InboundKind.PRESENCE): (RiderPresenceChangedEvent,),
    # A binary JPEG or PNG, made an event by the backbone (contract/photo.py).
    (Identity.RIDER, InboundKind.PHOTO): (OrderPhotoAttachedEvent,),
    (Identity.CUSTOMER, InboundKind.CHAT): (OrderChatPostedEvent, OrderRateEvent),
    (Identity.SERVICE, InboundKind.EVENTS): (
        DispatchOfferedEvent,
        DispatchExpiredEvent,
        AlertRaisedEvent,
        AlertEscalatedEvent,
        AlertResolvedEvent,
        OrderChatPostedEvent,
        OrderNotifiedEvent,
    ),
}

#: The one event type each shop command carries.
COMMAND_EVENTS: dict[Command, type[_Envelope]] = {
    Command.CREATE_ORDER: OrderCreateEvent,
    Command.CANCEL_ORDER: OrderCancelEvent,
    Command.CHAT: OrderChatPostedEvent,
    Command.ASSIGN: OrderAssignEvent,
    Command.ACK_ALERT: AlertAcknowledgeEvent,
    Command.AMEND_ORDER: OrderAmendEvent,
}

#: Each request -> the fact the persister records and publishes once it accepts the request.
FACT_OF: dict[type[_Envelope], type[_Envelope]] = {
    OrderCreateEvent: OrderCreatedEvent,
    OrderCancelEvent: OrderCancelledEvent,
    OrderAssignEvent: OrderAssignedEvent,
    OrderRateEvent: OrderRatedEvent,
    AlertAcknowledgeEvent: AlertAcknowledgedEvent,
    DispatchReplyEvent: DispatchRepliedEvent,
    OrderAmendEvent: OrderAmendedEvent,
    OrderAmendmentConfirmEvent: OrderAmendmentConfirmedEvent,
}
_REQUEST_OF = {fact: request for request, fact in FACT_OF.items()}


def fact_of(event: _Envelope) -> _Envelope:
    """What the backbone records for an inbound event: a request becomes its fact (same id, source,
    time and data), any other event stays itself.

    A fact that only a request yields, sent as such, is refused (:class:`PayloadError`): a device
    asks, only the persister says it happened.
    """
    request = _REQUEST_OF.get(type(event))
    if request is not None:
        raise PayloadError(
            f"type: {type_name(type(event))!r} is what the backbone records; send the request "
            f"{type_name(request)!r}"
        )
    fact = FACT_OF.get(type(event))
    if fact is None:
        return event
    return fact(**{name: getattr(event, name) for name in type(event).model_fields if name != "type"})


def accepted_types(where: InboundTopic) -> tuple[type[_Envelope], ...]:
    """The event types a message on this inbound topic may carry."""
    if where.command is not None:
        return (COMMAND_EVENTS[where.command],)
    return ACCEPTED.get((where.identity, where.kind), ())


def type_name(cls: type[_Envelope]) -> str:
    """The ``type`` string of an envelope class, e.g. ``order.status_changed``."""
    return str(cls.model_fields["type"].default)


def describe_validation_error(exc: ValidationError) -> str:
    """One line per failing field: ``data.window.end: promised window end must be after ...``."""
    parts = []
    for err in exc.errors(include_url=False):
        # The first level of a union error is the discriminator tag; the field path follows it.
        path = [str(p) for p in err["loc"] if str(p) not in EVENT_TYPES]
        loc = ".".join(path) or "payload"
        parts.append(f"{loc}: {_error_message(err)}")
    return "; ".join(parts)


def _error_message(err: ErrorDetails) -> str:
    """pydantic's message, or the contract's rule where pydantic's would not name it."""
    kind, ctx = err["type"], err.get("ctx", {})
    if kind == "string_pattern_mismatch" and ctx.get("pattern") == TEXT_PATTERN:
        return text_problem(str(err["input"])) or err["msg"]
    if kind == "string_unicode":
        return "text contains a lone surrogate (not valid Unicode)"
    if kind in ("greater_than_equal", "less_than_equal") and any(str(v) in UTC_LIMITS for v in ctx.values()):
        return utc_problem(err["input"])
    return err["msg"].removeprefix("Value error, ")


def _reject_constant(name: str) -> Any:
    raise PayloadError(f"payload is not JSON: {name} is not a JSON number")


def _as_bytes(raw: bytes | str) -> bytes:
    """``raw`` as bytes, refused when larger than :data:`MAX_PAYLOAD_BYTES`."""
    data = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")
    if len(data) > MAX_PAYLOAD_BYTES:
        raise PayloadError(f"payload is {len(data)} bytes (max {MAX_PAYLOAD_BYTES})")
    return data


def load_json(raw: bytes | str) -> Any:
    """Parse a payload as UTF-8 JSON, raising :class:`PayloadError` that says what is wrong."""
    data = _as_bytes(raw)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadError(f"payload is not UTF-8 text (byte {exc.start})") from None
    check_depth(data)
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise PayloadError(
            f"payload is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:  # check_depth should have caught it; never let it escape
        raise PayloadError(f"payload nests deeper than {MAX_DEPTH} levels of JSON arrays/objects") from None
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits
        raise PayloadError(f"payload is not usable JSON: {exc}") from None


#: Envelope fields a sender must give (the models' defaults serve producers, not the wire).
REQUIRED_ON_WIRE: dict[str, str] = {
    "id": "every event carries the sender's id so a retry is deduplicated",
    "time": "every event carries the time it happened (RFC 3339 with a UTC offset)",
}


def _missing(present: Any) -> list[str]:
    """One reason per field of :data:`REQUIRED_ON_WIRE` not in ``present``."""
    return [f"missing field {name}: {why}" for name, why in REQUIRED_ON_WIRE.items() if name not in present]


_REQUIRED_NAMES = frozenset(REQUIRED_ON_WIRE)


def _check_required(present: Any) -> None:
    if not _REQUIRED_NAMES.issubset(present):  # the usual case in one set operation
        raise PayloadError("; ".join(_missing(present)))


def decode(raw: bytes | str) -> Event:
    """Decode and validate one inbound CloudEvent; raise :class:`PayloadError` naming the bad field.

    Total: whatever the input, the answer is an event or a :class:`PayloadError` (an unexpected
    exception becomes one, "undecodable payload: ..."), so one message can never stop a batch.
    """
    try:
        return _decode(_as_bytes(raw))
    except PayloadError:
        raise
    except Exception as exc:
        raise PayloadError(f"undecodable payload: {type(exc).__name__}: {exc}") from None


def _decode(data: bytes) -> Event:
    check_depth(data)
    # Fast path (pydantic's own JSON parser, ~2x json.loads + validate_python); anything it
    # rejects takes the slow path below, which explains the problem precisely.
    try:
        event = _ADAPTER.validate_json(data)
    except ValidationError:
        pass
    else:
        _check_required(event.model_fields_set)
        return event
    obj = load_json(data)
    if not isinstance(obj, dict):
        raise PayloadError(f"payload must be a JSON object, not {type(obj).__name__}")
    kind = obj.get("type")
    if not isinstance(kind, str) or kind not in EVENT_TYPES:
        known = ", ".join(sorted(EVENT_TYPES))
        raise PayloadError(f"type: unknown event type {kind!r} (known: {known})")
    try:
        event = _ADAPTER.validate_python(obj)
    except ValidationError as exc:  # every problem at once, the missing id and time first
        raise PayloadError("; ".join([*_missing(obj), describe_validation_error(exc)])) from None
    _check_required(obj)
    return event


def check_received(event: _Envelope, now: datetime, bounds: TimeBounds) -> None:
    """Raise :class:`PayloadError` if the times of an inbound event are implausible at ``now``.

    The event's ``time`` and a position's ``tst`` must lie between ``bounds.max_age_s`` ago and
    ``bounds.future_skew_s`` ahead; an incident's ETA at most ``bounds.eta_horizon_s`` ahead.
    """
    check_time("time", event.time, now, bounds)
    if isinstance(event, RiderLocationReportedEvent):
        check_epoch("data.tst", event.data.tst, now, bounds)
    elif isinstance(event, OrderIncidentReportedEvent) and event.data.eta is not None:
        check_eta("data.eta", event.data.eta, now, bounds)


def encode(event: BaseModel) -> bytes:
    """Serialise an event (or any payload model) to compact UTF-8 JSON."""
    return event.model_dump_json(exclude_none=True).encode()


def check_rider_status(data: OrderStatusChanged) -> None:
    """Raise :class:`PayloadError` if a rider may not report this status itself."""
    if data.status not in RIDER_REPORTABLE:
        allowed = ", ".join(sorted(s.value for s in RIDER_REPORTABLE))
        raise PayloadError(
            f"data.status: a rider cannot report {data.status.value!r} (may report: {allowed})"
        )


# --- snapshots published retained ---------------------------------------------------------------


class Position(BaseModel):
    lat: float
    lon: float
    at: datetime
    speed_kmh: float | None = None


class TimelineEntry(BaseModel):
    status: str
    at: datetime
    note: str = ""


class OrderState(BaseModel):
    """Retained ``shops/S/orders/O/state``: the whole order at a glance."""

    order: str
    shop: str
    status: OrderStatus
    rider: str | None = None
    customer: str = ""
    window: Window
    eta: datetime | None = None
    position: Position | None = None
    timeline: list[TimelineEntry] = Field(default_factory=list)
    open_alerts: int = 0
    updated_at: datetime
    #: Where the order goes.
    destination: Place | None = None
    #: The customer's rating once delivered (1-5), and its comment.
    rating: int | None = None
    rating_comment: str = ""
    #: How to hand the order over (issue 18), and its last amendment.
    instructions: Instructions | None = None
    last_amendment: AmendmentNote | None = None
    #: Proof of delivery (issue 16): the code the customer gives the rider, whether the rider
    #: must enter it, and the delivery photo (its sha256, served by the web service).
    handover_code: str | None = None
    handover_code_required: bool = False
    photo: PhotoRef | None = None
    #: The customer's language (notices and the tracking page speak it).
    language: Language = Language.EN
    #: The last notice told the customer (a page opened later shows it).
    notice: StateNotice | None = None


class OrderLocation(BaseModel):
    """``shops/S/orders/O/location``: the carrying rider's position and the ETA (only while out)."""

    order: str
    rider: str
    position: Position
    eta: datetime | None = None


class RiderState(BaseModel):
    """Retained ``shops/S/riders/R/state``."""

    rider: str
    presence: str
    on_duty: bool
    load: int
    capacity: int
    position: Position | None = None
    updated_at: datetime


class Ack(BaseModel):
    """On ``riders/R/inbox/acks``: ids of events committed to the store."""

    ids: list[str]


def payload_text(payload: bytes, limit: int) -> str:
    """A payload as text for a dead letter: UTF-8, else ``base64:`` and its bytes; cut to ``limit``.

    Text with a NUL character is kept as bytes too: PostgreSQL refuses NUL in text.
    """
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        text = "\x00"
    if "\x00" in text:
        text = "base64:" + base64.b64encode(payload[: limit * 3 // 4]).decode()
    return text[:limit]


class Refusal(BaseModel):
    """On ``*/inbox/errors`` and ``services/deadletter``: why a message was refused."""

    id: str | None = None
    topic: str
    reason: str
    at: datetime = Field(default_factory=now)
    #: The service that refused it (the persister stores the other services' refusals).
    service: str | None = None
    #: The refused payload, cut short (``base64:`` and the bytes when it is not UTF-8).
    payload: str | None = None


class ServiceState(StrEnum):
    """What a service says of itself on ``services/N/status``."""

    ONLINE = "online"  # started and doing its job
    DEGRADED = "degraded"  # running, but cannot do its job now (``reason`` says why); recovers by itself
    OFFLINE = "offline"  # stopped, or its Last Will


class ServiceStatus(BaseModel):
    """Retained on ``services/N/status`` (JSON); older senders and Last Wills may send the bare word."""

    state: ServiceState
    reason: str = ""
    since: datetime | None = None


def parse_service_status(payload: bytes) -> ServiceStatus:
    """Read a ``services/N/status`` payload: the JSON object or a bare word; never raises."""
    word = payload.strip().decode("utf-8", errors="replace")
    if word in ServiceState.__members__.values():
        return ServiceStatus(state=ServiceState(word))
    try:
        return ServiceStatus.model_validate_json(payload)
    except ValueError:
        return ServiceStatus(state=ServiceState.OFFLINE, reason=f"unreadable status: {word[:100]}")
