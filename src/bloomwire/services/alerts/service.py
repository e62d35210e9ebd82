"""The alerts service (docs/design.md §4): rules on every event and on a tick, follow-ups after delivery.

Two triggers feed the same decision step:

* **edge** — every canonical ``shops/S/orders/O/status`` event (published by the persister after
  its commit) and every live ``shops/S/riders/R/state`` snapshot marks that order or rider dirty;
  one worker re-reads the dirty subjects from the store (read-only) and evaluates their rules;
* **level** — an APScheduler tick reads every live order and rider and evaluates everything, so a
  missed event only delays an alert by one tick. A second job sends the after-delivery follow-ups.

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
import gc
import math
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Generic, TypeAlias, TypeVar

import sqlalchemy as sa
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy import Connection, Engine

from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.contract.lifecycle import CLOSED, OrderStatus
from bloomwire.errors import PayloadError
from bloomwire.runtime.log import get_logger
from bloomwire.runtime.metrics import Figure, FiguresCollector, ServiceMetrics
from bloomwire.runtime.mqtt import Message, Service
from bloomwire.runtime.settings import Settings
from bloomwire.services.alerts.config import RulesConfig, Thresholds, load_rules
from bloomwire.services.alerts.rules import (
    FAILED_OUTCOME,
    AlertKey,
    Finding,
    OrderView,
    RiderView,
    alert_key,
    evaluate_by_key,
    followup_due,
)
from bloomwire.services.alerts.watch import Watch
from bloomwire.store import make_engine
from bloomwire.store.models import ALERTS, EVENTS, ORDERS, RIDERS

NAME: Final = "alerts"
log = get_logger("bloomwire.alerts")

#: ``services/alerts/events``: where every decision of this service goes.
EVENTS_TOPIC: Final = topics.service_events(NAME)
#: The CloudEvents ``source`` the persister expects on that topic (``services/alerts``).
SOURCE: Final = topics.parse_inbound(EVENTS_TOPIC).source
#: Live rider snapshots (published by the persister after each commit that changes a rider).
#: TODO(topics): belongs in bloomwire.contract.topics next to ALL_ALERTS_FILTER.
RIDER_STATE_FILTER: Final = topics.ALL_RIDER_STATE_FILTER

#: Default seconds between two ticks over the whole store.
TICK_S: Final = 5.0
#: Default seconds between two looks for due follow-ups.
FOLLOWUP_S: Final = 30.0
#: Seconds a change we sent may take to show in the store before it is sent again.
GRACE_S: Final = 30.0
#: Failed and returned orders are watched this long after they closed (and while their alert is
#: not resolved), so a failure missed while the service was down is still raised.
CLOSED_LOOKBACK: Final = timedelta(hours=24)
#: A follow-up more than this late (the service was down) is not sent any more.
FOLLOWUP_LATEST: Final = timedelta(hours=24)

_OPEN: Final = "open"
_ACKNOWLEDGED: Final = "acknowledged"
_NAMESPACE: Final = uuid.uuid5(uuid.NAMESPACE_URL, "https://bloomwire.invalid/alerts")
_ACTIVE: Final = tuple(s.value for s in OrderStatus if s not in CLOSED)
_FAILED_OUTCOME: Final = tuple(s.value for s in FAILED_OUTCOME)
_CHUNK: Final = 500

V = TypeVar("V")
Subject: TypeAlias = tuple[str, str]  # ("order", id) or ("rider", id)
Publish: TypeAlias = Callable[[str, bytes], None]


# --- deterministic ids ------------------------------------------------------------------------


def _uuid(*parts: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, "/".join(parts)))


def alert_id(key: AlertKey, raised_before: int) -> str:
    """The id of the alert raised for ``key`` after ``raised_before`` earlier alerts of that key."""
    rule, shop, order, rider = key
    return _uuid("alert", rule.value, shop, order or "", rider or "", str(raised_before))


def raised_event_id(alert: str) -> str:
    return _uuid("alert.raised", alert)


def escalated_event_id(alert: str, level: int) -> str:
    return _uuid("alert.escalated", alert, str(level))


def resolved_event_id(alert: str) -> str:
    return _uuid("alert.resolved", alert)


def followup_event_id(order: str) -> str:
    """The id of the follow-up chat line of ``order`` (one per order, ever)."""
    return _uuid("followup", order)


# --- state ------------------------------------------------------------------------------------


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
class _Change:
    """A change the store may not show yet; ``target`` None means resolved."""

    key: AlertKey
    target: Tracked | None
    at: float  # time.monotonic()


def _merge(row: Tracked, newer: Tracked) -> Tracked:
    """Statuses and levels only move forward: acknowledged wins, the higher level wins."""
    status = _ACKNOWLEDGED if _ACKNOWLEDGED in (row.status, newer.status) else _OPEN
    return Tracked(
        row.id, row.key, status, max(row.level, newer.level), max(row.notified_at, newer.notified_at)
    )


def _reflects(row: Tracked | None, change: _Change) -> bool:
    """True if the store's ``row`` (None: not open) already shows ``change``."""
    if change.target is None:
        return row is None
    if row is None:
        return False
    return row.level >= change.target.level and (change.target.status == _OPEN or row.status == _ACKNOWLEDGED)


