"""The dispatch service's declaration: offers waiting orders to riders (docs/design.md §4).

Dispatch only reads: the store (read-only engine; the persister creates and migrates it) and the
canonical topics. Its decisions (:mod:`~bloomwire.services.dispatch.decide`) go out as events on
``services/dispatch/events`` and become real only once the persister has stored them.

Level-triggered and edge-triggered: an APScheduler tick looks at the store every ``tick_s``, and
canonical order status events, rider presence and refusals of our own events wake a pass at once
(:mod:`~bloomwire.services.dispatch.passes`). Passes run one at a time. The store is the truth, so
every pass is idempotent and a restart at any point is safe: an order holding a pending offer is
left alone, and ids are derived from the store (offer id = uuid5 of order + number of earlier
offers of that order), so a pass that re-sends a decision produces the same event id, which the
persister stores only once.

The parts: :mod:`~bloomwire.services.dispatch.ids` (name, topic, ids),
:mod:`~bloomwire.services.dispatch.reads` (the store reads),
:mod:`~bloomwire.services.dispatch.decide` (the decision, no I/O),
:mod:`~bloomwire.services.dispatch.passes` (one pass, and when passes run),
:mod:`~bloomwire.services.dispatch.planner` (costs and joint assignment).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.contract.lifecycle import OrderStatus
from bloomwire.runtime.metrics import FiguresCollector, ServiceMetrics
from bloomwire.runtime.mqtt import Message, Service
from bloomwire.runtime.settings import Settings
from bloomwire.services.dispatch.config import DispatchConfig
from bloomwire.services.dispatch.decide import PassResult
from bloomwire.services.dispatch.ids import EVENTS_TOPIC, NAME, SOURCE, expired_id, offer_id
from bloomwire.services.dispatch.passes import Dispatcher, DispatchStats, PassLoop, log
from bloomwire.services.dispatch.planner import DEFAULT_WEIGHTS, Weights
from bloomwire.services.dispatch.reads import OverdueOffer, Snapshot, WaitingOrder
from bloomwire.store import make_engine

__all__ = [
    "EVENTS_TOPIC",
    "NAME",
    "SOURCE",
    "DispatchConfig",
    "DispatchService",
    "DispatchState",
    "DispatchStats",
    "Dispatcher",
    "OverdueOffer",
    "PassLoop",
    "PassResult",
    "Snapshot",
    "WaitingOrder",
    "build",
    "expired_id",
    "offer_id",
]

#: Canonical statuses after which a pass may find work: an order waiting, or a rider freed.
_WAKE_STATUSES = frozenset(
    (
        OrderStatus.CREATED,
        OrderStatus.DECLINED,
        OrderStatus.DELIVERED,
        OrderStatus.FAILED,
        OrderStatus.RETURNED,
        OrderStatus.CANCELLED,
    )
)


@dataclass
class DispatchState:
    """What the dispatch service holds while it runs (its start-up state)."""

    dispatcher: Dispatcher
    passes: PassLoop
    scheduler: AsyncIOScheduler


class DispatchService(Service[DispatchState]):
    """The dispatch :class:`Service`: its handlers, start-up and shutdown, and its statistics."""

    def __init__(
        self,
        config: DispatchConfig,
        metrics: ServiceMetrics | None = None,
        *,
        database_url: str = "",
        clock: Callable[[], datetime] = ev.now,
    ) -> None:
        super().__init__(NAME, metrics=metrics)
        self.config = config
        self.database_url = database_url
        self.clock = clock
        self.stats = DispatchStats()

    @property
    def dispatcher(self) -> Dispatcher | None:
        """The running dispatcher (None unless running)."""
        return self.state.dispatcher if self.has_state else None

    def _publish(self, topic: str, payload: bytes) -> None:
        self.publish(topic, payload, qos=1)

    async def on_status(self, event: ev.Event, msg: Message) -> None:
        """An order was created, became ready again, closed (a rider freed) or moved: a pass soon."""
        if isinstance(event, ev.OrderStatusChangedEvent) and event.data.status in _WAKE_STATUSES:
            self.state.passes.wake(msg.received_at)
        elif isinstance(event, ev.OrderAmendedEvent) and ev.AmendField.POSITION in event.data.changes:
            self.state.passes.wake(msg.received_at)  # a waiting order moved: plan it from there

    async def on_presence(self, msg: Message) -> None:
        """A rider came or went (the payload does not matter: the store says which)."""
        # The raw presence reaches us about when it reaches the persister: look now, and again
        # once the persister has surely committed it (the tick would catch it anyway).
        self.state.passes.presence_changed(msg.received_at)

    async def on_refusal(self, refusal: ev.Refusal, msg: Message) -> None:
        """The persister refused one of our events (dead letter): the dispatcher forgets it."""
        if refusal.topic != EVENTS_TOPIC:
            return
        log.warning("persister refused a dispatch event", id=refusal.id, reason=refusal.reason)
        if refusal.id is not None:
            self.state.dispatcher.refused(refusal.id)

    async def on_start(self) -> DispatchState:
        """Open the store read-only, start the pass loop and the tick."""
        logging.getLogger("apscheduler").setLevel(logging.WARNING)
        engine = await asyncio.to_thread(make_engine, self.database_url, readonly=True)
        dispatcher = Dispatcher(engine, clock=self.clock, config=self.config)
        passes = PassLoop(dispatcher, self._publish, self.stats)
        scheduler = AsyncIOScheduler(timezone=UTC)
        scheduler.add_job(
            _tick,
            "interval",
            args=(passes,),
            seconds=self.config.tick_s,
            id="dispatch-tick",
            max_instances=1,
            coalesce=True,
        )
        passes.start()
        scheduler.start()
        return DispatchState(dispatcher, passes, scheduler)

    async def on_stop(self) -> None:
        """Stop the tick, let the current pass finish (30 s at most), close the store."""
        if not self.has_state:  # the start-up failed before anything was opened
            return
        state = self.state
        if state.scheduler.running:
            state.scheduler.shutdown(wait=False)
        await state.passes.stop()
        state.dispatcher.engine.dispose()


async def _tick(passes: PassLoop) -> None:
    passes.wake(full=True)


def build(
    settings: Settings,
    *,
    clock: Callable[[], datetime] = ev.now,
    offer_timeout_s: float = 45.0,
    tick_s: float = 1.0,
    batch_threshold: int = 3,
    weights: Weights = DEFAULT_WEIGHTS,
    top: int = 10,
    config: DispatchConfig | None = None,
    metrics: ServiceMetrics | None = None,
) -> DispatchService:
    """Declare the dispatch service. ``config`` (if given) overrides the individual options."""
    cfg = config or DispatchConfig(
        offer_timeout_s=offer_timeout_s,
        tick_s=tick_s,
        batch_threshold=batch_threshold,
        weights=weights,
        top=top,
    )
    if cfg.offer_timeout_s <= 0 or cfg.tick_s <= 0 or cfg.batch_threshold < 1:
        raise ValueError("offer_timeout_s and tick_s must be > 0 and batch_threshold >= 1")
    service = DispatchService(cfg, metrics, database_url=settings.database_url, clock=clock)
    if metrics is not None:
        metrics.registry.register(FiguresCollector(service.stats.figures))
    service.on_startup(service.on_start)
    service.handle(topics.all_orders_filter(topics.OrderChannel.STATUS), model=ev.decode)(service.on_status)
    service.handle(topics.ALL_PRESENCE_FILTER)(service.on_presence)
    service.handle(topics.DEADLETTER, model=ev.Refusal)(service.on_refusal)
    service.on_shutdown(service.on_stop)
    return service
