"""What the shop terminal and the customer tracker know, built from MQTT messages only, and drawn.

:class:`ShopView` folds everything under ``shops/S/#`` (retained order and rider states, canonical
status and chat, alerts, refusals) into one table per shop; :class:`TrackView` folds the four
channels a customer may read. Both are plain objects: feed them ``(topic, payload)`` and render
them with any Rich console (a recording console in tests).
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime

from pydantic import ValidationError
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from bloomwire.contract import events as ev
from bloomwire.contract import geo, topics
from bloomwire.contract.lifecycle import CLOSED, OUT_FOR_DELIVERY, OrderStatus
from bloomwire.errors import PayloadError

FEED_LINES = 8

STATUS_STYLE: dict[str, str] = {
    "created": "white",
    "assigned": "yellow",
    "accepted": "yellow",
    "declined": "magenta",
    "picked_up": "cyan",
    "en_route": "cyan",
    "arrived": "cyan",
    "delivered": "green",
    "failed": "red",
    "returned": "red",
    "cancelled": "dim",
}


def clock(at: datetime | None) -> str:
    """``HH:MM`` in local time (a dash for None)."""
    return at.astimezone().strftime("%H:%M") if at is not None else "–"


def clock_s(at: datetime | None) -> str:
    """``HH:MM:SS`` in local time."""
    return at.astimezone().strftime("%H:%M:%S") if at is not None else "–"


def age(seconds: float) -> str:
    """A short age: ``4 s``, ``3 min``, ``2 h``."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def lateness(when: datetime, window: ev.Window) -> str:
    """How ``when`` compares with the promised window: ``on time``, ``before the window``, ``12 min late``."""
    if when > window.end:
        return f"{age((when - window.end).total_seconds())} late"
    if when < window.start:
        return "before the window"
    return "on time"


def amendment_words(fields: list[str]) -> str:
    """What a confirmation confirms: ``the new address``, ``the new instructions``, or both."""
    words = []
    if {"address", "position"} & set(fields):
        words.append("address")
    if "instructions" in fields:
        words.append("instructions")
    return f"the new {' and '.join(words)}" if words else "the change"


def _decode(payload: bytes) -> ev.Event | None:
    try:
        return ev.decode(payload)
    except PayloadError:
        return None


# --- shop -----------------------------------------------------------------------------------------


@dataclass
class OrderLine:
    """One order as the shop terminal sees it."""

    order: str
    status: str = "created"
    rider: str | None = None
    customer: str = ""
    window: ev.Window | None = None
    eta: datetime | None = None
    updated_at: datetime | None = None
    open_alerts: int = 0
    note: str = ""
    closed_at: datetime | None = None
    #: Why it failed (kept after ``returned``, whose own event carries no reason).
    reason: str | None = None


@dataclass
class AlertLine:
    """One alert of the shop's feed."""

    alert: str
    rule: str
    severity: str
    order: str | None
    message: str
    status: str = "open"
    raised_at: datetime | None = None


def _told(event: ev.OrderRatedEvent | ev.OrderNotifiedEvent) -> str:
    """A rating, or a notice told the customer, as a line of the shop's feed."""
    if isinstance(event, ev.OrderNotifiedEvent):
        return f"notice ({event.data.kind.value}): {event.data.text}"
    comment = f": {event.data.comment}" if event.data.comment else ""
    return f"rated {event.data.stars}/5{comment}"