def _subject(key: AlertKey) -> Subject:
    _, _, order, rider = key
    return ("order", order) if order is not None else ("rider", rider or "")


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


# --- store reads ------------------------------------------------------------------------------

_O = ORDERS.c
_ORDER_COLUMNS = (
    _O.id,
    _O.shop,
    _O.status,
    _O.rider,
    _O.customer_name,
    _O.window_start,
    _O.window_end,
    _O.eta,
    _O.created_at,
    _O.accepted_at,
    _O.delivered_at,
    _O.closed_at,
    _O.failure_reason,
    _O.updated_at,
)
#: The same columns without SQLAlchemy's result processing (raw driver values, see _dt).
_RAW_ORDER_COLUMNS = tuple(sa.type_coerce(c, sa.String()).label(c.name) for c in _ORDER_COLUMNS)
_R = RIDERS.c
_RIDER_COLUMNS = (_R.id, _R.presence, _R.presence_at, _R.position_at, _R.lat, _R.lon, _R.load)
_A = ALERTS.c
_ALERT_COLUMNS = (
    _A.id,
    _A.rule,
    _A.shop,
    _A.order_id,
    _A.rider,
    _A.status,
    _A.level,
    _A.raised_at,
    _A.escalated_at,
)


def _chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


_STATUS_OF: Final = {s.value: s for s in OrderStatus}
_PRESENCE_OF: Final = {p.value: p for p in ev.Presence}
_fromiso = datetime.fromisoformat


def _dt(value: Any) -> datetime | None:
    """A raw driver value as an aware UTC datetime (SQLite keeps naive UTC text)."""
    if value is None:
        return None
    if isinstance(value, str):
        return _fromiso(value + "+00:00")
    assert isinstance(value, datetime)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _dt_required(value: Any) -> datetime:
    parsed = _dt(value)
    assert parsed is not None, "NOT NULL column is NULL"
    return parsed


def _order_from_raw(r: Sequence[Any]) -> OrderView:
    return OrderView(
        id=r[0],
        shop=r[1],
        status=_STATUS_OF.get(r[2]) or OrderStatus(r[2]),
        rider=r[3],
        customer_name=r[4] or "",
        window_start=_dt_required(r[5]),
        window_end=_dt_required(r[6]),
        eta=_dt(r[7]),
        created_at=_dt_required(r[8]),
        accepted_at=_dt(r[9]),
        delivered_at=_dt(r[10]),
        closed_at=_dt(r[11]),
        failure_reason=r[12],
        updated_at=_dt_required(r[13]),
    )


def _rider_from_raw(r: Sequence[Any]) -> RiderView:
    return RiderView(
        id=r[0],
        presence=_PRESENCE_OF.get(r[1]) or ev.Presence(r[1]),
        presence_at=_dt(r[2]),
        position_at=_dt(r[3]),
        lat=r[4],
        lon=r[5],
        load=r[6],
    )


