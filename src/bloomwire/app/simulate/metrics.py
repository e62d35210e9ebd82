"""What a run measured, from the clients' side: events sent, their fate, and latencies."""

from __future__ import annotations

import statistics
from collections import Counter, deque
from dataclasses import dataclass, field


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) of ``values``; None when empty."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[max(0, min(98, round(q) - 1))]


@dataclass
class Metrics:
    """A :class:`bloomwire.app.clients.base.Observer` shared by every simulated client."""

    #: event id -> (kind, first publish time) of every event of record sent (no positions).
    events: dict[str, tuple[str, float]] = field(default_factory=dict)
    stored: set[str] = field(default_factory=set)
    refused: dict[str, str] = field(default_factory=dict)
    #: event id -> first arrival of its canonical echo.
    canonical_at: dict[str, float] = field(default_factory=dict)
    counters: Counter[str] = field(default_factory=Counter)
    feed: deque[str] = field(default_factory=lambda: deque(maxlen=10))

    # Observer protocol ---------------------------------------------------------------------

    def sent(self, event_id: str, kind: str, at: float) -> None:
        """(Observer) An event of record went out (the first publish counts)."""
        self.events.setdefault(event_id, (kind, at))

    def settled(self, event_id: str, stored: bool, reason: str = "") -> None:
        """(Observer) The backbone stored or refused an event."""
        if stored:
            self.stored.add(event_id)
        else:
            self.refused[event_id] = reason

    def canonical(self, event_id: str, at: float) -> None:
        """(Observer) A canonical echo arrived."""
        self.canonical_at.setdefault(event_id, at)

    # figures -------------------------------------------------------------------------------

    def latencies_ms(self) -> list[float]:
        """Publish -> canonical echo, ms, for every event that has both."""
        out = []
        for event_id, (_kind, at) in self.events.items():
            seen = self.canonical_at.get(event_id)
            if seen is not None:
                out.append(max(0.0, (seen - at) * 1000.0))
        return out

    def note(self, line: str) -> None:
        """Add a line to the activity feed."""
        self.feed.append(line)
