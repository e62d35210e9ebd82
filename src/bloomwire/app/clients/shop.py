"""The shop terminal: create, assign, cancel, chat and acknowledge alerts; watch every order.

A command is one CloudEvent published on ``shops/S/commands/…``. The terminal knows it worked when
``shops/S/acks`` names its id (the persister acks a re-sent duplicate too, which it does not echo)
or its canonical echo (same id) arrives under ``shops/S/orders/…`` or ``shops/S/alerts``, and
that it was refused when ``shops/S/errors`` names its id. Until then it stays in the terminal's
:class:`~bloomwire.app.clients.outbox.Outbox` and is re-published (same id) after every
reconnection and when overdue (the persister dedupes by id, so that can never do it twice).
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from bloomwire.app.clients.access import AccessIssuer, CustomerAccess, UsernameOnly, customer_username
from bloomwire.app.clients.base import (
    DEFAULT_ANSWER_TIMEOUT_S,
    Client,
    NullObserver,
    Observer,
    Outcome,
    UsageError,
    Waiters,
    build_data,
    check_name,
    check_point,
    wait_event,
)
from bloomwire.app.clients.outbox import Entry, Outbox
from bloomwire.app.clients.sender import RESEND_AFTER_S, OutboxSender, memory_outbox, wait_confirmed
from bloomwire.app.clients.views import ShopView
from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.contract.topics import Command
from bloomwire.runtime.mqtt import Message
from bloomwire.runtime.settings import Settings

_HHMM = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*[-–]\s*(\d{1,2}):(\d{2})\s*$")
_HHMM_ONE = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*$")


def new_order_id(now: datetime | None = None) -> str:
    """A fresh order id, e.g. ``o-270214-3fa9c1``."""
    now = now or ev.now()
    return f"o-{now:%y%m%d}-{secrets.token_hex(3)}"


def parse_window(text: str, *, now: datetime | None = None) -> ev.Window:
    """A promised window from ``HH:MM-HH:MM`` (today, local time) or ``ISO/ISO``.

    Raises :class:`UsageError` naming what is wrong: unreadable, end before start, longer than a
    day, or already over.
    """
    now = now or ev.now()
    local_now = now.astimezone()
    m = _HHMM.match(text)
    if m:
        h1, m1, h2, m2 = (int(g) for g in m.groups())
        for h, mi in ((h1, m1), (h2, m2)):
            if h > 23 or mi > 59:
                raise UsageError(f"promised window {text!r}: {h:02d}:{mi:02d} is not a time of day")
        start = local_now.replace(hour=h1, minute=m1, second=0, microsecond=0)
        end = local_now.replace(hour=h2, minute=m2, second=0, microsecond=0)
    elif "/" in text:
        a, _, b = text.partition("/")
        try:
            start, end = datetime.fromisoformat(a.strip()), datetime.fromisoformat(b.strip())
        except ValueError as exc:
            raise UsageError(f"promised window {text!r}: {exc}") from None
        if start.tzinfo is None:
            start = start.astimezone()
        if end.tzinfo is None:
            end = end.astimezone()
    else:
        raise UsageError(
            f"promised window {text!r} must be HH:MM-HH:MM (today) or START/END in ISO 8601, e.g. 14:00-16:00"
        )
    try:
        window = ev.Window(start=start, end=end)
    except ValidationError as exc:
        raise UsageError(f"promised window {text!r}: {ev.describe_validation_error(exc)}") from None
    if window.end <= now:
        raise UsageError(
            f"promised window {text!r} ended at {window.end.astimezone():%Y-%m-%d %H:%M}; "
            "a new order needs a window in the future"
        )
    return window


@dataclass
class OrderDraft:
    """Everything the shop types in for a new order."""

    customer_name: str
    lat: float
    lon: float
    window: ev.Window
    phone: str = ""
    address: str = ""
    items: Sequence[str] = ()
    note: str = ""
    order: str | None = None
    pickup: tuple[float, float] | None = None
    #: The customer's language (None: the shop's).
    language: ev.Language | None = None
    #: The rider must enter the order's handover code to report it delivered (issue 16).
    require_code: bool = False

    def build(self, shop: str) -> ev.OrderCreateEvent:
        """The ``order.create`` request, validated (a :class:`UsageError` names the bad field)."""
        order = check_name(self.order or new_order_id(), "order")
        check_point(self.lat, self.lon, "customer position")
        if self.pickup is not None:
            check_point(*self.pickup, "pickup position")
        data = build_data(
            ev.OrderCreated,
            order=order,
            customer={
                "name": self.customer_name,
                "phone": self.phone,
                "address": self.address,
                "lat": self.lat,
                "lon": self.lon,
            },
            window=self.window,
            items=list(self.items),
            note=self.note,
            pickup_lat=self.pickup[0] if self.pickup else None,
            pickup_lon=self.pickup[1] if self.pickup else None,
            customer_username=customer_username(order),
            language=self.language,
            handover_code_required=self.require_code,
        )
        return ev.OrderCreateEvent(source=f"{topics.SHOPS}/{shop}", data=data)


def parse_time(text: str, what: str, *, now: datetime | None = None) -> datetime:
    """A point in time from ``HH:MM`` (today, local time) or ISO 8601; :class:`UsageError` if neither."""
    now = now or ev.now()
    m = _HHMM_ONE.match(text)
    if m:
        hour, minute = int(m.group(1)), int(m.group(2))
        if hour > 23 or minute > 59:
            raise UsageError(f"{what} {text!r}: {hour:02d}:{minute:02d} is not a time of day")
        return now.astimezone().replace(hour=hour, minute=minute, second=0, microsecond=0)
    try:
        at = datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(f"{what} {text!r} must be HH:MM (today) or ISO 8601, e.g. 16:30") from None
    return at if at.tzinfo is not None else at.astimezone()


def parse_instructions(text: str) -> ev.Instructions:
    """``call_first``, ``leave_at_door``, ``hand_to_reception``, ``none``, or free text."""
    kinds = {k.value: k for k in ev.InstructionKind}
    word = text.strip().lower().replace("-", "_").replace(" ", "_")
    try:
        if word in kinds:
            return ev.Instructions(kind=kinds[word])
        return ev.Instructions(kind=ev.InstructionKind.OTHER, text=text)
    except ValidationError as exc:
        raise UsageError(f"--instructions: {ev.describe_validation_error(exc)}") from None


@dataclass
class AmendDraft:
    """What the shop changes on an order (None: unchanged)."""

    order: str
    window_start: datetime | None = None
    window_end: datetime | None = None
    address: str | None = None
    position: tuple[float, float] | None = None
    items: Sequence[str] | None = None
    note: str | None = None
    phone: str | None = None
    alternate_contact: str | None = None
    instructions: ev.Instructions | None = None
    asked_by: Literal["shop", "customer"] = "shop"
    reason: str = ""

    def build(self, shop: str) -> ev.OrderAmendEvent:
        """The ``order.amend`` request, validated (a :class:`UsageError` names the bad field)."""
        values: dict[str, Any] = {
            "window_start": self.window_start,
            "window_end": self.window_end,
            "address": self.address,
            "items": None if self.items is None else list(self.items),
            "note": self.note,
            "customer_phone": self.phone,
            "alternate_contact": self.alternate_contact,
            "instructions": self.instructions,
        }
        if self.position is not None:
            values["lat"], values["lon"] = check_point(*self.position, "delivery position")
        given = {k: v for k, v in values.items() if v is not None}
        if not given:
            raise UsageError("nothing to change: give at least one of the options (see --help)")
        data = build_data(
            ev.OrderAmendment, order=self.order, asked_by=self.asked_by, reason=self.reason, **given
        )
        return ev.OrderAmendEvent(source=f"{topics.SHOPS}/{shop}", data=data)


@dataclass(frozen=True)
class Created:
    """A created order: its id and the customer's access (or the refusal)."""

    order: str
    outcome: Outcome
    access: CustomerAccess | None = None


