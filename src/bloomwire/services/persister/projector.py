"""Validation and projection: what each inbound message does to the store, and what goes out after.

:meth:`Projector.apply` takes a batch of raw messages, decides for each whether it is new, a
duplicate or refused, updates the in-memory projections, writes everything in ONE transaction and
returns the messages to publish after the commit. Nothing here touches MQTT.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import math
import uuid
from collections import OrderedDict, defaultdict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Engine

from bloomwire.contract import events as ev
from bloomwire.contract import geo, topics
from bloomwire.contract import owntracks as ot
from bloomwire.contract.lifecycle import (
    CLOSED,
    OUT_FOR_DELIVERY,
    RIDER_BOUND,
    UNASSIGNED,
    OrderStatus,
    check_transition,
)
from bloomwire.contract.topics import Identity, InboundKind, InboundTopic
from bloomwire.contract.validate import DEFAULT_TIME_BOUNDS, TimeBounds
from bloomwire.errors import BloomwireError, PayloadError, TopicError
from bloomwire.runtime.log import get_logger
from bloomwire.services.persister.tables import CachedTable, Row
from bloomwire.store import models as m
from bloomwire.store.bulk import BulkInsert, KeyLookup

log = get_logger("bloomwire.persister")

S = OrderStatus
EVENTS_T, ORDERS_T, RIDERS_T, OFFERS_T = m.EVENTS, m.ORDERS, m.RIDERS, m.OFFERS
ALERTS_T, CHAT_T, TRAIL_T, DEAD_T = m.ALERTS, m.CHAT, m.TRAIL, m.DEAD_LETTERS

LOCATION_KINDS = frozenset({InboundKind.LOCATION, InboundKind.OWNTRACKS})
#: The statuses in which an order's rider may report on it (after failed: returned).
RIDER_HOLDS = RIDER_BOUND | {S.FAILED}
#: Inbound kinds whose retained publishes are used: presence is state, and the OwnTracks app
#: publishes retained by default (the Recorder uses such live messages; the broker's replays on
#: subscription never reach the persister: its subscriptions ask for none).
RETAINED_ALLOWED = frozenset({InboundKind.PRESENCE, InboundKind.OWNTRACKS})

#: Trail spacing: a point when the rider moved this far or this long since the last one. 50 m is
#: about one city block (enough to redraw the route on a map); 30 s bounds gaps when crawling.
TRAIL_MIN_DISTANCE_M = 50.0
TRAIL_MIN_INTERVAL_S = 30.0
#: Location events on the canonical topic expire: a stale position is worse than none.
LOCATION_EXPIRY_S = 60
#: The retained order state is refreshed from positions at most this often (status changes: always).
STATE_REFRESH_FROM_LOCATION_S = 10.0
RECENT_IDS = 200_000
#: A transition this close to a carried order's destination is about that order (a region a rider
#: draws around a door is ~100 m; the phone's own uncertainty widens it, up to the second figure).
DESTINATION_RADIUS_M = 150.0
DESTINATION_RADIUS_MAX_M = 500.0
DEAD_PAYLOAD_LIMIT = 65_536
#: How the persister signs its refusals on ``services/deadletter`` (it stores them itself).
SERVICE_NAME = "persister"

STEP_COLUMN: dict[OrderStatus, str] = {
    S.ASSIGNED: "assigned_at",
    S.ACCEPTED: "accepted_at",
    S.PICKED_UP: "picked_up_at",
    S.EN_ROUTE: "en_route_at",
    S.ARRIVED: "arrived_at",
    S.DELIVERED: "delivered_at",
}


@dataclass(frozen=True, slots=True)
class Inbound:
    """A raw inbound message as the broker delivered it."""

    topic: str
    payload: bytes
    received_at: float = 0.0
    #: Published retained (the broker says so with Retain As Published): not an event, except
    #: on presence and OwnTracks topics (see :data:`RETAINED_ALLOWED`).
    retain: bool = False


@dataclass(frozen=True, slots=True)
class Outbound:
    """A message to publish after the commit."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    expiry_s: int | None = None


@dataclass
class BatchResult:
    """What a batch did: counts, and the messages to publish now that it is committed."""

    outbound: list[Outbound] = field(default_factory=list)
    stored: int = 0
    duplicates: int = 0
    refused: int = 0
    ignored: int = 0
    #: OwnTracks messages acknowledged as ignored, by (``_type`` label, reason).
    owntracks_ignored: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))


class _IgnoredError(BloomwireError):
    """A message that changes nothing (a repeated retained presence): acknowledged, not stored."""


class _RefusedError(BloomwireError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Pending:
    """Rows and messages collected while applying one batch."""

    events: list[Row] = field(default_factory=list)
    chat: list[Row] = field(default_factory=list)
    trail: list[Row] = field(default_factory=list)
    dead: list[Row] = field(default_factory=list)
    canonical: list[Outbound] = field(default_factory=list)
    acks: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    states: dict[str, None] = field(default_factory=dict)
    #: rider -> shops to tell besides those of its current orders (one it just stopped carrying for)
    rider_states: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    #: event id -> content digest of the events this batch stores
    seen: dict[str, int] = field(default_factory=dict)


class _Keep(Enum):
    KEEP = 0


#: What is known of a stored event id: its content digest (recent ids), or the stored
#: (type, source, time, data) read back from the store.
Known = int | tuple[str, str, datetime, Any]


def _digest(event: Any, data_json: str) -> int:
    """The content of an event, to tell a repeated event from a reused id (this process only)."""
    return hash((event.type, event.source, event.time, data_json))


def _storable(text: str) -> str:
    """``text`` without NUL characters (PostgreSQL text cannot hold them; a refusal must store)."""
    return text.replace("\x00", "\\u0000") if "\x00" in text else text


def _uuid5(*parts: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "/".join(parts)))


def _event_id(payload: bytes) -> str | None:
    """The ``id`` of a refused payload, if it has a readable one (for the sender's refusal)."""
    try:
        obj = ev.load_json(payload)
    except Exception:  # unreadable: the refusal goes without an id
        return None
    # Only a well-formed id: a refused one may hold anything (a NUL, which PostgreSQL refuses).
    if isinstance(obj, dict) and ev.is_event_id(obj.get("id")):
        return str(obj["id"])
    return None


def _check_accepted(where: InboundTopic, event: ev.Event) -> None:
    """Refuse an event of a type its topic does not take, or naming another order than the topic."""
    expected = ev.accepted_types(where)
    if not isinstance(event, expected):
        names = ", ".join(ev.type_name(t) for t in expected) or "nothing"
        raise _RefusedError(
            f"type: {event.type!r} is not accepted on {where.kind.value} topics (expected {names})"
        )
    claimed = getattr(event.data, "order", None)
    if where.order is not None and claimed not in (None, where.order):
        raise _RefusedError(f"data.order {claimed!r} does not match the topic's order {where.order!r}")


