"""OwnTracks app payloads (the booklet's "JSON" page): what each ``_type`` is to the backbone.

The apps publish on ``owntracks/R/DEVICE`` (``location``; ``lwt``, their Last Will) and below it
(``.../event``: ``transition``; ``waypoint(s)``, ``cmd``, ``status``, ``steps``, ``beacon``, ...).
:func:`parse` turns one payload into a position, the app going offline, a region transition to
store, or :class:`Ignored` (acknowledged, logged and counted by the persister) -- or raises
:class:`PayloadError` with the reason, which dead-letters it.

Retained messages as the OwnTracks Recorder has them by default (``--useretained``: "process
retained messages (default: no)"): what the broker replays on (re)subscription is not used (the
persister's subscriptions ask for no replays), while a live message the app publishes retained
(its default) is an ordinary location and is used.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from pydantic import ValidationError

from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.contract.validate import DEFAULT_TIME_BOUNDS, TimeBounds, check_epoch
from bloomwire.errors import PayloadError

LOCATION: Final = "location"
LWT: Final = "lwt"
TRANSITION: Final = "transition"
#: Every other ``_type`` of the booklet and the Recorder: acknowledged as ignored, never stored.
IGNORED_TYPES: Final = frozenset(
    {
        "beacon",
        "card",
        "cmd",
        "configuration",
        "dump",
        "encrypted",
        "request",
        "status",
        "steps",
        "waypoint",
        "waypoints",
    }
)
#: The counter's label for a ``_type`` nobody documents (keeps the label set bounded).
UNKNOWN: Final = "unknown"

#: ``tst`` above this is milliseconds: 1e11 s is the year 5138, while 1e11 ms is March 1973.
MILLISECONDS_ABOVE: Final = 100_000_000_000
#: Fields that are numbers in every OwnTracks payload: neither strings, booleans nor non-finite.
NUMBER_FIELDS: Final = ("lat", "lon", "tst", "acc", "vel", "alt", "cog", "batt", "vac", "rad", "wtst")
#: Transition fields the backbone keeps (text), with their longest accepted length.
TEXT_FIELDS: Final = {"desc": 500, "rid": 100, "t": 10}


@dataclass(frozen=True, slots=True)
class Lwt:
    """The app's Last Will: it lost its connection (``tst``: when that connection began)."""

    tst: int | None = None


@dataclass(frozen=True, slots=True)
class Transition:
    """A region entered or left, as the phone saw it (``tst``: when)."""

    event: str
    tst: int
    lat: float
    lon: float
    acc: float | None
    desc: str
    rid: str | None
    trigger: str | None


@dataclass(frozen=True, slots=True)
class Ignored:
    """A payload the backbone has no use for: ``kind`` is its ``_type`` label, ``why`` the reason."""

    kind: str
    why: str


Parsed = ev.RiderLocation | Lwt | Transition | Ignored


def parse(raw: bytes, now: datetime, *, bounds: TimeBounds = DEFAULT_TIME_BOUNDS) -> Parsed:
    """Read one unmodified OwnTracks payload; raise :class:`PayloadError` when it is malformed."""
    if not raw.strip():
        return Ignored("empty", "empty payload (a retained message being cleared)")
    obj = ev.load_json(raw)
    if not isinstance(obj, dict):
        raise PayloadError(f"OwnTracks payload must be a JSON object, not {type(obj).__name__}")
    kind = obj.get("_type")
    if not isinstance(kind, str):
        raise PayloadError("_type: missing; every OwnTracks payload names its _type")
    if kind == LOCATION:
        return parse_location_fields(obj, now, bounds)
    if kind == LWT:
        tst = obj.get("tst")
        return Lwt(tst if isinstance(tst, int) and not isinstance(tst, bool) else None)
    if kind == TRANSITION:
        return parse_transition(obj, now, bounds)
    if kind in IGNORED_TYPES:
        return Ignored(kind, f"_type {kind!r} is not used by Bloomwire")
    return Ignored(UNKNOWN, f"unknown _type {kind[:40]!r}")


