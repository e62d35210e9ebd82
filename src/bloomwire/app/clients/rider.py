"""The rider's phone app: presence, positions, offers, status, incidents and chat, over MQTT only.

:class:`RiderDevice` is the app's core, used by ``bloomwire rider …`` and by the simulator alike:

- connects as rider ``R`` (username ``R``) with a retained ``online`` on ``riders/R/presence`` and
  the Last Will ``offline`` (a persistent session, so offers and acks wait while the phone is off);
- writes every event to its :class:`~bloomwire.app.clients.outbox.Outbox` first, then publishes it
  (:class:`~bloomwire.app.clients.sender.OutboxSender`, shared with the shop and customer clients);
  the persister's ack deletes it, a refusal moves it aside and is shown; whatever is left is sent
  again after every (re)connection and at the next app start;
- receives offers (``riders/R/inbox/offers``), chat, amendments of its orders (which it may
  confirm), acks and errors from ``riders/R/inbox/#``.

:class:`RiderApp` is the interactive command-line app around it (positions from a route file,
fixed coordinates or a simulated ride; offers answered by flag or typed commands).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import math
import os
import random
import signal
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal, Protocol

from PIL import Image
from pydantic import ValidationError
from rich.console import Console

from bloomwire.access.policy import device_username
from bloomwire.app.clients.base import (
    DEFAULT_ANSWER_TIMEOUT_S,
    Client,
    ClientError,
    NullObserver,
    Observer,
    Outcome,
    UsageError,
    Waiters,
    check_name,
    parse_point,
    wait_outcome,
)
from bloomwire.app.clients.outbox import LOCATION, PHOTO, Entry, Outbox
from bloomwire.app.clients.sender import RESEND_AFTER_S, OutboxSender
from bloomwire.contract import events as ev
from bloomwire.contract import geo, topics
from bloomwire.contract.lifecycle import FailureReason, OrderStatus
from bloomwire.contract.photo import MAX_PHOTO_BYTES, check_photo
from bloomwire.errors import PayloadError
from bloomwire.runtime.aio import cancel_and_wait
from bloomwire.runtime.mqtt import Message
from bloomwire.runtime.settings import Settings

#: A position older than this is not worth sending any more.
POSITION_TTL_S = 60.0
#: The largest speed a position may report (the ``vel`` field's limit in the payload model).
MAX_VEL_KMH = 400.0

OfferPolicy = Literal["accept", "decline", "ask"]


def outbox_path(settings: Settings, rider: str, device: str | None = None) -> Path:
    """Where rider ``R``'s outbox lives by default: ``DATA_DIR/clients/riders/R/outbox.db``; a
    device login ``R@LABEL`` keeps its own in ``.../riders/R@LABEL/outbox.db``."""
    login = rider if device is None else device_username(rider, device)
    return settings.data_dir / "clients" / "riders" / login / "outbox.db"


# --- events a rider sends (pure builders) ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outgoing:
    """An event ready for the outbox."""

    id: str
    kind: str
    topic: str
    payload: bytes
    order: str | None = None


def _source(rider: str) -> str:
    return f"{topics.RIDERS}/{rider}"


def _usage(exc: ValidationError) -> UsageError:
    return UsageError(ev.describe_validation_error(exc))


def status_event(
    rider: str,
    order: str,
    status: OrderStatus | str,
    *,
    note: str = "",
    reason: FailureReason | str | None = None,
    code: str | None = None,
) -> Outgoing:
    """A status transition the rider reports (``picked_up``, ``en_route``, ``arrived``, …);
    ``code``: the handover code the customer gave, for ``delivered``."""
    check_name(order, "order")
    try:
        st = OrderStatus(status)
    except ValueError:
        known = ", ".join(s.value for s in OrderStatus)
        raise UsageError(f"unknown status {status!r} (known: {known})") from None
    why: FailureReason | None = None
    if reason is not None:
        try:
            why = FailureReason(reason)
        except ValueError:
            known = ", ".join(r.value for r in FailureReason)
            raise UsageError(f"unknown failure reason {reason!r} (known: {known})") from None
    try:
        data = ev.OrderStatusChanged(order=order, status=st, note=note, reason=why, code=code)
        ev.check_rider_status(data)
    except ValidationError as exc:
        raise _usage(exc) from None
    except PayloadError as exc:
        raise UsageError(str(exc).removeprefix("data.status: ")) from None
    event = ev.OrderStatusChangedEvent(source=_source(rider), data=data)
    return Outgoing(event.id, "status", topics.rider_order_status(rider, order), ev.encode(event), order)


def photo_event(rider: str, order: str, data: bytes) -> Outgoing:
    """A delivery photo (JPEG or PNG bytes), checked on the phone as the backbone will check it."""
    check_name(order, "order")
    try:
        ref = check_photo(data)
    except PayloadError as exc:
        raise UsageError(str(exc)) from None
    event_id = ev.photo_event_id(rider, order, ref.sha256)
    return Outgoing(event_id, PHOTO, topics.rider_order_photo(rider, order), data, order)


def incident_event(
    rider: str, order: str, reason: str, *, eta: datetime | None = None, note: str = ""
) -> Outgoing:
    """An incident (flat tyre, traffic …) with an optional new ETA: not a status change."""
    check_name(order, "order")
    try:
        data = ev.OrderIncident(order=order, reason=reason, eta=eta, note=note)
    except ValidationError as exc:
        raise _usage(exc) from None
    event = ev.OrderIncidentReportedEvent(source=_source(rider), data=data)
    return Outgoing(event.id, "incident", topics.rider_order_status(rider, order), ev.encode(event), order)


def chat_event(rider: str, order: str, text: str) -> Outgoing:
    """A chat line from the rider on an order."""
    check_name(order, "order")
    try:
        data = ev.OrderChat(order=order, text=text)
    except ValidationError as exc:
        raise _usage(exc) from None
    event = ev.OrderChatPostedEvent(source=_source(rider), data=data)
    return Outgoing(event.id, "chat", topics.rider_order_chat(rider, order), ev.encode(event), order)


def confirm_event(rider: str, order: str, amendment: str, note: str = "") -> Outgoing:
    """The rider confirms it has seen an amendment of an order it holds (issue 18)."""
    check_name(order, "order")
    try:
        data = ev.AmendmentConfirmation(order=order, amendment=amendment, note=note)
    except ValidationError as exc:
        raise _usage(exc) from None
    event = ev.OrderAmendmentConfirmEvent(source=_source(rider), data=data)
    return Outgoing(event.id, "confirm", topics.rider_order_status(rider, order), ev.encode(event), order)


def needs_confirmation(amendment: ev.OrderAmendedEvent) -> bool:
    """Whether the rider app asks the rider to confirm this amendment (a new door or new
    instructions: the shop wants to know the rider saw it)."""
    return bool(ev.RIDER_CONFIRMS & amendment.data.changes.keys())


def describe_amendment(amendment: ev.OrderAmendedEvent) -> list[str]:
    """One line per change, as the rider app shows it."""
    lines = []
    for field, change in amendment.data.changes.items():
        new = change.new
        if field is ev.AmendField.INSTRUCTIONS and isinstance(new, dict):
            new = " — ".join(str(v) for v in (new.get("kind"), new.get("text")) if v)
        elif field is ev.AmendField.POSITION and isinstance(new, dict):
            new = f"{new.get('lat')},{new.get('lon')}"
        lines.append(f"{field.value.replace('_', ' ')}: {new}")
    return lines


def reply_event(rider: str, offer: str, order: str, accept: bool, reason: str = "") -> Outgoing:
    """Accept or decline an offer."""
    check_name(offer, "offer")
    check_name(order, "order")
    data = ev.DispatchReply(offer=offer, order=order, accept=accept, reason=reason)
    event = ev.DispatchReplyEvent(source=_source(rider), data=data)
    return Outgoing(event.id, "reply", topics.rider_replies(rider), ev.encode(event), order)


def location_event(
    rider: str,
    lat: float,
    lon: float,
    *,
    tst: float | None = None,
    vel: float | None = None,
    batt: int | None = None,
    acc: float | None = None,
    cog: float | None = None,
) -> Outgoing:
    """A position as a ``rider.location_reported`` CloudEvent (OwnTracks field names inside)."""
    try:
        data = ev.RiderLocation(
            lat=lat,
            lon=lon,
            tst=int(time.time() if tst is None else tst),
            vel=None if vel is None else round(min(max(vel, 0.0), MAX_VEL_KMH), 1),
            batt=batt,
            acc=acc,
            cog=cog,
        )
    except ValidationError as exc:
        raise _usage(exc) from None
    event = ev.RiderLocationReportedEvent(source=_source(rider), data=data)
    return Outgoing(event.id, LOCATION, topics.rider_location(rider), ev.encode(event))


# --- the device -----------------------------------------------------------------------------------


class RiderListener(Protocol):
    """What the app (or the simulated rider) is told."""

    def offer(self, offer: ev.DispatchOfferedEvent) -> None:
        """An offer arrived."""

    def chat(self, chat: ev.OrderChatPostedEvent) -> None:
        """A chat line from the shop or the customer."""

    def amendment(self, amendment: ev.OrderAmendedEvent) -> None:
        """One of the rider's orders changed (issue 18)."""

    def stored(self, entries: Sequence[Entry]) -> None:
        """The persister committed these events (positions included)."""

    def refused(self, entry: Entry | None, refusal: ev.Refusal) -> None:
        """The persister refused an event (``entry`` is None if it was not in this outbox)."""