class Projector:
    """The persister's authoritative in-memory projections over the store."""

    def __init__(
        self,
        engine: Engine,
        *,
        clock: Callable[[], datetime] = ev.now,
        manual_offer_timeout_s: int = 90,
        bounds: TimeBounds = DEFAULT_TIME_BOUNDS,
        state_grace_s: float | None = None,
    ) -> None:
        self.engine = engine
        #: How long a closed order's retained state outlives its close (its customer's access
        #: grace); then it is cleared from the broker. None: kept (as before).
        self.state_grace_s = state_grace_s
        #: (due, order id) of closed orders' retained states to clear; ``clear_due`` is the truth
        #: (an order that closes again gets a later date; the older heap entry is skipped).
        self.clear_heap: list[tuple[datetime, str]] = []
        self.clear_due: dict[str, tuple[datetime, str]] = {}
        #: How far inbound times may lie from ``clock`` (refused beyond, in :meth:`_decode`).
        self.bounds = bounds
        self.clock = clock
        self.manual_offer_timeout_s = manual_offer_timeout_s
        self.orders = CachedTable(ORDERS_T, self._load_one(ORDERS_T))
        self.riders = CachedTable(RIDERS_T, self._load_one(RIDERS_T))
        self.offers = CachedTable(OFFERS_T, self._load_one(OFFERS_T))
        self.alerts = CachedTable(ALERTS_T, self._load_one(ALERTS_T))
        self._tables = (self.orders, self.riders, self.offers, self.alerts)
        self._insert = {t: BulkInsert(t, engine.dialect) for t in (CHAT_T, TRAIL_T, DEAD_T)}
        # An event's data is written as pydantic serialises it: one pass instead of two.
        self._insert[EVENTS_T] = BulkInsert(EVENTS_T, engine.dialect, serialized=("data",))
        self._event_ids = KeyLookup(EVENTS_T.c.id, engine.dialect)
        self._conn: sa.Connection | None = None
        #: Recently stored event ids and their content digests (older ones: read from the store).
        self.recent_ids: OrderedDict[str, int] = OrderedDict()
        self.rider_orders: dict[str, set[str]] = defaultdict(set)
        self.customer_orders: dict[str, str] = {}
        #: order id -> ids of its open alerts: a snapshot counts them without a scan of every alert.
        self.open_alerts: dict[str, set[str]] = {}
        self.fixes: dict[str, deque[geo.Fix]] = defaultdict(lambda: deque(maxlen=6))
        self.last_trail: dict[str, tuple[float, float, datetime]] = {}
        self.state_sent_at: dict[str, datetime] = {}
        self.rider_state_sent_at: dict[str, datetime] = {}
        #: A commit failed: memory may hold changes the store never took; reload before going on.
        self._stale = False

    # --- start-up -------------------------------------------------------------------------------

    def _load_one(self, table: sa.Table) -> Callable[[str], Row | None]:
        key = next(iter(table.primary_key.columns))

        def load(value: str) -> Row | None:
            with self.engine.connect() as conn:
                r = conn.execute(sa.select(table).where(key == value)).first()
            return dict(r._mapping) if r is not None else None

        return load

    def load(self) -> None:
        """Read the live part of the store into memory (open orders, riders, pending offers, open alerts)."""
        closed = [s.value for s in CLOSED]
        with self.engine.connect() as conn:
            self.orders.load(conn.execute(sa.select(ORDERS_T).where(ORDERS_T.c.status.not_in(closed))))
            self.riders.load(conn.execute(sa.select(RIDERS_T)))
            self.offers.load(conn.execute(sa.select(OFFERS_T).where(OFFERS_T.c.status == "pending")))
            self.alerts.load(conn.execute(sa.select(ALERTS_T).where(ALERTS_T.c.status != "resolved")))
        for order in self.orders.values():
            if order["rider"] and order["status"] in RIDER_BOUND:
                self.rider_orders[order["rider"]].add(order["id"])
            if order["customer_username"]:
                self.customer_orders[order["customer_username"]] = order["id"]
        for alert in self.alerts.values():
            self._index_alert(alert)
        self._load_clearings()
        log.info("projections loaded", orders=len(self.orders.rows), riders=len(self.riders.rows))

    def _load_clearings(self) -> None:
        """Date the clearing of orders closed within the grace (older ones were published with
        a message expiry, so the broker drops them even if this process was down when due)."""
        if self.state_grace_s is None:
            return
        since = self.clock() - timedelta(seconds=self.state_grace_s)
        cols = (ORDERS_T.c.id, ORDERS_T.c.shop, ORDERS_T.c.closed_at)
        query = sa.select(*cols).where(ORDERS_T.c.closed_at >= since)  # set only when closed
        with self.engine.connect() as conn:
            for order_id, shop, closed_at in conn.execute(query):
                self._date_clearing(order_id, shop, closed_at)

    def _date_clearing(self, order_id: str, shop: str, closed_at: datetime) -> datetime:
        assert self.state_grace_s is not None
        due = closed_at + timedelta(seconds=self.state_grace_s)
        self.clear_due[order_id] = (due, shop)
        heapq.heappush(self.clear_heap, (due, order_id))
        return due

    def due_clearings(self, now: datetime | None = None) -> list[Outbound]:
        """Empty retained publishes for the closed orders whose grace has ended (each once)."""
        now = now or self.clock()
        out: list[Outbound] = []
        heap = self.clear_heap
        while heap and heap[0][0] <= now:
            due, order_id = heapq.heappop(heap)
            entry = self.clear_due.get(order_id)
            if entry is None or entry[0] != due:
                continue  # re-dated since
            del self.clear_due[order_id]
            topic = topics.order_topic(entry[1], order_id, topics.OrderChannel.STATE)
            out.append(Outbound(topic, b"", qos=1, retain=True))
        return out

    def snapshot_messages(self) -> list[Outbound]:
        """Retained state of every live order and rider, republished at start-up.

        A crash between commit and publish can leave a retained snapshot one step behind; the
        store is right, so the persister repairs the snapshots from it whenever it starts.
        """
        out = [self._order_state_msg(o) for o in self.orders.values()]
        for rider in self.riders.values():
            out.extend(self._rider_state_msgs(rider))
        return out

    # --- the batch --------------------------------------------------------------------------------

    def apply(self, batch: Sequence[Inbound]) -> BatchResult:
        """Validate and apply ``batch`` in order, commit once, and return what to publish.

        If it raises, nothing was committed and the projections are reloaded before the next batch.
        """
        if self._stale:
            self._reload()  # raises while the store is still unreachable: the batch is retried
        try:
            return self._apply(batch)
        except BaseException:
            self._stale = True  # memory may hold changes the store never took
            raise

    def _apply(self, batch: Sequence[Inbound]) -> BatchResult:
        now = self.clock()
        result = BatchResult()
        pending = _Pending()
        decoded: list[tuple[Inbound, InboundTopic | None, Any, str | None]] = []
        for msg in batch:
            decoded.append(self._decode(msg))
        ids = [e.id for _, _, e, _ in decoded if isinstance(e, ev._Envelope)]
        known = self._known_ids(ids)
        for msg, where, event, error in decoded:
            if msg.retain and where is not None and where.kind not in RETAINED_ALLOWED:
                self._retained(pending, msg, where, event, now, result)
                continue
            if error is not None:
                self._refuse(pending, msg, where, event, error, now)
                result.refused += 1
                continue
            if event is None or isinstance(event, ot.Ignored):
                result.ignored += 1
                if isinstance(event, ot.Ignored):
                    result.owntracks_ignored[event.kind, event.why] += 1
                continue
            assert where is not None
            if isinstance(event, ev.RiderLocationEvent) and where.kind in LOCATION_KINDS:
                # Positions are not events of record: latest position + trail, no dedupe needed.
                self._check_and_locate(pending, msg, where, event, now, result)
                continue
            seen = pending.seen.get(event.id, known.get(event.id))
            if seen is not None:
                self._repeated(pending, msg, where, event, seen, now, result)
                continue
            self._one(pending, msg, where, event, now, result)
        self._commit(pending)
        for eid, digest in pending.seen.items():
            self._remember(eid, digest)
        result.outbound = self._outbound(pending, now)
        self._evict_closed()
        return result

    def _one(
        self,
        pending: _Pending,
        msg: Inbound,
        where: InboundTopic,
        event: Any,
        now: datetime,
        result: BatchResult,
    ) -> None:
        """Apply one new event: stored, ignored or refused."""
        try:
            self._check_source(where, event)
            self._apply_event(pending, where, event, now)
        except _IgnoredError:
            self._ack(pending, where, event.id)
            result.ignored += 1
            return
        except _RefusedError as exc:
            self._refuse(pending, msg, where, event, exc.reason, now)
            result.refused += 1
            return
        except Exception as exc:  # a bug must not stop the stream: refuse and carry on
            log.exception("internal error applying event", topic=msg.topic, id=event.id)
            self._refuse(pending, msg, where, event, f"internal error: {exc}", now)
            result.refused += 1
            return
        row = self._event_row(where, event, msg.topic, now)
        pending.seen[event.id] = _digest(event, row["data"])
        pending.events.append(row)
        self._ack(pending, where, event.id)
        result.stored += 1

    def _repeated(
        self,
        pending: _Pending,
        msg: Inbound,
        where: InboundTopic,
        event: Any,
        known: Known,
        now: datetime,
        result: BatchResult,
    ) -> None:
        """A known id: the same event again is a duplicate (acknowledged); other content, a conflict."""
        data_json = event.data.model_dump_json(exclude_none=True)
        if isinstance(known, int):
            same = known == _digest(event, data_json)
        else:
            kind, source, at, data = known
            same = (kind, source, at) == (event.type, event.source, event.time) and data == json.loads(
                data_json
            )
        if same:
            self._ack(pending, where, event.id)
            result.duplicates += 1
            return
        self._refuse(pending, msg, where, event, f"id {event.id!r} already used for a different event", now)
        result.refused += 1

    def _retained(
        self,
        pending: _Pending,
        msg: Inbound,
        where: InboundTopic,
        event: Any,
        now: datetime,
        result: BatchResult,
    ) -> None:
        """A retained publish on an inbound topic (presence aside): refused, and cleared from the
        broker (else it is handed to every new subscriber). Its clearing comes back: ignored."""
        if not msg.payload:
            result.ignored += 1
            return
        self._refuse(pending, msg, where, event, f"retained publishes are not events on {msg.topic}", now)
        pending.canonical.append(Outbound(msg.topic, b"", retain=True))
        result.refused += 1

    def refuse(self, msg: Inbound, reason: str, check: Callable[[Projector, Exception], None]) -> BatchResult:
        """Refuse ``msg`` alone (the store would not take it): dead-letter it, tell its sender.

        ``check(self, exc)`` raises if a failure to store the refusal means the store is down;
        otherwise the refusal is published without its row (logged: it cannot be stored).
        """
        if self._stale:
            self._reload()
        now = self.clock()
        pending = _Pending()
        try:
            where: InboundTopic | None = topics.parse_inbound(msg.topic)
        except TopicError:
            where = None
        self._refuse(pending, msg, where, _event_id(msg.payload), reason, now)
        try:
            self._commit(pending)
        except Exception as exc:
            check(self, exc)
            log.error(
                "a refusal could not be stored", topic=msg.topic[:200], reason=reason, error=str(exc)[:300]
            )
        result = BatchResult(refused=1)
        result.outbound = self._outbound(pending, now)
        return result

    def _decode(self, msg: Inbound) -> tuple[Inbound, InboundTopic | None, Any, str | None]:
        """``(msg, where, event or None, None)``, or ``(msg, where, id or None, reason)`` if refused.

        Total: no exception escapes, so one message can never fail its batch.
        """
        try:
            where = topics.parse_inbound(msg.topic)
        except Exception as exc:  # a TopicError, or anything else: this message alone is refused
            return msg, None, None, str(exc)
        try:
            event = self._decode_payload(msg, where)
            if isinstance(event, ev._Envelope):
                ev.check_received(event, self.clock(), self.bounds)
            return msg, where, event, None
        except PayloadError as exc:
            return msg, where, _event_id(msg.payload), str(exc)
        except Exception as exc:  # a bug in a validator must not fail the batch: refuse this one
            log.exception("internal error decoding", topic=msg.topic)
            return msg, where, _event_id(msg.payload), f"undecodable payload: {type(exc).__name__}: {exc}"

    def _decode_payload(self, msg: Inbound, where: InboundTopic) -> ev._Envelope | ot.Ignored | None:
        if where.kind is InboundKind.OWNTRACKS:
            return self._decode_owntracks(msg, where)
        if where.kind is InboundKind.PRESENCE and msg.payload.strip() in (b"online", b"offline"):
            status = ev.Presence(msg.payload.strip().decode())
            data = ev.RiderPresence(status=status)
            # A bare word (e.g. the Last Will) has no time of its own: it happens now.
            return ev.RiderPresenceEvent(source=where.source, time=self.clock(), data=data)
        if where.kind is InboundKind.PRESENCE and msg.payload == b"":
            return None  # a retained presence being cleared
        if where.kind is InboundKind.LOCATION:
            obj = ev.load_json(msg.payload)
            if isinstance(obj, dict) and "type" not in obj:  # bare OwnTracks-style fields
                loc = ot.parse_location_fields(obj, self.clock(), self.bounds)
                return ev.RiderLocationEvent(source=where.source, data=loc)
        return ev.decode(msg.payload)

    def _decode_owntracks(
        self, msg: Inbound, where: InboundTopic
    ) -> ev.Event | ev.RiderRegionChangedEvent | ot.Ignored:
        """What an OwnTracks payload is (raises :class:`PayloadError` when it is malformed)."""
        now = self.clock()
        parsed = ot.parse(msg.payload, now, bounds=self.bounds)
        match parsed:
            case ot.Ignored():
                log.info("owntracks message ignored", topic=msg.topic[:200], type=parsed.kind, why=parsed.why)
                return parsed
            case ot.Lwt():
                # The app's own Last Will: the same as a bare ``offline`` on riders/R/presence.
                offline = ev.RiderPresence(status=ev.Presence.OFFLINE)
                return ev.RiderPresenceEvent(source=where.source, time=now, data=offline)
            case ot.Transition():
                device = where.device or "unknown"
                return ot.transition_event(
                    where.sender, device, parsed, self._transition_order(where, parsed)
                )
            case _:
                return ev.RiderLocationEvent(source=where.source, data=parsed)

    def _transition_order(self, where: InboundTopic, t: ot.Transition) -> str | None:
        """The order a transition is about: the carried order whose destination its region is, else
        the rider's only carried order (part of that delivery's story), else none."""
        carried = sorted(self.rider_orders.get(where.sender, ()))
        found = self._destination_order(where.sender, t.lat, t.lon, t.acc, (t.desc, t.rid))
        return found or (carried[0] if len(carried) == 1 else None)

    def _destination_order(
        self, rider: str, lat: float, lon: float, acc: float | None, names: tuple[str | None, ...]
    ) -> str | None:
        """The order ``rider`` carries whose destination a region is, if any: the region is named
        after the order (its ``desc`` or ``rid``), or the phone was near the order's address."""
        nearest: tuple[float, str] | None = None
        for order_id in sorted(self.rider_orders.get(rider, ())):
            order = self.orders.rows.get(order_id)
            if order is None:
                continue
            if order_id in names:
                return order_id
            metres = geo.distance_m(lat, lon, order["lat"], order["lon"])
            near = metres <= max(DESTINATION_RADIUS_M, min(acc or 0.0, DESTINATION_RADIUS_MAX_M))
            if near and (nearest is None or metres < nearest[0]):
                nearest = (metres, order_id)
        return nearest[1] if nearest else None

    def _check_and_locate(
        self,
        pending: _Pending,
        msg: Inbound,
        where: InboundTopic,
        event: ev.RiderLocationEvent,
        now: datetime,
        result: BatchResult,
    ) -> None:
        try:
            self._check_source(where, event)
        except _RefusedError as exc:
            self._refuse(pending, msg, where, event, exc.reason, now)
            result.refused += 1
            return
        self._location(pending, where, event, now)
        result.stored += 1

    def _connection(self) -> sa.Connection:
        """The projector's own connection, kept from batch to batch: a pool checkout and the reset
        on its return cost more than a small batch's inserts."""
        conn = self._conn
        if conn is None or conn.closed or conn.invalidated:
            conn = self._conn = self.engine.connect()
        return conn

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sa.Connection]:
        """A write transaction on the kept connection; a failure gives the connection up."""
        conn = self._connection()
        try:
            with conn.begin():
                yield conn
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        """Give the kept connection back (after a failure, the next batch takes a fresh one)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _known_ids(self, ids: list[str]) -> dict[str, Known]:
        """What is known of the ids already stored (recent ones from memory, others read back)."""
        recent = self.recent_ids
        known: dict[str, Known] = {i: recent[i] for i in ids if i in recent}
        unknown = [i for i in ids if i not in known]
        if unknown:
            conn = self._connection()
            try:
                stored = self._event_ids.existing(conn, unknown)
                if stored:  # rare (a redelivery after a restart): read them to compare contents
                    cols = (
                        EVENTS_T.c.id,
                        EVENTS_T.c.type,
                        EVENTS_T.c.source,
                        EVENTS_T.c.time,
                        EVENTS_T.c.data,
                    )
                    for r in conn.execute(sa.select(*cols).where(EVENTS_T.c.id.in_(sorted(stored)))):
                        known[r[0]] = (r[1], r[2], r[3], r[4])
                conn.rollback()  # the read ends here; the batch's writes are a transaction of their own
            except Exception:
                self.close()
                raise
        return known

    def _remember(self, event_id: str, digest: int) -> None:
        self.recent_ids[event_id] = digest
        if len(self.recent_ids) > RECENT_IDS:
            self.recent_ids.popitem(last=False)

    def _commit(self, pending: _Pending) -> None:
        try:
            with self._transaction() as conn:
                self._insert[EVENTS_T].execute(conn, pending.events)
                for table in self._tables:
                    table.flush(conn)
                self._insert[CHAT_T].execute(conn, pending.chat)
                self._insert[TRAIL_T].execute(conn, pending.trail)
                self._insert[DEAD_T].execute(conn, pending.dead)
        except Exception:
            for table in self._tables:
                table.rolled_back()
            self._stale = True
            raise
        for table in self._tables:
            table.committed()

    def _evict_closed(self) -> None:
        """Let closed orders go from memory once the batch is committed and its snapshots built
        (evicted earlier, building a snapshot would read them straight back from the store).
        Only orders this batch read or changed can have closed: no scan of every open order.
        Resolved alerts go too (read back from the store if named again), and so does what was
        kept per order for positions: memory follows the open work, not the history."""
        for order_id in self.orders.take_recent():
            order = self.orders.rows.get(order_id)
            if order is not None and order["status"] in CLOSED and order["closed_at"] is not None:
                self.orders.evict(order_id)
                if self.customer_orders.get(order["customer_username"]) == order_id:
                    del self.customer_orders[order["customer_username"]]  # the store answers now
                self.last_trail.pop(order_id, None)
                self.state_sent_at.pop(order_id, None)
        for alert_id in self.alerts.take_recent():
            alert = self.alerts.rows.get(alert_id)
            if alert is not None and alert["status"] == "resolved":
                self.alerts.evict(alert_id)
        for offer_id in self.offers.take_recent():
            offer = self.offers.rows.get(offer_id)
            if offer is not None and offer["status"] != "pending":
                self.offers.evict(offer_id)
        self.riders.take_recent()  # riders stay (one row each); only the set of recent keys goes

    def _reload(self) -> None:
        """Forget every projection and read them again from the store (after a failed commit).

        Rolling back only the rows a batch touched is not enough: the indexes over them (which
        orders a rider carries, which order a customer has) and the trail spacing would go on
        without them, and positions would stop reaching the order.
        """
        for table in self._tables:
            table.rows.clear()
            table.committed()
        self.rider_orders.clear()
        self.customer_orders.clear()
        self.open_alerts.clear()
        self.clear_heap.clear()
        self.clear_due.clear()
        self.last_trail.clear()
        self.load()
        self._stale = False

    def record_refusal(self, payload: bytes) -> bool:
        """Store another service's refusal from ``services/deadletter``; True if a row was written.

        The persister's own refusals are stored with their batch and skipped here. A dead letter
        that cannot be read is stored as such: nothing on that topic is dropped unseen.
        """
        now = self.clock()
        try:
            refusal = ev.Refusal.model_validate_json(payload)
        except ValueError as exc:
            row = {
                "received_at": now,
                "topic": topics.DEADLETTER,
                "event_id": None,
                "sender": None,
                "reason": f"unreadable dead letter: {str(exc)[:500]}",
                "payload": ev.payload_text(payload, DEAD_PAYLOAD_LIMIT),
            }
        else:
            if refusal.service == SERVICE_NAME:
                return False
            row = {
                "received_at": now,
                "topic": _storable(refusal.topic[:1024]),
                "event_id": _storable(refusal.id[:128]) if refusal.id else None,
                "sender": _storable(f"{topics.SERVICES}/{refusal.service}"[:200])
                if refusal.service
                else None,
                "reason": _storable(refusal.reason),
                "payload": _storable((refusal.payload or "")[:DEAD_PAYLOAD_LIMIT]),
            }
        with self._transaction() as conn:
            self._insert[DEAD_T].execute(conn, [row])
        return True

    # --- outcomes ---------------------------------------------------------------------------------

    def _ack(self, pending: _Pending, where: InboundTopic, event_id: str) -> None:
        if where.identity in (Identity.RIDER, Identity.CUSTOMER, Identity.SHOP):
            pending.acks[where.source].append(event_id)

    def _refuse(
        self,
        pending: _Pending,
        msg: Inbound,
        /,
        where: InboundTopic | None,
        event: Any,
        reason: str,
        now: datetime,
    ) -> None:
        event_id = event.id if isinstance(event, ev._Envelope) else event if isinstance(event, str) else None
        text = ev.payload_text(msg.payload, DEAD_PAYLOAD_LIMIT)
        pending.dead.append(
            {
                "received_at": now,
                "topic": _storable(msg.topic[:1024]),
                "event_id": _storable(event_id) if event_id else None,
                "sender": where.source if where else None,
                "reason": _storable(reason),
                "payload": _storable(text),
            }
        )
        refusal = ev.encode(
            ev.Refusal(id=event_id, topic=msg.topic[:1024], reason=reason, at=now, service=SERVICE_NAME)
        )
        pending.canonical.append(Outbound(topics.DEADLETTER, refusal))
        error_topic = where.error_topic() if where else None
        if error_topic:
            pending.canonical.append(Outbound(error_topic, refusal))
        log.info("refused", topic=msg.topic[:200], id=event_id, reason=reason)

    def _outbound(self, pending: _Pending, now: datetime) -> list[Outbound]:
        out = pending.canonical
        for order_id in pending.states:
            order = self.orders.get(order_id)
            if order is not None:
                out.append(self._order_state_msg(order))
                self.state_sent_at[order_id] = now
        for rider_id, shops in pending.rider_states.items():
            rider = self.riders.get(rider_id)
            if rider is not None:
                out.extend(self._rider_state_msgs(rider, shops))
                self.rider_state_sent_at[rider_id] = now
        for source, ids in pending.acks.items():
            out.append(Outbound(topics.acks_topic(source), ev.encode(ev.Ack(ids=ids))))
        return out

    def _event_row(self, where: InboundTopic, event: Any, topic: str, now: datetime) -> Row:
        data = event.data
        order_id = getattr(data, "order", None) or where.order
        if isinstance(event, ev.RiderRegionChangedEvent):
            order_id = event.subject  # the order the transition is about, if any
        order = self.orders.rows.get(order_id) if order_id else None
        rider = getattr(data, "rider", None) or (where.sender if where.identity is Identity.RIDER else None)
        return {
            "id": event.id,
            "type": event.type,
            "source": event.source,
            "topic": topic,
            "shop": order["shop"] if order else (where.sender if where.identity is Identity.SHOP else None),
            "order_id": order_id,
            "rider": rider,
            "time": event.time,
            "recorded_at": now,
            "data": data.model_dump_json(exclude_none=True),
        }

    # --- snapshots --------------------------------------------------------------------------------

    def order_state(self, order: Row) -> ev.OrderState:
        """The retained snapshot of an order."""
        timeline = [ev.TimelineEntry(status=S.CREATED, at=order["created_at"])]
        for status, column in STEP_COLUMN.items():
            if order[column] is not None:
                timeline.append(ev.TimelineEntry(status=status, at=order[column]))
        closing = order["status"] in CLOSED and order["status"] not in STEP_COLUMN
        if closing and order["closed_at"] is not None:
            # delivered already has its step above; cancelled, failed and returned end it here
            note = order["failure_reason"] or ""
            timeline.append(ev.TimelineEntry(status=order["status"], at=order["closed_at"], note=note))
        timeline.sort(key=lambda t: t.at)
        position = None
        rider = self.riders.rows.get(order["rider"]) if order["rider"] else None
        # A rider row may hold a position without its time (older stores, `bench alerts` seeds):
        # no time, no position in the snapshot.
        located = rider is not None and rider["lat"] is not None and rider["position_at"] is not None
        if order["status"] in OUT_FOR_DELIVERY and rider is not None and located:
            position = ev.Position(
                lat=rider["lat"],
                lon=rider["lon"],
                at=rider["position_at"],
                speed_kmh=rider["speed_kmh"],
            )
        open_alerts = len(self.open_alerts.get(order["id"], ()))
        return ev.OrderState(
            order=order["id"],
            shop=order["shop"],
            status=order["status"],
            rider=order["rider"],
            customer=order["customer_name"],
            window=ev.Window(start=order["window_start"], end=order["window_end"]),
            eta=order["eta"] if order["status"] in OUT_FOR_DELIVERY else None,
            position=position,
            timeline=timeline[-20:],
            open_alerts=open_alerts,
            updated_at=order["updated_at"],
            destination=ev.Place(lat=order["lat"], lon=order["lon"], address=order["address"] or ""),
        )

    def _order_state_msg(self, order: Row) -> Outbound:
        """The retained state; a closed order's expires with its grace (or is cleared, past it)."""
        topic = topics.order_topic(order["shop"], order["id"], topics.OrderChannel.STATE)
        expiry: int | None = None
        if self.state_grace_s is not None and order["status"] in CLOSED and order["closed_at"] is not None:
            due = self._date_clearing(order["id"], order["shop"], order["closed_at"])
            left = (due - self.clock()).total_seconds()
            if left <= 0:
                return Outbound(topic, b"", qos=1, retain=True)
            expiry = math.ceil(left)
        return Outbound(topic, ev.encode(self.order_state(order)), qos=1, retain=True, expiry_s=expiry)

    def _rider_state_msgs(self, rider: Row, also: set[str] | None = None) -> list[Outbound]:
        """Retained rider state for each shop it carries for (and ``also``: shops it just left)."""
        shops = {
            self.orders.rows[o]["shop"]
            for o in self.rider_orders.get(rider["id"], ())
            if o in self.orders.rows
        } | (also or set())
        if not shops:
            return []
        position = None
        if rider["lat"] is not None and rider["position_at"] is not None:
            position = ev.Position(
                lat=rider["lat"],
                lon=rider["lon"],
                at=rider["position_at"],
                speed_kmh=rider["speed_kmh"],
            )
        state = ev.RiderState(
            rider=rider["id"],
            presence=rider["presence"],
            on_duty=rider["on_duty"],
            load=rider["load"],
            capacity=rider["capacity"],
            position=position,
            updated_at=rider["updated_at"] or self.clock(),
        )
        payload = ev.encode(state)
        return [
            Outbound(topics.shop_rider_state(s, rider["id"]), payload, retain=True) for s in sorted(shops)
        ]

    # --- helpers over rows ------------------------------------------------------------------------

    def _order(self, order_id: str) -> Row:
        order = self.orders.get(order_id)
        if order is None:
            raise _RefusedError(f"unknown order {order_id!r}")
        return order

    def _rider(self, rider_id: str, now: datetime) -> Row:
        rider = self.riders.get(rider_id)
        if rider is None:
            rider = self.riders.add(
                {
                    "id": rider_id,
                    "presence": "offline",
                    "presence_at": None,
                    "on_duty": True,
                    "capacity": 3,
                    "load": 0,
                    "lat": None,
                    "lon": None,
                    "speed_kmh": None,
                    "position_at": None,
                    "last_decline_at": None,
                    "idle_since": now,
                    "updated_at": now,
                }
            )
        return rider

    def _set_status(
        self,
        pending: _Pending,
        order: Row,
        status: OrderStatus,
        at: datetime,
        now: datetime,
        *,
        rider: str | _Keep | None = _Keep.KEEP,
    ) -> None:
        """Move ``order`` to ``status`` (validated), keeping rider loads and timestamps in step."""
        check = S(order["status"])
        if status is not check or status is S.ASSIGNED:
            try:
                check_transition(check, status)
            except BloomwireError as exc:
                raise _RefusedError(f"order {order['id']}: {exc}") from None
        old_rider = order["rider"]
        new_rider = old_rider if isinstance(rider, _Keep) else rider
        order["status"] = status.value
        order["rider"] = new_rider
        order["updated_at"] = now
        column = STEP_COLUMN.get(status)
        if column:
            order[column] = at
        if status in CLOSED:
            order["closed_at"] = at
        if status in UNASSIGNED:
            order["offer_id"] = None
            order["offer_deadline"] = None
        self.orders.touch(order["id"])
        pending.states[order["id"]] = None
        bound = status in RIDER_BOUND
        for rid in {old_rider, new_rider} - {None}:
            assert rid is not None
            holds = bound and rid == new_rider
            orders = self.rider_orders[rid]
            if holds:
                orders.add(order["id"])
            else:
                orders.discard(order["id"])
            r = self._rider(rid, now)
            if r["load"] != len(orders):
                if not orders:
                    r["idle_since"] = now
                r["load"] = len(orders)
                r["updated_at"] = now
                self.riders.touch(rid)
                # The order's shop hears of it even when the rider no longer carries for it.
                pending.rider_states[rid].add(order["shop"])

    def _publish_status(self, pending: _Pending, order: Row, event: Any, note: str = "") -> None:
        data = ev.OrderStatusChanged(
            order=order["id"],
            status=S(order["status"]),
            reason=order["failure_reason"] if order["status"] == S.FAILED else None,
            note=note,
            rider=order["rider"],
        )
        canonical = ev.OrderStatusEvent(id=event.id, source=event.source, time=event.time, data=data)
        topic = topics.order_topic(order["shop"], order["id"], topics.OrderChannel.STATUS)
        pending.canonical.append(Outbound(topic, ev.encode(canonical)))

    def _check_source(self, where: InboundTopic, event: Any) -> None:
        if event.source != where.source:
            raise _RefusedError(
                f"source {event.source!r} does not match the sender {where.source!r}; "
                "an identity may only speak for itself"
            )

    # --- per event type ---------------------------------------------------------------------------

    def _apply_event(self, pending: _Pending, where: InboundTopic, event: ev.Event, now: datetime) -> None:
        _check_accepted(where, event)
        match event:
            case ev.OrderCreatedEvent():
                self._created(pending, where, event, now)
            case ev.OrderCancelledEvent():
                self._cancelled(pending, where, event, now)
            case ev.OrderStatusEvent():
                self._rider_status(pending, where, event, now)
            case ev.OrderIncidentEvent():
                self._incident(pending, where, event, now)
            case ev.OrderChatEvent():
                self._chat(pending, where, event, now)
            case ev.OrderAssignedEvent():
                self._manual_assign(pending, where, event, now)
            case ev.RiderPresenceEvent():
                self._presence(pending, where, event, now)
            case ev.RiderRegionChangedEvent():
                self._region_changed(pending, where, event)
            case ev.DispatchOfferEvent():
                self._offer(pending, event, now)
            case ev.DispatchReplyEvent():
                self._reply(pending, where, event, now)
            case ev.DispatchExpiredEvent():
                self._expired(pending, event, now)
            case ev.AlertRaisedEvent() | ev.AlertEscalatedEvent() | ev.AlertResolvedEvent():
                self._alert(pending, event, now)
            case ev.AlertAcknowledgedEvent():
                self._alert_ack(pending, where, event, now)
            case _:  # pragma: no cover - guarded by ``expected`` above
                raise _RefusedError(f"type: {event.type!r} is not handled")

    def _cancelled(
        self, pending: _Pending, where: InboundTopic, event: ev.OrderCancelledEvent, now: datetime
    ) -> None:
        order = self._shop_order(where, event.data.order)
        self._set_status(pending, order, S.CANCELLED, event.time, now)
        self._close_offer(order, "cancelled", now)
        self._publish_status(pending, order, event, event.data.reason)

    def _incident(
        self, pending: _Pending, where: InboundTopic, event: ev.OrderIncidentEvent, now: datetime
    ) -> None:
        order = self._rider_order(where, event.data.order)
        if event.data.eta is not None:
            order["eta"] = event.data.eta
            order["updated_at"] = now
            self.orders.touch(order["id"])
            pending.states[order["id"]] = None
        topic = topics.order_topic(order["shop"], order["id"], topics.OrderChannel.STATUS)
        pending.canonical.append(Outbound(topic, ev.encode(event)))

    def _customer_order(self, username: str) -> str | None:
        """The order a customer username belongs to: open orders from memory, closed ones (whose
        customer may still answer a follow-up, and whose username stays taken) from the store."""
        order_id = self.customer_orders.get(username)
        if order_id is None:
            with self.engine.connect() as conn:
                order_id = conn.execute(
                    sa.select(ORDERS_T.c.id).where(ORDERS_T.c.customer_username == username).limit(1)
                ).scalar()
            if order_id is not None:
                self.customer_orders[username] = order_id
        return order_id

    def _shop_order(self, where: InboundTopic, order_id: str) -> Row:
        order = self._order(order_id)
        if order["shop"] != where.sender:
            raise _RefusedError(f"order {order_id!r} does not belong to shop {where.sender!r}")
        return order

    def _rider_order(self, where: InboundTopic, order_id: str) -> Row:
        order = self._order(order_id)
        if order["rider"] != where.sender:
            raise _RefusedError(f"order {order_id!r} is not assigned to rider {where.sender!r}")
        status = order["status"]
        if status not in RIDER_HOLDS:  # its rider, but no longer in its hands
            why = "it is closed" if status in CLOSED else f"rider {where.sender!r} no longer holds it"
            raise _RefusedError(f"order {order_id!r} is {status}; {why}")
        return order

    def _created(
        self, pending: _Pending, where: InboundTopic, event: ev.OrderCreatedEvent, now: datetime
    ) -> None:
        d = event.data
        if self.orders.get(d.order) is not None:
            raise _RefusedError(f"order {d.order!r} already exists")
        customer = d.customer_username or topics.customer_for_order(d.order)
        if self._customer_order(customer) is not None:
            raise _RefusedError(f"customer access {customer!r} is already used by another order")
        order = self.orders.add(
            {
                "id": d.order,
                "shop": where.sender,
                "status": S.CREATED.value,
                "rider": None,
                "customer_name": d.customer.name,
                "customer_phone": d.customer.phone,
                "address": d.customer.address,
                "lat": d.customer.lat,
                "lon": d.customer.lon,
                "pickup_lat": d.pickup_lat,
                "pickup_lon": d.pickup_lon,
                "items": list(d.items),
                "note": d.note,
                "customer_username": customer,
                "window_start": d.window.start,
                "window_end": d.window.end,
                "eta": None,
                "failure_reason": None,
                "offer_id": None,
                "offer_deadline": None,
                "declined_by": [],
                "created_at": event.time,
                "assigned_at": None,
                "accepted_at": None,
                "picked_up_at": None,
                "en_route_at": None,
                "arrived_at": None,
                "delivered_at": None,
                "closed_at": None,
                "updated_at": now,
            }
        )
        self.customer_orders[customer] = d.order
        pending.states[d.order] = None
        self._publish_status(pending, order, event, d.note)

    def _rider_status(
        self, pending: _Pending, where: InboundTopic, event: ev.OrderStatusEvent, now: datetime
    ) -> None:
        d = event.data
        try:
            ev.check_rider_status(d)
        except PayloadError as exc:
            raise _RefusedError(str(exc)) from None
        order = self._rider_order(where, d.order)
        if d.status is S.DECLINED:
            # The rider hands the order back: it goes to the next candidate.
            self._set_status(pending, order, S.DECLINED, event.time, now, rider=None)
            declined = list(order["declined_by"])
            if where.sender not in declined:
                order["declined_by"] = [*declined, where.sender]
            self._close_offer(order, "released", now)
            rider = self._rider(where.sender, now)
            rider["last_decline_at"] = now
            self.riders.touch(where.sender)
        else:
            self._set_status(pending, order, d.status, event.time, now)
            if d.status is S.FAILED:  # only once the transition is accepted: a refusal changes nothing
                order["failure_reason"] = d.reason.value if d.reason else None
            if d.status in OUT_FOR_DELIVERY:
                self._update_eta(order, now)
        self._publish_status(pending, order, event, d.note)

    def _chat(self, pending: _Pending, where: InboundTopic, event: ev.OrderChatEvent, now: datetime) -> None:
        d = event.data
        if where.identity is Identity.CUSTOMER:
            order_id = self._customer_order(where.sender)
            if order_id is None:
                raise _RefusedError(f"customer {where.sender!r} has no order")
            if d.order not in (None, order_id):
                raise _RefusedError(f"customer {where.sender!r} may only chat on its own order")
            order = self._order(order_id)
            author_role, author = "customer", order["customer_name"]
        elif where.identity is Identity.RIDER:
            if d.order is None:
                raise _RefusedError("data.order: required")
            order = self._rider_order(where, d.order)
            author_role, author = "rider", where.sender
        elif where.identity is Identity.SHOP:
            if d.order is None:
                raise _RefusedError("data.order: required")
            order = self._shop_order(where, d.order)
            author_role, author = "shop", where.sender
        else:  # a service writing as the shop (follow-ups)
            if d.order is None:
                raise _RefusedError("data.order: required")
            order = self._order(d.order)
            author_role, author = "shop", f"{order['shop']} ({where.sender})"
        pending.chat.append(
            {
                "id": event.id,
                "order_id": order["id"],
                "shop": order["shop"],
                "author_role": author_role,
                "author": author,
                "text": d.text,
                "at": event.time,
            }
        )
        # Plain construction: pydantic-core validates faster than model_construct skips it.
        canonical = ev.OrderChatEvent(
            id=event.id,
            source=event.source,
            time=event.time,
            data=ev.OrderChat(order=order["id"], text=d.text, author=f"{author_role}:{author}"),
        )
        topic = topics.order_topic(order["shop"], order["id"], topics.OrderChannel.CHAT)
        pending.canonical.append(Outbound(topic, ev.encode(canonical)))
        if author_role != "rider" and order["rider"] and order["status"] in RIDER_BOUND:
            pending.canonical.append(
                Outbound(topics.rider_inbox(order["rider"], topics.Inbox.CHAT), ev.encode(canonical))
            )

    def _presence(
        self, pending: _Pending, where: InboundTopic, event: ev.RiderPresenceEvent, now: datetime
    ) -> None:
        rider = self._rider(where.sender, now)
        d = event.data
        unchanged = (
            rider["presence"] == d.status.value
            and d.on_duty in (None, rider["on_duty"])
            and d.capacity in (None, rider["capacity"])
        )
        if unchanged and where.sender not in self.riders.new:
            raise _IgnoredError()
        rider["presence"] = d.status.value
        rider["presence_at"] = event.time
        if d.on_duty is not None:
            rider["on_duty"] = d.on_duty
        if d.capacity is not None:
            rider["capacity"] = d.capacity
        rider["updated_at"] = now
        self.riders.touch(where.sender)
        pending.rider_states.setdefault(where.sender, set())

    def _region_changed(
        self, pending: _Pending, where: InboundTopic, event: ev.RiderRegionChangedEvent
    ) -> None:
        """A transition is stored as it is; entering an order's destination asks "arrived?"."""
        d = event.data
        if d.event != "enter":
            return
        names = (d.region, d.region_id)
        order_id = self._destination_order(where.sender, d.lat, d.lon, d.acc, names)
        order = self.orders.rows.get(order_id) if order_id else None
        if order is None:
            return
        if order["status"] not in (S.PICKED_UP, S.EN_ROUTE):
            return
        text = (
            f"You have reached the destination of order {order['id']}"
            f"{f' ({d.region})' if d.region else ''}. Report 'arrived'?"
        )
        prompt = ev.OrderChatEvent(
            id=_uuid5("arrival-prompt", event.id),
            source=f"{topics.SERVICES}/{SERVICE_NAME}",
            time=event.time,
            data=ev.OrderChat(order=order["id"], text=text, author=f"service:{SERVICE_NAME}"),
        )
        inbox = topics.rider_inbox(where.sender, topics.Inbox.CHAT)
        pending.canonical.append(Outbound(inbox, ev.encode(prompt)))

    def _location(
        self, pending: _Pending, where: InboundTopic, event: ev.RiderLocationEvent, now: datetime
    ) -> None:
        d = event.data
        at = datetime.fromtimestamp(d.tst, tz=now.tzinfo) if d.tst else event.time
        rider = self._rider(where.sender, now)
        if rider["position_at"] is not None and at < rider["position_at"]:
            self._ack(pending, where, event.id)
            return  # an older fix arriving late: the newer one stands
        fixes = self.fixes[where.sender]
        fixes.append(geo.Fix(d.lat, d.lon, at))
        rider["lat"], rider["lon"], rider["position_at"] = d.lat, d.lon, at
        rider["speed_kmh"] = d.vel if d.vel is not None else geo.estimate_speed_kmh(list(fixes))
        rider["updated_at"] = now
        self.riders.touch(where.sender)
        self._ack(pending, where, event.id)
        last_sent = self.rider_state_sent_at.get(where.sender)
        if last_sent is None or (now - last_sent).total_seconds() >= STATE_REFRESH_FROM_LOCATION_S:
            pending.rider_states.setdefault(where.sender, set())  # the retained position, now and then
        for order_id in self.rider_orders.get(where.sender, ()):
            order = self.orders.rows.get(order_id)
            if order is None or order["status"] not in OUT_FOR_DELIVERY:
                continue
            self._update_eta(order, now)
            self._trail(pending, order, where.sender, d.lat, d.lon, at)
            position = ev.Position(lat=d.lat, lon=d.lon, at=at, speed_kmh=rider["speed_kmh"])
            payload = ev.encode(
                ev.OrderLocation(order=order_id, rider=where.sender, position=position, eta=order["eta"])
            )
            topic = topics.order_topic(order["shop"], order_id, topics.OrderChannel.LOCATION)
            pending.canonical.append(Outbound(topic, payload, qos=0, expiry_s=LOCATION_EXPIRY_S))
            last = self.state_sent_at.get(order_id)
            if last is None or (now - last).total_seconds() >= STATE_REFRESH_FROM_LOCATION_S:
                pending.states[order_id] = None

    def _update_eta(self, order: Row, now: datetime) -> None:
        rider = self.riders.rows.get(order["rider"]) if order["rider"] else None
        if rider is None or rider["lat"] is None:
            return
        speed = rider["speed_kmh"] or geo.DEFAULT_SPEED_KMH
        order["eta"] = geo.eta(rider["lat"], rider["lon"], order["lat"], order["lon"], now, max(speed, 5.0))
        order["updated_at"] = now
        self.orders.touch(order["id"])

    def _trail(
        self, pending: _Pending, /, order: Row, rider: str, lat: float, lon: float, at: datetime
    ) -> None:
        last = self.last_trail.get(order["id"])
        if last is not None:
            moved = geo.distance_m(last[0], last[1], lat, lon)
            if moved < TRAIL_MIN_DISTANCE_M and (at - last[2]).total_seconds() < TRAIL_MIN_INTERVAL_S:
                return
        self.last_trail[order["id"]] = (lat, lon, at)
        pending.trail.append({"order_id": order["id"], "rider": rider, "lat": lat, "lon": lon, "at": at})

    # --- dispatch ---------------------------------------------------------------------------------

    def _offer(self, pending: _Pending, event: ev.DispatchOfferEvent, now: datetime) -> None:
        d = event.data
        order = self._order(d.order)
        if self.offers.get(d.offer) is not None:
            raise _RefusedError(f"offer {d.offer!r} already exists")
        if order["status"] not in UNASSIGNED and d.mode != "manual":
            raise _RefusedError(f"order {d.order!r} is {order['status']}; only unassigned orders get offers")
        if d.rider in order["declined_by"] and d.mode != "manual":
            raise _RefusedError(f"rider {d.rider!r} already declined order {d.order!r}")
        if d.deadline <= now:
            raise _RefusedError(f"offer deadline {d.deadline.isoformat()} has already passed")
        self._close_offer(order, "superseded", now)
        self.offers.add(
            {
                "id": d.offer,
                "order_id": d.order,
                "rider": d.rider,
                "status": "pending",
                "mode": d.mode,
                "cost": d.cost,
                "candidates": [c.model_dump(mode="json") for c in d.candidates],
                "deadline": d.deadline,
                "created_at": now,
                "closed_at": None,
            }
        )
        self._set_status(pending, order, S.ASSIGNED, event.time, now, rider=d.rider)
        order["offer_id"] = d.offer
        order["offer_deadline"] = d.deadline
        self._publish_status(pending, order, event, f"offered to {d.rider}")
        to_rider = event.model_copy(update={"data": d.model_copy(update={"candidates": []})})
        expiry = max(1, int((d.deadline - now).total_seconds()))
        pending.canonical.append(
            Outbound(
                topics.rider_inbox(d.rider, topics.Inbox.OFFERS),
                ev.encode(to_rider),
                expiry_s=expiry,
            )
        )

    def _close_offer(self, order: Row, status: str, now: datetime) -> None:
        offer_id = order.get("offer_id")
        offer = self.offers.get(offer_id) if offer_id else None
        if offer is not None and offer["status"] == "pending":
            offer["status"] = status
            offer["closed_at"] = now
            self.offers.touch(offer["id"])

    def _reply(
        self, pending: _Pending, where: InboundTopic, event: ev.DispatchReplyEvent, now: datetime
    ) -> None:
        d = event.data
        offer = self.offers.get(d.offer)
        if offer is None:
            raise _RefusedError(f"unknown offer {d.offer!r}")
        if offer["rider"] != where.sender:
            raise _RefusedError(f"offer {d.offer!r} was made to another rider")
        if offer["order_id"] != d.order:
            raise _RefusedError(f"offer {d.offer!r} is for order {offer['order_id']!r}, not {d.order!r}")
        if offer["status"] != "pending":
            raise _RefusedError(f"offer {d.offer!r} is already {offer['status']}")
        if now > offer["deadline"]:
            raise _RefusedError(
                f"offer {d.offer!r} expired at {offer['deadline'].isoformat()}; too late to answer"
            )
        order = self._order(d.order)
        if order["offer_id"] != d.offer or order["rider"] != where.sender:
            raise _RefusedError(f"order {d.order!r} is no longer offered to {where.sender!r}")
        offer["status"] = "accepted" if d.accept else "declined"
        offer["closed_at"] = now
        self.offers.touch(offer["id"])
        if d.accept:
            self._set_status(pending, order, S.ACCEPTED, event.time, now)
        else:
            self._set_status(pending, order, S.DECLINED, event.time, now, rider=None)
            order["declined_by"] = [*order["declined_by"], where.sender]
            rider = self._rider(where.sender, now)
            rider["last_decline_at"] = now
            self.riders.touch(where.sender)
        self._publish_status(pending, order, event, d.reason)

    def _expired(self, pending: _Pending, event: ev.DispatchExpiredEvent, now: datetime) -> None:
        d = event.data
        offer = self.offers.get(d.offer)
        if offer is None:
            raise _RefusedError(f"unknown offer {d.offer!r}")
        if offer["status"] != "pending":
            raise _RefusedError(f"offer {d.offer!r} is already {offer['status']}")
        if now < offer["deadline"]:
            raise _RefusedError(f"offer {d.offer!r} runs until {offer['deadline'].isoformat()}")
        offer["status"] = "expired"
        offer["closed_at"] = now
        self.offers.touch(offer["id"])
        order = self._order(d.order)
        if order["offer_id"] == d.offer and order["status"] == S.ASSIGNED:
            self._set_status(pending, order, S.DECLINED, event.time, now, rider=None)
            order["declined_by"] = [*order["declined_by"], offer["rider"]]
            self._publish_status(pending, order, event, f"offer to {offer['rider']} timed out")

    def _manual_assign(
        self, pending: _Pending, where: InboundTopic, event: ev.OrderAssignedEvent, now: datetime
    ) -> None:
        d = event.data
        order = self._shop_order(where, d.order)
        rider = self.riders.get(d.rider)
        if rider is None:
            raise _RefusedError(f"unknown rider {d.rider!r}")
        if rider["presence"] != "online":
            raise _RefusedError(f"rider {d.rider!r} is offline")
        if order["status"] not in UNASSIGNED | {S.ASSIGNED, S.ACCEPTED}:
            raise _RefusedError(f"order {d.order!r} is {order['status']}; it can no longer be reassigned")
        load = len(self.rider_orders.get(d.rider, ())) - (1 if order["rider"] == d.rider else 0)
        if load >= rider["capacity"]:
            raise _RefusedError(f"rider {d.rider!r} is full ({load}/{rider['capacity']})")
        deadline = now + timedelta(seconds=self.manual_offer_timeout_s)
        offer = ev.DispatchOfferEvent(
            id=event.id,
            source=event.source,
            time=event.time,
            data=ev.DispatchOffer(
                offer=_uuid5("offer", event.id),
                order=d.order,
                rider=d.rider,
                deadline=deadline,
                mode="manual",
            ),
        )
        self._offer(pending, offer, now)

    # --- alerts -----------------------------------------------------------------------------------

    def _alert(self, pending: _Pending, event: Any, now: datetime) -> None:
        d = event.data
        if isinstance(event, ev.AlertRaisedEvent):
            if self.alerts.get(d.alert) is not None:
                raise _RefusedError(f"alert {d.alert!r} already exists")
            alert = self.alerts.add(
                {
                    "id": d.alert,
                    "rule": d.rule.value,
                    "severity": d.severity.value,
                    "shop": d.shop,
                    "order_id": d.order,
                    "rider": d.rider,
                    "message": d.message,
                    "action": d.action,
                    "status": "open",
                    "level": 0,
                    "raised_at": event.time,
                    "escalated_at": None,
                    "acknowledged_at": None,
                    "acknowledged_by": None,
                    "resolved_at": None,
                }
            )
        else:
            found = self.alerts.get(d.alert)
            if found is None:
                raise _RefusedError(f"unknown alert {d.alert!r}")
            alert = found
            if alert["status"] == "resolved":
                raise _RefusedError(f"alert {d.alert!r} is already resolved")
            if isinstance(event, ev.AlertEscalatedEvent):
                alert["level"] = d.level
                alert["escalated_at"] = event.time
            else:
                alert["status"] = "resolved"
                alert["resolved_at"] = event.time
            self.alerts.touch(alert["id"])
        self._index_alert(alert)
        self._publish_alert(pending, alert, event)

    def _index_alert(self, alert: Row) -> None:
        """Keep :attr:`open_alerts` in step with ``alert``'s status."""
        order_id = alert["order_id"]
        if not order_id:
            return
        if alert["status"] == "open":
            self.open_alerts.setdefault(order_id, set()).add(alert["id"])
            return
        ids = self.open_alerts.get(order_id)
        if ids is not None:
            ids.discard(alert["id"])
            if not ids:
                del self.open_alerts[order_id]

    def _alert_ack(
        self,
        pending: _Pending,
        where: InboundTopic,
        event: ev.AlertAcknowledgedEvent,
        now: datetime,
    ) -> None:
        d = event.data
        alert = self.alerts.get(d.alert)
        if alert is None:
            raise _RefusedError(f"unknown alert {d.alert!r}")
        if alert["shop"] != where.sender:
            raise _RefusedError(f"alert {d.alert!r} does not belong to shop {where.sender!r}")
        if alert["status"] != "open":
            raise _RefusedError(f"alert {d.alert!r} is already {alert['status']}")
        alert["status"] = "acknowledged"
        alert["acknowledged_at"] = event.time
        alert["acknowledged_by"] = d.by or where.sender
        self.alerts.touch(alert["id"])
        self._index_alert(alert)
        self._publish_alert(pending, alert, event)

    def _publish_alert(self, pending: _Pending, alert: Row, event: Any) -> None:
        payload = ev.encode(event)
        pending.canonical.append(Outbound(topics.shop_alerts(alert["shop"]), payload))
        if alert["order_id"]:
            order = self.orders.get(alert["order_id"])
            if order is not None:
                topic = topics.order_topic(order["shop"], order["id"], topics.OrderChannel.ALERTS)
                pending.canonical.append(Outbound(topic, payload))
                pending.states[order["id"]] = None
