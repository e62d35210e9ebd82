"""Every MQTT topic of the contract (docs/design.md §1): built, filtered and parsed here and nowhere else.

Inbound topics are written by devices and services; canonical topics are written by the persister
after the commit. :func:`parse_inbound` turns an inbound topic back into who sent it and what it is.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, TypeVar

from bloomwire.errors import TopicError

MAX_ID_LENGTH = 64
MAX_TOPIC_LENGTH = 512
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]*")
_E = TypeVar("_E", bound=StrEnum)

RIDERS = "riders"
SHOPS = "shops"
CUSTOMERS = "customers"
SERVICES = "services"
OWNTRACKS = "owntracks"
DEADLETTER = f"{SERVICES}/deadletter"
#: The service that answers customers in the order chat: its lines are marked ``assistant:``.
ASSISTANT = "assistant"
#: The service that tells customers of their order unasked (issue 16): ``order.notified``.
NOTICES = "notices"

PRESENCE_ONLINE = "online"
PRESENCE_OFFLINE = "offline"

#: Level names of the customer-access flow (access-control mode, see docs/security.md): the
#: order's ``access`` topic is NOT an :class:`OrderChannel` (customers and services never read
#: it), and ``devices`` is not an :class:`Inbox` channel of riders.
ACCESS = "access"
DEVICES = "devices"

#: Mosquitto's dynamic-security plugin: its control topic, its answers, and both as one filter.
DYNSEC_CONTROL = "$CONTROL/dynamic-security/v1"
DYNSEC_RESPONSE = f"{DYNSEC_CONTROL}/response"
DYNSEC_CONTROL_FILTER = "$CONTROL/dynamic-security/#"
#: The broker's own statistics (``#`` never matches ``$``-topics).
SYS_FILTER = "$SYS/#"


class Identity(StrEnum):
    """Kinds of MQTT identity; each writes only under its own prefix."""

    RIDER = "rider"
    SHOP = "shop"
    CUSTOMER = "customer"
    SERVICE = "service"


class InboundKind(StrEnum):
    """What an inbound message is, by its topic."""

    LOCATION = "location"
    STATUS = "status"
    CHAT = "chat"
    REPLY = "replies"
    PRESENCE = "presence"
    OWNTRACKS = "owntracks"
    COMMAND = "commands"
    EVENTS = "events"
    #: A delivery photo: a binary JPEG or PNG, not JSON (issue 16).
    PHOTO = "photo"


class Command(StrEnum):
    """Shop terminal commands under ``shops/S/commands/``."""

    CREATE_ORDER = "create-order"
    CANCEL_ORDER = "cancel-order"
    CHAT = "chat"
    ASSIGN = "assign"
    ACK_ALERT = "ack-alert"
    #: Change an order after it is placed (issue 18).
    AMEND_ORDER = "amend-order"


class OrderChannel(StrEnum):
    """Canonical per-order topics under ``shops/S/orders/O/``."""

    STATUS = "status"
    LOCATION = "location"
    CHAT = "chat"
    ALERTS = "alerts"
    STATE = "state"


class Inbox(StrEnum):
    """Device inbox channels."""

    OFFERS = "offers"
    ACKS = "acks"
    CHAT = "chat"
    ERRORS = "errors"
    #: Changes to the rider's orders (issue 18): it may be asked to confirm them.
    AMENDMENTS = "amendments"


#: The order channels a customer of that order may read.
CUSTOMER_CHANNELS = (
    OrderChannel.STATUS,
    OrderChannel.LOCATION,
    OrderChannel.CHAT,
    OrderChannel.STATE,
)


_VALID_IDS: set[str] = set()
_VALID_IDS_MAX = 100_000


def check_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a safe topic level, else raise :class:`TopicError` naming it."""
    if value in _VALID_IDS:  # hot path: the same rider/order ids recur in every message
        return value
    if not isinstance(value, str):
        raise TopicError(f"{what} must be a string, not {type(value).__name__}")
    if value == "":
        raise TopicError(f"{what} is empty")
    if len(value) > MAX_ID_LENGTH:
        raise TopicError(f"{what} is {len(value)} characters long (max {MAX_ID_LENGTH})")
    for bad, name in (("+", "'+'"), ("#", "'#'"), ("/", "'/'"), ("\x00", "NUL")):
        if bad in value:
            raise TopicError(f"{what} {value[:MAX_ID_LENGTH]!r} contains {name}")
    if not _ID_RE.fullmatch(value):
        raise TopicError(
            f"{what} {value!r} must start with a letter or digit and use only letters, digits and _ . : @ -"
        )
    if len(_VALID_IDS) >= _VALID_IDS_MAX:
        _VALID_IDS.clear()
    _VALID_IDS.add(value)
    return value


