"""``bloomwire bench metrics``: the CPU the Prometheus figures cost a service per event.

Runs, in this process and without a broker, exactly what :class:`~bloomwire.runtime.mqtt.Service`
does per drained batch when it has a :class:`~bloomwire.runtime.metrics.ServiceMetrics` (count by
route, observe the handler call), and what the persister adds per committed batch
(:class:`~bloomwire.services.persister.metrics.PersisterMetrics`), over rider chat events.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from rich.console import Console

from bloomwire.app.bench.report import Report
from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.runtime.metrics import ServiceMetrics
from bloomwire.runtime.mqtt import Message, Service
from bloomwire.services.persister.metrics import PersisterMetrics
from bloomwire.services.persister.projector import BatchResult

BATCH_SIZES = (1, 20, 500)


def _events(n: int) -> list[Message]:
    out = []
    for i in range(n):
        rider, order = f"r{i % 50}", f"o{i % 50}"
        event = ev.OrderChatPostedEvent(
            source=f"riders/{rider}", data=ev.OrderChat(order=order, text="on my way")
        )
        out.append(Message(topics.rider_order_chat(rider, order), ev.encode(event)))
    return out


def _per_event_us(
    batch: Sequence[Message], events: int, service: Service, persister: PersisterMetrics
) -> tuple[float, float]:
    """CPU µs per event of the generic hook, and of the persister's figures."""
    rounds = max(1, events // len(batch))
    metrics = service.metrics
    assert metrics is not None
    result = BatchResult(stored=len(batch))
    started = time.process_time()
    for _ in range(rounds):
        metrics.received(service._routes_of(batch))
        service._observe(batch, time.perf_counter())
    generic = time.process_time() - started
    started = time.process_time()
    for _ in range(rounds):
        persister.observe(batch, result, time.perf_counter())
    own = time.process_time() - started
    n = rounds * len(batch)
    return generic / n * 1e6, own / n * 1e6


def main(*, events: int, console: Console) -> list[Report]:
    """Measure, print and return the table."""
    metrics = ServiceMetrics("persister")
    service = Service("persister", metrics=metrics)

    @service.handle_batch(*topics.INBOUND_FILTERS)
    async def handler(batch: Sequence[Message]) -> None:
        """Never called: only the routes matter."""

    persister = PersisterMetrics(metrics.registry)
    sample = _events(max(BATCH_SIZES))
    report = Report(
        "CPU per event of the metrics (µs, this process)",
        ("batch size", "Service hook (route counts, latency)", "persister figures", "together"),
    )
    for size in BATCH_SIZES:
        generic, own = _per_event_us(sample[:size], events, service, persister)
        report.add(size, f"{generic:.2f}", f"{own:.2f}", f"{generic + own:.2f}")
    console.print(report.rich())
    return [report]
