"""The alert rules (docs/design.md §4): pure functions of order/rider state and the current time.

Each order rule takes ``(order, rider, now, t)`` — ``rider`` is the view of ``order.rider`` (or
None) and ``t`` the shop's :class:`~bloomwire.services.alerts.config.Thresholds` — and returns a
:class:`Finding` while its condition holds, ``None`` otherwise. ``None`` is what auto-resolves an
open alert. :func:`evaluate` runs every rule over the whole state; one finding per
:attr:`Finding.key`.

Conventions:

* A duration condition holds once the elapsed time *exceeds* its threshold (strictly).
* The subject of an order rule is the order alone (``Finding.rider`` is None; the rider is named
  in the sentence), so reassigning an order keeps its alert. ``stale_position`` is about a rider's
  tracking on one order (subject: order and rider); ``rider_offline`` is about the rider (subject:
  rider; one finding per shop whose orders it carries).
* ``overdue`` supersedes ``eta_slip``: once the order is overdue the ETA slip resolves.
* ``customer_unreachable`` holds while ``failure_reason == "customer_unreachable"`` and the
  bouquet is still out (the order is not yet delivered, cancelled or returned): the shop can still
  call the customer and send the rider back. ``delivery_failed`` holds for ``failed`` and
  ``returned`` orders, except a ``failed`` order covered by ``customer_unreachable``; once such an
  order is returned, ``delivery_failed`` takes over.
* ``rider_offline`` counts only orders the rider is carrying (picked up, en route, arrived).

The alert service should pass every order that is not delivered or cancelled (plus failed and
returned orders whose alerts it still tracks): an order left out simply yields no finding.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from functools import lru_cache
from typing import Protocol, TypeAlias

from bloomwire.contract.events import AlertRule, Presence, Severity
from bloomwire.contract.lifecycle import CLOSED, OUT_FOR_DELIVERY, TERMINAL, FailureReason, OrderStatus
from bloomwire.services.alerts.config import RulesConfig, Thresholds

S = OrderStatus

#: (rule, shop, order, rider): one open alert per key. Equal to the tuple built from the plain
#: strings of an alert row, since the enums are ``StrEnum``.
AlertKey: TypeAlias = tuple[AlertRule, str, str | None, str | None]

#: The order is on its way to the customer (the ETA and the rider's position matter).
ON_THE_WAY: frozenset[OrderStatus] = frozenset({S.PICKED_UP, S.EN_ROUTE})
#: No rider has accepted the order yet.
WAITING_FOR_RIDER: frozenset[OrderStatus] = frozenset({S.CREATED, S.DECLINED, S.ASSIGNED})
#: A failed or returned outcome.
FAILED_OUTCOME: frozenset[OrderStatus] = frozenset({S.FAILED, S.RETURNED})

_NO_RIDER = frozenset({S.CREATED, S.DECLINED})
_UNREACHABLE = FailureReason.CUSTOMER_UNREACHABLE.value
_STATUS = {s.value: s for s in OrderStatus}
_PRESENCE = {p.value: p for p in Presence}
_STATUS_WORDS = {s: s.value.replace("_", " ") for s in OrderStatus} | {S.ARRIVED: "at the door"}
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MAX_LISTED = 5


# --- views ------------------------------------------------------------------------------------


class OrderLike(Protocol):
    """What :meth:`OrderView.from_row` reads (the store's ``OrderRow`` has it all)."""

    @property
    def id(self) -> str: ...
    @property
    def shop(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def rider(self) -> str | None: ...
    @property
    def customer_name(self) -> str: ...
    @property
    def window_start(self) -> datetime: ...
    @property
    def window_end(self) -> datetime: ...
    @property
    def eta(self) -> datetime | None: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def accepted_at(self) -> datetime | None: ...
    @property
    def delivered_at(self) -> datetime | None: ...
    @property
    def closed_at(self) -> datetime | None: ...
    @property
    def failure_reason(self) -> str | None: ...
    @property
    def updated_at(self) -> datetime: ...
    @property
    def handover_failures(self) -> int: ...


class RiderLike(Protocol):
    """What :meth:`RiderView.from_row` reads (the store's ``RiderRow`` has it all)."""

    @property
    def id(self) -> str: ...
    @property
    def presence(self) -> str: ...
    @property
    def presence_at(self) -> datetime | None: ...
    @property
    def position_at(self) -> datetime | None: ...
    @property
    def lat(self) -> float | None: ...
    @property
    def lon(self) -> float | None: ...
    @property
    def load(self) -> int: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class OrderView:
    """The part of an order the rules look at. Datetimes are timezone-aware."""

    id: str
    shop: str
    status: OrderStatus
    rider: str | None = None
    customer_name: str = ""
    window_start: datetime
    window_end: datetime
    eta: datetime | None = None
    created_at: datetime
    accepted_at: datetime | None = None
    delivered_at: datetime | None = None
    closed_at: datetime | None = None
    failure_reason: str | None = None
    updated_at: datetime
    #: Wrong handover codes entered so far (issue 16).
    handover_failures: int = 0

    @classmethod
    def from_row(cls, row: OrderLike) -> OrderView:
        """A view of a store row (or anything with the same attributes)."""
        status = _STATUS.get(row.status) or OrderStatus(row.status)
        return cls(
            id=row.id,
            shop=row.shop,
            status=status,
            rider=row.rider,
            customer_name=row.customer_name,
            window_start=row.window_start,
            window_end=row.window_end,
            eta=row.eta,
            created_at=row.created_at,
            accepted_at=row.accepted_at,
            delivered_at=row.delivered_at,
            closed_at=row.closed_at,
            failure_reason=row.failure_reason,
            updated_at=row.updated_at,
            handover_failures=row.handover_failures or 0,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class RiderView:
    """The part of a rider the rules look at."""

    id: str
    presence: Presence
    presence_at: datetime | None = None
    position_at: datetime | None = None
    lat: float | None = None
    lon: float | None = None
    load: int = 0

    @classmethod
    def from_row(cls, row: RiderLike) -> RiderView:
        """A view of a store row (or anything with the same attributes)."""
        presence = _PRESENCE.get(row.presence) or Presence(row.presence)
        return cls(
            id=row.id,
            presence=presence,
            presence_at=row.presence_at,
            position_at=row.position_at,
            lat=row.lat,
            lon=row.lon,
            load=row.load,
        )


@dataclass(frozen=True, slots=True)
class Finding:
    """A rule whose condition holds: what to raise (or keep open)."""

    rule: AlertRule
    severity: Severity
    shop: str
    order: str | None
    rider: str | None
    message: str
    action: str

    @property
    def subject(self) -> tuple[str | None, str | None]:
        """(order, rider) the alert is about; either may be None."""
        return (self.order, self.rider)

    @property
    def key(self) -> AlertKey:
        """(rule, shop, order, rider): at most one open alert per key."""
        return (self.rule, self.shop, self.order, self.rider)


def alert_key(rule: str, shop: str, order: str | None, rider: str | None) -> AlertKey:
    """The :attr:`Finding.key` of a stored alert (e.g. from an ``AlertRow``'s columns)."""
    return (AlertRule(rule), shop, order, rider)


# --- wording ----------------------------------------------------------------------------------


def _dur(delta: timedelta) -> str:
    minutes = int(delta.total_seconds() // 60)
    if minutes < 1:
        return "under a minute"
    if minutes < 120:
        return f"{minutes} min"
    hours, rest = divmod(minutes, 60)
    return f"{hours} h {rest} min" if rest else f"{hours} h"


@lru_cache(maxsize=64)
def _local_date(now: datetime, tz: tzinfo) -> date:
    return now.astimezone(tz).date()


def _clock(at: datetime, now: datetime, t: Thresholds) -> str:
    """``14:30`` in the shop's time zone; ``15 Feb 09:05`` when it is not today's date."""
    tz = t.tz
    return _clock_on(at, _local_date(now, tz), tz)


@lru_cache(maxsize=65_536)
def _clock_on(at: datetime, today: date, tz: tzinfo) -> str:
    # The same instants (window ends, creation times) are worded again at every tick of the
    # alerts service; their wording only depends on the local date they are read on.
    local = at.astimezone(tz)
    hhmm = f"{local.hour:02d}:{local.minute:02d}"
    if local.date() != today:
        return f"{local.day} {_MONTHS[local.month - 1]} {hhmm}"
    return hhmm


def _order(order: OrderView) -> str:
    return f"{order.id} for {order.customer_name}" if order.customer_name else order.id


def _reason(reason: str | None) -> str:
    return reason.replace("_", " ") if reason else "no reason given"


def _rider_state(order: OrderView, rider: RiderView | None, now: datetime, t: Thresholds) -> str:
    """``rider r7 last seen 6 min ago`` and friends."""
    if order.rider is None:
        return "no rider assigned"
    name = f"rider {order.rider}"
    if rider is None:
        return f"{name} is unknown to the backbone"
    if rider.presence is Presence.OFFLINE:
        since = f" since {_clock(rider.presence_at, now, t)}" if rider.presence_at else ""
        return f"{name} is offline{since}"
    if rider.position_at is None:
        return f"{name} has sent no position yet"
    return f"{name} last seen {_dur(now - rider.position_at)} ago"


def _order_finding(
    rule: AlertRule,
    order: OrderView,
    t: Thresholds,
    message: str,
    action: str,
    *,
    rider: str | None = None,
) -> Finding:
    return Finding(rule, t.severity_of(rule), order.shop, order.id, rider, message, action)


# --- when a rule holds -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Span:
    """When a rule holds for unchanged inputs: once ``now`` is past ``after`` (strictly) and while
    it is not past ``until``; None is unbounded. Lets the alerts service look at an order again
    only when one of its rules may change its mind."""

    after: datetime | None = None
    until: datetime | None = None

    def holds(self, now: datetime) -> bool:
        return (self.after is None or now > self.after) and (self.until is None or now <= self.until)

    def next_change(self, now: datetime) -> datetime | None:
        """The instant past which :meth:`holds` may differ from its value at ``now``; None: never."""
        if self.after is not None and now <= self.after:
            return self.after
        if self.until is not None and now <= self.until:
            return self.until
        return None


ALWAYS: Span = Span()


def overdue_span(order: OrderView, t: Thresholds) -> Span | None:
    if order.status in CLOSED:
        return None
    return Span(after=order.window_end + t.overdue_grace)


def eta_slip_span(order: OrderView, t: Thresholds) -> Span | None:
    if order.status not in ON_THE_WAY or order.eta is None or order.eta - order.window_end <= t.eta_slip:
        return None
    # Overdue takes over past the window's end plus the grace.
    return Span(until=order.window_end + t.overdue_grace) if t.enabled(AlertRule.OVERDUE) else ALWAYS


def stale_position_span(order: OrderView, rider: RiderView | None, t: Thresholds) -> Span | None:
    if order.status not in ON_THE_WAY or order.rider is None:
        return None
    base = order.updated_at if rider is None or rider.position_at is None else rider.position_at
    return Span(after=base + t.stale_position)


def unassigned_span(order: OrderView, t: Thresholds) -> Span | None:
    return Span(after=order.created_at + t.unassigned) if order.status in WAITING_FOR_RIDER else None


def customer_unreachable_span(order: OrderView) -> Span | None:
    return ALWAYS if _unreachable(order) else None


def delivery_failed_span(order: OrderView, t: Thresholds) -> Span | None:
    if order.status not in FAILED_OUTCOME:
        return None
    if _unreachable(order) and t.enabled(AlertRule.CUSTOMER_UNREACHABLE):
        return None
    return ALWAYS


def handover_code_span(order: OrderView, t: Thresholds) -> Span | None:
    """While an order not yet closed has had too many wrong handover codes."""
    if order.status in CLOSED or order.handover_failures < t.handover_wrong_codes:
        return None
    return ALWAYS


def rider_offline_span(rider: RiderView, t: Thresholds) -> Span | None:
    """When ``rider`` counts as offline for a shop with thresholds ``t`` (if it carries its orders)."""
    if rider.presence is not Presence.OFFLINE:
        return None
    return ALWAYS if rider.presence_at is None else Span(after=rider.presence_at + t.rider_offline)


def _unreachable(order: OrderView) -> bool:
    return order.failure_reason == _UNREACHABLE and order.status not in TERMINAL


# --- the rules --------------------------------------------------------------------------------


def overdue(order: OrderView, rider: RiderView | None, now: datetime, t: Thresholds) -> Finding | None:
    """Not delivered (nor closed otherwise) by the end of the promised window plus the grace."""
    span = overdue_span(order, t)
    if span is None or not span.holds(now):
        return None
    late = now - order.window_end
    eta = ""
    if order.eta is not None and order.status in OUT_FOR_DELIVERY:
        eta = f", ETA {_clock(order.eta, now, t)}"
    message = (
        f"Order {_order(order)} is {_dur(late)} past its promise "
        f"(window ended {_clock(order.window_end, now, t)}){eta}; "
        f"{_rider_state(order, rider, now, t)}."
    )
    if order.rider is None or order.status in _NO_RIDER:
        action = "Assign a rider by hand and tell the customer the delivery is late"
    elif order.status in OUT_FOR_DELIVERY:
        action = "Call the rider for an ETA, then call the customer"
    else:
        action = "Call the rider or reassign the order, then tell the customer"
    return _order_finding(AlertRule.OVERDUE, order, t, message, action)


def eta_slip(order: OrderView, rider: RiderView | None, now: datetime, t: Thresholds) -> Finding | None:
    """While on the way, the ETA runs past the promised window by more than ``eta_slip_min``.

    Resolves once the order is overdue (if the shop has ``overdue`` on): that alert takes over.
    """
    span = eta_slip_span(order, t)
    if span is None or not span.holds(now) or order.eta is None:
        return None
    slip = order.eta - order.window_end
    message = (
        f"Order {_order(order)} will be about {_dur(slip)} late: "
        f"ETA {_clock(order.eta, now, t)}, window ends {_clock(order.window_end, now, t)}; "
        f"{_rider_state(order, rider, now, t)}."
    )
    action = "Call the customer to warn them of the new time"
    return _order_finding(AlertRule.ETA_SLIP, order, t, message, action)


def stale_position(order: OrderView, rider: RiderView | None, now: datetime, t: Thresholds) -> Finding | None:
    """Picked up or en route, and the rider's last position is older than ``stale_position_min``.

    A rider that never sent a position counts from the order's last update.
    """
    span = stale_position_span(order, rider, t)
    if span is None or not span.holds(now):
        return None
    words = _STATUS_WORDS[order.status]
    if rider is None or rider.position_at is None:
        message = f"Rider {order.rider} has sent no position while order {_order(order)} is {words}"
    else:
        age = now - rider.position_at
        message = (
            f"No position from rider {order.rider} for {_dur(age)} "
            f"(last at {_clock(rider.position_at, now, t)}) while order {_order(order)} is {words}"
        )
    if rider is not None and rider.presence is Presence.OFFLINE:
        message += "; the rider is offline"
    action = "Call the rider (their phone may have stopped sharing its location)"
    return _order_finding(AlertRule.STALE_POSITION, order, t, message + ".", action, rider=order.rider)


def rider_offline(
    rider: RiderView,
    orders_carried: Iterable[OrderView],
    now: datetime,
    t: Thresholds | Callable[[str], Thresholds],
) -> list[Finding]:
    """Presence went offline (Last Will) while the rider carries orders; one finding per shop.

    Only orders assigned to ``rider`` and out for delivery count. ``t`` is one shop's thresholds
    or a ``shop -> Thresholds`` function (orders may belong to several shops). The rider must have
    been offline for more than ``rider_offline_min`` (unknown since when counts as long enough).
    """
    if rider.presence is not Presence.OFFLINE:
        return []
    by_shop: dict[str, dict[str, OrderView]] = {}
    for order in orders_carried:
        if order.rider == rider.id and order.status in OUT_FOR_DELIVERY:
            by_shop.setdefault(order.shop, {})[order.id] = order
    findings: list[Finding] = []
    for shop in sorted(by_shop):
        ts = t if isinstance(t, Thresholds) else t(shop)
        span = rider_offline_span(rider, ts)
        if span is None or not span.holds(now):
            continue
        orders = [by_shop[shop][order_id] for order_id in sorted(by_shop[shop])]
        if len(orders) == 1:
            carrying = f"order {_order(orders[0])}"
        else:
            listed = ", ".join(o.id for o in orders[:_MAX_LISTED])
            more = f" and {len(orders) - _MAX_LISTED} more" if len(orders) > _MAX_LISTED else ""
            carrying = f"{len(orders)} orders: {listed}{more}"
        if rider.presence_at is None:
            went = "is offline"
        else:
            went = f"went offline {_dur(now - rider.presence_at)} ago ({_clock(rider.presence_at, now, ts)})"
        findings.append(
            Finding(
                rule=AlertRule.RIDER_OFFLINE,
                severity=ts.severity_of(AlertRule.RIDER_OFFLINE),
                shop=shop,
                order=None,
                rider=rider.id,
                message=f"Rider {rider.id} {went} while carrying {carrying}.",
                action="Call the rider; if they cannot be reached, warn the customers",
            )
        )
    return findings


def unassigned(order: OrderView, rider: RiderView | None, now: datetime, t: Thresholds) -> Finding | None:
    """Created (or declined, or offered) and not accepted within ``unassigned_min`` of creation."""
    span = unassigned_span(order, t)
    if span is None or not span.holds(now):
        return None
    waited = now - order.created_at
    if order.status is S.ASSIGNED and order.rider is not None:
        state = f"offered to rider {order.rider}, not accepted yet"
        action = f"Call rider {order.rider} or assign another rider"
    else:
        state = "declined, no new rider yet" if order.status is S.DECLINED else "no rider found yet"
        action = "Assign a rider by hand"
    message = (
        f"Order {_order(order)} has waited {_dur(waited)} for a rider "
        f"(created {_clock(order.created_at, now, t)}; "
        f"window starts {_clock(order.window_start, now, t)}): {state}."
    )
    return _order_finding(AlertRule.UNASSIGNED, order, t, message, action)


def customer_unreachable(
    order: OrderView, rider: RiderView | None, now: datetime, t: Thresholds
) -> Finding | None:
    """The rider reported the customer unreachable and the bouquet is still out."""
    if customer_unreachable_span(order) is None:
        return None
    reported = order.closed_at if order.status is S.FAILED and order.closed_at else order.updated_at
    who = f"Rider {order.rider}" if order.rider else "The rider"
    customer = order.customer_name or "the customer"
    state = "; the delivery is marked failed" if order.status is S.FAILED else ""
    message = (
        f"{who} cannot reach {customer} for order {order.id} (reported {_clock(reported, now, t)}){state}."
    )
    action = "Call the customer, then tell the rider to try again or bring the bouquet back"
    return _order_finding(AlertRule.CUSTOMER_UNREACHABLE, order, t, message, action)


def delivery_failed(
    order: OrderView, rider: RiderView | None, now: datetime, t: Thresholds
) -> Finding | None:
    """The order failed or was returned (a failed, customer-unreachable order: see module doc)."""
    if delivery_failed_span(order, t) is None:
        return None
    at = order.closed_at or order.updated_at
    if order.status is S.RETURNED:
        after = f" after a failed delivery ({_reason(order.failure_reason)})"
        message = (
            f"Order {_order(order)} was returned to the shop at {_clock(at, now, t)}"
            f"{after if order.failure_reason else ''}."
        )
        action = "Call the customer to arrange a new delivery or a refund"
    else:
        message = (
            f"Delivery of order {_order(order)} failed at {_clock(at, now, t)}: "
            f"{_reason(order.failure_reason)}."
        )
        action = "Call the customer to arrange a new delivery, or have the bouquet brought back"
    return _order_finding(AlertRule.DELIVERY_FAILED, order, t, message, action)


def handover_code(order: OrderView, rider: RiderView | None, now: datetime, t: Thresholds) -> Finding | None:
    """The rider entered the wrong handover code too many times (issue 16)."""
    if handover_code_span(order, t) is None:
        return None
    who = f"Rider {order.rider}" if order.rider else "The rider"
    message = (
        f"{who} entered a wrong handover code {order.handover_failures} times for order "
        f"{_order(order)}; it is not delivered."
    )
    action = "Call the customer and the rider: is the rider at the right door?"
    return _order_finding(AlertRule.HANDOVER_CODE, order, t, message, action)


# --- scheduling helpers -----------------------------------------------------------------------


def escalation_due(last_notified_at: datetime, now: datetime, t: Thresholds) -> bool:
    """An unacknowledged open alert last (re-)notified at ``last_notified_at`` is due again."""
    return now - last_notified_at > t.escalate_after


def followup_due(order: OrderView, now: datetime, t: Thresholds) -> bool:
    """The after-delivery follow-up of ``order`` is due (the caller records that it was sent)."""
    return (
        order.status is S.DELIVERED
        and order.delivered_at is not None
        and now - order.delivered_at > t.followup_after
    )


# --- evaluation -------------------------------------------------------------------------------

OrderRule: TypeAlias = Callable[[OrderView, RiderView | None, datetime, Thresholds], Finding | None]

_ORDER_RULES: tuple[tuple[AlertRule, OrderRule, frozenset[OrderStatus]], ...] = (
    (AlertRule.OVERDUE, overdue, frozenset(OrderStatus) - CLOSED),
    (AlertRule.ETA_SLIP, eta_slip, ON_THE_WAY),
    (AlertRule.STALE_POSITION, stale_position, ON_THE_WAY),
    (AlertRule.UNASSIGNED, unassigned, WAITING_FOR_RIDER),
    (AlertRule.CUSTOMER_UNREACHABLE, customer_unreachable, frozenset(OrderStatus) - TERMINAL),
    (AlertRule.DELIVERY_FAILED, delivery_failed, FAILED_OUTCOME),
    (AlertRule.HANDOVER_CODE, handover_code, frozenset(OrderStatus) - CLOSED),
)
#: status -> the order rules that can fire for it (each rule still checks for itself).
_RULES_BY_STATUS: dict[OrderStatus, tuple[tuple[AlertRule, OrderRule], ...]] = {
    status: tuple((rule, fn) for rule, fn, statuses in _ORDER_RULES if status in statuses)
    for status in OrderStatus
}

#: rule -> its order rule function (what the alerts service words a finding with).
ORDER_RULE: dict[AlertRule, OrderRule] = {rule: fn for rule, fn, _ in _ORDER_RULES}

_RULES_OF_STATUS: dict[OrderStatus, frozenset[AlertRule]] = {
    status: frozenset(rule for rule, _ in rules) for status, rules in _RULES_BY_STATUS.items()
}


def order_spans(order: OrderView, rider: RiderView | None, t: Thresholds) -> list[tuple[AlertKey, Span]]:
    """The order rules of ``order`` that hold at some time, keyed like their findings, with when
    they hold: :func:`evaluate` finds exactly the keys whose span holds at ``now``."""
    rules = _RULES_OF_STATUS[order.status] - t.disabled if t.disabled else _RULES_OF_STATUS[order.status]
    shop, oid = order.shop, order.id
    candidates = (
        (AlertRule.OVERDUE, None, overdue_span(order, t) if AlertRule.OVERDUE in rules else None),
        (AlertRule.ETA_SLIP, None, eta_slip_span(order, t) if AlertRule.ETA_SLIP in rules else None),
        (
            AlertRule.STALE_POSITION,
            order.rider,
            stale_position_span(order, rider, t) if AlertRule.STALE_POSITION in rules else None,
        ),
        (AlertRule.UNASSIGNED, None, unassigned_span(order, t) if AlertRule.UNASSIGNED in rules else None),
        (
            AlertRule.CUSTOMER_UNREACHABLE,
            None,
            customer_unreachable_span(order) if AlertRule.CUSTOMER_UNREACHABLE in rules else None,
        ),
        (
            AlertRule.DELIVERY_FAILED,
            None,
            delivery_failed_span(order, t) if AlertRule.DELIVERY_FAILED in rules else None,
        ),
        (
            AlertRule.HANDOVER_CODE,
            None,
            handover_code_span(order, t) if AlertRule.HANDOVER_CODE in rules else None,
        ),
    )
    return [((rule, shop, oid, who), span) for rule, who, span in candidates if span is not None]


def rider_offline_spans(
    rider: RiderView, orders_carried: Iterable[OrderView], thresholds_for: Callable[[str], Thresholds]
) -> list[tuple[AlertKey, Span]]:
    """:func:`order_spans` of the ``rider_offline`` rule: one per shop whose orders ``rider`` carries."""
    if rider.presence is not Presence.OFFLINE:
        return []
    shops = {o.shop for o in orders_carried if o.rider == rider.id and o.status in OUT_FOR_DELIVERY}
    spans: list[tuple[AlertKey, Span]] = []
    for shop in sorted(shops):
        t = thresholds_for(shop)
        span = rider_offline_span(rider, t)
        if span is not None and t.enabled(AlertRule.RIDER_OFFLINE):
            spans.append(((AlertRule.RIDER_OFFLINE, shop, None, rider.id), span))
    return spans


def evaluate(
    orders: Iterable[OrderView],
    riders: Mapping[str, RiderView],
    now: datetime,
    thresholds_for: Callable[[str], Thresholds],
) -> list[Finding]:
    """Every finding for the current state, at most one per :attr:`Finding.key`.

    ``riders`` maps rider id to view; ``thresholds_for`` is typically
    :meth:`RulesConfig.for_shop <bloomwire.services.alerts.config.RulesConfig.for_shop>`. Rules a shop has
    disabled are skipped.
    """
    return list(evaluate_by_key(orders, riders, now, thresholds_for).values())


def evaluate_by_key(
    orders: Iterable[OrderView],
    riders: Mapping[str, RiderView],
    now: datetime,
    thresholds_for: Callable[[str], Thresholds],
) -> dict[AlertKey, Finding]:
    """:func:`evaluate`, keyed by :attr:`Finding.key` (what the alerts service reconciles by)."""
    cache: dict[str, Thresholds] = {}

    def shop_thresholds(shop: str) -> Thresholds:
        t = cache.get(shop)
        if t is None:
            t = cache[shop] = thresholds_for(shop)
        return t

    findings: dict[AlertKey, Finding] = {}
    carried: dict[RiderView, list[OrderView]] = {}
    offline = Presence.OFFLINE
    for order in orders:
        t = cache.get(order.shop) or shop_thresholds(order.shop)
        rider = riders.get(order.rider) if order.rider is not None else None
        disabled = t.disabled
        for rule, fn in _RULES_BY_STATUS[order.status]:
            if rule in disabled:
                continue
            found = fn(order, rider, now, t)
            if found is not None:
                findings.setdefault(found.key, found)
        if rider is not None and rider.presence is offline and order.status in OUT_FOR_DELIVERY:
            carried.setdefault(rider, []).append(order)
    for offline_rider, carried_orders in carried.items():
        for found in rider_offline(offline_rider, carried_orders, now, shop_thresholds):
            if shop_thresholds(found.shop).enabled(AlertRule.RIDER_OFFLINE):
                findings.setdefault(found.key, found)
    return findings


# --- benchmark --------------------------------------------------------------------------------

_BENCH_MIX: Sequence[tuple[OrderStatus, int]] = (
    (S.CREATED, 8), (S.DECLINED, 2), (S.ASSIGNED, 10), (S.ACCEPTED, 15), (S.PICKED_UP, 10),
    (S.EN_ROUTE, 35), (S.ARRIVED, 10), (S.FAILED, 3), (S.RETURNED, 1), (S.DELIVERED, 6),
)  # fmt: skip


def bench_state(
    n_orders: int = 10_000, n_riders: int = 2_000, *, seed: int = 7
) -> tuple[list[OrderView], dict[str, RiderView], datetime]:
    """A reproducible, busy state: ``(orders, riders, now)`` with a realistic status mix."""
    rng = random.Random(seed)
    now = datetime(2027, 2, 14, 12, 0, tzinfo=UTC)
    minute = timedelta(minutes=1)
    riders: dict[str, RiderView] = {}
    for i in range(n_riders):
        rid = f"r{i}"
        riders[rid] = RiderView(
            id=rid,
            presence=Presence.OFFLINE if rng.random() < 0.1 else Presence.ONLINE,
            presence_at=now - rng.uniform(0, 30) * minute,
            position_at=None if rng.random() < 0.02 else now - rng.uniform(0, 10) * minute,
            lat=52.5 + rng.uniform(-0.1, 0.1),
            lon=13.4 + rng.uniform(-0.1, 0.1),
            load=rng.randint(0, 3),
        )
    statuses, weights = zip(*_BENCH_MIX, strict=True)
    orders: list[OrderView] = []
    for i, status in enumerate(rng.choices(statuses, weights, k=n_orders)):
        end = now + rng.uniform(-40, 90) * minute
        has_rider = status not in {S.CREATED, S.DECLINED}
        orders.append(
            OrderView(
                id=f"o{i}",
                shop=f"s{i % 50}",
                status=status,
                rider=f"r{rng.randrange(n_riders)}" if has_rider and n_riders else None,
                customer_name=f"Customer {i}",
                window_start=end - 60 * minute,
                window_end=end,
                eta=end + rng.uniform(-30, 20) * minute if status in ON_THE_WAY else None,
                created_at=now - rng.uniform(0, 120) * minute,
                failure_reason=rng.choice(list(FailureReason)).value if status in FAILED_OUTCOME else None,
                closed_at=now - rng.uniform(0, 60) * minute if status in CLOSED else None,
                delivered_at=now - rng.uniform(0, 60) * minute if status is S.DELIVERED else None,
                updated_at=now - rng.uniform(0, 20) * minute,
            )
        )
    return orders, riders, now


def bench_tick(n_orders: int = 10_000, n_riders: int = 2_000) -> float:
    """Seconds one :func:`evaluate` takes over a busy synthetic state (after one warm-up run)."""
    orders, riders, now = bench_state(n_orders, n_riders)
    config = RulesConfig(shops={"s1": Thresholds(unassigned_min=5), "s2": Thresholds(timezone="UTC")})
    evaluate(orders, riders, now, config.for_shop)
    start = time.perf_counter()
    evaluate(orders, riders, now, config.for_shop)
    return time.perf_counter() - start
