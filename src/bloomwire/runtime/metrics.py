"""Prometheus metrics of one process: a registry of its own, the generic service figures, the exporter.

Nothing here is module-level state: whoever runs a process makes a :class:`ServiceMetrics` (with a
``CollectorRegistry`` of its own), passes it to the service it builds, and serves it with
:func:`serve`. :class:`~bloomwire.runtime.mqtt.Service` calls the hook methods below; the label
``route`` is the subscription filter a message matched (``none`` for a message no route takes).
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

#: Messages a handler got at once (a single handler always gets 1).
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
#: Seconds: from sub-millisecond handlers to a commit stuck behind a slow disk.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
NO_ROUTE = "none"


class ServiceMetrics:
    """The generic figures of one service process (what :class:`~bloomwire.runtime.mqtt.Service`
    counts), in a registry of its own that service-specific collectors join."""

    def __init__(self, service: str, registry: CollectorRegistry | None = None) -> None:
        self.service = service
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        ProcessCollector(registry=reg)
        by_route = ["service", "route"]
        self._received = Counter(
            "bloomwire_messages_received", "Messages taken from the broker", by_route, registry=reg
        )
        self._handled = Counter(
            "bloomwire_messages_handled", "Messages whose handler returned", by_route, registry=reg
        )
        self._failed = Counter(
            "bloomwire_handler_failures",
            "Handler calls that raised (a batch retried counts once per try)",
            by_route,
            registry=reg,
        )
        self._dead = Counter(
            "bloomwire_messages_dead_lettered",
            "Messages this service refused onto services/deadletter",
            by_route,
            registry=reg,
        )
        self._batch = Histogram(
            "bloomwire_batch_size",
            "Messages per handler call",
            ["service"],
            buckets=BATCH_BUCKETS,
            registry=reg,
        )
        self._latency = Histogram(
            "bloomwire_handler_seconds",
            "Duration of one handler call (a whole batch for batch handlers)",
            ["service"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self._connects = Counter(
            "bloomwire_mqtt_connections",
            "Connections to the broker made (1 + reconnections)",
            ["service"],
            registry=reg,
        )
        self._ready = Gauge(
            "bloomwire_service_ready", "1 while started and connected", ["service"], registry=reg
        )
        self._queued = Gauge(
            "bloomwire_queue_messages",
            "Messages received and waiting for a handler",
            ["service"],
            registry=reg,
        )
        self._lag = Gauge(
            "bloomwire_queue_lag_seconds",
            "Age of the oldest message waiting for a handler",
            ["service"],
            registry=reg,
        )
        self._ready.labels(service).set(0)
        # labels() looks a child up under a lock: keep the children of the hot path at hand
        self._received_of: dict[str, Counter] = {}
        self._handled_of: dict[str, Counter] = {}
        self._batch_child = self._batch.labels(service)
        self._latency_child = self._latency.labels(service)

    # --- the hook Service calls ----------------------------------------------------------------

    def received(self, routes: Mapping[str, int]) -> None:
        """``routes``: how many messages of each route were just taken from the broker."""
        for route, n in routes.items():
            child = self._received_of.get(route)
            if child is None:
                child = self._received_of[route] = self._received.labels(self.service, route)
            child.inc(n)

    def handled(self, routes: Mapping[str, int], seconds: float) -> None:
        """One handler call returned after ``seconds`` for these messages."""
        for route, n in routes.items():
            child = self._handled_of.get(route)
            if child is None:
                child = self._handled_of[route] = self._handled.labels(self.service, route)
            child.inc(n)
        self._batch_child.observe(sum(routes.values()))
        self._latency_child.observe(seconds)

    def failed(self, route: str) -> None:
        """A handler call raised."""
        self._failed.labels(self.service, route).inc()

    def dead_lettered(self, route: str) -> None:
        """The service refused a message onto ``services/deadletter``."""
        self._dead.labels(self.service, route).inc()

    def connected(self) -> None:
        """A (re)connection to the broker succeeded (called in the network thread)."""
        self._connects.labels(self.service).inc()

    def watch(
        self,
        *,
        queued: Callable[[], int],
        oldest: Callable[[], float | None],
        ready: Callable[[], bool],
    ) -> None:
        """Read the queue and readiness at scrape time (no work per message)."""
        self._queued.labels(self.service).set_function(queued)
        self._lag.labels(self.service).set_function(lambda: _age(oldest()))
        self._ready.labels(self.service).set_function(lambda: 1.0 if ready() else 0.0)

    def stopped(self) -> None:
        """The service stopped: it is no longer ready."""
        self._ready.labels(self.service).set(0)


def _age(at: float | None) -> float:
    return 0.0 if at is None else max(0.0, time.time() - at)


# --- figures read from a service's own statistics at scrape time -------------------------------


@dataclass(frozen=True, slots=True)
class Figure:
    """One sample: a counter (``name`` without ``_total``) or a gauge, with its labels."""

    name: str
    doc: str
    value: float
    labels: Mapping[str, str] | None = None
    counter: bool = True


class FiguresCollector(Collector):
    """A collector that asks ``read()`` for its figures on every scrape (thread-safe reads only)."""

    def __init__(self, read: Callable[[], Iterable[Figure]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for f in self._read():
            labels = dict(f.labels or {})
            family = families.get(f.name)
            if family is None:
                kind = CounterMetricFamily if f.counter else GaugeMetricFamily
                family = families[f.name] = kind(f.name, f.doc, labels=list(labels))
            family.add_metric(list(labels.values()), f.value)
        return list(families.values())


# --- the exporter ------------------------------------------------------------------------------


class PortInUseError(OSError):
    """The metrics port is taken."""


class Exporter:
    """A running ``/metrics`` HTTP server (a daemon thread); :meth:`close` stops it."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def port(self) -> int:
        """The port it listens on."""
        return int(self._server.server_port)

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def serve(registry: CollectorRegistry, host: str, port: int) -> Exporter:
    """Serve ``registry`` on ``http://host:port/metrics`` (0 = a free port); raises
    :class:`PortInUseError` if the port is taken."""
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(exc.errno, f"metrics port {port} on {host} is in use") from None
        raise
    return Exporter(server, thread)
