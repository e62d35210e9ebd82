"""Who may do what on the broker (docs/design.md §1), as dynamic-security roles over literal topics.

Mosquitto 2.0.11's dynamic-security plugin does not substitute ``%u``/``%c`` in ACLs, so every
identity gets a role of its own that names its topics literally (``rider/r7``, ``shop/s1``,
``order/s1/o42``). Everything here is pure: names and ACL lists (ACL patterns built from the constants and
builders of :mod:`bloomwire.contract.topics`, where every topic, the access flow's included, is defined);
:mod:`bloomwire.access.accounts` applies them to a broker or to the plugin's JSON file.

Evaluation rules relied upon (verified against 2.0.11, see docs/security.md): the default for
every ACL type is *deny* except unsubscribe (set by :data:`DEFAULT_ACL_ACCESS`); a client's
roles are checked in priority order (higher first), ACLs inside a role likewise, and the first
ACL whose topic matches decides. A SUBSCRIBE is checked by matching the filter *as a topic*
against ``subscribePattern`` ACLs, so ``#`` or ``shops/+/orders/+/#`` never match a narrower
pattern. Every delivery, retained messages and Wills included, is checked against
``publishClientReceive``/``publishClientSend``.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from bloomwire.contract import topics
from bloomwire.contract.topics import CUSTOMER_CHANNELS, INBOUND_FILTERS, OrderChannel, check_id
from bloomwire.errors import TopicError

# --- ACL types ----------------------------------------------------------------------------------

PUBLISH = "publishClientSend"
RECEIVE = "publishClientReceive"
SUBSCRIBE = "subscribePattern"

#: Deny by default (the plugin's own default lets every client RECEIVE whatever it subscribed).
DEFAULT_ACL_ACCESS: dict[str, bool] = {
    PUBLISH: False,
    RECEIVE: False,
    "subscribe": False,
    "unsubscribe": True,
}

# --- fixed identities ---------------------------------------------------------------------------

#: The dynsec administrator used by ``bloomwire accounts`` (the CLI of the provisioning component).
ADMIN = "admin"
#: The provisioner service: dynsec admin too, plus the customer-access topics.
PROVISIONER = "provisioner"
#: Reads everything (``bloomwire up`` watches service status with it).
OPERATOR = "operator"
#: The admin's role that clears retired riders' and devices' retained messages.
SWEEPER_ROLE = "retired-state-sweeper"
#: The only writer of canonical topics.
PERSISTER = "persister"
#: ``bloomwire up``'s own login: reads ``$SYS`` and the services' status, reports crash loops there.
MONITOR = "monitor"
#: Backbone services that get a ``service/N`` role by default.
DEFAULT_SERVICES: tuple[str, ...] = ("dispatch", "alerts")
#: Usernames no rider, shop or service may take.
RESERVED = frozenset({ADMIN, PROVISIONER, OPERATOR, PERSISTER, MONITOR})

#: Minted customer device usernames start with this (``@`` keeps them apart from typed ids).
DEVICE_PREFIX = "cust@"
#: A shop's or rider's device login is ``<identity>@<label>`` (``s1@till-2``, ``r7@owntracks``):
#: its own username (one MQTT session each) holding its identity's role.
DEVICE_SEPARATOR = "@"
#: The persister's default customer id for order O (``c-O`` cut to the id length limit).
CUSTOMER_PREFIX = "c-"

#: Every role of an identity of that kind is named ``<kind>/<id>``; ids never contain ``/``.
ROLE_SEPARATOR = "/"


class Kind(StrEnum):
    """Kinds of broker account."""

    ADMIN = "admin"
    PROVISIONER = "provisioner"
    OPERATOR = "operator"
    PERSISTER = "persister"
    MONITOR = "monitor"
    SERVICE = "service"
    SHOP = "shop"
    RIDER = "rider"
    CUSTOMER = "customer"


#: Kinds with exactly one account, named like the kind (``admin``, ..., ``monitor``).
FIXED_KINDS: tuple[Kind, ...] = (Kind.ADMIN, Kind.PROVISIONER, Kind.OPERATOR, Kind.PERSISTER, Kind.MONITOR)


def customer_id(order: str) -> str:
    """The persister's default customer id of ``order`` (see :func:`topics.customer_for_order`)."""
    return topics.customer_for_order(order)


def new_device_username() -> str:
    """A random, unguessable username for one customer device (``cust@`` + 80 random bits)."""
    return f"{DEVICE_PREFIX}{secrets.token_hex(10)}"