@dataclass
class ShopView:
    """Every order of shop ``shop``, its riders and its alerts."""

    shop: str
    orders: dict[str, OrderLine] = field(default_factory=dict)
    riders: dict[str, ev.RiderState] = field(default_factory=dict)
    alerts: dict[str, AlertLine] = field(default_factory=dict)
    feed: deque[str] = field(default_factory=lambda: deque(maxlen=FEED_LINES))
    errors: deque[ev.Refusal] = field(default_factory=lambda: deque(maxlen=FEED_LINES))
    #: Customer accesses the provisioner published (access-control mode), by order.
    accesses: dict[str, ev.CustomerAccess] = field(default_factory=dict)
    #: amendment id -> the fields it changed (a rider's confirmation names them)
    amended: dict[str, list[str]] = field(default_factory=dict)
    messages: int = 0

    def line(self, order: str) -> OrderLine:
        """The line of ``order`` (created on first sight)."""
        found = self.orders.get(order)
        if found is None:
            found = self.orders[order] = OrderLine(order)
        return found

    def apply(self, topic: str, payload: bytes) -> ev.Event | ev.Refusal | None:
        """Fold one message from ``shops/S/#`` in; return the decoded event, if any."""
        levels = topic.split("/")
        if len(levels) < 3 or levels[0] != topics.SHOPS or levels[1] != self.shop:
            return None
        self.messages += 1
        try:
            if levels[2] == "orders" and len(levels) == 5:
                return self._order_message(levels[3], levels[4], payload)
            if levels[2] == "alerts" and len(levels) == 3:
                event = _decode(payload)
                self._alert(event)
                return event
            if levels[2] == "riders" and len(levels) == 5 and levels[4] == "state":
                if payload:
                    self.riders[levels[3]] = ev.RiderState.model_validate_json(payload)
                return None
            if levels[2] == "errors":
                refusal = ev.Refusal.model_validate_json(payload)
                self.errors.append(refusal)
                return refusal
        except (ValidationError, ValueError):
            return None
        return None  # our own commands echoed back, and anything newer than this client

    def _order_message(self, order: str, channel: str, payload: bytes) -> ev.Event | None:
        if channel == topics.ACCESS:
            if payload:
                self.accesses[order] = ev.CustomerAccessGrantedEvent.model_validate_json(payload).data
            else:  # revoked
                self.accesses.pop(order, None)
            return None
        if channel == topics.OrderChannel.STATE:
            if not payload:
                return None
            state = ev.OrderState.model_validate_json(payload)
            line = self.line(order)
            line.status = state.status.value
            line.rider = state.rider
            line.customer = state.customer
            line.window = state.window
            line.eta = state.eta
            line.updated_at = state.updated_at
            line.open_alerts = state.open_alerts
            if state.status in CLOSED and state.timeline:
                line.closed_at = state.timeline[-1].at
                if state.status in (OrderStatus.FAILED, OrderStatus.RETURNED) and state.timeline[-1].note:
                    line.reason = state.timeline[-1].note
            return None
        if channel == topics.OrderChannel.LOCATION:
            loc = ev.OrderLocation.model_validate_json(payload)
            line = self.line(order)
            line.eta = loc.eta or line.eta
            line.updated_at = max(line.updated_at or loc.position.at, loc.position.at)
            return None
        event = _decode(payload)
        if isinstance(event, ev.OrderStatusChangedEvent):
            line = self.line(order)
            d = event.data
            line.status = d.status.value
            line.rider = d.rider
            line.note = d.note
            line.updated_at = event.time
            if d.reason is not None:
                line.reason = d.reason.value
            if d.status in CLOSED:
                line.closed_at = event.time
            extra = f" ({d.reason.value})" if d.reason else ""
            who = f" · {d.rider}" if d.rider else ""
            self.feed.append(f"{clock_s(event.time)} {order} {d.status.value}{extra}{who}")
        elif isinstance(event, ev.OrderIncidentReportedEvent):
            line = self.line(order)
            line.eta = event.data.eta or line.eta
            line.note = event.data.reason
            line.updated_at = event.time
            eta = f", new ETA {clock(event.data.eta)}" if event.data.eta else ""
            self.feed.append(f"{clock_s(event.time)} {order} incident: {event.data.reason}{eta}")
        elif channel == topics.OrderChannel.ALERTS:
            self._alert(event)
        elif event is not None and (said := self._said(event)):
            self.feed.append(f"{clock_s(event.time)} {order} {said}")
        return event

    def _said(self, event: ev.Event) -> str:
        """The feed line of a rating, a notice, a chat line or an amendment ("" for anything else)."""
        if isinstance(event, ev.OrderRatedEvent | ev.OrderNotifiedEvent):
            return _told(event)
        if isinstance(event, ev.OrderChatPostedEvent):
            return f"💬 {event.data.author}: {event.data.text}"
        if isinstance(event, ev.OrderAmendedEvent | ev.OrderAmendmentConfirmedEvent):
            return self._amendment(event)
        return ""

    def _amendment(self, event: ev.OrderAmendedEvent | ev.OrderAmendmentConfirmedEvent) -> str:
        """``amended: window end, address (customer: …)`` / ``r2 confirmed the new address``."""
        if isinstance(event, ev.OrderAmendedEvent):
            d = event.data
            self.amended[event.id] = [f.value for f in d.changes]
            fields = ", ".join(f.value.replace("_", " ") for f in d.changes)
            why = f": {d.reason}" if d.reason else ""
            return f"amended: {fields} ({d.asked_by}{why})"
        c = event.data
        return f"{c.rider or 'the rider'} confirmed {amendment_words(self.amended.get(c.amendment, []))}"

    def _alert(self, event: ev.Event | None) -> None:
        if isinstance(event, ev.AlertRaisedEvent):
            d = event.data
            self.alerts[d.alert] = AlertLine(
                d.alert, d.rule.value, d.severity.value, d.order, d.message, "open", event.time
            )
        elif isinstance(event, ev.AlertAcknowledgedEvent | ev.AlertResolvedEvent | ev.AlertEscalatedEvent):
            found = self.alerts.get(event.data.alert)
            if found is None:
                return
            if isinstance(event, ev.AlertAcknowledgedEvent) and found.status == "open":
                found.status = "acknowledged"
            elif isinstance(event, ev.AlertResolvedEvent):
                found.status = "resolved"
            elif isinstance(event, ev.AlertEscalatedEvent):
                found.message = event.data.message or found.message

    def open_alerts(self, order: str | None = None) -> list[AlertLine]:
        """Unresolved alerts (of one order, if given), newest first."""
        found = [
            a for a in self.alerts.values() if a.status != "resolved" and (order is None or a.order == order)
        ]
        return sorted(found, key=lambda a: a.raised_at or datetime.min.astimezone(), reverse=True)

    def render(self, now: datetime | None = None, *, limit: int = 40) -> RenderableType:
        """The orders table, the open alerts and the recent activity."""
        now = now or ev.now()
        table = Table(title=f"Shop {self.shop} — {len(self.orders)} order(s)", expand=False)
        for col in ("order", "status", "rider", "customer", "promise / ETA", "updated", "alerts"):
            table.add_column(col)

        def sort_key(line: OrderLine) -> tuple[int, float]:
            closed = line.status in {s.value for s in CLOSED}
            start = line.window.start.timestamp() if line.window else 0.0
            return (1 if closed else 0, start)

        for line in sorted(self.orders.values(), key=sort_key)[:limit]:
            table.add_row(
                line.order,
                Text(line.status, style=STATUS_STYLE.get(line.status, "")),
                line.rider or "–",
                line.customer or "–",
                self._promise(line, now),
                age((now - line.updated_at).total_seconds()) if line.updated_at else "–",
                self._alert_cell(line),
            )
        parts: list[RenderableType] = [table]
        open_alerts = self.open_alerts()
        if open_alerts:
            alerts = Table(title="Open alerts", expand=False)
            for col in ("alert", "rule", "severity", "order", "status", "message"):
                alerts.add_column(col)
            for a in open_alerts[:10]:
                alerts.add_row(a.alert, a.rule, a.severity, a.order or "–", a.status, a.message)
            parts.append(alerts)
        if self.feed:
            parts.append(Text("recent: " + " | ".join(list(self.feed)[-4:]), style="dim"))
        if self.errors:
            last = self.errors[-1]
            parts.append(Text(f"last refusal: {last.reason}", style="red"))
        return Group(*parts)

    @staticmethod
    def _promise(line: OrderLine, now: datetime) -> Text:
        if line.window is None:
            return Text("–")
        window = f"{clock(line.window.start)}–{clock(line.window.end)}"
        if line.status == OrderStatus.DELIVERED and line.closed_at is not None:
            verdict = lateness(line.closed_at, line.window)
            style = "red" if "late" in verdict else "green"
            return Text(f"{window} · delivered {clock(line.closed_at)} {verdict}", style=style)
        if line.status in {s.value for s in OUT_FOR_DELIVERY} and line.eta is not None:
            verdict = lateness(line.eta, line.window)
            style = "red" if "late" in verdict else "green"
            return Text(f"{window} · ETA {clock(line.eta)} {verdict}", style=style)
        if line.status not in {s.value for s in CLOSED} and now > line.window.end:
            return Text(f"{window} · overdue {age((now - line.window.end).total_seconds())}", style="red")
        return Text(window)

    def _alert_cell(self, line: OrderLine) -> Text:
        found = self.open_alerts(line.order)
        if found:
            return Text(", ".join(a.rule for a in found), style="bold red")
        return Text(str(line.open_alerts) if line.open_alerts else "")


