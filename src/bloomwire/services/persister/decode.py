"""The decode step, pure: a raw inbound message becomes a :class:`Decoded` event or a refusal.

It reads only the message, the time and the time bounds: no projection, no store, no log. The
order an OwnTracks transition is about (its ``subject``) needs the projections: it is left
unset here and found by ``riders.with_subject``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import datetime

from bloomwire.contract import events as ev
from bloomwire.contract import owntracks as ot
from bloomwire.contract import topics
from bloomwire.contract.topics import InboundKind, InboundTopic
from bloomwire.contract.validate import TimeBounds
from bloomwire.errors import PayloadError
from bloomwire.services.persister import proof
from bloomwire.services.persister.messages import Inbound

#: What a message says: an event, an OwnTracks message the backbone has no use for, or nothing
#: (a retained presence being cleared).
Said = ev._Envelope | ot.Ignored | None


@dataclass(frozen=True, slots=True)
class Decoded:
    """A message read: the topic it came on and what it says."""

    msg: Inbound
    where: InboundTopic
    event: Said

    @property
    def event_id(self) -> str | None:
        """The event's id, if it is an event."""
        return self.event.id if isinstance(self.event, ev._Envelope) else None


@dataclass(frozen=True, slots=True)
class Undecodable:
    """A message refused before anything else: bad topic, bad payload, implausible time."""

    msg: Inbound
    #: None when the topic itself is refused.
    where: InboundTopic | None
    #: The payload's id when it has a well-formed one (for the sender's refusal).
    event_id: str | None
    reason: str
    #: A bug in a validator (not the sender's fault): the caller logs it with its traceback.
    bug: Exception | None = None


def decode(msg: Inbound, now: datetime, bounds: TimeBounds) -> Decoded | Undecodable:
    """What ``msg`` says at ``now``, or why it is refused.

    Total: no exception escapes, so one message can never fail its batch.
    """
    try:
        where = topics.parse_inbound(msg.topic)
    except Exception as exc:  # a TopicError, or anything else: this message alone is refused
        return Undecodable(msg, None, None, str(exc))
    try:
        event = _payload(msg, where, now, bounds)
        if isinstance(event, ev._Envelope):
            ev.check_received(event, now, bounds)
            event = ev.fact_of(event)  # a request is recorded and published as its fact
        return Decoded(msg, where, event)
    except PayloadError as exc:
        refused_id = proof.photo_refusal_id(msg.payload, where) if where.kind is InboundKind.PHOTO else None
        return Undecodable(msg, where, refused_id or event_id(msg.payload), str(exc))
    except Exception as exc:  # a bug in a validator must not fail the batch: refuse this one
        reason = f"undecodable payload: {type(exc).__name__}: {exc}"
        return Undecodable(msg, where, event_id(msg.payload), reason, bug=exc)


def event_id(payload: bytes) -> str | None:
    """The ``id`` of a refused payload, if it has a readable one (for the sender's refusal)."""
    try:
        obj = ev.load_json(payload)
    except Exception:  # unreadable: the refusal goes without an id
        return None
    # Only a well-formed id: a refused one may hold anything (a NUL, which PostgreSQL refuses).
    if isinstance(obj, dict) and ev.is_event_id(obj.get("id")):
        return str(obj["id"])
    return None


def _payload(msg: Inbound, where: InboundTopic, now: datetime, bounds: TimeBounds) -> Said:
    if where.kind is InboundKind.OWNTRACKS:
        return _owntracks(msg, where, now, bounds)
    if where.kind is InboundKind.PHOTO:  # bytes, not JSON (issue 16)
        return proof.photo_event(msg.payload, where, now)
    if where.kind is InboundKind.PRESENCE and msg.payload.strip() in (b"online", b"offline"):
        status = ev.Presence(msg.payload.strip().decode())
        data = ev.RiderPresence(status=status)
        # A bare word (e.g. the Last Will) has no time of its own: it happens now.
        return ev.RiderPresenceChangedEvent(source=where.source, time=now, data=data)
    if where.kind is InboundKind.PRESENCE and msg.payload == b"":
        return None  # a retained presence being cleared
    if where.kind is InboundKind.LOCATION:
        return _location(msg, where, now, bounds)
    return ev.decode(msg.payload)


def _location(msg: Inbound, where: InboundTopic, now: datetime, bounds: TimeBounds) -> Said:
    """A position: the rider app's CloudEvent, or bare OwnTracks-style fields (no ``type``)."""
    if b'"type"' in msg.payload:
        # Most likely an event: parsed once by pydantic, not by json.loads first as well (the
        # most frequent message of all). Refused, it may still be bare fields: read as below.
        with contextlib.suppress(PayloadError):
            return ev.decode(msg.payload)
    obj = ev.load_json(msg.payload)
    if isinstance(obj, dict) and "type" not in obj:
        loc = ot.parse_location_fields(obj, now, bounds)
        return ev.RiderLocationReportedEvent(source=where.source, data=loc)
    return ev.decode(msg.payload)


def _owntracks(msg: Inbound, where: InboundTopic, now: datetime, bounds: TimeBounds) -> Said:
    """What an OwnTracks payload is (raises :class:`PayloadError` when it is malformed)."""
    parsed = ot.parse(msg.payload, now, bounds=bounds)
    match parsed:
        case ot.Ignored():
            return parsed
        case ot.Lwt():
            # The app's own Last Will: the same as a bare ``offline`` on riders/R/presence.
            offline = ev.RiderPresence(status=ev.Presence.OFFLINE)
            return ev.RiderPresenceChangedEvent(source=where.source, time=now, data=offline)
        case ot.Transition():
            return ot.transition_event(where.sender, where.device or "unknown", parsed)
        case _:
            return ev.RiderLocationReportedEvent(source=where.source, data=parsed)