def new_password() -> str:
    """A random password (192 bits, URL-safe)."""
    return secrets.token_urlsafe(24)


def check_account_name(name: str, what: str = "username") -> str:
    """``check_id`` plus the rules of the account namespace (device prefix and separator)."""
    check_id(name, what)
    if name.startswith(DEVICE_PREFIX):
        raise TopicError(f"{what} {name!r} starts with {DEVICE_PREFIX!r}, which is kept for customer devices")
    if name == DEVICE_PREFIX.removesuffix(DEVICE_SEPARATOR):  # its devices would look like customers
        raise TopicError(f"{what} {name!r} is kept for customer devices ({DEVICE_PREFIX}...)")
    if DEVICE_SEPARATOR in name:
        raise TopicError(f"{what} {name!r} contains {DEVICE_SEPARATOR!r}, which separates a device's label")
    return name


# --- device logins of shops and riders ----------------------------------------------------------

#: Kinds of identity that may have device logins.
DEVICE_KINDS: tuple[Kind, ...] = (Kind.SHOP, Kind.RIDER)


def new_device_label() -> str:
    """A label for a device nobody named (``d-`` + 24 random bits)."""
    return f"d-{secrets.token_hex(3)}"


def device_username(identity: str, label: str) -> str:
    """``s1`` + ``till-2`` -> ``s1@till-2``; :class:`TopicError` for a bad identity or label."""
    check_account_name(identity, "identity")
    check_id(label, "device label")
    if DEVICE_SEPARATOR in label:
        raise TopicError(f"device label {label!r} contains {DEVICE_SEPARATOR!r}")
    return check_id(f"{identity}{DEVICE_SEPARATOR}{label}", "device username")


def split_device(username: str) -> tuple[str, str] | None:
    """``s1@till-2`` -> ``("s1", "till-2")``; None for any other username (customers included)."""
    if username.startswith(DEVICE_PREFIX):
        return None
    identity, sep, label = username.partition(DEVICE_SEPARATOR)
    return (identity, label) if sep and identity and label else None


# --- ACLs and roles -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Acl:
    """One dynamic-security ACL."""

    acltype: str
    topic: str
    allow: bool = True
    priority: int = 0

    def to_json(self) -> dict[str, Any]:
        """The plugin's JSON form."""
        return {"acltype": self.acltype, "topic": self.topic, "priority": self.priority, "allow": self.allow}


@dataclass(frozen=True, slots=True)
class Role:
    """A named list of ACLs."""

    name: str
    acls: tuple[Acl, ...]

    def to_json(self) -> dict[str, Any]:
        """The plugin's JSON form (as in ``createRole``)."""
        return {"rolename": self.name, "acls": [a.to_json() for a in self.acls]}


def _write(*filters: str) -> list[Acl]:
    return [Acl(PUBLISH, f) for f in filters]


def _read(*filters: str) -> list[Acl]:
    """Subscribe to and receive ``filters``."""
    out: list[Acl] = []
    for f in filters:
        out += [Acl(SUBSCRIBE, f), Acl(RECEIVE, f)]
    return out


def _receive(*filters: str) -> list[Acl]:
    """Receive only (the subscription itself is granted by a shared role)."""
    return [Acl(RECEIVE, f) for f in filters]


def role_name(kind: Kind, *ids: str) -> str:
    """``rider/r7``, ``shop/s1``, ``service/dispatch``, ``order/s1/o42``; fixed roles by kind."""
    if kind is Kind.CUSTOMER:
        return ROLE_SEPARATOR.join(("order", *ids))
    if not ids:
        return kind.value
    return ROLE_SEPARATOR.join((kind.value, *ids))


_CANONICAL_ORDER = tuple(
    topics.all_orders_filter(ch)
    for ch in (
        OrderChannel.STATUS,
        OrderChannel.LOCATION,
        OrderChannel.CHAT,
        OrderChannel.ALERTS,
        OrderChannel.STATE,
    )
)
_SHOP_FEEDS = (topics.ALL_ALERTS_FILTER, topics.ALL_RIDER_STATE_FILTER)


def admin_role() -> Role:
    """Administers the plugin over ``$CONTROL/dynamic-security/v1`` and nothing else."""
    control = topics.DYNSEC_CONTROL_FILTER
    return Role(ADMIN, (Acl(PUBLISH, control), *_read(control)))