class QuietListener:
    """A listener that does nothing."""

    def offer(self, offer: ev.DispatchOfferedEvent) -> None:
        """Ignore."""

    def chat(self, chat: ev.OrderChatPostedEvent) -> None:
        """Ignore."""

    def amendment(self, amendment: ev.OrderAmendedEvent) -> None:
        """Ignore."""

    def stored(self, entries: Sequence[Entry]) -> None:
        """Ignore."""

    def refused(self, entry: Entry | None, refusal: ev.Refusal) -> None:
        """Ignore."""


class RiderDevice(Client):
    """The rider app's MQTT side and outbox."""

    what = "rider"

    def __init__(
        self,
        settings: Settings,
        rider: str,
        password: str,
        outbox: Outbox,
        *,
        listener: RiderListener | None = None,
        observer: Observer | None = None,
        presence: bool = True,
        resend_after_s: float = RESEND_AFTER_S,
        position_ttl_s: float = POSITION_TTL_S,
        username: str | None = None,
    ) -> None:
        self.rider = check_name(rider, "rider")
        super().__init__(
            settings,
            check_name(username or rider, "username"),
            password,
            status_topic=topics.rider_presence(rider) if presence else None,
            persistent=True,
        )
        self.outbox = outbox
        self.listener: RiderListener = listener or QuietListener()
        self.observer: Observer = observer or NullObserver()
        self.waiters = Waiters()
        self.offers: dict[str, ev.DispatchOfferedEvent] = {}
        #: order -> id of its last amendment received (what `confirm ORDER` confirms)
        self.amendments: dict[str, str] = {}
        self._reported: set[str] = set()
        self.sender = OutboxSender(
            self.conn,
            outbox,
            resend_after_s=resend_after_s,
            on_sent=self._sent,
            position_ttl_s=position_ttl_s,
        )
        self.subscribe([topics.rider_inbox_filter(rider)])

    @property
    def resends(self) -> int:
        """How many events were published again (after a reconnection or when overdue)."""
        return self.sender.resends

    async def start(self, timeout: float = 20.0, on_retry: Callable[[str], None] | None = None) -> None:
        """Connect, then publish whatever the outbox still holds, and keep sending."""
        await super().start(timeout, on_retry)
        self.sender.start()

    async def stop(self, *, announce_offline: bool = True) -> None:
        """Stop sending and disconnect (unacknowledged events stay in the outbox)."""
        await self.sender.stop()
        self.waiters.cancel_all()
        await super().stop(announce_offline=announce_offline)

    async def crash(self) -> None:
        """Die like a killed app: no clean disconnect (Last Will), outbox left as it is."""
        await self.sender.stop()
        self.waiters.cancel_all()
        await super().crash()

    # --- sending ----------------------------------------------------------------------------

    def send(self, out: Outgoing) -> str:
        """Keep ``out`` in the outbox, then publish it if connected; return its event id."""
        self.sender.send(out.id, out.kind, out.topic, out.payload)
        return out.id

    def _sent(self, entry: Entry, at: float) -> None:
        if entry.kind != LOCATION and entry.id not in self._reported:
            self._reported.add(entry.id)
            self.observer.sent(entry.id, entry.kind, at)

    def status(
        self,
        order: str,
        status: OrderStatus | str,
        *,
        note: str = "",
        reason: FailureReason | str | None = None,
        code: str | None = None,
    ) -> str:
        """Report a status transition (``delivered`` with the handover code); returns the event id."""
        return self.send(status_event(self.rider, order, status, note=note, reason=reason, code=code))

    def photo(self, order: str, data: bytes) -> str:
        """Send a delivery photo (kept in the outbox like any event); returns its event id."""
        return self.send(photo_event(self.rider, order, data))

    def incident(self, order: str, reason: str, *, eta: datetime | None = None, note: str = "") -> str:
        """Report an incident (with a new ETA); returns the event id."""
        return self.send(incident_event(self.rider, order, reason, eta=eta, note=note))

    def chat(self, order: str, text: str) -> str:
        """Send a chat line on an order; returns the event id."""
        return self.send(chat_event(self.rider, order, text))

    def confirm(self, order: str, amendment: str | None = None, note: str = "") -> str:
        """Confirm an amendment of ``order`` (its last one received if not given); the event id."""
        amendment = amendment or self.amendments.get(order)
        if amendment is None:
            raise UsageError(f"no amendment of order {order!r} to confirm (give its id)")
        return self.send(confirm_event(self.rider, order, amendment, note))

    def reply(self, offer: str, accept: bool, *, order: str | None = None, reason: str = "") -> str:
        """Accept or decline an offer (its order looked up from the received offer if not given)."""
        if order is None:
            known = self.offers.get(offer)
            if known is None:
                raise UsageError(f"unknown offer {offer!r} (give its order with --order)")
            order = known.data.order
        self.offers.pop(offer, None)
        return self.send(reply_event(self.rider, offer, order, accept, reason))

    def position(
        self,
        lat: float,
        lon: float,
        *,
        vel: float | None = None,
        batt: int | None = None,
        tst: float | None = None,
    ) -> str:
        """Publish a position (kept only while fresh); returns the event id."""
        return self.send(location_event(self.rider, lat, lon, vel=vel, batt=batt, tst=tst))

    async def wait(self, event_id: str, timeout: float = DEFAULT_ANSWER_TIMEOUT_S) -> Outcome:
        """Wait until the persister stored or refused ``event_id``."""
        return await wait_outcome(self.waiters.expect(event_id), timeout, f"event {event_id}")

    def expect(self, event_id: str) -> asyncio.Future[Outcome]:
        """A future resolved when ``event_id`` is stored or refused."""
        return self.waiters.expect(event_id)

    # --- receiving ----------------------------------------------------------------------------

    def handle(self, msg: Message) -> None:
        """Acks, errors, offers, chat and amendments from ``riders/R/inbox/#``."""
        channel = msg.topic.rsplit("/", 1)[-1]
        if channel == topics.Inbox.ACKS:
            ids = [str(i) for i in ev.Ack.model_validate_json(msg.payload).ids]
            entries = self.outbox.ack(ids)
            for e in entries:
                if e.kind != LOCATION:
                    self.observer.settled(e.id, True)
            for i in ids:
                self.waiters.resolve(i, True)
            if entries:
                self.listener.stored(entries)
        elif channel == topics.Inbox.ERRORS:
            refusal = ev.Refusal.model_validate_json(msg.payload)
            entry = self.outbox.refuse(refusal.id, refusal.reason) if refusal.id else None
            if entry is not None and entry.kind != LOCATION:
                self.observer.settled(entry.id, False, refusal.reason)
            self.waiters.resolve(refusal.id, False, refusal.reason)
            self.listener.refused(entry, refusal)
        elif channel == topics.Inbox.OFFERS:
            event = ev.decode(msg.payload)
            if isinstance(event, ev.DispatchOfferedEvent):
                self.offers[event.data.offer] = event
                self.listener.offer(event)
        elif channel == topics.Inbox.CHAT:
            event = ev.decode(msg.payload)
            if isinstance(event, ev.OrderChatPostedEvent):
                self.listener.chat(event)
        elif channel == topics.Inbox.AMENDMENTS:
            event = ev.decode(msg.payload)
            if isinstance(event, ev.OrderAmendedEvent):
                self.amendments[event.data.order] = event.id
                self.listener.amendment(event)


