"""The notices service: tells an order's customer what happens to it, unasked (issue 16).

It follows the canonical status (steps, incidents) and location (positions with the ETA) of
every order, reads the order's facts from the store (read-only, like the assistant), and sends
each notice :mod:`.decide` calls for at most once, as an ``order.notified`` on
``services/notices/events`` in the customer's language (:mod:`.texts`). The persister stores it
and publishes it on the order's status topic: the customer's page and the shop's feed read it.

At most once: a notice's id is uuid5 of its order and :attr:`~.decide.Notice.key`, and before
saying anything about an order the service reads which notices the store already holds. A
status redelivered after a restart gives the very same event (its time is the status's, plus
:data:`AFTER`), which the persister acknowledges as a duplicate.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, tzinfo
from typing import Final

import sqlalchemy as sa
from sqlalchemy import Engine

from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.contract.lifecycle import CLOSED
from bloomwire.errors import TopicError
from bloomwire.runtime.aio import cancel_and_wait
from bloomwire.runtime.log import get_logger
from bloomwire.runtime.metrics import Figure, FiguresCollector, ServiceMetrics
from bloomwire.runtime.mqtt import Message, Service
from bloomwire.runtime.settings import Settings
from bloomwire.services.notices import decide
from bloomwire.services.notices.decide import Notice, OrderFacts
from bloomwire.services.notices.texts import render
from bloomwire.store import make_engine
from bloomwire.store.models import EVENTS, ORDERS

NAME: Final = topics.NOTICES
log = get_logger("bloomwire.notices")

EVENTS_TOPIC: Final = topics.service_events(NAME)
SOURCE: Final = topics.parse_inbound(EVENTS_TOPIC).source
#: A notice is dated this much after what prompted it (it sorts after it).
AFTER: Final = timedelta(milliseconds=1)
#: How often the clock looks for windows about to end (level-triggered, beside the events).
TICK_S: Final = 15.0
#: A status older than this (the service was down) prompts no notice: the news is stale.
MAX_AGE: Final = timedelta(minutes=30)
NOTIFIED: Final = ev.type_name(ev.OrderNotifiedEvent)
_NAMESPACE: Final = uuid.uuid5(uuid.NAMESPACE_URL, "https://bloomwire.invalid/notices")
_O = ORDERS.c


def notice_id(order: str, key: str) -> str:
    """The event id of notice ``key`` (:func:`.decide.key`) on ``order``."""
    return str(uuid.uuid5(_NAMESPACE, f"{order}/{key}"))


@dataclass(slots=True)
class Known:
    """An order as the service knows it: its facts, the notices said (ids, kinds)."""

    facts: OrderFacts
    sent: set[str] = field(default_factory=set)
    said: set[ev.NoticeKind] = field(default_factory=set)


class Store:
    """Read-only look-ups: one order's facts and the notices the store holds for it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def known(self, order: str) -> Known | None:
        """The order's facts and notices, or None if the store does not know it."""
        # The code proves a delivery only if the order has one (proof.check_handover checks no other).
        cols = (
            _O.id, _O.shop, _O.language, _O.window_end, _O.lat, _O.lon, _O.eta,
            sa.and_(_O.handover_code_required, _O.handover_code.is_not(None)), _O.photo,
        )  # fmt: skip
        notices = sa.select(EVENTS.c.id, EVENTS.c.data).where(
            EVENTS.c.order_id == order, EVENTS.c.type == NOTIFIED
        )
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(*cols).where(_O.id == order)).first()
            said = conn.execute(notices).all()
        if row is None:
            return None
        facts = OrderFacts(
            order=row[0], shop=row[1], language=ev.Language(row[2]), window_end=row[3],
            lat=row[4], lon=row[5], eta=row[6], code_required=bool(row[7]), photo=row[8] is not None,
        )  # fmt: skip
        kinds = {ev.NoticeKind(d["kind"]) for _id, d in said if isinstance(d, dict) and "kind" in d}
        return Known(facts, {i for i, _d in said}, kinds)

    def due(self, now: datetime, lead: timedelta) -> list[str]:
        """Open orders whose window ends within ``lead`` of ``now`` (the clock's candidates)."""
        closed = [s.value for s in CLOSED]
        query = sa.select(_O.id).where(  # open orders by closed_at's index, not every order ever
            _O.closed_at.is_(None), _O.window_end > now, _O.window_end <= now + lead, _O.status.not_in(closed)
        )
        with self.engine.connect() as conn:
            return list(conn.execute(query).scalars())


