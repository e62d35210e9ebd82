"""The projector: what each inbound batch does to the store, and what goes out after.

:meth:`Projector.apply` orchestrates one batch: each message is decoded (:mod:`.decode`, pure),
its id looked up, and, when new, handed to the handler of its event type (:mod:`.orders`,
:mod:`.offers`, :mod:`.riders`, :mod:`.alerts`, :mod:`.chat`,
:mod:`.ratings`, :mod:`.notices`), which changes the in-memory
projections (:mod:`.projections`) through the batch's unit of work (:mod:`.work`). The unit of
work is written in ONE transaction; then the snapshots (:mod:`.snapshots`) and acks are added to
the messages to publish. Nothing here touches MQTT.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Engine

from bloomwire.contract import events as ev
from bloomwire.contract import owntracks as ot
from bloomwire.contract import topics
from bloomwire.contract.lifecycle import CLOSED
from bloomwire.contract.topics import Identity, InboundKind, InboundTopic
from bloomwire.contract.validate import DEFAULT_TIME_BOUNDS, TimeBounds
from bloomwire.errors import TopicError
from bloomwire.runtime.log import get_logger
from bloomwire.services.persister import (
    alerts,
    amendments,
    chat,
    notices,
    offers,
    orders,
    proof,
    ratings,
    riders,
    snapshots,
)
from bloomwire.services.persister.decode import Decoded, Undecodable, decode, event_id
from bloomwire.services.persister.messages import BatchResult, Inbound, Outbound
from bloomwire.services.persister.projections import Projections
from bloomwire.services.persister.rows import Order
from bloomwire.services.persister.snapshots import Clearings
from bloomwire.services.persister.work import (
    DEAD_PAYLOAD_LIMIT,
    SERVICE_NAME,
    IgnoredError,
    Inserts,
    Record,
    RefusedError,
    UnitOfWork,
    storable,
)
from bloomwire.store import models as m
from bloomwire.store.bulk import KeyLookup
from bloomwire.store.photos import PhotoStore

__all__ = ["BatchResult", "Inbound", "Outbound", "Projector"]

log = get_logger("bloomwire.persister")

Handler = Callable[[Projections, UnitOfWork, InboundTopic, Any], None]
#: The handler of each event type the persister stores.
HANDLERS: Mapping[type[ev._Envelope], Handler] = {
    **orders.HANDLERS,
    **offers.HANDLERS,
    **riders.HANDLERS,
    **alerts.HANDLERS,
    **chat.HANDLERS,
    **ratings.HANDLERS,
    **amendments.HANDLERS,
    **proof.HANDLERS,
    **notices.HANDLERS,
}
LOCATION_KINDS = frozenset({InboundKind.LOCATION, InboundKind.OWNTRACKS})
#: Inbound kinds whose retained publishes are used: presence is state, and the OwnTracks app
#: publishes retained by default (the Recorder uses such live messages; the broker's replays on
#: subscription never reach the persister: its subscriptions ask for none).
RETAINED_ALLOWED = frozenset({InboundKind.PRESENCE, InboundKind.OWNTRACKS})
RECENT_IDS = 200_000

#: What is known of a stored event id: its content digest (recent ids), or the stored
#: (type, source, time, data) read back from the store.
Known = int | tuple[str, str, datetime, Any]


def _digest(event: Any, data_json: str) -> int:
    """The content of an event, to tell a repeated event from a reused id (this process only)."""
    return hash((event.type, event.source, event.time, data_json))


@functools.lru_cache(maxsize=64)
def _as_facts(sent: tuple[type[ev._Envelope], ...]) -> tuple[type[ev._Envelope], ...]:
    """The types ``sent`` arrive here as: a request as its fact (once per topic kind, not per event)."""
    return tuple(ev.FACT_OF.get(t, t) for t in sent)


def _check_accepted(where: InboundTopic, event: Any) -> None:
    """Refuse an event of a type its topic does not take, or naming another order than the topic."""
    sent = ev.accepted_types(where)
    expected = _as_facts(sent)
    data: Any = event.data
    if not isinstance(event, expected):
        names = ", ".join(ev.type_name(t) for t in sent) or "nothing"
        raise RefusedError(
            f"type: {event.type!r} is not accepted on {where.kind.value} topics (expected {names})"
        )
    claimed = getattr(data, "order", None)
    if where.order is not None and claimed not in (None, where.order):
        raise RefusedError(f"data.order {claimed!r} does not match the topic's order {where.order!r}")


def _check_source(where: InboundTopic, event: Any) -> None:
    if event.source != where.source:
        raise RefusedError(
            f"source {event.source!r} does not match the sender {where.source!r}; "
            "an identity may only speak for itself"
        )


def _event_row(p: Projections, where: InboundTopic, event: Any, topic: str, now: datetime) -> Record:
    data = event.data
    order_id = getattr(data, "order", None) or where.order
    if order_id is None and where.identity is Identity.CUSTOMER:  # a customer speaks of its order
        order_id = p.customer_order(where.sender)
    if isinstance(event, ev.RiderRegionChangedEvent):
        order_id = event.subject  # the order the transition is about, if any
    order = p.orders.rows.get(order_id) if order_id else None
    rider = getattr(data, "rider", None) or (where.sender if where.identity is Identity.RIDER else None)
    return {
        "id": event.id,
        "type": event.type,
        "source": event.source,
        "topic": topic,
        "shop": order.shop if order else (where.sender if where.identity is Identity.SHOP else None),
        "order_id": order_id,
        "rider": rider,
        "time": event.time,
        "recorded_at": now,
        "data": data.model_dump_json(exclude_none=True),
    }


class Projector:
    """The persister's authoritative in-memory projections over the store, batch by batch."""

    def __init__(
        self,
        engine: Engine,
        *,
        clock: Callable[[], datetime] = ev.now,
        manual_offer_timeout_s: int = 90,
        bounds: TimeBounds = DEFAULT_TIME_BOUNDS,
        state_grace_s: float | None = None,
        photos: PhotoStore | None = None,
        shop_language: str = "en",
    ) -> None:
        self.engine = engine
        #: Where delivery photos go (None: photos are refused).
        self.photos = photos
        #: How far inbound times may lie from ``clock`` (refused beyond, by :func:`.decode.decode`).
        self.bounds = bounds
        self.clock = clock
        self.projections = Projections(
            engine, manual_offer_timeout_s=manual_offer_timeout_s, shop_language=shop_language
        )
        #: When closed orders' retained states are cleared (their customer's access grace).
        self.clearings = Clearings(state_grace_s)
        self._inserts = Inserts(engine.dialect)
        self._event_ids = KeyLookup(m.EVENTS.c.id, engine.dialect)
        self._conn: sa.Connection | None = None
        #: Recently stored event ids and their content digests (older ones: read from the store).
        self.recent_ids: OrderedDict[str, int] = OrderedDict()
        #: A commit failed: memory may hold changes the store never took; reload before going on.
        self._stale = False

    # --- start-up -------------------------------------------------------------------------------

    def load(self) -> None:
        """Read the live part of the store into memory (open orders, riders, pending offers, open alerts)."""
        p = self.projections
        p.load()
        self.clearings.load(self.engine, self.clock())
        log.info("projections loaded", orders=len(p.orders.rows), riders=len(p.riders.rows))

    def _reload(self) -> None:
        """Forget every projection and read them again from the store (after a failed commit)."""
        self.projections.clear()
        self.clearings.clear()
        self.load()
        self._stale = False

    def due_clearings(self, now: datetime | None = None) -> list[Outbound]:
        """Empty retained publishes for the closed orders whose grace has ended (each once)."""
        return self.clearings.take_due(now or self.clock())

    def snapshot_messages(self) -> list[Outbound]:
        """Retained state of every live order and rider, republished at start-up.

        A crash between commit and publish can leave a retained snapshot one step behind; the
        store is right, so the persister repairs the snapshots from it whenever it starts.
        """
        p, now = self.projections, self.clock()
        out = [snapshots.order_state_msg(p, self.clearings, o, now) for o in p.orders.values()]
        for rider in p.riders.values():
            out.extend(snapshots.rider_state_msgs(p, rider, now))
        return out

    def order_state(self, order: Order) -> ev.OrderState:
        """The retained snapshot of an order."""
        p = self.projections
        rider = p.riders.rows.get(order.rider) if order.rider else None
        return snapshots.order_state(order, rider, len(p.open_alerts.get(order.id, ())))

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
        work = UnitOfWork(now)
        decoded = [self._decode(msg, now) for msg in batch]
        known = self._known_ids([i for d in decoded if isinstance(d, Decoded) and (i := d.event_id)])
        for d in decoded:
            self._step(work, d, known, result)
        self._commit(work)
        for eid, digest in work.seen.items():
            self._remember(eid, digest)
        result.outbound = self._outbound(work)
        self._evict_closed()
        return result

    def _decode(self, msg: Inbound, now: datetime) -> Decoded | Undecodable:
        """The pure decode step, then what it cannot know: the order a transition is about."""
        d = decode(msg, now, self.bounds)
        if isinstance(d, Undecodable):
            if d.bug is not None:
                log.error("internal error decoding", topic=msg.topic, exc_info=d.bug)
            return d
        event = d.event
        if isinstance(event, ev.RiderRegionChangedEvent):
            return riders.with_subject(self.projections, d)
        if isinstance(event, ot.Ignored):
            log.info("owntracks message ignored", topic=msg.topic[:200], type=event.kind, why=event.why)
        return d

    def _step(
        self, work: UnitOfWork, d: Decoded | Undecodable, known: dict[str, Known], result: BatchResult
    ) -> None:
        """One message of the batch: refused, ignored, a position, a repeat, or a new event."""
        msg, where = d.msg, d.where
        if msg.retain and where is not None and where.kind not in RETAINED_ALLOWED:
            self._retained(work, d, result)
        elif isinstance(d, Undecodable):
            work.refuse(msg, where, d.event_id, d.reason)
            result.refused += 1
        elif not isinstance(d.event, ev._Envelope):  # nothing (a cleared presence), or ignored
            result.ignored += 1
            if isinstance(d.event, ot.Ignored):
                result.owntracks_ignored[d.event.kind, d.event.why] += 1
        elif isinstance(d.event, ev.RiderLocationReportedEvent) and d.where.kind in LOCATION_KINDS:
            self._position(work, d.msg, d.where, d.event, result)
        else:
            seen = work.seen.get(d.event.id, known.get(d.event.id))
            if seen is not None:
                self._repeated(work, d.msg, d.where, d.event, seen, result)
            else:
                self._new(work, d.msg, d.where, d.event, result)

    def _new(
        self, work: UnitOfWork, msg: Inbound, where: InboundTopic, event: Any, result: BatchResult
    ) -> None:
        """Apply one new event: stored, ignored or refused."""
        try:
            _check_source(where, event)
            _check_accepted(where, event)
            handler = HANDLERS.get(type(event))
            if handler is None:  # pragma: no cover - guarded by ``accepted_types``
                raise RefusedError(f"type: {event.type!r} is not handled")
            handler(self.projections, work, where, event)
        except IgnoredError:
            work.ack(where, event.id)
            result.ignored += 1
            return
        except RefusedError as exc:
            work.refuse(msg, where, event.id, exc.reason)
            result.refused += 1
            return
        except Exception as exc:  # a bug must not stop the stream: refuse and carry on
            log.exception("internal error applying event", topic=msg.topic, id=event.id)
            work.refuse(msg, where, event.id, f"internal error: {exc}")
            result.refused += 1
            return
        if isinstance(event, ev.OrderPhotoAttachedEvent):
            self._keep_photo(msg.payload)  # before the row that names it; raises: batch retried
        recorded = work.recorded.pop(event.id, event)  # an amendment is stored with its old values
        row = _event_row(self.projections, where, recorded, msg.topic, work.now)
        sent = row["data"] if recorded is event else event.data.model_dump_json(exclude_none=True)
        work.seen[event.id] = _digest(event, sent)
        work.events.append(row)
        work.ack(where, event.id)
        result.stored += 1

    def _keep_photo(self, payload: bytes) -> None:
        """Write a photo's bytes to the photo store (content-addressed: a retry writes nothing new)."""
        if self.photos is None:
            raise RuntimeError("a photo was accepted but the persister has no photo store")
        self.photos.put(payload)

    def _position(
        self,
        work: UnitOfWork,
        msg: Inbound,
        where: InboundTopic,
        event: ev.RiderLocationReportedEvent,
        result: BatchResult,
    ) -> None:
        """A position, from its own rider only: not an event of record (no dedupe, no event row)."""
        try:
            _check_source(where, event)
        except RefusedError as exc:
            work.refuse(msg, where, event.id, exc.reason)
            result.refused += 1
            return
        riders.locate(self.projections, work, where, event)
        result.stored += 1

    def _repeated(
        self,
        work: UnitOfWork,
        msg: Inbound,
        where: InboundTopic,
        event: Any,
        known: Known,
        result: BatchResult,
    ) -> None:
        """A known id: the same event again is a duplicate (acknowledged); other content, a conflict."""
        data_json = event.data.model_dump_json(exclude_none=True)
        if isinstance(event, ev.OrderPhotoAttachedEvent):
            known = _digest(event, data_json)  # its id is its content's hash; its time is arrival's
        if isinstance(known, int):
            same = known == _digest(event, data_json)
        else:
            kind, source, at, data = known
            same = (kind, source, at) == (event.type, event.source, event.time) and amendments.as_sent(
                data
            ) == amendments.as_sent(json.loads(data_json))
        if same:
            work.ack(where, event.id)
            result.duplicates += 1
            return
        work.refuse(msg, where, event.id, f"id {event.id!r} already used for a different event")
        result.refused += 1

    def _retained(self, work: UnitOfWork, d: Decoded | Undecodable, result: BatchResult) -> None:
        """A retained publish on an inbound topic (presence aside): refused, and cleared from the
        broker (else it is handed to every new subscriber). Its clearing comes back: ignored."""
        msg = d.msg
        if not msg.payload:
            result.ignored += 1
            return
        work.refuse(msg, d.where, d.event_id, f"retained publishes are not events on {msg.topic}")
        work.publish(msg.topic, b"", retain=True)
        result.refused += 1

    def refuse(self, msg: Inbound, reason: str, check: Callable[[Projector, Exception], None]) -> BatchResult:
        """Refuse ``msg`` alone (the store would not take it): dead-letter it, tell its sender.

        ``check(self, exc)`` raises if a failure to store the refusal means the store is down;
        otherwise the refusal is published without its row (logged: it cannot be stored).
        """
        if self._stale:
            self._reload()
        work = UnitOfWork(self.clock())
        try:
            where: InboundTopic | None = topics.parse_inbound(msg.topic)
        except TopicError:
            where = None
        work.refuse(msg, where, event_id(msg.payload), reason)
        try:
            self._commit(work)
        except Exception as exc:
            check(self, exc)
            log.error(
                "a refusal could not be stored", topic=msg.topic[:200], reason=reason, error=str(exc)[:300]
            )
        result = BatchResult(refused=1)
        result.outbound = self._outbound(work)
        return result

    # --- the store --------------------------------------------------------------------------------

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
                    e = m.EVENTS
                    cols = (e.c.id, e.c.type, e.c.source, e.c.time, e.c.data)
                    for r in conn.execute(sa.select(*cols).where(e.c.id.in_(sorted(stored)))):
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

    def _commit(self, work: UnitOfWork) -> None:
        try:
            with self._transaction() as conn:
                work.flush(conn, self.projections.tables, self._inserts)
        except Exception:
            work.rolled_back()
            self._stale = True
            raise

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
            sender = f"{topics.SERVICES}/{refusal.service}"[:200] if refusal.service else None
            row = {
                "received_at": now,
                "topic": storable(refusal.topic[:1024]),
                "event_id": storable(refusal.id[:128]) if refusal.id else None,
                "sender": storable(sender) if sender else None,
                "reason": storable(refusal.reason),
                "payload": storable((refusal.payload or "")[:DEAD_PAYLOAD_LIMIT]),
            }
        with self._transaction() as conn:
            self._inserts.dead.execute(conn, [row])
        return True

    # --- after the commit -------------------------------------------------------------------------

    def _outbound(self, work: UnitOfWork) -> list[Outbound]:
        """The batch's messages, then the snapshots it changed and the acks of its senders."""
        p, now = self.projections, work.now
        out = work.canonical
        for order_id in work.states:
            order = p.orders.get(order_id)
            if order is not None:
                out.append(snapshots.order_state_msg(p, self.clearings, order, self.clock()))
                p.state_sent_at[order_id] = now
        for rider_id, shops in work.rider_states.items():
            rider = p.riders.get(rider_id)
            if rider is not None:
                out.extend(snapshots.rider_state_msgs(p, rider, self.clock(), shops))
                p.rider_state_sent_at[rider_id] = now
        for source, ids in work.acks.items():
            out.append(Outbound(topics.acks_topic(source), ev.encode(ev.Ack(ids=ids))))
        return out

    def _evict_closed(self) -> None:
        """Let closed orders go from memory once the batch is committed and its snapshots built
        (evicted earlier, building a snapshot would read them straight back from the store).
        Only orders this batch read or changed can have closed: no scan of every open order.
        Resolved alerts go too (read back from the store if named again), and so does what was
        kept per order for positions: memory follows the open work, not the history."""
        p = self.projections
        for order_id in p.orders.take_recent():
            order = p.orders.rows.get(order_id)
            if order is not None and order.status in CLOSED and order.closed_at is not None:
                p.orders.evict(order_id)
                if order.customer_username and p.customer_orders.get(order.customer_username) == order_id:
                    del p.customer_orders[order.customer_username]  # the store answers now
                p.last_trail.pop(order_id, None)
                p.state_sent_at.pop(order_id, None)
        for alert_id in p.alerts.take_recent():
            alert = p.alerts.rows.get(alert_id)
            if alert is not None and alert.status == "resolved":
                p.alerts.evict(alert_id)
        for offer_id in p.offers.take_recent():
            offer = p.offers.rows.get(offer_id)
            if offer is not None and offer.status != "pending":
                p.offers.evict(offer_id)
        p.riders.take_recent()  # riders stay (one row each); only the set of recent keys goes
