"""The order lifecycle of docs/design.md §3 as one transition table."""

from __future__ import annotations

from enum import StrEnum

from bloomwire.errors import TransitionError


class OrderStatus(StrEnum):
    """Where an order stands."""

    CREATED = "created"
    ASSIGNED = "assigned"
    ACCEPTED = "accepted"
    PICKED_UP = "picked_up"
    EN_ROUTE = "en_route"
    ARRIVED = "arrived"
    DELIVERED = "delivered"
    DECLINED = "declined"
    FAILED = "failed"
    CANCELLED = "cancelled"
    RETURNED = "returned"


class FailureReason(StrEnum):
    """Why a delivery failed."""

    CUSTOMER_UNREACHABLE = "customer_unreachable"
    ADDRESS_WRONG = "address_wrong"
    DAMAGED = "damaged"
    REFUSED = "refused"
    OTHER = "other"


S = OrderStatus

#: status -> statuses it may move to. ``declined`` means "back to unassigned".
TRANSITIONS: dict[OrderStatus, frozenset[OrderStatus]] = {
    S.CREATED: frozenset({S.ASSIGNED, S.CANCELLED}),
    S.ASSIGNED: frozenset({S.ACCEPTED, S.DECLINED, S.ASSIGNED, S.CANCELLED}),
    S.DECLINED: frozenset({S.ASSIGNED, S.CANCELLED}),
    S.ACCEPTED: frozenset({S.PICKED_UP, S.DECLINED, S.ASSIGNED, S.CANCELLED}),
    S.PICKED_UP: frozenset({S.EN_ROUTE, S.ARRIVED, S.FAILED, S.RETURNED}),
    S.EN_ROUTE: frozenset({S.ARRIVED, S.DELIVERED, S.FAILED, S.RETURNED}),
    S.ARRIVED: frozenset({S.DELIVERED, S.FAILED, S.RETURNED}),
    S.FAILED: frozenset({S.RETURNED}),
    S.DELIVERED: frozenset(),
    S.CANCELLED: frozenset(),
    S.RETURNED: frozenset(),
}

#: Statuses a rider may report on ``riders/R/orders/O/status`` (acceptance goes via replies).
RIDER_REPORTABLE: frozenset[OrderStatus] = frozenset(
    {S.PICKED_UP, S.EN_ROUTE, S.ARRIVED, S.DELIVERED, S.FAILED, S.RETURNED, S.DECLINED}
)

#: Orders in these statuses are finished; nothing moves them any more (``failed`` may still return).
TERMINAL: frozenset[OrderStatus] = frozenset({S.DELIVERED, S.CANCELLED, S.RETURNED})
CLOSED: frozenset[OrderStatus] = TERMINAL | {S.FAILED}

#: The rider is carrying the bouquet: the customer may see the rider's position.
OUT_FOR_DELIVERY: frozenset[OrderStatus] = frozenset({S.PICKED_UP, S.EN_ROUTE, S.ARRIVED})

#: A rider is bound to the order (counts towards the rider's load).
RIDER_BOUND: frozenset[OrderStatus] = frozenset({S.ASSIGNED, S.ACCEPTED}) | OUT_FOR_DELIVERY

#: No rider holds the order; dispatch should offer it.
UNASSIGNED: frozenset[OrderStatus] = frozenset({S.CREATED, S.DECLINED})


def can_transition(current: OrderStatus, new: OrderStatus) -> bool:
    """True if ``current -> new`` is a legal move."""
    return new in TRANSITIONS[current]


def check_transition(current: OrderStatus, new: OrderStatus) -> None:
    """Raise :class:`TransitionError` with a readable reason unless ``current -> new`` is legal."""
    if can_transition(current, new):
        return
    allowed = sorted(s.value for s in TRANSITIONS[current])
    if not allowed:
        raise TransitionError(f"order is already {current.value}; it cannot become {new.value}")
    raise TransitionError(
        f"an order that is {current.value} cannot become {new.value} (allowed next: {', '.join(allowed)})"
    )