def customer_for_order(order: str) -> str:
    """The customer id of an order: ``c-<order>``, or for a long id a prefix plus a hash of it.

    Order ids are unique forever (never reused), so this id is too: one order's customer can
    never read another order's inbox.
    """
    candidate = f"c-{check_id(order, 'order')}"
    if len(candidate) <= MAX_ID_LENGTH:
        return candidate
    digest = hashlib.sha256(order.encode()).hexdigest()[:20]
    return check_id(f"c-{order[: MAX_ID_LENGTH - 23]}-{digest}", "customer")


def _join(*levels: str) -> str:
    return "/".join(levels)


def _member(enum: type[_E], value: _E | str, what: str) -> _E:
    """``enum(value)``, or a :class:`TopicError` listing the known values."""
    try:
        return enum(value)
    except ValueError:
        known = ", ".join(m.value for m in enum)
        raise TopicError(f"unknown {what} {value!r} (known: {known})") from None


# --- inbound (device -> backbone) -------------------------------------------------------------


def rider_location(rider: str) -> str:
    """``riders/R/location``: a rider's position (OwnTracks field names)."""
    return _join(RIDERS, check_id(rider, "rider"), "location")


def rider_order_status(rider: str, order: str) -> str:
    """``riders/R/orders/O/status``: a status transition or incident the rider reports."""
    return _join(RIDERS, check_id(rider, "rider"), "orders", check_id(order, "order"), "status")


def rider_order_chat(rider: str, order: str) -> str:
    """``riders/R/orders/O/chat``: a chat line from the rider."""
    return _join(RIDERS, check_id(rider, "rider"), "orders", check_id(order, "order"), "chat")


def rider_order_photo(rider: str, order: str) -> str:
    """``riders/R/orders/O/photo``: the rider's delivery photo, a binary JPEG or PNG payload."""
    return _join(
        RIDERS, check_id(rider, "rider"), "orders", check_id(order, "order"), InboundKind.PHOTO.value
    )


def rider_replies(rider: str) -> str:
    """``riders/R/replies``: accept / decline of an offer."""
    return _join(RIDERS, check_id(rider, "rider"), "replies")


def rider_presence(rider: str) -> str:
    """``riders/R/presence``: retained online/offline, offline being the Last Will."""
    return _join(RIDERS, check_id(rider, "rider"), "presence")


#: What the OwnTracks apps publish below their base topic ``owntracks/R/DEVICE`` (the booklet's
#: "Topics"): ``event`` carries region transitions; the others are acknowledged as ignored.
OWNTRACKS_SUBTOPICS = frozenset(
    {"event", "waypoint", "waypoints", "cmd", "status", "step", "beacon", "dump", "info"}
)


def owntracks(rider: str, device: str, subtopic: str | None = None) -> str:
    """``owntracks/R/DEVICE`` (locations, lwt) or ``owntracks/R/DEVICE/SUB`` (``event``: transitions)."""
    base = _join(OWNTRACKS, check_id(rider, "rider"), check_id(device, "device"))
    if subtopic is None:
        return base
    if subtopic not in OWNTRACKS_SUBTOPICS:
        raise TopicError(
            f"unknown OwnTracks subtopic {subtopic!r} (known: {', '.join(sorted(OWNTRACKS_SUBTOPICS))})"
        )
    return _join(base, subtopic)


