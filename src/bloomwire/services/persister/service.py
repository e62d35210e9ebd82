"""The persister service: the only writer of the store (docs/design.md §4).

Consumes every inbound topic on a persistent session with manual acks. A batch of messages is
validated and committed in one transaction; only then are the canonical events, retained snapshots
and device acks published, and only then is each message acknowledged to the broker.

A batch the store refuses is split to find the message(s) it will not take (:mod:`.poison`); a
store that is unavailable leaves the batch unacknowledged and retried, the service ``degraded``
meanwhile (:class:`~bloomwire.runtime.mqtt.Service`). Inbound topics are subscribed without their
retained messages, and a retained publish on one (presence aside) is refused.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.runtime.aio import cancel_and_wait
from bloomwire.runtime.log import get_logger
from bloomwire.runtime.metrics import ServiceMetrics
from bloomwire.runtime.mqtt import Message, Service, first_line
from bloomwire.runtime.settings import Settings
from bloomwire.services.persister.metrics import PersisterMetrics
from bloomwire.services.persister.poison import StoreUnavailableError, apply_isolating, unavailable
from bloomwire.services.persister.projector import Inbound, Outbound, Projector
from bloomwire.services.persister.repair import Repair, repair_states
from bloomwire.store import open_store, retention
from bloomwire.store.photos import FilePhotoStore

NAME = "persister"
#: How often closed orders' retained states are checked for the end of their grace.
CLEAR_EVERY_S = 1.0
log = get_logger("bloomwire.persister")


async def clear_states(projector: Projector, publish: Callable[[Sequence[Outbound]], None]) -> None:
    """Clear closed orders' retained states as their grace ends: the broker holds open orders
    plus a constant, whatever the history (the same grace as the customer's access)."""
    while True:
        await asyncio.sleep(CLEAR_EVERY_S)
        try:
            publish(projector.due_clearings())
        except Exception as exc:  # disconnected: the next round (or the message expiry) does it
            log.warning("retained states not cleared", error=first_line(exc))


@dataclass
class PersisterState:
    """What the persister holds while it runs (its start-up state)."""

    projector: Projector
    #: Clears closed orders' retained states as their grace ends (:func:`clear_states`).
    clearing: asyncio.Task[None]
    #: Republishes every live order's and rider's retained state after start-up (:mod:`.repair`).
    repairing: asyncio.Task[None]
    #: Runs the retention policy nightly (:func:`~bloomwire.store.retention.start_nightly`).
    nightly: AsyncIOScheduler


def build(
    settings: Settings,
    *,
    clock: Callable[[], datetime] = ev.now,
    max_batch: int = 2000,
    metrics: ServiceMetrics | None = None,
) -> Service[PersisterState]:
    """Declare the persister: one batch handler over all inbound topics, start-up and shutdown."""
    service: Service[PersisterState] = Service(
        NAME,
        persistent=True,
        max_batch=max_batch,
        linger_s=settings.persister_window_ms / 1000,
        metrics=metrics,
        tuned=True,
        degraded_alert_s=settings.persister_degraded_alert_s,
    )
    figures = PersisterMetrics(metrics.registry) if metrics is not None else None

    def publish(out: Sequence[Outbound]) -> None:
        with service.corked():
            for o in out:
                service.publish(o.topic, o.payload, qos=o.qos, retain=o.retain, expiry_s=o.expiry_s)

    @service.on_startup
    async def open_projections() -> PersisterState:
        engine = await asyncio.to_thread(
            open_store,
            settings.database_url,
            sqlite_synchronous=settings.sqlite_synchronous,
            sqlite_busy_timeout_s=settings.sqlite_busy_timeout_s,
        )
        projector = Projector(
            engine,
            clock=clock,
            bounds=settings.time_bounds,
            state_grace_s=settings.customer_access_grace_s,
            photos=FilePhotoStore.in_data_dir(settings.data_dir),
            shop_language=settings.shop_language.value,
        )
        try:
            started = time.perf_counter()
            await asyncio.to_thread(projector.load)
            repair = Repair(projector)
            log.info("projections ready", seconds=round(time.perf_counter() - started, 2))
        except BaseException:  # not the service's state yet: the shutdown hook would not see it
            projector.close()
            engine.dispose()
            raise
        policy = retention.Retention(  # the only writer prunes too, nightly, in small batches
            settings.database_url,
            settings.position_retention_days,
            settings.position_keep_every_s,
            settings.sqlite_busy_timeout_s,
        )
        clearing = asyncio.create_task(clear_states(projector, publish))
        # After online: the retained snapshots are repaired from the store, paced (:mod:`.repair`).
        repairing = asyncio.create_task(repair_states(repair, publish, service.conn.in_flight))
        return PersisterState(projector, clearing, repairing, retention.start_nightly(policy))

    # Raw messages, not a model=: decoding is the projector's job, per message, because a refusal
    # here is more than a dead letter (stored in dead_letters, answered on the sender's error
    # inbox, with the lifecycle and authority checks that need the store), and a batch must keep
    # its order and acknowledgement whatever each payload is.
    @service.handle_batch(*topics.INBOUND_FILTERS, live=True)
    async def persist(batch: Sequence[Message]) -> None:
        projector = service.state.projector
        started = time.perf_counter()
        inbound = [Inbound(m.topic, m.payload, m.received_at, m.retain) for m in batch]
        result = apply_isolating(projector, inbound, publish)
        if figures is not None:
            try:
                figures.observe(batch, result, started)
            except Exception as exc:  # committed and published: raising would run it again
                log.warning("persister figures not updated", error=first_line(exc))

    # Raw too: a dead letter is stored whatever its payload (a malformed one most of all).
    @service.handle(topics.DEADLETTER, retry=True)
    async def store_refusal(msg: Message) -> None:
        """Another service's refusal, acknowledged once stored: retried while the store is down."""
        projector = service.state.projector
        try:
            projector.record_refusal(msg.payload)
        except Exception as exc:
            why = unavailable(projector.engine, exc)
            if why is not None:
                raise StoreUnavailableError(f"store unavailable: {why}") from exc
            log.error("a dead letter could not be stored", topic=msg.topic, error=str(exc)[:300])

    @service.on_shutdown
    async def close_store() -> None:
        if not service.has_state:
            return
        state = service.state
        state.nightly.shutdown(wait=False)
        await cancel_and_wait(state.clearing)
        await cancel_and_wait(state.repairing)
        state.projector.close()
        state.projector.engine.dispose()

    return service
