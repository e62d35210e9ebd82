"""The alerts service (docs/design.md §4): rules on every event and on a tick, follow-ups after delivery.

Two triggers feed the same decision step:

* **edge** — every canonical ``shops/S/orders/O/status`` event (published by the persister after
  its commit) and every live ``shops/S/riders/R/state`` snapshot marks that order or rider dirty;
  one worker re-reads the dirty subjects from the store (read-only) and evaluates their rules;
* **level** — an APScheduler tick reads every live order and rider and re-evaluates those whose
  row changed or whose rule is due (:class:`~bloomwire.services.alerts.watch.Watch`), so a missed
  event only delays an alert by one tick. A second job sends the after-delivery follow-ups.

The alerts table of the store is the truth. The service keeps a *book* of the open alerts (one per
:attr:`Finding.key <bloomwire.services.alerts.rules.Finding.key>`), rebuilt from the store at every tick,
plus an *overlay* of changes it has sent (or learned from ``shops/+/alerts``) that the store may
not show yet; an overlay entry is dropped once a snapshot reflects it, or after a grace period
(the next evaluation then re-sends it with the same ids). Every id is deterministic, so the
persister dedupes anything sent twice:

* alert id: uuid5 of the key and the number of alerts the key had before (``raised-count``);
* event ids: uuid5 of the alert id and what happened to it (raised, escalated to level L, resolved);
* follow-up chat line: uuid5 of ``followup`` and the order.

Nothing here writes to the store: decisions are events on ``services/alerts/events``; the persister
stores them and publishes them on ``shops/S/alerts`` and ``shops/S/orders/O/alerts``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Final, TypeAlias

import sqlalchemy as sa
from sqlalchemy import Engine

from bloomwire.contract import events as ev
from bloomwire.contract.lifecycle import OrderStatus
from bloomwire.runtime.log import get_logger
from bloomwire.services.alerts.book import ACKNOWLEDGED, OPEN, Change, Tracked, merge, reflects, subject_of
from bloomwire.services.alerts.config import RulesConfig, Thresholds
from bloomwire.services.alerts.ids import (
    EVENTS_TOPIC,
    SOURCE,
    alert_id,
    escalated_event_id,
    followup_event_id,
    raised_event_id,
    resolved_event_id,
)
from bloomwire.services.alerts.reads import (
    ACTIVE,
    ALERT_COLUMNS,
    FAILED,
    ORDER_COLUMNS,
    ORDER_UPDATED_AT,
    RAW_ORDER_COLUMNS,
    RIDER_COLUMNS,
    RIDER_LIVE_COLUMNS,
    ChangedRows,
    RowCache,
    ViewCache,
    alert_from_raw,
    chunks,
    count_alerts,
    order_from_raw,
    read_order_rows,
    read_riders,
    rider_from_raw,
)
from bloomwire.services.alerts.rules import (
    AlertKey,
    Finding,
    OrderView,
    evaluate_by_key,
    followup_due,
)
from bloomwire.services.alerts.watch import Subject, Watch
from bloomwire.store.models import ALERTS, EVENTS, ORDERS

log = get_logger("bloomwire.alerts")
_O = ORDERS.c
_A = ALERTS.c

#: Seconds a change we sent may take to show in the store before it is sent again.
GRACE_S: Final = 30.0
#: Failed and returned orders are watched this long after they closed (and while their alert is
#: not resolved), so a failure missed while the service was down is still raised.
CLOSED_LOOKBACK: Final = timedelta(hours=24)
#: A follow-up more than this late (the service was down) is not sent any more.
FOLLOWUP_LATEST: Final = timedelta(hours=24)

Publish: TypeAlias = Callable[[str, bytes], None]


@dataclass
class Snapshot:
    """What one read of the store found, and the rules' verdict on it."""

    #: time.monotonic() before the first read: any later change may be missing.
    taken_at: float
    now: datetime
    #: Subjects fully evaluated (None: everything, a tick).
    scope: frozenset[Subject] | None
    #: The keys whose condition holds: to their finding (edge reads) or to their subject (ticks,
    #: worded on demand by ``describe``: only new and escalated alerts need a sentence).
    findings: Mapping[AlertKey, Finding | Subject]
    #: Non-resolved alerts in the store (ticks only).
    alerts: list[Tracked] | None
    #: key -> number of alerts the store holds for it, for the keys that may need a new alert.
    counts: dict[AlertKey, int]
    #: The orders read, for the wording of resolutions.
    views: Mapping[str, OrderView] = field(default_factory=dict)
    orders: int = 0
    riders: int = 0
    read_s: float = 0.0
    evaluate_s: float = 0.0
    #: CPU seconds the reading thread spent (read + rules), whatever else ran on the machine.
    cpu_s: float = 0.0
    #: Subjects the rules looked at (ticks: changed or due).
    visited: int = 0
    describe: Callable[[AlertKey], Finding | None] | None = None

    def finding(self, key: AlertKey) -> Finding | None:
        """The finding of ``key`` if its condition holds."""
        found = self.findings.get(key)
        if found is None or isinstance(found, Finding):
            return found
        return self.describe(key) if self.describe is not None else None