#: Where a retired rider's or device's retained messages lie: presence, location, its OwnTracks
#: topics and its state as each shop saw it (:mod:`bloomwire.access.retired`). Not its inbox: only
#: the persister writes there, never retained, and the admin reads no inbox.
RETIRED_STATE_FILTERS = (
    f"{topics.RIDERS}/+/presence",
    f"{topics.RIDERS}/+/location",
    f"{topics.OWNTRACKS}/#",
    topics.ALL_RIDER_STATE_FILTER,
)


def sweeper_role() -> Role:
    """The admin's second role: reads and clears (an empty retained publish) what a removed rider
    or device left retained. The admin could grant itself any role anyway; the provisioner, which
    shares :func:`admin_role`, does not get this one."""
    return Role(SWEEPER_ROLE, (*_read(*RETIRED_STATE_FILTERS), *_write(*RETIRED_STATE_FILTERS)))


def provisioner_role() -> Role:
    """The provisioner: sees order creation/closure, answers device requests, publishes access."""
    acls = [
        *_read(topics.all_orders_filter(OrderChannel.STATUS), topics.ALL_DEVICE_REQUESTS_FILTER),
        *_write(
            topics.ALL_ACCESS_FILTER,
            topics.ALL_DEVICE_REPLIES_FILTER,
            topics.service_status(PROVISIONER),
        ),
        *_write(topics.DEADLETTER),
    ]
    return Role(role_name(Kind.PROVISIONER), tuple(acls))


def operator_role() -> Role:
    """Reads everything (``#`` does not match ``$``-topics, so ``$SYS`` is named too)."""
    return Role(role_name(Kind.OPERATOR), tuple(_read("#", topics.SYS_FILTER)))


def monitor_role() -> Role:
    """The supervisor: reads ``$SYS`` (exported as metrics) and every service's status, and writes
    a service's retained status when that service is in a crash loop (it cannot say so itself)."""
    status = topics.ALL_SERVICE_STATUS_FILTER
    return Role(role_name(Kind.MONITOR), (*_read(topics.SYS_FILTER, status), *_write(status)))


def persister_role() -> Role:
    """Reads every inbound topic and the dead letters; writes the canonical topics, inboxes,
    dead letters, and empty retained messages on the inbound topics (presence aside)."""
    writes = (
        *_CANONICAL_ORDER,
        *_SHOP_FEEDS,
        f"{topics.SHOPS}/+/errors",
        f"{topics.SHOPS}/+/acks",
        f"{topics.RIDERS}/+/inbox/#",
        f"{topics.CUSTOMERS}/+/inbox/#",
        topics.DEADLETTER,
        topics.service_status(PERSISTER),
        # to clear a retained publish left on an inbound topic (presence stays retained)
        *(f for f in INBOUND_FILTERS if f != topics.ALL_PRESENCE_FILTER),
    )
    reads = (*INBOUND_FILTERS, topics.DEADLETTER)  # the other services' refusals, to store them
    return Role(role_name(Kind.PERSISTER), (*_read(*reads), *_write(*writes)))


def service_role(name: str) -> Role:
    """Service N: writes its events and status (and dead letters), reads the canonical topics.

    Rider presence is read too (dispatch needs it). The ``access`` channel is NOT readable: a
    service subscribing ``shops/+/orders/+/#`` is refused, and a per-channel grant never
    covers ``shops/S/orders/O/access``.
    """
    check_account_name(name, "service")
    reads = (
        *_CANONICAL_ORDER,
        *_SHOP_FEEDS,
        topics.ALL_SERVICE_STATUS_FILTER,
        topics.DEADLETTER,
        topics.ALL_PRESENCE_FILTER,
    )
    writes = (topics.service_events(name), topics.service_status(name), topics.DEADLETTER)
    return Role(role_name(Kind.SERVICE, name), (*_read(*reads), *_write(*writes)))


def rider_role(rider: str) -> Role:
    """Rider R: writes ``riders/R/#`` and ``owntracks/R/#`` (not its inbox), reads its inbox."""
    check_account_name(rider, "rider")
    inbox = topics.rider_inbox_filter(rider)
    acls = [
        Acl(PUBLISH, inbox, allow=False, priority=1),  # the inbox is backbone -> device only
        *_write(f"{topics.RIDERS}/{rider}/#", f"{topics.OWNTRACKS}/{rider}/#"),
        *_read(inbox),
    ]
    return Role(role_name(Kind.RIDER, rider), tuple(acls))


