"""Which alert conditions hold, kept current by looking only at what changed or is due (#19).

Each order and rider (a *subject*) is turned into :class:`~bloomwire.services.alerts.rules.Span` s
once per change of its row (or of the rider it depends on): when each of its rules holds, as long
as the row stays the same. A deadline index (a heap of the instant each subject's next span
boundary is passed) brings it back when time alone may change a verdict. A tick therefore
re-evaluates the subjects whose rows changed and the subjects that are due, not every live order.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Final, TypeAlias

from bloomwire.contract.events import AlertRule, Presence
from bloomwire.services.alerts.config import Thresholds
from bloomwire.services.alerts.rules import (
    ON_THE_WAY,
    ORDER_RULE,
    AlertKey,
    Finding,
    OrderView,
    RiderView,
    Span,
    order_spans,
    rider_offline,
    rider_offline_spans,
)

Subject: TypeAlias = tuple[str, str]  # ("order", id) or ("rider", id)
Spans: TypeAlias = list[tuple[AlertKey, Span]]

ORDER: Final = "order"
RIDER: Final = "rider"


class Watch:
    """The keys whose condition holds (:attr:`found`, key -> subject), updated by :meth:`update`.

    Equal, after each :meth:`update`, to the keys of
    :func:`~bloomwire.services.alerts.rules.evaluate_by_key` over the same orders and riders at
    the same time (tests/test_alert_watch.py checks it); :meth:`finding` words one on demand.
    """

    def __init__(self, thresholds_for: Callable[[str], Thresholds]) -> None:
        self.thresholds_for = thresholds_for
        self._reset()

    def _reset(self) -> None:
        self.orders: Mapping[str, OrderView] = {}
        self.riders: Mapping[str, RiderView] = {}
        self.found: dict[AlertKey, Subject] = {}
        self.now: datetime | None = None
        #: Subjects evaluated by the last update (changed or due), for the stats.
        self.visited = 0
        self._carried: dict[str, set[str]] = {}  # rider -> ids of the orders naming it
        self._spans: dict[Subject, Spans] = {}
        self._held: dict[Subject, list[AlertKey]] = {}
        self._wake: dict[Subject, datetime] = {}
        self._heap: list[tuple[datetime, Subject]] = []

    def update(self, orders: Mapping[str, OrderView], riders: Mapping[str, RiderView], now: datetime) -> None:
        """Take the live ``orders`` and ``riders`` read at ``now``. Views of unchanged rows must be
        the same objects as last time (the store reader's row cache keeps them)."""
        if self.now is not None and now < self.now:
            self._reset()  # the clock went back: spans looked at since may flip back
        changed = self._changed(orders, riders)
        due = self._due(now) - changed
        for subject in changed:
            self._spans[subject] = self._spans_of(subject)
            self._hold(subject, now)
        for subject in due:
            self._hold(subject, now)
        self.visited = len(changed) + len(due)
        self.now = now

    def finding(self, key: AlertKey, now: datetime) -> Finding | None:
        """The rule's finding for ``key`` (with its current wording), None if it does not hold."""
        rule, shop, order_id, rider_id = key
        if order_id is not None:
            order = self.orders.get(order_id)
            if order is None:
                return None
            rider = self.riders.get(order.rider) if order.rider is not None else None
            return ORDER_RULE[rule](order, rider, now, self.thresholds_for(order.shop))
        rider_view = self.riders.get(rider_id or "")
        if rule is not AlertRule.RIDER_OFFLINE or rider_view is None:
            return None
        for found in rider_offline(rider_view, self._carried_orders(rider_view.id), now, self.thresholds_for):
            if found.shop == shop:
                return found
        return None

    # --- what changed -----------------------------------------------------------------------------

    def _changed(self, orders: Mapping[str, OrderView], riders: Mapping[str, RiderView]) -> set[Subject]:
        """Subjects whose spans must be computed again; updates the rider -> orders index."""
        old_orders, old_riders = self.orders, self.riders
        self.orders, self.riders = orders, riders
        changed_orders = [i for i, v in orders.items() if old_orders.get(i) is not v]
        changed_orders += old_orders.keys() - orders.keys()
        changed_riders = [i for i, v in riders.items() if old_riders.get(i) is not v]
        changed_riders += old_riders.keys() - riders.keys()
        subjects: set[Subject] = {(ORDER, i) for i in changed_orders}
        touched = set(changed_riders)
        for oid in changed_orders:
            old, new = old_orders.get(oid), orders.get(oid)
            # rider_offline reads the rider, shop and status of the orders a rider carries
            if old is None or new is None or _filed(old) != _filed(new):
                touched.update(self._move(oid, old, new))
        for rid in changed_riders:  # of the order rules, only stale_position reads the rider
            carried = self._carried.get(rid, ())
            subjects.update((ORDER, oid) for oid in carried if orders[oid].status in ON_THE_WAY)
        subjects.update((RIDER, rid) for rid in touched)
        return subjects

    def _move(self, oid: str, old: OrderView | None, new: OrderView | None) -> list[str]:
        """Re-file order ``oid`` under its rider; the riders whose carried orders changed."""
        riders: list[str] = []
        if old is not None and old.rider is not None:
            held = self._carried.get(old.rider)
            if held is not None:
                held.discard(oid)
                if not held:
                    del self._carried[old.rider]
            riders.append(old.rider)
        if new is not None and new.rider is not None:
            self._carried.setdefault(new.rider, set()).add(oid)
            riders.append(new.rider)
        return riders

    def _carried_orders(self, rider: str) -> list[OrderView]:
        orders = self.orders
        return [orders[oid] for oid in self._carried.get(rider, ()) if oid in orders]

    def _spans_of(self, subject: Subject) -> Spans:
        kind, ident = subject
        if kind == ORDER:
            order = self.orders.get(ident)
            if order is None:
                return []
            rider = self.riders.get(order.rider) if order.rider is not None else None
            return order_spans(order, rider, self.thresholds_for(order.shop))
        rider_view = self.riders.get(ident)
        if rider_view is None or rider_view.presence is not Presence.OFFLINE:
            return []  # rider_offline_spans would say so, after listing the orders it carries
        return rider_offline_spans(rider_view, self._carried_orders(ident), self.thresholds_for)

    # --- what holds, and when to look again -------------------------------------------------------

    def _hold(self, subject: Subject, now: datetime) -> None:
        """Bring :attr:`found` in line with ``subject``'s spans at ``now``; schedule its next look."""
        spans = self._spans.get(subject, [])
        holding = [key for key, span in spans if span.holds(now)]
        held = self._held.get(subject, [])
        if holding != held:
            found = self.found
            for key in held:
                found.pop(key, None)
            for key in holding:
                found.setdefault(key, subject)
            if holding:
                self._held[subject] = holding
            else:
                del self._held[subject]
        if not spans:
            self._spans.pop(subject, None)
            return
        changes = [at for _, span in spans if (at := span.next_change(now)) is not None]
        if changes:
            self._schedule(subject, min(changes))

    def _schedule(self, subject: Subject, at: datetime) -> None:
        # A subject woken early is only looked at again and rescheduled: keep one wake-up per
        # subject, the earliest, so a row that changes at every tick does not grow the heap.
        wake = self._wake.get(subject)
        if wake is not None and wake <= at:
            return
        self._wake[subject] = at
        heapq.heappush(self._heap, (at, subject))
        if len(self._heap) > 2 * len(self._wake) + 1024:
            self._heap = [(t, s) for s, t in self._wake.items()]
            heapq.heapify(self._heap)

    def _due(self, now: datetime) -> set[Subject]:
        """Subjects whose wake-up time ``now`` is past (a span boundary ``b`` flips for now > b)."""
        heap, wake = self._heap, self._wake
        due: set[Subject] = set()
        while heap and heap[0][0] < now:
            at, subject = heapq.heappop(heap)
            if wake.get(subject) == at:
                del wake[subject]
                due.add(subject)
        return due


def _filed(order: OrderView) -> tuple[str | None, str, str]:
    return (order.rider, order.status, order.shop)
