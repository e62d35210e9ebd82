"""The broker's own figures (Mosquitto's ``$SYS/broker/...`` topics) as Prometheus metrics.

Whoever holds a subscription to :data:`SYS_BROKER_FILTER` feeds every message to
:meth:`BrokerStats.update`; a scrape then reads the latest value of each topic. Names follow the
topic: ``$SYS/broker/clients/connected`` becomes ``mosquitto_clients_connected``. The broker's
running totals are counters, everything else (loads per minute, heap, counts now) gauges.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

SYS_PREFIX = "$SYS/broker/"
SYS_BROKER_FILTER = SYS_PREFIX + "#"
#: Running totals since the broker started (Prometheus counters; a broker restart resets them).
COUNTERS = frozenset(
    {
        "bytes/received",
        "bytes/sent",
        "messages/received",
        "messages/sent",
        "publish/bytes/received",
        "publish/bytes/sent",
        "publish/messages/dropped",
        "publish/messages/received",
        "publish/messages/sent",
        "clients/total",
    }
)
_NUMBER = re.compile(r"^\s*(-?\d+(?:\.\d+)?)")
_UNSAFE = re.compile(r"[^a-zA-Z0-9_]+")


def metric_name(topic: str) -> str | None:
    """``$SYS/broker/load/messages/received/1min`` -> ``mosquitto_load_messages_received_1min``."""
    if not topic.startswith(SYS_PREFIX):
        return None
    rest = topic[len(SYS_PREFIX) :]
    return "mosquitto_" + _UNSAFE.sub("_", rest).strip("_").lower()


def number(payload: bytes) -> float | None:
    """The leading number of a ``$SYS`` payload (``"1234 seconds"`` -> 1234.0), or None."""
    found = _NUMBER.match(payload.decode("utf-8", errors="replace"))
    return float(found.group(1)) if found else None


class BrokerStats(Collector):
    """The latest value of every numeric ``$SYS/broker`` topic (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, tuple[str, float]] = {}
        self.updated_at: float | None = None

    def update(self, topic: str, payload: bytes) -> None:
        """Keep the value of one ``$SYS`` message (ignored when not numeric)."""
        name, value = metric_name(topic), number(payload)
        if name is None or value is None:
            return
        with self._lock:
            self._values[name] = (topic[len(SYS_PREFIX) :], value)
            self.updated_at = time.time()

    def value(self, suffix: str) -> float | None:
        """The latest value of ``$SYS/broker/<suffix>``, if seen."""
        name = metric_name(SYS_PREFIX + suffix)
        with self._lock:
            found = self._values.get(name or "")
        return found[1] if found else None

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            values = sorted(self._values.items())
        out: list[Metric] = []
        for name, (suffix, value) in values:
            doc = f"Mosquitto $SYS/broker/{suffix}"
            if suffix in COUNTERS:
                out.append(CounterMetricFamily(name, doc, value=value))
            else:
                out.append(GaugeMetricFamily(name, doc, value=value))
        return out