@dataclass
class Stats:
    """Counters and the timings of the last tick (seconds)."""

    ticks: int = 0
    tick_errors: int = 0
    partial_runs: int = 0
    raised: int = 0
    escalated: int = 0
    resolved: int = 0
    followups: int = 0
    followup_runs: int = 0
    last_tick_s: float = 0.0
    last_read_s: float = 0.0
    last_evaluate_s: float = 0.0
    last_reconcile_s: float = 0.0
    #: CPU seconds of the last tick (read, rules and reconcile), unlike the wall times above.
    last_tick_cpu_s: float = 0.0
    last_orders: int = 0
    last_riders: int = 0
    last_open: int = 0


class AlertEngine:
    """The service's logic over a read-only store; publishes through ``publish(topic, payload)``.

    Reads run in worker threads (:meth:`read_all`, :meth:`read_subjects`, :meth:`read_followups`);
    every decision (:meth:`apply`, :meth:`send_followups`, :meth:`learn`) runs on the event loop,
    so the book needs no lock.
    """

    def __init__(
        self,
        engine: Engine,
        config: RulesConfig,
        publish: Publish,
        *,
        clock: Callable[[], datetime] = ev.now,
        grace_s: float = GRACE_S,
    ) -> None:
        self.engine = engine
        self.config = config
        self.publish = publish
        self.clock = clock
        self.grace_s = grace_s
        self.book: dict[AlertKey, Tracked] = {}
        self.overlay: dict[str, Change] = {}
        #: Snapshot time of the newest evaluation of each subject since the last tick.
        self.subject_at: dict[Subject, float] = {}
        self.full_at = -math.inf
        self.loaded = False
        self.followups_sent: dict[str, float] = {}
        #: order id -> the fields its last amendment changed (issue 18): a resolution it causes says so
        self.amended: dict[str, str] = {}
        self.stats = Stats()
        # Read whole once, then only the rows changed since (and the ids of orders closed since).
        self._orders = ChangedRows(
            ORDER_COLUMNS,
            _O.status.in_(ACTIVE),
            order_from_raw,
            updated_at_index=ORDER_UPDATED_AT,
            gone=sa.select(_O.id).where(_O.closed_at >= sa.bindparam("since", type_=_O.closed_at.type)),
        )
        self._riders = ChangedRows(
            RIDER_LIVE_COLUMNS, sa.true(), rider_from_raw, updated_at_index=len(RIDER_COLUMNS)
        )
        # The assistant's hand-overs are not this service's to resolve.
        self._alerts = RowCache(
            sa.select(*ALERT_COLUMNS).where(
                _A.status.in_((OPEN, ACKNOWLEDGED)), _A.rule.not_in([r.value for r in ev.ASSISTANT_RULES])
            ),
            alert_from_raw,
        )
        self._closed = ViewCache(order_from_raw)
        self.watch = Watch(config.for_shop)
        self._dirty: set[Subject] = set()
        self._wake = asyncio.Event()
        self._tick_lock = asyncio.Lock()
        self._followup_lock = asyncio.Lock()

    # --- reading (worker threads) ---------------------------------------------------------------

    def read_all(self) -> Snapshot:
        """Every live order and rider and every open alert; the rules' findings over them."""
        taken_at = time.monotonic()
        start = time.perf_counter()
        cpu = time.thread_time()
        now = self.clock()
        with self.engine.connect() as conn:
            orders = self._orders.read(conn)
            since = now - CLOSED_LOOKBACK
            recent_failed = sa.select(*RAW_ORDER_COLUMNS).where(_O.status.in_(FAILED), _O.closed_at >= since)
            closed = self._closed
            closed.start()
            for r in conn.execute(recent_failed):
                orders[r[0]] = closed.view(r)
            alerts = self._alerts.read(conn)
            missing = sorted({a.key[2] for a in alerts.values() if a.key[2]} - orders.keys())
            for part in chunks(missing):
                for r in conn.execute(sa.select(*RAW_ORDER_COLUMNS).where(_O.id.in_(part))):
                    orders[r[0]] = closed.view(r)
            riders = self._riders.read(conn)
            read_s = time.perf_counter() - start
            watch = self.watch
            watch.update(orders, riders, now)
            findings = watch.found
            evaluate_s = time.perf_counter() - start - read_s
            known = {a.key for a in alerts.values()}
            counts = count_alerts(conn, findings.keys() - known)
        return Snapshot(
            taken_at=taken_at,
            now=now,
            scope=None,
            findings=findings,
            alerts=list(alerts.values()),
            counts=counts,
            views=orders,
            orders=len(orders),
            riders=len(riders),
            read_s=read_s,
            evaluate_s=evaluate_s,
            cpu_s=time.thread_time() - cpu,
            visited=watch.visited,
            describe=lambda key: watch.finding(key, now),
        )

    def read_subjects(self, subjects: Iterable[Subject]) -> Snapshot:
        """The given orders and riders (with every live order a rider carries), evaluated."""
        taken_at = time.monotonic()
        now = self.clock()
        order_ids = sorted({i for kind, i in subjects if kind == "order"})
        rider_ids = sorted({i for kind, i in subjects if kind == "rider"})
        with self.engine.connect() as conn:
            order_rows = read_order_rows(conn, order_ids, rider_ids)
            wanted = sorted(set(rider_ids) | {r.rider for r in order_rows.values() if r.rider})
            riders = read_riders(conn, wanted)
            orders = [OrderView.from_row(r) for r in order_rows.values()]
            scope = frozenset(
                {("order", i) for i in order_ids}
                | {("order", o.id) for o in orders}
                | {("rider", i) for i in rider_ids}
            )
            findings = {
                k: f
                for k, f in evaluate_by_key(orders, riders, now, self.config.for_shop).items()
                if subject_of(k) in scope
            }
            counts = count_alerts(conn, findings)
        return Snapshot(
            taken_at=taken_at,
            now=now,
            scope=scope,
            findings=findings,
            alerts=None,
            counts=counts,
            views={o.id: o for o in orders},
            orders=len(orders),
            riders=len(riders),
        )

    def read_followups(self) -> list[tuple[str, str]]:
        """(order, shop) of every delivered order whose follow-up is due and not in the store."""
        now = self.clock()
        shop_thresholds = [self.config.defaults, *self.config.shops.values()]
        earliest = min(t.followup_after for t in shop_thresholds)
        latest = max(t.followup_after for t in shop_thresholds) + FOLLOWUP_LATEST
        query = sa.select(*ORDER_COLUMNS).where(
            _O.status == OrderStatus.DELIVERED.value,
            _O.delivered_at <= now - earliest,
            _O.delivered_at > now - latest,
        )
        with self.engine.connect() as conn:
            due: dict[str, tuple[str, str]] = {}
            for r in conn.execute(query):
                order = OrderView.from_row(r)
                t = self.config.for_shop(order.shop)
                assert order.delivered_at is not None
                late = now - order.delivered_at - t.followup_after
                if followup_due(order, now, t) and late <= FOLLOWUP_LATEST:
                    due[followup_event_id(order.id)] = (order.id, order.shop)
            for part in chunks(sorted(due)):
                for (sent,) in conn.execute(sa.select(EVENTS.c.id).where(EVENTS.c.id.in_(part))):
                    due.pop(sent, None)
        return sorted(due.values())

    # --- deciding (event loop) ------------------------------------------------------------------

    def apply(self, snap: Snapshot) -> None:
        """Raise, escalate and resolve so the book matches ``snap``'s findings."""
        start = time.perf_counter()
        mono = time.monotonic()
        skip = self._skipped(snap, mono)
        if skip is None:
            return  # a tick read the store after this edge-triggered read: it has already decided
        book, found = self.book, snap.findings

        def wanted(key: AlertKey) -> bool:
            return not (skip and subject_of(key) in skip)

        # Steady state: nearly every finding already has its alert. Set differences (in C) find
        # what is new and what is gone; only those and the escalation candidates are visited.
        for key in found.keys() - book.keys():
            if wanted(key) and (finding := snap.finding(key)) is not None:
                self._raise(finding, snap, mono)
        for key in self._gone(snap):
            if wanted(key):
                self._resolve(book[key], snap, mono)
        if snap.scope is None:
            self._escalations(found, skip, snap, mono)
            self.full_at = snap.taken_at
            self.subject_at = {s: t for s, t in self.subject_at.items() if t > snap.taken_at}
            self._prune(mono)
            self.stats.last_reconcile_s = time.perf_counter() - start
        else:
            for subject in snap.scope:
                self.subject_at[subject] = max(self.subject_at.get(subject, -math.inf), snap.taken_at)
        for order in [o for o in self.amended if o in snap.views]:
            del self.amended[order]  # this read saw the amendment: later resolutions are its own

    def _skipped(self, snap: Snapshot, mono: float) -> set[Subject] | None:
        """Subjects an edge-triggered evaluation read after ``snap`` (it knew better), or None when
        ``snap`` is an edge-triggered read older than the last tick's. A tick's snapshot first
        rebuilds the book from the store (resolving duplicates it finds there)."""
        if snap.scope is not None:
            if snap.taken_at < self.full_at:
                return None
            return {s for s in snap.scope if self.subject_at.get(s, -math.inf) > snap.taken_at}
        assert snap.alerts is not None
        for extra, kept in self._rebuild(snap.alerts, mono):
            self._send_resolved(extra, snap.now, mono, f"duplicate of alert {kept.id}")
        return {s for s, t in self.subject_at.items() if t > snap.taken_at}

    def _gone(self, snap: Snapshot) -> set[AlertKey]:
        """Open alerts whose condition ``snap`` no longer finds (an edge-triggered read: only
        those about what it read)."""
        book, found = self.book, snap.findings
        if snap.scope is None:
            return set(book.keys() - found.keys())
        orders = {i for kind, i in snap.scope if kind == "order"}
        riders = {i for kind, i in snap.scope if kind == "rider"}
        return {
            k for k in book if (k[2] in orders if k[2] is not None else k[3] in riders) and k not in found
        }

    def _escalations(
        self, found: Mapping[AlertKey, object], skip: set[Subject], snap: Snapshot, mono: float
    ) -> None:
        """Re-notify open alerts unacknowledged for longer than their shop's ``escalate_after``."""
        shops = [self.config.defaults, *self.config.shops.values()]
        # Notified after this, no shop's alert is due yet: one comparison rules most out.
        surely_not_due = snap.now - min(t.escalate_after for t in shops)
        due_before: dict[str, datetime] = {}
        for tracked in list(self.book.values()):
            if tracked.status != OPEN or tracked.notified_at >= surely_not_due:
                continue
            if tracked.key not in found or (skip and subject_of(tracked.key) in skip):
                continue
            shop = tracked.key[1]
            limit = due_before.get(shop)
            if limit is None:  # escalation_due(notified_at, now, t) <=> notified_at < now - t.escalate_after
                limit = due_before[shop] = snap.now - self.config.for_shop(shop).escalate_after
            if tracked.notified_at < limit and (finding := snap.finding(tracked.key)) is not None:
                self._escalate(tracked, finding, snap.now, mono)

    def _rebuild(self, alerts: list[Tracked], mono: float) -> list[tuple[Tracked, Tracked]]:
        """The book from the store's open alerts plus the changes it does not show yet.

        Returns (extra, kept) for keys the store holds more than one open alert for (two alerts
        instances racing, say): the extras are resolved, so one alert per key stays open.
        """
        book = {a.key: a for a in alerts}
        extras = self._duplicates(alerts, book) if len(book) < len(alerts) else []
        store = {a.id: a for a in alerts} if self.overlay else {}
        for aid, change in list(self.overlay.items()):
            row = store.get(aid)
            if reflects(row, change) or mono - change.at > self.grace_s:
                del self.overlay[aid]
            elif change.target is not None:
                book[change.key] = merge(row, change.target) if row else change.target
            elif (held := book.get(change.key)) is not None and held.id == aid:
                del book[change.key]
        self.book = book
        self.loaded = True
        return extras

    def _duplicates(
        self, alerts: list[Tracked], book: dict[AlertKey, Tracked]
    ) -> list[tuple[Tracked, Tracked]]:
        """Rare: several open alerts of one key. Keep the acknowledged or oldest in ``book``;
        return (extra, kept) for the others not already resolved by us."""
        same: dict[AlertKey, list[Tracked]] = {}
        for a in alerts:
            same.setdefault(a.key, []).append(a)
        extras: list[tuple[Tracked, Tracked]] = []
        for key, group in same.items():
            if len(group) == 1:
                continue
            group.sort(key=lambda a: (a.status != ACKNOWLEDGED, a.notified_at, a.id))
            book[key] = group[0]
            for a in group[1:]:
                if (change := self.overlay.get(a.id)) is None or change.target is not None:
                    extras.append((a, group[0]))
        return extras

    def _prune(self, mono: float) -> None:
        self.followups_sent = {o: t for o, t in self.followups_sent.items() if mono - t <= self.grace_s}

    def _note(self, tracked: Tracked | None, key: AlertKey, aid: str, mono: float) -> None:
        self.overlay[aid] = Change(key, tracked, mono)

    def _raise(self, finding: Finding, snap: Snapshot, mono: float) -> None:
        key = finding.key
        n = snap.counts.get(key)
        if n is None:
            return  # the read did not count this key (it was open then); the next evaluation will
        # The store holds alerts 0..n-1 of this key. Ids still pending in the overlay are ours and
        # not stored yet (raised, maybe already resolved): skip them. A raise that was lost and
        # has left the overlay gets its id again, so a late copy and the re-send are one alert.
        aid = alert_id(key, n)
        while aid in self.overlay:
            n += 1
            aid = alert_id(key, n)
        tracked = Tracked(aid, key, OPEN, 0, snap.now)
        self.book[key] = tracked
        self._note(tracked, key, aid, mono)
        event = ev.AlertRaisedEvent(
            id=raised_event_id(aid),
            source=SOURCE,
            time=snap.now,
            data=ev.AlertRaised(
                alert=aid,
                rule=finding.rule,
                severity=finding.severity,
                shop=finding.shop,
                order=finding.order,
                rider=finding.rider,
                message=finding.message,
                action=finding.action[:500],
            ),
        )
        self.publish(EVENTS_TOPIC, ev.encode(event))
        self.stats.raised += 1
        log.debug("alert raised", alert=aid, rule=finding.rule.value, shop=finding.shop,
                 order=finding.order, rider=finding.rider)  # fmt: skip

    def _escalate(self, tracked: Tracked, finding: Finding, now: datetime, mono: float) -> None:
        tracked = replace(tracked, level=tracked.level + 1, notified_at=now)
        self.book[tracked.key] = tracked
        self._note(tracked, tracked.key, tracked.id, mono)
        waited = f"Still unacknowledged (reminder {tracked.level}). "
        event = ev.AlertEscalatedEvent(
            id=escalated_event_id(tracked.id, tracked.level),
            source=SOURCE,
            time=now,
            data=ev.AlertEscalated(
                alert=tracked.id, level=tracked.level, message=(waited + finding.message)[:500]
            ),
        )
        self.publish(EVENTS_TOPIC, ev.encode(event))
        self.stats.escalated += 1
        log.debug("alert escalated", alert=tracked.id, level=tracked.level)

    def _resolve(self, tracked: Tracked, snap: Snapshot, mono: float) -> None:
        del self.book[tracked.key]
        _, _, order, _ = tracked.key
        view = snap.views.get(order) if order else None
        status = view.status.value.replace("_", " ") if view else None
        reason = f"condition cleared (order is {status})" if status else "condition cleared"
        changed = self.amended.get(order) if order else None
        if changed:
            reason = f"condition cleared: the order was amended ({changed})"
        self._send_resolved(tracked, snap.now, mono, reason)

    def _send_resolved(self, tracked: Tracked, now: datetime, mono: float, reason: str) -> None:
        self._note(None, tracked.key, tracked.id, mono)
        event = ev.AlertResolvedEvent(
            id=resolved_event_id(tracked.id),
            source=SOURCE,
            time=now,
            data=ev.AlertResolved(alert=tracked.id, reason=reason),
        )
        self.publish(EVENTS_TOPIC, ev.encode(event))
        self.stats.resolved += 1
        log.debug("alert resolved", alert=tracked.id, rule=tracked.key[0].value, reason=reason)

    def learn(self, event: ev.Event) -> None:
        """An alert event the persister committed (``shops/+/alerts``): note acknowledgements."""
        if not isinstance(event, ev.AlertAcknowledgedEvent):
            return
        aid = event.data.alert
        for tracked in self.book.values():
            if tracked.id == aid:
                change = self.overlay.get(aid)
                if change is None or change.target is not None:
                    acked = replace(tracked, status=ACKNOWLEDGED)
                    self.book[tracked.key] = acked
                    self._note(acked, tracked.key, aid, time.monotonic())
                break

    def send_followups(self, due: Sequence[tuple[str, str]]) -> int:
        """Send the follow-up chat line of each (order, shop) not sent in the last grace period."""
        mono = time.monotonic()
        now = self.clock()
        sent = 0
        for order, shop in due:
            last = self.followups_sent.get(order)
            if last is not None and mono - last <= self.grace_s:
                continue
            t: Thresholds = self.config.for_shop(shop)
            event = ev.OrderChatPostedEvent(
                id=followup_event_id(order),
                source=SOURCE,
                time=now,
                data=ev.OrderChat(order=order, text=t.followup_text),
            )
            self.publish(EVENTS_TOPIC, ev.encode(event))
            self.followups_sent[order] = mono
            sent += 1
            log.debug("follow-up sent", order=order, shop=shop)
        self.stats.followups += sent
        return sent

    # --- the jobs (event loop) --------------------------------------------------------------------

    async def tick(self) -> bool:
        """Read the whole store, evaluate every rule and reconcile; False if the store failed."""
        async with self._tick_lock:
            start = time.perf_counter()
            try:
                snap = await asyncio.to_thread(self.read_all)
            except Exception as exc:
                self.stats.tick_errors += 1
                log.warning("tick could not read the store", error=_brief(exc))
                return False
            cpu = time.thread_time()
            self.apply(snap)
            s = self.stats
            s.last_tick_cpu_s = snap.cpu_s + time.thread_time() - cpu
            s.ticks += 1
            s.last_tick_s = time.perf_counter() - start
            s.last_read_s, s.last_evaluate_s = snap.read_s, snap.evaluate_s
            s.last_orders, s.last_riders, s.last_open = snap.orders, snap.riders, len(self.book)
            return True

    async def followups(self) -> int:
        """Send every due follow-up; the number sent."""
        async with self._followup_lock:
            try:
                due = await asyncio.to_thread(self.read_followups)
            except Exception as exc:
                log.warning("follow-ups could not read the store", error=_brief(exc))
                return 0
            self.stats.followup_runs += 1
            return self.send_followups(due)

    def mark_stopping(self) -> None:
        """Wake the worker so it sees its stop event now."""
        self._wake.set()

    def note_amended(self, order: str, fields: Iterable[str]) -> None:
        """An amendment of ``order`` was committed: evaluate it soon, and say so if that resolves alerts."""
        self.amended[order] = ", ".join(fields)
        self.mark(("order", order))

    def mark(self, subject: Subject) -> None:
        """An event about ``subject`` was committed: evaluate it soon."""
        self._dirty.add(subject)
        self._wake.set()

    async def work(self, stop: asyncio.Event) -> None:
        """Evaluate dirty subjects as they come, many at once when they come fast."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.5)
            self._wake.clear()
            if not self._dirty or not self.loaded:
                continue  # before the first tick the book is unknown; the tick covers it
            dirty, self._dirty = self._dirty, set()
            try:
                snap = await asyncio.to_thread(self.read_subjects, dirty)
            except Exception as exc:
                log.warning("could not read the store", error=_brief(exc))
                continue
            self.apply(snap)
            self.stats.partial_runs += 1


def _brief(exc: BaseException) -> str:
    """``OperationalError: no such table: orders``: the error without SQLAlchemy's SQL dump."""
    cause = getattr(exc, "orig", None) or exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"