def parse_location_fields(
    obj: dict[str, Any], now: datetime, bounds: TimeBounds = DEFAULT_TIME_BOUNDS
) -> ev.RiderLocation:
    """Validate a position with OwnTracks field names (also bare on ``riders/R/location``)."""
    check_numbers(obj)
    tst = obj.get("tst")
    if tst is not None:
        check_tst(tst, now, bounds)
    try:
        return ev.RiderLocation.model_validate(obj)
    except ValidationError as exc:
        raise PayloadError(ev.describe_validation_error(exc)) from None


def parse_transition(
    obj: dict[str, Any], now: datetime, bounds: TimeBounds = DEFAULT_TIME_BOUNDS
) -> Transition:
    """Validate a ``transition`` (``event`` enter/leave, ``tst``, ``lat``/``lon``; ``desc``, ...)."""
    check_numbers(obj)
    event = obj.get("event")
    if event not in ("enter", "leave"):
        raise PayloadError(f"event: must be 'enter' or 'leave', not {str(event)[:40]!r}")
    for name in ("tst", "lat", "lon"):
        if obj.get(name) is None:
            raise PayloadError(f"{name}: required in a transition")
    check_tst(obj["tst"], now, bounds)
    lat, lon, acc = float(obj["lat"]), float(obj["lon"]), obj.get("acc")
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        raise PayloadError(f"lat/lon: {lat}, {lon} is not a place on Earth")
    if acc is not None and acc < 0:
        raise PayloadError("acc: must be >= 0 (metres)")
    text = {name: _text(obj, name, limit) for name, limit in TEXT_FIELDS.items()}
    return Transition(
        event=event,
        tst=obj["tst"],
        lat=lat,
        lon=lon,
        acc=None if acc is None else float(acc),
        desc=text["desc"] or "",
        rid=text["rid"],
        trigger=text["t"],
    )


def check_numbers(obj: dict[str, Any]) -> None:
    """Numbers must be JSON numbers, finite; ``tst`` a whole one (``"lat": "52.5"`` is refused)."""
    for name in NUMBER_FIELDS:
        value = obj.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PayloadError(f"{name}: must be a number, not {type(value).__name__}")
        if not math.isfinite(value):
            raise PayloadError(f"{name}: must be a finite number")
    tst = obj.get("tst")
    if isinstance(tst, float):
        raise PayloadError("tst: must be whole epoch seconds")


def check_tst(tst: int, now: datetime, bounds: TimeBounds = DEFAULT_TIME_BOUNDS) -> None:
    """Refuse a fix time in milliseconds or at/before the epoch, then the contract's time bounds
    (``bounds.future_skew_s`` ahead, ``bounds.max_age_s`` old: the same as every event's time)."""
    if tst > MILLISECONDS_ABOVE:
        raise PayloadError(f"tst: {tst} looks like milliseconds; OwnTracks sends epoch seconds")
    if tst <= 0:
        raise PayloadError(f"tst: {tst} is not a time; OwnTracks sends epoch seconds")
    check_epoch("tst", tst, now, bounds)


def transition_id(rider: str, device: str, t: Transition) -> str:
    """The event id of a transition: the same re-sent transition gets the same id (stored once)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"owntracks/{rider}/{device}/transition/{t.tst}/{t.event}"))


def transition_event(
    rider: str, device: str, t: Transition, order: str | None = None
) -> ev.RiderRegionChangedEvent:
    """The ``rider.region_changed`` event of ``rider``'s transition; ``order`` becomes its subject."""
    try:
        data = ev.RiderRegionChanged(
            event="enter" if t.event == "enter" else "leave",
            region=t.desc,
            region_id=t.rid,
            device=device,
            lat=t.lat,
            lon=t.lon,
            acc=t.acc,
            trigger=t.trigger,
        )
    except ValidationError as exc:
        raise PayloadError(ev.describe_validation_error(exc)) from None
    return ev.RiderRegionChangedEvent(
        id=transition_id(rider, device, t),
        source=f"{topics.RIDERS}/{rider}",
        time=datetime.fromtimestamp(t.tst, tz=UTC),
        subject=order,
        data=data,
    )


def _text(obj: dict[str, Any], name: str, limit: int) -> str | None:
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise PayloadError(f"{name}: must be text, not {type(value).__name__}")
    if len(value) > limit:
        raise PayloadError(f"{name}: {len(value)} characters long (max {limit})")
    if any(ord(c) < 32 and c not in "\n\t" for c in value):
        raise PayloadError(f"{name}: contains control characters")
    return value.strip()