def shop_role(shop: str) -> Role:
    """Shop S: writes ``shops/S/commands/#``, reads ``shops/S/#`` (its orders' access and its
    command acks ``shops/S/acks`` included; it cannot write them)."""
    check_account_name(shop, "shop")
    return Role(
        role_name(Kind.SHOP, shop),
        (*_write(f"{topics.SHOPS}/{shop}/commands/#"), *_read(topics.shop_filter(shop))),
    )


#: Shared by every customer device, checked before the order role (higher priority): may
#: SUBSCRIBE to any order channel or customer inbox (what is DELIVERED is decided by the order
#: role's receive ACLs, deny by default), and may never write into an inbox.
CUSTOMERS_ROLE = "customers"
CUSTOMERS_ROLE_PRIORITY = 10


def customers_role() -> Role:
    """The shared customer role (see :data:`CUSTOMERS_ROLE`)."""
    inboxes = f"{topics.CUSTOMERS}/+/inbox/#"
    acls = (
        Acl(PUBLISH, inboxes, allow=False, priority=1),
        Acl(SUBSCRIBE, f"{topics.SHOPS}/+/orders/+/+"),
        Acl(SUBSCRIBE, inboxes),
    )
    return Role(CUSTOMERS_ROLE, acls)


def order_role(shop: str, order: str, customer: str) -> Role:
    """The customer of order O of shop S (id C): 6 literal ACLs, fail-closed.

    Receives ``shops/S/orders/O/{status,location,chat,state}`` and ``customers/C/inbox/#``;
    writes ``customers/C/#`` (chat, device requests; the inbox is denied by the shared role).
    """
    check_id(shop, "shop")
    check_id(order, "order")
    check_id(customer, "customer")
    reads = [topics.order_topic(shop, order, ch) for ch in CUSTOMER_CHANNELS]
    acls = (
        *_receive(*reads, topics.customer_inbox_filter(customer)),
        *_write(f"{topics.CUSTOMERS}/{customer}/#"),
    )
    return Role(role_name(Kind.CUSTOMER, shop, order), acls)


_ORDER_ROLE_RE = re.compile(r"^order/([^/]+)/([^/]+)$")
_CUSTOMER_WRITE_RE = re.compile(rf"^{topics.CUSTOMERS}/([^/]+)/#$")


@dataclass(frozen=True, slots=True)
class OrderRoleInfo:
    """What an order role names: its shop, order and customer id."""

    shop: str
    order: str
    customer: str


def parse_order_role(name: str, acls: Iterable[dict[str, Any]] = ()) -> OrderRoleInfo | None:
    """Shop, order and customer of an ``order/S/O`` role (customer from its write ACL), else None."""
    found = _ORDER_ROLE_RE.match(name)
    if found is None:
        return None
    shop, order = found.groups()
    customer = None
    for acl in acls:
        m = _CUSTOMER_WRITE_RE.match(str(acl.get("topic", "")))
        if acl.get("acltype") == PUBLISH and m is not None:
            customer = m.group(1)
    return OrderRoleInfo(shop, order, customer or customer_id(order))


def kind_of(username: str, roles: Iterable[str]) -> Kind | None:
    """The kind of account from its username and role names (None if not one of ours); a
    shop's or rider's device login is of its identity's kind."""
    names = set(roles)
    if username.startswith(DEVICE_PREFIX):
        return Kind.CUSTOMER
    for kind in FIXED_KINDS:
        if role_name(kind) in names and username == kind.value:
            return kind
    for kind in (Kind.SERVICE, Kind.SHOP, Kind.RIDER):
        if role_name(kind, username) in names:
            return kind
    device = split_device(username)
    if device is not None:
        for kind in DEVICE_KINDS:
            if role_name(kind, device[0]) in names:
                return kind
    return None


def roles_for(kind: Kind, name: str) -> list[Role]:
    """The roles an account of ``kind`` named ``name`` holds (fixed identities included)."""
    if kind is Kind.ADMIN:
        return [admin_role(), sweeper_role()]
    if kind is Kind.PROVISIONER:
        return [admin_role(), provisioner_role()]
    if kind is Kind.OPERATOR:
        return [operator_role()]
    if kind is Kind.PERSISTER:
        return [persister_role()]
    if kind is Kind.MONITOR:
        return [monitor_role()]
    if kind is Kind.SERVICE:
        return [service_role(name)]
    if kind is Kind.SHOP:
        return [shop_role(name)]
    if kind is Kind.RIDER:
        return [rider_role(name)]
    raise ValueError("customer roles are per order: use order_role()")