# --- customer -------------------------------------------------------------------------------------


@dataclass
class TrackView:
    """One order as its customer sees it: timeline, ETA, the rider's distance, chat."""

    shop: str
    order: str
    destination: tuple[float, float] | None = None
    state: ev.OrderState | None = None
    location: ev.OrderLocation | None = None
    timeline: list[tuple[datetime, str, str]] = field(default_factory=list)
    chat: list[tuple[datetime, str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    #: Messages about anything but this order (a correct tracker never gets any).
    foreign: int = 0
    last_message_at: float = 0.0

    def _own(self, channel: str) -> str:
        return topics.order_topic(self.shop, self.order, channel)

    def apply(self, topic: str, payload: bytes) -> ev.Event | None:
        """Fold one message in (only this order's topics and this customer's inbox count)."""
        own = {self._own(c): c for c in topics.CUSTOMER_CHANNELS}
        channel = own.get(topic)
        if channel is None:
            if topic.startswith(f"{topics.CUSTOMERS}/") and "/inbox/" in topic:
                if topic.endswith("/errors"):
                    with contextlib.suppress(ValidationError):
                        self.errors.append(ev.Refusal.model_validate_json(payload).reason)
                return None
            self.foreign += 1
            return None
        self.last_message_at = time.monotonic()
        try:
            if channel == topics.OrderChannel.STATE:
                if payload:
                    self.state = ev.OrderState.model_validate_json(payload)
                    for entry in self.state.timeline:
                        self._add_step(entry.at, entry.status, entry.note)
                return None
            if channel == topics.OrderChannel.LOCATION:
                self.location = ev.OrderLocation.model_validate_json(payload)
                return None
        except ValidationError:
            return None
        event = _decode(payload)
        if isinstance(event, ev.OrderStatusChangedEvent):
            if self.state is not None:
                self.state = self.state.model_copy(update={"status": event.data.status})
            self._add_step(event.time, event.data.status.value, event.data.note)
        elif isinstance(event, ev.OrderIncidentReportedEvent):
            eta = f" — new ETA {clock(event.data.eta)}" if event.data.eta else ""
            self._add_step(event.time, "incident", f"{event.data.reason}{eta}")
            if event.data.eta is not None and self.state is not None:
                self.state = self.state.model_copy(update={"eta": event.data.eta})
        elif isinstance(event, ev.OrderChatPostedEvent):
            self.chat.append((event.time, event.data.author, event.data.text))
        elif isinstance(event, ev.OrderAmendedEvent):
            d = event.data
            who = "at your request" if d.asked_by == "customer" else "by the shop"
            why = f": {d.reason}" if d.reason else ""
            fields = ", ".join(f.value.replace("_", " ") for f in d.changes)
            self._add_step(event.time, "amended", f"{fields} ({who}{why})")
        return event

    def _add_step(self, at: datetime, status: str, note: str) -> None:
        for i, (known_at, known_status, known_note) in enumerate(self.timeline):
            if known_status == status and abs((known_at - at).total_seconds()) < 1:
                if note and not known_note:
                    self.timeline[i] = (known_at, status, note)
                return
        self.timeline.append((at, status, note))
        self.timeline.sort(key=lambda t: t[0])

    @property
    def status(self) -> str | None:
        """The order's current status, if known."""
        return self.state.status.value if self.state is not None else None

    @property
    def eta(self) -> datetime | None:
        """The latest ETA while out for delivery."""
        if self.status not in {s.value for s in OUT_FOR_DELIVERY}:
            return None
        if self.location is not None and self.location.eta is not None:
            return self.location.eta
        return self.state.eta if self.state is not None else None

    def rider_position(self) -> ev.Position | None:
        """Where the rider is (only while out for delivery)."""
        if self.status not in {s.value for s in OUT_FOR_DELIVERY}:
            return None
        if self.location is not None:
            return self.location.position
        return self.state.position if self.state is not None else None

    def distance_m(self) -> float | None:
        """Straight-line metres from the rider to the destination, if both are known."""
        pos = self.rider_position()
        target = self.destination
        if target is None and self.state is not None and self.state.destination is not None:
            target = (self.state.destination.lat, self.state.destination.lon)
        if pos is None or target is None:
            return None
        return geo.distance_m(pos.lat, pos.lon, target[0], target[1])

    def render(self, now: datetime | None = None) -> RenderableType:
        """Status, promise, ETA and distance, the timeline and the chat."""
        now = now or ev.now()
        if self.state is None:
            return Text(f"Order {self.order}: waiting for its state …", style="dim")
        s = self.state
        head = Text()
        head.append(f"Order {self.order} from {self.shop}: ", style="bold")
        head.append(s.status.value, style=STATUS_STYLE.get(s.status.value, ""))
        head.append(f"\npromised {clock(s.window.start)}–{clock(s.window.end)}")
        if self.eta is not None:
            head.append(f" · ETA {clock(self.eta)} ({lateness(self.eta, s.window)})")
        dist = self.distance_m()
        if dist is not None:
            head.append(f" · rider {dist / 1000:.1f} km away")
        elif self.rider_position() is not None:
            head.append(" · rider on the way (give --at LAT,LON for the distance)")
        steps = Table("time", "step", "note", title="Timeline", expand=False)
        for at, status, note in self.timeline[-15:]:
            steps.add_row(clock_s(at), status, note)
        parts: list[RenderableType] = [head, steps]
        if self.chat:
            chat = Table("time", "from", "text", title="Chat", expand=False)
            for at, author, text in self.chat[-10:]:
                chat.add_row(clock_s(at), author, text)
            parts.append(chat)
        if self.errors:
            parts.append(Text(f"refused: {self.errors[-1]}", style="red"))
        return Group(*parts)
