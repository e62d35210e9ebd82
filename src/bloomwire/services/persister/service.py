"""The persister service: the only writer of the store (DESIGN.md §4).

Consumes every inbound topic on a persistent session with manual acks. A batch of messages is
validated and committed in one transaction; only then are the canonical events, retained snapshots
and device acks published, and only then is each message acknowledged to the broker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from datetime import datetime

from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.runtime.log import get_logger
from bloomwire.runtime.metrics import ServiceMetrics
from bloomwire.runtime.mqtt import Message, Service
from bloomwire.runtime.settings import Settings
from bloomwire.services.persister.metrics import PersisterMetrics
from bloomwire.services.persister.projector import Inbound, Outbound, Projector
from bloomwire.store import open_store

NAME = "persister"
log = get_logger("bloomwire.persister")


def build(
    settings: Settings,
    *,
    clock: Callable[[], datetime] = ev.now,
    max_batch: int = 2000,
    metrics: ServiceMetrics | None = None,
) -> Service:
    """Declare the persister: one batch handler over all inbound topics, start-up and shutdown."""
    service = Service(
        NAME,
        persistent=True,
        max_batch=max_batch,
        linger_s=settings.persister_window_ms / 1000,
        metrics=metrics,
        tuned=True,
    )
    figures = PersisterMetrics(metrics.registry) if metrics is not None else None
    state: dict[str, Projector] = {}

    def publish(out: Sequence[Outbound]) -> None:
        with service.corked():
            for o in out:
                service.publish(o.topic, o.payload, qos=o.qos, retain=o.retain, expiry_s=o.expiry_s)

    @service.on_startup
    async def open_projections() -> None:
        engine = await asyncio.to_thread(
            open_store, settings.database_url, sqlite_synchronous=settings.sqlite_synchronous
        )
        projector = Projector(engine, clock=clock, bounds=settings.time_bounds)
        await asyncio.to_thread(projector.load)
        state["projector"] = projector
        publish(projector.snapshot_messages())

    @service.handle_batch(*topics.INBOUND_FILTERS)
    async def persist(batch: Sequence[Message]) -> None:
        projector = state["projector"]
        started = time.perf_counter()
        result = projector.apply([Inbound(m.topic, m.payload, m.received_at, m.retain) for m in batch])
        if figures is not None:
            figures.observe(batch, result, started)
        publish(result.outbound)

    @service.handle(topics.DEADLETTER)
    async def store_refusal(msg: Message) -> None:
        state["projector"].record_refusal(msg.payload)

    @service.on_shutdown
    async def close_store() -> None:
        projector = state.pop("projector", None)
        if projector is not None:
            projector.close()
            projector.engine.dispose()

    return service
