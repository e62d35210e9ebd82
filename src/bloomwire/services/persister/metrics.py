"""The persister's own figures, taken from what each batch returned (:class:`BatchResult`).

Outcomes by result, refusals by inbound topic kind and reason, the duration of one batch
(validation and commit), receive→commit per batch, and publish→commit sampled once per batch from
the first message's own ``time`` (or OwnTracks ``tst``): one JSON parse per batch, not per event.
OwnTracks messages acknowledged as ignored (waypoints, cards, ...) are counted by ``_type``.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Histogram

from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.errors import TopicError
from bloomwire.runtime.metrics import LATENCY_BUCKETS
from bloomwire.runtime.mqtt import Message
from bloomwire.services.persister.projector import BatchResult

#: What became of an inbound message (BatchResult's counts, in this order).
OUTCOMES = ("stored", "duplicate", "refused", "ignored")
#: Distinct refusal reasons kept as labels; later new ones count as ``other`` (bounded series).
MAX_REASONS = 100
REASON_CHARS = 80
#: Ids, numbers and quoted values vary per message: replaced so one rule is one label value.
_VOLATILE = re.compile(r"'[^']*'|\"[^\"]*\"|[\w.:@-]*\d[\w.:@-]*")


def reason_label(reason: str) -> str:
    """A refusal reason without its ids, numbers and quoted values, on one short line."""
    first = (reason.strip().splitlines() or [""])[0]
    return _VOLATILE.sub("…", first)[:REASON_CHARS] or "unknown"


def kind_label(topic: str) -> str:
    """The inbound kind of ``topic`` (``location``, ``status``, ...), ``unknown`` if none."""
    try:
        return topics.parse_inbound(topic).kind.value
    except TopicError:
        return "unknown"


def sent_at(payload: bytes) -> float | None:
    """When the sender says it sent ``payload`` (epoch s): CloudEvents ``time``, OwnTracks ``tst``.

    Never raises: any payload reaches it (nested too deep, times out of range...)."""
    try:
        return _sent_at(payload)
    except Exception:
        return None


def _sent_at(payload: bytes) -> float | None:
    obj = json.loads(payload)
    if not isinstance(obj, dict):
        return None
    when = obj.get("time")
    if isinstance(when, str):
        return datetime.fromisoformat(when).timestamp()
    tst = obj.get("tst")
    return float(tst) if isinstance(tst, int | float) and not isinstance(tst, bool) else None


class PersisterMetrics:
    """Counters and histograms of the persister, registered in the process's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Counter(
            "bloomwire_persister_events",
            "Inbound messages by outcome: stored, duplicate, refused, ignored",
            ["result"],
            registry=registry,
        )
        self.refused = Counter(
            "bloomwire_persister_refused",
            "Refused messages by inbound kind and reason (ids and numbers left out)",
            ["kind", "reason"],
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "bloomwire_persister_batch_seconds",
            "Validating and committing one batch",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.receive_to_commit = Histogram(
            "bloomwire_persister_receive_to_commit_seconds",
            "From the oldest message of a batch reaching the persister to its commit",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.publish_to_commit = Histogram(
            "bloomwire_persister_publish_to_commit_seconds",
            "From the sender's own timestamp to the commit; one sample per batch (device clocks may differ)",
            buckets=(*LATENCY_BUCKETS, 60.0, 300.0),
            registry=registry,
        )
        self.owntracks_ignored = Counter(
            "bloomwire_owntracks_ignored",
            "OwnTracks messages acknowledged as ignored, by _type (waypoint, cmd, ...) and reason",
            ["type", "reason"],
            registry=registry,
        )
        self._reasons: set[str] = set()
        self._outcomes = {name: self.events.labels(name) for name in OUTCOMES}

    def observe(self, batch: Sequence[Message], result: BatchResult, started: float) -> None:
        """Count one committed batch; ``started`` is ``time.perf_counter()`` before it was applied."""
        now = time.time()
        self.batch_seconds.observe(time.perf_counter() - started)
        counts = (result.stored, result.duplicates, result.refused, result.ignored)
        for name, n in zip(OUTCOMES, counts, strict=True):
            if n:
                self._outcomes[name].inc(n)
        for (kind, why), n in result.owntracks_ignored.items():
            self.owntracks_ignored.labels(kind, reason_label(why)).inc(n)
        for out in result.outbound:
            if out.topic == topics.DEADLETTER:
                self._refusal(out.payload)
        if batch:
            self.receive_to_commit.observe(max(0.0, now - batch[0].received_at))
            sent = sent_at(batch[0].payload)
            if sent is not None:
                self.publish_to_commit.observe(max(0.0, now - sent))

    def _refusal(self, payload: bytes) -> None:
        try:
            refusal = ev.Refusal.model_validate_json(payload)
        except ValueError:
            self.refused.labels("unknown", "unreadable refusal").inc()
            return
        reason = reason_label(refusal.reason)
        if reason not in self._reasons:
            if len(self._reasons) >= MAX_REASONS:
                reason = "other"
            else:
                self._reasons.add(reason)
        self.refused.labels(kind_label(refusal.topic), reason).inc()