def shop_command(shop: str, command: Command | str) -> str:
    """``shops/S/commands/CMD``: a shop terminal action."""
    cmd = _member(Command, command, "shop command")
    return _join(SHOPS, check_id(shop, "shop"), "commands", cmd.value)


def customer_chat(customer: str) -> str:
    """``customers/C/chat``: a chat line from the customer."""
    return _join(CUSTOMERS, check_id(customer, "customer"), "chat")


def service_events(service: str) -> str:
    """``services/N/events``: a service's decisions, persisted like any other event."""
    return _join(SERVICES, check_id(service, "service"), "events")


# --- canonical (backbone -> everyone) ---------------------------------------------------------


def order_topic(shop: str, order: str, channel: OrderChannel | str) -> str:
    """``shops/S/orders/O/{status,location,chat,alerts,state}``."""
    tail = _member(OrderChannel, channel, "order channel")
    return _join(SHOPS, check_id(shop, "shop"), "orders", check_id(order, "order"), tail.value)


def shop_alerts(shop: str) -> str:
    """``shops/S/alerts``: the shop's alert feed."""
    return _join(SHOPS, check_id(shop, "shop"), "alerts")


def shop_rider_state(shop: str, rider: str) -> str:
    """``shops/S/riders/R/state``: retained rider snapshot."""
    return _join(SHOPS, check_id(shop, "shop"), "riders", check_id(rider, "rider"), "state")


def shop_errors(shop: str) -> str:
    """``shops/S/errors``: why a shop command was refused."""
    return _join(SHOPS, check_id(shop, "shop"), "errors")


def shop_acks(shop: str) -> str:
    """``shops/S/acks``: ids of shop S's commands committed to the store (a re-sent duplicate too)."""
    return _join(SHOPS, check_id(shop, "shop"), Inbox.ACKS.value)


def acks_topic(source: str) -> str:
    """Where the persister confirms the events of ``source`` (``riders/R``, ``shops/S``, ``customers/C``)."""
    prefix, _, sender = source.partition("/")
    if prefix == RIDERS:
        return rider_inbox(sender, Inbox.ACKS)
    if prefix == SHOPS:
        return shop_acks(sender)
    if prefix == CUSTOMERS:
        return customer_inbox(sender, Inbox.ACKS)
    raise TopicError(f"no ack topic for source {source!r} (riders/R, shops/S or customers/C)")


def rider_inbox(rider: str, channel: Inbox | str) -> str:
    """``riders/R/inbox/{offers,acks,chat,errors,amendments}``."""
    return _join(RIDERS, check_id(rider, "rider"), "inbox", _member(Inbox, channel, "inbox").value)


def customer_inbox(customer: str, channel: Inbox | str) -> str:
    """``customers/C/inbox/{acks,chat,errors}``."""
    box = _member(Inbox, channel, "inbox")
    return _join(CUSTOMERS, check_id(customer, "customer"), "inbox", box.value)


def service_status(service: str) -> str:
    """``services/N/status``: retained online/offline (Last Will) of a service."""
    return _join(SERVICES, check_id(service, "service"), "status")


# --- customer access (access-control mode; the provisioner's topics) ------------------------------


def access_topic(shop: str, order: str) -> str:
    """``shops/S/orders/O/access``: RETAINED, QoS 1, the order's customer access, for shop S only.

    The provisioner publishes it once the order is created and clears it (empty retained
    payload) when the access is revoked. Only shop S (``shops/S/#``), the operator and the
    provisioner may read it; customers and services may not.
    """
    return _join(SHOPS, check_id(shop, "shop"), "orders", check_id(order, "order"), ACCESS)


def device_request_topic(customer: str) -> str:
    """``customers/C/devices``: a customer device asks for a login of its own (enrolment)."""
    return _join(CUSTOMERS, check_id(customer, "customer"), DEVICES)


def device_reply_topic(customer: str) -> str:
    """``customers/C/inbox/devices``: the provisioner's answer, readable by every device of C."""
    return _join(CUSTOMERS, check_id(customer, "customer"), "inbox", DEVICES)


