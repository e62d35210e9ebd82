"""What goes in and out of the projector: raw inbound messages, messages to publish, batch counts."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Inbound:
    """A raw inbound message as the broker delivered it."""

    topic: str
    payload: bytes
    received_at: float = 0.0
    #: Published retained (the broker says so with Retain As Published): not an event, except
    #: on presence and OwnTracks topics (``projector.RETAINED_ALLOWED``).
    retain: bool = False


@dataclass(frozen=True, slots=True)
class Outbound:
    """A message to publish after the commit."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    expiry_s: int | None = None


@dataclass
class BatchResult:
    """What a batch did: counts, and the messages to publish now that it is committed."""

    outbound: list[Outbound] = field(default_factory=list)
    stored: int = 0
    duplicates: int = 0
    refused: int = 0
    ignored: int = 0
    #: OwnTracks messages acknowledged as ignored, by (``_type`` label, reason).
    owntracks_ignored: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