class ShopTerminal(Client):
    """Shop ``S``'s terminal on MQTT: commands out, everything under ``shops/S/#`` in."""

    what = "shop"

    def __init__(
        self,
        settings: Settings,
        shop: str,
        password: str,
        *,
        username: str | None = None,
        observer: Observer | None = None,
        access: AccessIssuer | None = None,
        access_wait_s: float = 2.0,
        on_message: Callable[[str, object], None] | None = None,
        outbox: Outbox | None = None,
        resend_after_s: float = RESEND_AFTER_S,
        persistent: bool = False,
    ) -> None:
        self.shop = check_name(shop, "shop")
        # A persistent session (with an on-disk outbox) lets the broker keep the ack of a
        # command stored while this terminal was gone.
        super().__init__(settings, check_name(username or shop, "username"), password, persistent=persistent)
        self.view = ShopView(self.shop)
        self.observer: Observer = observer or NullObserver()
        #: None: take the access the provisioner publishes (waiting up to ``access_wait_s``),
        #: else just the username.
        self.access = access
        self.access_wait_s = access_wait_s
        self.on_message = on_message
        self.waiters = Waiters()
        #: Commands not yet confirmed (None: one in memory, kept as long as the process).
        self.outbox = outbox if outbox is not None else memory_outbox()
        self.sender = OutboxSender(self.conn, self.outbox, resend_after_s=resend_after_s)
        #: Ids in the outbox: most canonical messages are other senders' events, not worth a lookup.
        self._open = {e.id for e in self.outbox.pending()}
        self._acks = topics.shop_acks(self.shop)
        self.subscribe([topics.shop_filter(self.shop)])

    async def start(self, timeout: float = 20.0, on_retry: Callable[[str], None] | None = None) -> None:
        """Connect, then publish whatever the outbox still holds, and keep sending."""
        await super().start(timeout, on_retry)
        self.sender.start()

    def _settled(self, event_id: str, stored: bool, reason: str = "") -> None:
        if event_id not in self._open:
            return
        self._open.discard(event_id)
        entry: Entry | None
        if stored:
            found = self.outbox.ack([event_id])
            entry = found[0] if found else None
        else:
            entry = self.outbox.refuse(event_id, reason)
        if entry is not None:
            self.observer.settled(event_id, stored, reason)

    # --- receiving ----------------------------------------------------------------------------

    def handle(self, msg: Message) -> None:
        """Fold the message into the view; settle commands by their ack, echo or refusal."""
        if msg.topic == self._acks:
            ack = self._acked(msg.payload)
            if self.on_message is not None and ack is not None:
                self.on_message(msg.topic, ack)
            return
        result = self.view.apply(msg.topic, msg.payload)
        if isinstance(result, ev.Refusal):
            if result.id is not None:
                self._settled(result.id, False, result.reason)
            self.waiters.resolve(result.id, False, result.reason)
        elif isinstance(result, BaseModel) and hasattr(result, "id") and not msg.retain:
            event_id = str(result.id)
            self.observer.canonical(event_id, msg.received_at)
            self._settled(event_id, True)
            self.waiters.resolve(event_id, True)
        if self.on_message is not None:
            self.on_message(msg.topic, result)

    def _acked(self, payload: bytes) -> ev.Ack | None:
        try:
            ack = ev.Ack.model_validate_json(payload)
        except ValidationError:
            return None
        for event_id in ack.ids:
            self._settled(event_id, True)
            self.waiters.resolve(event_id, True)
        return ack

    # --- commands -----------------------------------------------------------------------------

    def publish_command(self, command: Command, event: BaseModel) -> asyncio.Future[Outcome]:
        """Publish a command event; return a future for the backbone's answer."""
        event_id = str(getattr(event, "id"))  # noqa: B009 - every envelope has an id
        topic = topics.shop_command(self.shop, command)
        payload = ev.encode(event)
        fut = self.waiters.expect(event_id)
        self._open.add(event_id)
        self.sender.send(event_id, command.value, topic, payload)
        self.observer.sent(event_id, f"shop:{command.value}", time.time())
        return fut

    async def _run(self, command: Command, event: BaseModel, timeout: float, what: str) -> Outcome:
        """The answer, or :class:`~bloomwire.app.clients.sender.QueuedError` (kept, re-sent)."""
        fut = self.publish_command(command, event)
        return await wait_confirmed(fut, timeout, str(getattr(event, "id")), what)  # noqa: B009

    def _source(self) -> str:
        return f"{topics.SHOPS}/{self.shop}"

    async def create_order(self, draft: OrderDraft, *, timeout: float = DEFAULT_ANSWER_TIMEOUT_S) -> Created:
        """Publish ``order.create``; once the canonical status arrives, issue the customer access."""
        event = draft.build(self.shop)
        outcome = await self._run(Command.CREATE_ORDER, event, timeout, f"new order {event.data.order}")
        access = None
        if outcome.stored:
            order = event.data.order
            username = event.data.customer_username or customer_username(order)
            if self.access is not None:
                access = await asyncio.to_thread(self.access.issue, self.shop, order, username)
            else:
                access = await self.provisioned_access(order, username)
        return Created(event.data.order, outcome, access)

    async def provisioned_access(self, order: str, username: str) -> CustomerAccess:
        """The access the provisioner publishes for ``order`` (access-control mode), if it comes
        within ``access_wait_s``; else the bare customer username."""
        deadline = time.monotonic() + self.access_wait_s
        while order not in self.view.accesses:
            left = deadline - time.monotonic()
            if left <= 0:
                return UsernameOnly().issue(self.shop, order, username)
            self.changed.clear()
            await wait_event(self.changed, left)
        return CustomerAccess.from_provisioner(self.view.accesses[order])

    async def assign(
        self, order: str, rider: str, *, note: str = "", timeout: float = DEFAULT_ANSWER_TIMEOUT_S
    ) -> Outcome:
        """Assign (or reassign) ``order`` to ``rider``: the rider gets a manual offer."""
        data = build_data(
            ev.OrderAssigned, order=check_name(order, "order"), rider=check_name(rider, "rider"), note=note
        )
        event = ev.OrderAssignEvent(source=self._source(), data=data)
        return await self._run(Command.ASSIGN, event, timeout, f"assigning {order} to {rider}")

    async def cancel(
        self, order: str, *, reason: str = "", timeout: float = DEFAULT_ANSWER_TIMEOUT_S
    ) -> Outcome:
        """Cancel ``order`` (only before it is picked up)."""
        data = build_data(ev.OrderCancelled, order=check_name(order, "order"), reason=reason)
        event = ev.OrderCancelEvent(source=self._source(), data=data)
        return await self._run(Command.CANCEL_ORDER, event, timeout, f"cancelling {order}")

    async def chat(self, order: str, text: str, *, timeout: float = DEFAULT_ANSWER_TIMEOUT_S) -> Outcome:
        """Send a chat line on ``order`` (to the rider and the customer)."""
        data = build_data(ev.OrderChat, order=check_name(order, "order"), text=text)
        event = ev.OrderChatPostedEvent(source=self._source(), data=data)
        return await self._run(Command.CHAT, event, timeout, f"chat on {order}")

    async def amend(self, draft: AmendDraft, *, timeout: float = DEFAULT_ANSWER_TIMEOUT_S) -> Outcome:
        """Change an order after it is placed (refused, naming the rule, when too late)."""
        event = draft.build(self.shop)
        return await self._run(Command.AMEND_ORDER, event, timeout, f"amending {draft.order}")

    async def ack_alert(
        self, alert: str, *, by: str = "", timeout: float = DEFAULT_ANSWER_TIMEOUT_S
    ) -> Outcome:
        """Acknowledge an alert (someone is on it)."""
        data = ev.AlertAcknowledged(alert=check_name(alert, "alert"), by=by or self.username)
        event = ev.AlertAcknowledgeEvent(source=self._source(), data=data)
        return await self._run(Command.ACK_ALERT, event, timeout, f"acknowledging alert {alert}")

    def knows_order(self, order: str) -> bool:
        """True once the order's retained state (or any event about it) was seen."""
        return order in self.view.orders

    async def stop(self, *, announce_offline: bool = True) -> None:
        """Disconnect (unanswered commands stay in the outbox for the next start)."""
        await self.sender.stop()
        self.waiters.cancel_all()
        await super().stop(announce_offline=announce_offline)