class Notifier:
    """Decides and sends the notices; publishes through ``publish(topic, payload)``."""

    def __init__(
        self,
        store: Store,
        publish: Callable[[str, bytes], None],
        *,
        clock: Callable[[], datetime],
        tz: tzinfo,
        by_eta: bool = True,
    ) -> None:
        self.store, self.publish, self.clock, self.tz = store, publish, clock, tz
        #: Whether the ETA alone may prompt a notice (``Settings.notices_by_eta``).
        self.by_eta = by_eta
        #: Orders seen and still open: order id -> what is known of it.
        self.orders: dict[str, Known] = {}
        self.sent = 0

    async def on_status(self, order: str, event: ev.Event) -> None:
        """A canonical status-topic event of ``order``: a step, an incident (or one of ours)."""
        if isinstance(event, ev.OrderNotifiedEvent) or self.clock() - event.time > MAX_AGE:
            return
        known = await self._reload(order)  # a step changes the facts (its ETA): read them again
        if known is None:
            return
        self._send(known, decide.on_status(known.facts, event, event.time + AFTER))
        if isinstance(event, ev.OrderStatusChangedEvent) and event.data.status in CLOSED:
            self.orders.pop(order, None)

    async def on_location(self, order: str, loc: ev.OrderLocation) -> None:
        """A position of ``order``'s rider with the ETA (published only while it is out)."""
        known = self.orders.get(order) or await self._reload(order)
        if known is not None:
            notices = decide.on_location(known.facts, loc, loc.position.at + AFTER, by_eta=self.by_eta)
            self._send(known, notices)

    async def on_clock(self) -> None:
        """Orders whose window is about to end with no ETA that keeps it: told they are late."""
        now = self.clock()
        for order in await asyncio.to_thread(self.store.due, now, decide.LEAD):
            known = await self._reload(order)
            if known is not None:
                self._send(known, decide.on_clock(known.facts, now))

    async def _reload(self, order: str) -> Known | None:
        fresh = await asyncio.to_thread(self.store.known, order)
        if fresh is None:
            log.warning("event of an unknown order", order=order)
            return None
        old = self.orders.get(order)
        if old is not None:  # what was sent but may not be stored yet
            fresh.sent |= old.sent
            fresh.said |= old.said
        self.orders[order] = fresh
        return fresh

    def _send(self, known: Known, notices: list[Notice]) -> None:
        facts = known.facts
        for notice in notices:
            nid = notice_id(facts.order, notice.key)
            if nid in known.sent or decide.overtaken(notice, known.said):
                continue
            text = render(
                notice.kind, facts.language, order=facts.order, now=notice.at, tz=self.tz,
                window_end=facts.window_end, eta=notice.eta, reason=notice.reason, proof=notice.proof,
                amendment=notice.amendment,
            )  # fmt: skip
            data = ev.OrderNotice(
                order=facts.order, kind=notice.kind, language=facts.language, text=text,
                eta=notice.eta, reason=notice.reason,
            )  # fmt: skip
            event = ev.OrderNotifiedEvent(id=nid, source=SOURCE, time=notice.at, data=data)
            self.publish(EVENTS_TOPIC, ev.encode(event))
            known.sent.add(nid)
            known.said.add(notice.kind)
            self.sent += 1
            log.info("notice", order=facts.order, kind=notice.kind.value, lang=facts.language.value)


def _readonly_engine(url: str) -> Engine:
    engine = make_engine(url, readonly=True)
    if engine.dialect.name == "postgresql":  # the server refuses any write
        return engine.execution_options(postgresql_readonly=True)
    return engine


def _order_of(topic: str) -> str | None:
    try:
        return topics.parse_order_topic(topic).order
    except TopicError as exc:
        log.warning("message on a topic of no order", topic=topic, error=str(exc))
        return None


async def _tick(notifier: Notifier, every_s: float) -> None:
    """The clock's delays, at once and every ``every_s``; a failed look waits for the next one
    (the loop must outlive a busy store)."""
    while True:
        try:
            await notifier.on_clock()
        except Exception as exc:
            log.warning("the clock's notices failed this time", error=f"{type(exc).__name__}: {exc}")
        await asyncio.sleep(every_s)


class NoticesService(Service[Notifier]):
    """The notices :class:`~bloomwire.runtime.mqtt.Service`: its state is the :class:`Notifier`."""

    def figures(self) -> Iterator[Figure]:
        """Notices sent, for Prometheus (at scrape time)."""
        if self.has_state:
            yield Figure("bloomwire_notices_sent", "Notices sent to customers", self.state.sent)


def build(
    settings: Settings,
    *,
    metrics: ServiceMetrics | None = None,
    clock: Callable[[], datetime] = ev.now,
    tz: tzinfo | None = None,
    tick_s: float = TICK_S,
) -> NoticesService:
    """Declare the notices service: handlers over every order's canonical status and location.

    ``tz`` (default: ``settings.assistant_timezone``, the zone of every clock time said to
    customers) is where the times in notices are read; ``tick_s``: how often the clock looks.
    """
    zone = tz if tz is not None else settings.customer_zone()
    # Persistent: a status said while the service restarts waits in its session (MAX_AGE aside).
    service = NoticesService(NAME, persistent=True, metrics=metrics)
    if metrics is not None:
        metrics.registry.register(FiguresCollector(service.figures))

    ticking: list[asyncio.Task[None]] = []

    @service.on_startup
    async def start() -> Notifier:
        engine = await asyncio.to_thread(_readonly_engine, settings.database_url)
        publish = lambda topic, payload: service.publish(topic, payload, qos=1)  # noqa: E731
        notifier = Notifier(Store(engine), publish, clock=clock, tz=zone, by_eta=settings.notices_by_eta)
        if settings.notices_by_eta:  # the clock's delays compare ETAs too
            ticking.append(asyncio.create_task(_tick(notifier, tick_s)))
        return notifier

    @service.handle(topics.all_orders_filter(topics.OrderChannel.STATUS), retry=True, model=ev.decode)
    async def on_status(event: ev.Event, msg: Message) -> None:
        order = _order_of(msg.topic)
        if order is not None:
            await service.state.on_status(order, event)

    @service.handle(topics.all_orders_filter(topics.OrderChannel.LOCATION), qos=0, model=ev.OrderLocation)
    async def on_location(loc: ev.OrderLocation, msg: Message) -> None:
        order = _order_of(msg.topic)
        if order is not None:
            await service.state.on_location(order, loc)

    @service.on_shutdown
    async def stop() -> None:
        await cancel_and_wait(*ticking)
        if service.has_state:
            service.state.store.engine.dispose()

    return service