def _alert_from_raw(r: Sequence[Any]) -> Tracked:
    key = alert_key(r[1], r[2], r[3], r[4])
    return Tracked(r[0], key, r[5], r[6], _dt(r[8]) or _dt_required(r[7]))


class _RowCache(Generic[V]):
    """One full read of a table through the driver, keeping the views of unchanged rows.

    SQLAlchemy's typed result processing costs several times the query itself on ten thousand
    rows, and most rows do not change between two ticks: rows are compared raw and only changed
    ones are turned into views again. The first column must be the primary key.
    """

    def __init__(self, query: sa.Select[Any], build: Callable[[Sequence[Any]], V]) -> None:
        self.query = query
        self.build = build
        self.rows: dict[str, tuple[Sequence[Any], V]] = {}
        self._sql: dict[str, str] = {}

    def read(self, conn: Connection) -> dict[str, V]:
        """Every row of the query, as views by primary key."""
        dialect = conn.dialect
        sql = self._sql.get(dialect.name)
        if sql is None:
            compiled = self.query.compile(dialect=dialect, compile_kwargs={"literal_binds": True})
            sql = self._sql[dialect.name] = str(compiled)
        cursor = conn.connection.cursor()  # plain tuples: compared in C, no per-row processing
        try:
            cursor.execute(sql)
            raws = cursor.fetchall()
        finally:
            cursor.close()
        old, fresh = self.rows, {}
        build = self.build
        for raw in raws:
            hit = old.get(raw[0])
            fresh[raw[0]] = hit if hit is not None and hit[0] == raw else (raw, build(raw))
        self.rows = fresh
        return {k: v for k, (_, v) in fresh.items()}


class _ViewCache(Generic[V]):
    """Views of the rows of a query that changes (a time bound, a list of ids): unchanged rows
    keep their view object, which tells the :class:`~bloomwire.services.alerts.watch.Watch` they
    did not change."""

    def __init__(self, build: Callable[[Sequence[Any]], V]) -> None:
        self.build = build
        self.rows: dict[str, tuple[tuple[Any, ...], V]] = {}
        self._fresh: dict[str, tuple[tuple[Any, ...], V]] = {}

    def start(self) -> None:
        self.rows, self._fresh = self._fresh, {}

    def view(self, row: Sequence[Any]) -> V:
        raw = tuple(row)
        hit = self._fresh.get(raw[0]) or self.rows.get(raw[0])
        if hit is None or hit[0] != raw:
            hit = (raw, self.build(raw))
        self._fresh[raw[0]] = hit
        return hit[1]


def _read_order_rows(conn: Connection, order_ids: list[str], rider_ids: list[str]) -> dict[str, Any]:
    """Rows of the given orders and of every live order the given riders carry, by id."""
    rows: dict[str, Any] = {}
    for part in _chunks(order_ids):
        for r in conn.execute(sa.select(*_ORDER_COLUMNS).where(_O.id.in_(part))):
            rows[r.id] = r
    for part in _chunks(rider_ids):
        query = sa.select(*_ORDER_COLUMNS).where(_O.rider.in_(part), _O.status.in_(_ACTIVE))
        for r in conn.execute(query):
            rows[r.id] = r
    return rows


def _read_riders(conn: Connection, ids: list[str]) -> dict[str, RiderView]:
    riders: dict[str, RiderView] = {}
    for part in _chunks(ids):
        for r in conn.execute(sa.select(*_RIDER_COLUMNS).where(_R.id.in_(part))):
            riders[r.id] = RiderView.from_row(r)
    return riders