# --- subscription filters ---------------------------------------------------------------------

#: Everything the persister consumes.
INBOUND_FILTERS: tuple[str, ...] = (
    f"{RIDERS}/+/location",
    f"{RIDERS}/+/orders/+/status",
    f"{RIDERS}/+/orders/+/chat",
    f"{RIDERS}/+/orders/+/photo",
    f"{RIDERS}/+/replies",
    f"{RIDERS}/+/presence",
    f"{OWNTRACKS}/+/+",
    f"{OWNTRACKS}/+/+/+",  # transitions on .../event; the rest acknowledged as ignored
    f"{SHOPS}/+/commands/+",
    f"{CUSTOMERS}/+/chat",
    f"{SERVICES}/+/events",
)


def all_orders_filter(channel: OrderChannel | str | None = None, shop: str | None = None) -> str:
    """``shops/+/orders/+/CHANNEL`` (or ``#`` below the order when channel is None)."""
    s = "+" if shop is None else check_id(shop, "shop")
    tail = "#" if channel is None else _member(OrderChannel, channel, "order channel").value
    return _join(SHOPS, s, "orders", "+", tail)


def shop_filter(shop: str) -> str:
    """``shops/S/#``: everything a shop terminal may read."""
    return _join(SHOPS, check_id(shop, "shop"), "#")


def rider_inbox_filter(rider: str) -> str:
    """``riders/R/inbox/#``."""
    return _join(RIDERS, check_id(rider, "rider"), "inbox", "#")


def customer_inbox_filter(customer: str) -> str:
    """``customers/C/inbox/#``."""
    return _join(CUSTOMERS, check_id(customer, "customer"), "inbox", "#")


ALL_ALERTS_FILTER = f"{SHOPS}/+/alerts"
ALL_PRESENCE_FILTER = f"{RIDERS}/+/presence"
ALL_REPLIES_FILTER = f"{RIDERS}/+/replies"
ALL_SERVICE_STATUS_FILTER = f"{SERVICES}/+/status"
ALL_RIDER_STATE_FILTER = f"{SHOPS}/+/riders/+/state"
#: Every order's access message (the provisioner writes them; shop S reads its own).
ALL_ACCESS_FILTER = f"{SHOPS}/+/orders/+/{ACCESS}"
#: Every customer's device request (the provisioner reads them) ...
ALL_DEVICE_REQUESTS_FILTER = f"{CUSTOMERS}/+/{DEVICES}"
#: ... and every answer (the provisioner writes them).
ALL_DEVICE_REPLIES_FILTER = f"{CUSTOMERS}/+/inbox/{DEVICES}"


# --- parsing ----------------------------------------------------------------------------------


_SOURCE_PREFIX: Final = {
    Identity.RIDER: RIDERS,
    Identity.SHOP: SHOPS,
    Identity.CUSTOMER: CUSTOMERS,
    Identity.SERVICE: SERVICES,
}


@dataclass(frozen=True, slots=True)
class InboundTopic:
    """An inbound topic taken apart: who wrote it, about which order, and what it is."""

    identity: Identity
    sender: str
    kind: InboundKind
    order: str | None = None
    command: Command | None = None
    device: str | None = None

    @property
    def source(self) -> str:
        """The CloudEvents ``source`` this sender is entitled to, e.g. ``riders/r7``."""
        return f"{_SOURCE_PREFIX[self.identity]}/{self.sender}"  # asked twice per inbound event

    def error_topic(self) -> str | None:
        """Where to tell this sender that its message was refused (None for shops/services)."""
        if self.identity is Identity.RIDER:
            return rider_inbox(self.sender, Inbox.ERRORS)
        if self.identity is Identity.CUSTOMER:
            return customer_inbox(self.sender, Inbox.ERRORS)
        if self.identity is Identity.SHOP:
            return shop_errors(self.sender)
        return None


@dataclass(frozen=True, slots=True)
class OrderTopic:
    """A per-order topic ``shops/S/orders/O/CHANNEL`` taken apart."""

    shop: str
    order: str
    #: An :class:`OrderChannel` value, or :data:`ACCESS`.
    channel: str