# --- positions for the command-line app ----------------------------------------------------------


class PositionSource(Protocol):
    """Where the rider is ``elapsed`` seconds after the app started, and how fast (km/h)."""

    def at(self, elapsed: float) -> tuple[float, float, float]:
        """``(lat, lon, speed_kmh)``."""
        ...


@dataclass(frozen=True)
class FixedPosition:
    """A rider standing still."""

    lat: float
    lon: float

    def at(self, elapsed: float) -> tuple[float, float, float]:
        """Always the same place."""
        return self.lat, self.lon, 0.0


class RoutePlayer:
    """Rides along a polyline at ``speed_kmh`` (road factor 1), back and forth."""

    def __init__(
        self, points: Sequence[tuple[float, float]], speed_kmh: float = geo.DEFAULT_SPEED_KMH
    ) -> None:
        if not points:
            raise UsageError("route has no points")
        if not math.isfinite(speed_kmh) or speed_kmh <= 0:
            raise UsageError(f"speed must be a positive number of km/h, not {speed_kmh}")
        self.points = list(points)
        self.speed_ms = speed_kmh / 3.6
        self.legs = [
            geo.distance_m(a[0], a[1], b[0], b[1]) for a, b in zip(self.points, self.points[1:], strict=False)
        ]
        self.length = sum(self.legs)

    def at(self, elapsed: float) -> tuple[float, float, float]:
        """Position after riding for ``elapsed`` seconds."""
        if self.length <= 0:
            return self.points[0][0], self.points[0][1], 0.0
        travelled = (elapsed * self.speed_ms) % (2 * self.length)
        if travelled > self.length:  # on the way back
            travelled = 2 * self.length - travelled
        for (a, b), leg in zip(zip(self.points, self.points[1:], strict=False), self.legs, strict=True):
            if travelled <= leg and leg > 0:
                f = travelled / leg
                return a[0] + (b[0] - a[0]) * f, a[1] + (b[1] - a[1]) * f, self.speed_ms * 3.6
            travelled -= leg
        last = self.points[-1]
        return last[0], last[1], self.speed_ms * 3.6