def _count_alerts(conn: Connection, keys: Iterable[AlertKey]) -> dict[AlertKey, int]:
    """How many alerts (any status) the store holds for each of ``keys``."""
    wanted = set(keys)
    if not wanted:
        return {}
    orders = sorted({k[2] for k in wanted if k[2] is not None})
    riders = sorted({k[3] for k in wanted if k[2] is None and k[3] is not None})
    cols = (_A.rule, _A.shop, _A.order_id, _A.rider, sa.func.count())
    found: dict[AlertKey, int] = dict.fromkeys(wanted, 0)
    queries = [
        sa.select(*cols).where(_A.order_id.in_(part)).group_by(*cols[:4]) for part in _chunks(orders)
    ] + [
        sa.select(*cols).where(_A.order_id.is_(None), _A.rider.in_(part)).group_by(*cols[:4])
        for part in _chunks(riders)
    ]
    for query in queries:
        for rule, shop, order, rider, n in conn.execute(query):
            key = alert_key(rule, shop, order, rider)
            if key in found:
                found[key] = n
    return found


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
        self.overlay: dict[str, _Change] = {}
        #: Snapshot time of the newest evaluation of each subject since the last tick.
        self.subject_at: dict[Subject, float] = {}
        self.full_at = -math.inf
        self.loaded = False
        self.followups_sent: dict[str, float] = {}
        self.stats = Stats()
        self._orders = _RowCache(sa.select(*_ORDER_COLUMNS).where(_O.status.in_(_ACTIVE)), _order_from_raw)
        self._riders = _RowCache(sa.select(*_RIDER_COLUMNS), _rider_from_raw)
        self._alerts = _RowCache(
            sa.select(*_ALERT_COLUMNS).where(_A.status.in_((_OPEN, _ACKNOWLEDGED))), _alert_from_raw
        )
        self._closed = _ViewCache(_order_from_raw)
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
            recent_failed = sa.select(*_RAW_ORDER_COLUMNS).where(
                _O.status.in_(_FAILED_OUTCOME), _O.closed_at >= since
            )
            closed = self._closed
            closed.start()
            for r in conn.execute(recent_failed):
                orders[r[0]] = closed.view(r)
            alerts = self._alerts.read(conn)
            missing = sorted({a.key[2] for a in alerts.values() if a.key[2]} - orders.keys())
            for part in _chunks(missing):
                for r in conn.execute(sa.select(*_RAW_ORDER_COLUMNS).where(_O.id.in_(part))):
                    orders[r[0]] = closed.view(r)
            riders = self._riders.read(conn)
            read_s = time.perf_counter() - start
            watch = self.watch
            watch.update(orders, riders, now)
            findings = watch.found
            evaluate_s = time.perf_counter() - start - read_s
            known = {a.key for a in alerts.values()}
            counts = _count_alerts(conn, findings.keys() - known)
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
            order_rows = _read_order_rows(conn, order_ids, rider_ids)
            wanted = sorted(set(rider_ids) | {r.rider for r in order_rows.values() if r.rider})
            riders = _read_riders(conn, wanted)
            orders = [OrderView.from_row(r) for r in order_rows.values()]
            scope = frozenset(
                {("order", i) for i in order_ids}
                | {("order", o.id) for o in orders}
                | {("rider", i) for i in rider_ids}
            )
            findings = {
                k: f
                for k, f in evaluate_by_key(orders, riders, now, self.config.for_shop).items()
                if _subject(k) in scope
            }
            counts = _count_alerts(conn, findings)
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
        query = sa.select(*_ORDER_COLUMNS).where(
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
            for part in _chunks(sorted(due)):
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
            return not (skip and _subject(key) in skip)

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
            if tracked.status != _OPEN or tracked.notified_at >= surely_not_due:
                continue
            if tracked.key not in found or (skip and _subject(tracked.key) in skip):
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
            if _reflects(row, change) or mono - change.at > self.grace_s:
                del self.overlay[aid]
            elif change.target is not None:
                book[change.key] = _merge(row, change.target) if row else change.target
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
            group.sort(key=lambda a: (a.status != _ACKNOWLEDGED, a.notified_at, a.id))
            book[key] = group[0]
            for a in group[1:]:
                if (change := self.overlay.get(a.id)) is None or change.target is not None:
                    extras.append((a, group[0]))
        return extras

    def _prune(self, mono: float) -> None:
        self.followups_sent = {o: t for o, t in self.followups_sent.items() if mono - t <= self.grace_s}

    def _note(self, tracked: Tracked | None, key: AlertKey, aid: str, mono: float) -> None:
        self.overlay[aid] = _Change(key, tracked, mono)

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
        tracked = Tracked(aid, key, _OPEN, 0, snap.now)
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
                    acked = replace(tracked, status=_ACKNOWLEDGED)
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
            event = ev.OrderChatEvent(
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


def settle_heap() -> None:
    """Collect once and move everything alive (imports, the warm caches) out of the cyclic GC's
    sight. A tick keeps ~60,000 objects alive; without this, full collections over the whole heap
    (~60 ms on 2 cores) land in most ticks. Objects are still freed by reference counting."""
    gc.collect()
    gc.freeze()


def _brief(exc: BaseException) -> str:
    """``OperationalError: no such table: orders``: the error without SQLAlchemy's SQL dump."""
    cause = getattr(exc, "orig", None) or exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"


# --- the service ------------------------------------------------------------------------------


class AlertsService(Service):
    """The alerts :class:`~bloomwire.runtime.mqtt.Service`; :attr:`engine` is its logic (tests, bench)."""

    engine: AlertEngine | None = None

    def figures(self) -> Iterator[Figure]:
        """Open alerts by rule and status, and what the engine did, for Prometheus (at scrape time)."""
        core = self.engine
        if core is None:
            return
        open_now = Counter((t.key[0].value, t.status) for t in list(core.book.values()))
        for (rule, status), n in sorted(open_now.items()):
            yield Figure(
                "bloomwire_alerts_open",
                "Alerts not resolved, by rule and status",
                n,
                {"rule": rule, "status": status},
                counter=False,
            )
        stats = core.stats
        yield Figure("bloomwire_alerts_raised", "Alerts raised", stats.raised)
        yield Figure("bloomwire_alerts_escalated", "Alert escalations", stats.escalated)
        yield Figure("bloomwire_alerts_resolved", "Alerts resolved", stats.resolved)
        yield Figure("bloomwire_alerts_tick_errors", "Ticks that failed", stats.tick_errors)


def _readonly_engine(url: str) -> Engine:
    engine = make_engine(url, readonly=True)
    if engine.dialect.name == "postgresql":
        # One consistent snapshot per read, and the server refuses any write.
        return engine.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
    return engine


def build(
    settings: Settings,
    *,
    clock: Callable[[], datetime] = ev.now,
    rules_path: Path | None = None,
    tick_s: float = TICK_S,
    followup_s: float = FOLLOWUP_S,
    grace_s: float = GRACE_S,
    metrics: ServiceMetrics | None = None,
) -> AlertsService:
    """Declare the alerts service.

    Reads the rules file now: a broken one raises :class:`~bloomwire.errors.ConfigError` naming
    the file, line and key, before anything connects.
    """
    config = load_rules(rules_path if rules_path is not None else settings.alerts_rules)
    service = AlertsService(NAME, metrics=metrics)
    if metrics is not None:
        metrics.registry.register(FiguresCollector(service.figures))
    run = _Run(service, settings, config, clock=clock, tick_s=tick_s, followup_s=followup_s, grace_s=grace_s)
    service.on_startup(run.start)
    service.handle(topics.all_orders_filter(topics.OrderChannel.STATUS))(run.on_status)
    service.handle(RIDER_STATE_FILTER)(run.on_rider_state)
    service.handle(topics.ALL_ALERTS_FILTER)(run.on_alert)
    service.on_shutdown(run.stop)
    return service


class _Run:
    """The alerts service's hooks and handlers, and what they start: the engine, its worker and
    the scheduler of ticks and follow-ups."""

    def __init__(
        self,
        service: AlertsService,
        settings: Settings,
        config: RulesConfig,
        *,
        clock: Callable[[], datetime],
        tick_s: float,
        followup_s: float,
        grace_s: float,
    ) -> None:
        self.service, self.settings, self.config, self.clock = service, settings, config, clock
        self.tick_s, self.followup_s, self.grace_s = tick_s, followup_s, grace_s
        self.tasks: set[asyncio.Task[Any]] = set()
        self.stop_worker = asyncio.Event()
        self.scheduler: list[AsyncIOScheduler] = []

    def _publish(self, topic: str, payload: bytes) -> None:
        self.service.publish(topic, payload, qos=1)

    def _shielded(self, job: Callable[[], Any]) -> Callable[[], Any]:
        # The scheduler cancels running jobs when it shuts down; a read in a worker thread cannot
        # be cancelled, so let the job finish and wait for it in the shutdown hook.
        async def run() -> None:
            task = asyncio.ensure_future(job())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            await asyncio.shield(task)

        return run

    async def start(self) -> None:
        """Open the store read-only, load it (first tick), start the worker and the scheduler."""
        db = await asyncio.to_thread(_readonly_engine, self.settings.database_url)
        core = AlertEngine(db, self.config, self._publish, clock=self.clock, grace_s=self.grace_s)
        self.service.engine = core
        self.stop_worker.clear()
        loaded = await core.tick()
        settle_heap()
        if not loaded:
            log.warning(
                "store not readable yet (is the persister up?); retrying", url=db.url.render_as_string()
            )
        worker = asyncio.ensure_future(core.work(self.stop_worker))
        self.tasks.add(worker)
        worker.add_done_callback(self.tasks.discard)
        tick_s, followup_s = self.tick_s, self.followup_s
        sched = AsyncIOScheduler(timezone=UTC)
        first = datetime.now(UTC)
        every = {"max_instances": 1, "coalesce": True, "misfire_grace_time": None}
        sched.add_job(
            self._shielded(core.tick), "interval", seconds=tick_s, id="tick",
            next_run_time=first + timedelta(seconds=tick_s if loaded else min(tick_s, 0.5)), **every,
        )  # fmt: skip
        sched.add_job(
            self._shielded(core.followups), "interval", seconds=followup_s, id="followups",
            next_run_time=first, **every,
        )  # fmt: skip
        sched.start()
        self.scheduler.append(sched)
        log.info(
            "alerts running",
            tick_s=tick_s,
            followup_s=followup_s,
            rules=str(self.config.source or "defaults"),
            orders=core.stats.last_orders,
            open_alerts=core.stats.last_open,
        )

    async def on_status(self, msg: Message) -> None:
        """An order's status changed: look at that order again."""
        core = self.service.engine
        if msg.retain or core is None:
            return
        try:
            event = ev.decode(msg.payload)
        except PayloadError as exc:
            log.warning("unreadable status event", topic=msg.topic, error=str(exc))
            return
        order = getattr(event.data, "order", None)
        if isinstance(order, str):
            core.mark(("order", order))

    async def on_rider_state(self, msg: Message) -> None:
        """A rider's state changed: look at that rider again."""
        core = self.service.engine
        if msg.retain or not msg.payload or core is None:
            return
        try:
            state = ev.RiderState.model_validate_json(msg.payload)
        except ValueError as exc:
            log.warning("unreadable rider state", topic=msg.topic, error=str(exc))
            return
        core.mark(("rider", state.rider))

    async def on_alert(self, msg: Message) -> None:
        """An alert event (ours or an acknowledgement): the engine's book learns it."""
        core = self.service.engine
        if core is None:
            return
        try:
            event = ev.decode(msg.payload)
        except PayloadError as exc:
            log.warning("unreadable alert event", topic=msg.topic, error=str(exc))
            return
        core.learn(event)

    async def stop(self) -> None:
        """Stop the worker and the scheduler, wait for running jobs, close the store."""
        self.stop_worker.set()
        if self.service.engine is not None:
            self.service.engine.mark_stopping()
        while self.scheduler:
            self.scheduler.pop().shutdown(wait=False)
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        core, self.service.engine = self.service.engine, None
        if core is not None:
            core.engine.dispose()