def parse_order_topic(topic: str) -> OrderTopic:
    """Shop, order and channel of ``shops/S/orders/O/{status,...,state,access}``, else :class:`TopicError`."""
    levels = check_publish_topic(topic)
    known = {*(c.value for c in OrderChannel), ACCESS}
    if len(levels) != 5 or levels[0] != SHOPS or levels[2] != "orders" or levels[4] not in known:
        raise TopicError(f"topic {topic!r} is not a per-order topic of the contract")
    return OrderTopic(check_id(levels[1], "shop"), check_id(levels[3], "order"), levels[4])


def parse_device_request(topic: str) -> str:
    """The customer id of a ``customers/C/devices`` topic, else :class:`TopicError`."""
    levels = check_publish_topic(topic)
    if len(levels) != 3 or levels[0] != CUSTOMERS or levels[2] != DEVICES:
        raise TopicError(f"topic {topic!r} is not a device request topic")
    return check_id(levels[1], "customer")


def check_publish_topic(topic: str) -> list[str]:
    """Split a topic meant for PUBLISH, refusing empty levels, wildcards, NUL and excess length."""
    if not topic:
        raise TopicError("topic is empty")
    if len(topic) > MAX_TOPIC_LENGTH:
        raise TopicError(f"topic is {len(topic)} characters long (max {MAX_TOPIC_LENGTH})")
    if "\x00" in topic:
        raise TopicError("topic contains NUL")
    if "+" in topic or "#" in topic:
        raise TopicError(f"topic {topic!r} contains a wildcard; publish topics may not")
    levels = topic.split("/")
    if any(level == "" for level in levels):
        raise TopicError(f"topic {topic!r} has an empty level")
    return levels


# Riders and orders repeat their topics thousands of times; a refused topic is not cached.
@functools.lru_cache(maxsize=65_536)
def parse_inbound(topic: str) -> InboundTopic:
    """Turn an inbound topic into an :class:`InboundTopic`, or raise :class:`TopicError` saying why."""
    levels = check_publish_topic(topic)
    root, n = levels[0], len(levels)
    if root == RIDERS and n >= 3:
        rider = check_id(levels[1], "rider")
        if n == 3 and levels[2] in ("location", "replies", "presence"):
            return InboundTopic(Identity.RIDER, rider, InboundKind(levels[2]))
        if n == 5 and levels[2] == "orders" and levels[4] in ("status", "chat", "photo"):
            order = check_id(levels[3], "order")
            return InboundTopic(Identity.RIDER, rider, InboundKind(levels[4]), order=order)
    elif root == OWNTRACKS and (n == 3 or (n == 4 and levels[3] in OWNTRACKS_SUBTOPICS)):
        rider, device = check_id(levels[1], "rider"), check_id(levels[2], "device")
        return InboundTopic(Identity.RIDER, rider, InboundKind.OWNTRACKS, device=device)
    elif root == SHOPS and n == 4 and levels[2] == "commands":
        shop = check_id(levels[1], "shop")
        command = _member(Command, levels[3], "shop command")
        return InboundTopic(Identity.SHOP, shop, InboundKind.COMMAND, command=command)
    elif root == CUSTOMERS and n == 3 and levels[2] == "chat":
        return InboundTopic(Identity.CUSTOMER, check_id(levels[1], "customer"), InboundKind.CHAT)
    elif root == SERVICES and n == 3 and levels[2] == "events":
        return InboundTopic(Identity.SERVICE, check_id(levels[1], "service"), InboundKind.EVENTS)
    raise TopicError(f"topic {topic!r} is not an inbound topic of the contract")


def matches(topic_filter: str, topic: str) -> bool:
    """True if ``topic`` matches the MQTT subscription ``topic_filter``."""
    f_levels, t_levels = topic_filter.split("/"), topic.split("/")
    for i, f in enumerate(f_levels):
        if f == "#":
            return True
        if i >= len(t_levels):
            return False
        if f != "+" and f != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)