def random_ride(
    start: tuple[float, float], seed: int | None = None, speed_kmh: float = 18.0, legs: int = 40
) -> RoutePlayer:
    """A simulated ride: a chain of 300-1500 m legs in random directions around ``start``."""
    rng = random.Random(seed)
    points = [start]
    lat, lon = start
    for _ in range(legs):
        bearing = rng.uniform(0, 2 * math.pi)
        dist = rng.uniform(300, 1500)
        dlat = dist * math.cos(bearing) / 111_320
        dlon = dist * math.sin(bearing) / (111_320 * max(math.cos(math.radians(lat)), 0.01))
        # Stay within ~6 km of the start: a city ride, not a cross-country one.
        if geo.distance_m(start[0], start[1], lat + dlat, lon + dlon) > 6000:
            dlat, dlon = -dlat, -dlon
        lat, lon = lat + dlat, lon + dlon
        points.append((lat, lon))
    return RoutePlayer(points, speed_kmh)


def load_route(path: Path) -> list[tuple[float, float]]:
    """Points of a route file: GeoJSON (LineString/Points), GPX (trkpt/rtept/wpt) or ``lat,lon`` lines."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read route file {path}: {exc.strerror or exc}") from None
    stripped = text.lstrip()
    points: list[tuple[float, float]] = []
    if stripped.startswith("<"):
        try:
            root = ET.fromstring(text)
        except ET.ParseError as exc:
            raise UsageError(f"route file {path} is not valid GPX/XML: {exc}") from None
        for el in root.iter():
            if el.tag.rsplit("}", 1)[-1] in ("trkpt", "rtept", "wpt"):
                points.append(_point(el.get("lat"), el.get("lon"), path))
    elif stripped.startswith(("{", "[")):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"route file {path} is not valid JSON: {exc.msg} (line {exc.lineno})") from None
        points = _geojson_points(obj, path)
    else:
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line or line.lower().startswith("lat"):
                continue
            points.append(parse_point(line, f"{path}:{n}"))
    if not points:
        raise UsageError(f"route file {path} has no points")
    return points


def _point(lat: object, lon: object, path: Path) -> tuple[float, float]:
    try:
        return parse_point(f"{lat},{lon}", f"route file {path}")
    except UsageError:
        raise UsageError(f"route file {path}: bad point lat={lat!r} lon={lon!r}") from None


def _geojson_points(obj: object, path: Path) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []

    def coords(geometry: dict[str, object]) -> None:
        kind, c = geometry.get("type"), geometry.get("coordinates")
        if kind == "LineString" and isinstance(c, list):
            out.extend(_point(p[1], p[0], path) for p in c)
        elif kind == "Point" and isinstance(c, list):
            out.append(_point(c[1], c[0], path))
        elif kind == "MultiLineString" and isinstance(c, list):
            for line in c:
                out.extend(_point(p[1], p[0], path) for p in line)

    if isinstance(obj, list):  # a bare list of [lat, lon] pairs
        return [_point(p[0], p[1], path) for p in obj if isinstance(p, list) and len(p) >= 2]
    if isinstance(obj, dict):
        if obj.get("type") == "FeatureCollection":
            for feature in obj.get("features", []) or []:
                if isinstance(feature, dict) and isinstance(feature.get("geometry"), dict):
                    coords(feature["geometry"])
        elif obj.get("type") == "Feature" and isinstance(obj.get("geometry"), dict):
            coords(obj["geometry"])
        else:
            coords(obj)
    return out


# --- the interactive app --------------------------------------------------------------------------

HELP = (
    "commands: accept [OFFER] | decline [OFFER] [reason] | status ORDER STATUS [note] | "
    "fail ORDER REASON [note] | incident ORDER REASON [ETA_MIN] [note] | chat ORDER TEXT | "
    "deliver ORDER [CODE] | photo ORDER FILE | confirm ORDER [note] | "
    "outbox | help | quit"
)


class RiderApp:
    """``bloomwire rider run``: the device plus positions, console output and typed commands."""

    def __init__(
        self,
        device: RiderDevice,
        console: Console,
        *,
        source: PositionSource | None,
        interval: float,
        offers: OfferPolicy,
        read_commands: bool,
        batt_start: int = 100,
    ) -> None:
        self.device = device
        self.console = console
        self.source = source
        self.interval = interval
        self.policy = offers
        self.read_commands = read_commands
        self.batt = batt_start
        self.stop_event = asyncio.Event()
        self._typed = b""
        device.listener = self

    # listener ------------------------------------------------------------------------------

    def offer(self, offer: ev.DispatchOfferedEvent) -> None:
        """Show the offer and answer it by policy."""
        d = offer.data
        left = (d.deadline - ev.now()).total_seconds()
        self.console.print(
            f"[bold]offer[/bold] {d.offer}: order {d.order} ({d.mode}), answer within {left:.0f} s"
        )
        for label, place in (("collect at", d.pickup), ("deliver to", d.dropoff)):
            if place is not None:
                where = place.address or f"{place.lat:.5f},{place.lon:.5f}"
                self.console.print(f"  {label} {where}")
        if self.policy == "ask":
            self.console.print(f"  type `accept {d.offer}` or `decline {d.offer} [reason]`")
            return
        accept = self.policy == "accept"
        self.device.reply(d.offer, accept, order=d.order, reason="" if accept else "declined by flag")
        self.console.print(f"  {'accepted' if accept else 'declined'} (by --offers {self.policy})")

    def chat(self, chat: ev.OrderChatPostedEvent) -> None:
        """Show a chat line."""
        self.console.print(f"[cyan]chat[/cyan] {chat.data.order} {chat.data.author}: {chat.data.text}")

    def amendment(self, amendment: ev.OrderAmendedEvent) -> None:
        """Show what changed; ask for a confirmation of a new door or new instructions."""
        d = amendment.data
        who = "at the customer's request" if d.asked_by == "customer" else "by the shop"
        why = f": {d.reason}" if d.reason else ""
        self.console.print(
            f"[bold yellow]order {d.order} changed[/bold yellow] ({who}{why})", highlight=False
        )
        for line in describe_amendment(amendment):
            self.console.print(f"  {line}", markup=False, highlight=False)
        if needs_confirmation(amendment):
            self.console.print(f"  type `confirm {d.order}` once you have seen it", markup=False)

    def stored(self, entries: Sequence[Entry]) -> None:
        """Say which events the store now holds (positions are not worth a line)."""
        for e in entries:
            if e.kind != LOCATION:
                self.console.print(f"[green]stored[/green] {e.kind} {e.id}")

    def refused(self, entry: Entry | None, refusal: ev.Refusal) -> None:
        """Show why the backbone refused an event."""
        what = f"{entry.kind} {entry.id}" if entry else (refusal.id or refusal.topic)
        self.console.print(f"[bold red]refused[/bold red] {what}: {refusal.reason}")

    # loops -----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Until Ctrl-C / SIGTERM / ``quit``: positions, offers, typed commands."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop_event.set)
        reading = False
        if self.read_commands:
            with contextlib.suppress(OSError, ValueError, NotImplementedError):
                loop.add_reader(sys.stdin.fileno(), self._on_stdin)
                reading = True
        pending = self.device.outbox.count(records_only=True)
        self.console.print(
            f"rider {self.device.rider} online; {pending} event(s) from earlier waiting for an ack. "
            + (HELP if reading else "Ctrl-C stops."),
            markup=False,
        )
        task = asyncio.create_task(self._positions()) if self.source is not None else None
        try:
            await self.stop_event.wait()
        finally:
            if reading:
                with contextlib.suppress(Exception):
                    loop.remove_reader(sys.stdin.fileno())
            await cancel_and_wait(task)
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)

    async def _positions(self) -> None:
        assert self.source is not None
        started = time.monotonic()
        while True:
            lat, lon, speed = self.source.at(time.monotonic() - started)
            self.device.position(lat, lon, vel=speed, batt=self.batt)
            await asyncio.sleep(self.interval)

    def _on_stdin(self) -> None:
        # Read the file descriptor, not sys.stdin: a buffered readline() would keep further lines
        # in Python's buffer where the event loop never sees them.
        try:
            data = os.read(sys.stdin.fileno(), 65536)
        except OSError:
            data = b""
        if not data:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(sys.stdin.fileno())
            data = b"\n" if self._typed else b""
        self._typed += data
        while b"\n" in self._typed:
            raw, _, self._typed = self._typed.partition(b"\n")
            try:
                self.command(raw.decode("utf-8", errors="replace"))
            except (UsageError, ClientError) as exc:
                self.console.print(f"[red]error:[/red] {exc}")

    def command(self, line: str) -> None:
        """Run one typed command."""
        words = line.strip().split()
        if not words:
            return
        verb, args = words[0].lower(), words[1:]
        d = self.device
        if verb in ("quit", "exit"):
            self.stop_event.set()
        elif verb == "help":
            self.console.print(HELP, markup=False)
        elif verb == "outbox":
            for e in d.outbox.pending():
                self.console.print(f"  {e.kind:8} {e.id} sent {e.attempts}x")
            self.console.print(f"{d.outbox.count()} waiting for an ack")
        elif verb in ("accept", "decline"):
            offer = args[0] if args else (next(reversed(d.offers)) if d.offers else None)
            if offer is None:
                raise UsageError("no offer to answer")
            eid = d.reply(offer, verb == "accept", reason=" ".join(args[1:]))
            self.console.print(f"sent {verb} of {offer} ({eid})")
        elif not self._order_command(verb, args):
            raise UsageError(f"cannot read {line.strip()!r}; type help for the commands")

    def _order_command(self, verb: str, args: list[str]) -> bool:
        """Run a typed command about one order; False if ``verb``/``args`` is not one."""
        d = self.device
        if verb == "status" and len(args) >= 2:
            eid = d.status(args[0], args[1], note=" ".join(args[2:]))
            self.console.print(f"sent status {args[1]} for {args[0]} ({eid})")
        elif verb == "fail" and len(args) >= 2:
            eid = d.status(args[0], OrderStatus.FAILED, reason=args[1], note=" ".join(args[2:]))
            self.console.print(f"sent failed ({args[1]}) for {args[0]} ({eid})")
        elif verb == "incident" and len(args) >= 2:
            eta, rest = None, args[2:]
            if rest and _is_number(rest[0]):
                eta = ev.now() + timedelta(minutes=float(rest[0]))
                rest = rest[1:]
            eid = d.incident(args[0], args[1], eta=eta, note=" ".join(rest))
            self.console.print(f"sent incident {args[1]} for {args[0]} ({eid})")
        elif verb == "deliver" and args:
            eid = d.status(args[0], OrderStatus.DELIVERED, code=args[1] if len(args) > 1 else None)
            self.console.print(f"sent delivered for {args[0]} ({eid})")
        elif verb == "photo" and len(args) == 2:
            eid = d.photo(args[0], read_photo(Path(args[1])))
            self.console.print(f"sent photo for {args[0]} ({eid})")
        elif verb == "chat" and len(args) >= 2:
            eid = d.chat(args[0], " ".join(args[1:]))
            self.console.print(f"sent chat on {args[0]} ({eid})")
        elif verb == "confirm" and args:
            eid = d.confirm(args[0], note=" ".join(args[1:]))
            self.console.print(f"sent confirmation of the change to {args[0]} ({eid})")
        else:
            return False
        return True


def sample_photo(label: str, size: tuple[int, int] = (320, 240)) -> bytes:
    """A small JPEG standing in for a phone's delivery photo (the demo's riders send these)."""
    digest = hashlib.sha256(label.encode()).digest()
    out = io.BytesIO()
    Image.new("RGB", size, (digest[0], digest[1], digest[2])).save(out, "JPEG", quality=80)
    return out.getvalue()


def read_photo(path: Path) -> bytes:
    """A photo file's bytes, refused early when it cannot be one (too big to read whole)."""
    try:
        size = path.stat().st_size
        if size > MAX_PHOTO_BYTES:
            raise UsageError(f"{path} is {size} bytes (a photo may have at most {MAX_PHOTO_BYTES})")
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
