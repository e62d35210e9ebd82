"""When to tell a customer what (pure: no I/O). Each rule answers the notices one event calls for;
the caller sends those not sent yet (:attr:`Notice.key` names a notice once per order).

- picked up, delivered, failed: the order's canonical status (delivered with its proof as the
  store holds it then: the handover code it required, the rider's photo if already stored);
- amended: each ``order.amended`` (what changed, who asked, why), once per amendment;
- on the way: the first arrival estimate once the order is out (a position with an ETA, or
  ``en_route`` when the store has one);
- arriving: the rider within :data:`NEAR_M` of the door or :data:`SOON` from it, or ``arrived``;
- delayed: an incident (each one: its reason and new ETA), or the estimate slipping past the
  promised window's end while the window is still open, or the window about to end with no
  estimate yet (the last two once, as one notice: said before the promise breaks).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from bloomwire.contract import events as ev
from bloomwire.contract.events import NoticeKind
from bloomwire.contract.geo import distance_m
from bloomwire.contract.lifecycle import OrderStatus

K = NoticeKind
S = OrderStatus
#: The rider is this close to the door: arriving.
NEAR_M: Final = 150.0
#: Or this close in time.
SOON: Final = timedelta(minutes=2)
#: The key of the delay said because the estimate slipped past the window.
LATE: Final = "late"
#: By more than this (an ETA a few seconds over is noise, not news).
SLIP: Final = timedelta(minutes=1)
#: An open order whose window ends within this, with no ETA or one past the window, is late.
LEAD: Final = timedelta(minutes=5)
_BY_STATUS: Final = {
    S.PICKED_UP: K.PICKED_UP,
    S.ARRIVED: K.ARRIVING,
    S.DELIVERED: K.DELIVERED,
    S.FAILED: K.FAILED,
}


@dataclass(frozen=True, slots=True)
class OrderFacts:
    """What the store says of one order, as the notices need it."""

    order: str
    shop: str
    language: ev.Language
    window_end: datetime
    lat: float
    lon: float
    eta: datetime | None
    #: Proof of delivery as the store holds it: ``delivered`` needed the handover code; a photo.
    code_required: bool = False
    photo: bool = False


@dataclass(frozen=True, slots=True)
class Notice:
    """A notice to send: its kind, what makes it unique on the order, what it says, when."""

    kind: NoticeKind
    key: str
    at: datetime
    eta: datetime | None = None
    reason: str = ""
    #: Sentences said after the main one (``proof_code``, ``proof_photo``: keys of the templates).
    proof: tuple[str, ...] = ()
    #: The amendment an ``amended`` notice speaks of (its changes, who asked, why).
    amendment: ev.OrderAmendment | None = None


def proof_of(facts: OrderFacts) -> tuple[str, ...]:
    """What proves the delivery, as far as the store knows now (a photo may come after)."""
    return (("proof_code",) if facts.code_required else ()) + (("proof_photo",) if facts.photo else ())


def key(kind: NoticeKind, extra: str = "") -> str:
    """The notice's name on its order: its kind, and for a repeatable kind what it is about."""
    return f"{kind.value}/{extra}" if extra else kind.value


def on_status(facts: OrderFacts, event: ev.Event, at: datetime) -> list[Notice]:
    """The notices a canonical status-topic event calls for."""
    if isinstance(event, ev.OrderIncidentReportedEvent):
        eta = event.data.eta or facts.eta
        return [Notice(K.DELAYED, key(K.DELAYED, event.id), at, eta, event.data.reason)]
    if isinstance(event, ev.OrderAmendedEvent):  # one per amendment: its id names the notice
        return [Notice(K.AMENDED, key(K.AMENDED, event.id), at, amendment=event.data)]
    if not isinstance(event, ev.OrderStatusChangedEvent):
        return []
    status = event.data.status
    if status is S.EN_ROUTE and facts.eta is not None:
        return [Notice(K.ON_THE_WAY, key(K.ON_THE_WAY), at, facts.eta)]
    kind = _BY_STATUS.get(status)
    if kind is None:
        return []
    reason = event.data.reason.value if status is S.FAILED and event.data.reason else ""
    proof = proof_of(facts) if status is S.DELIVERED else ()
    return [Notice(kind, key(kind), at, reason=reason, proof=proof)]


def on_location(
    facts: OrderFacts, loc: ev.OrderLocation, at: datetime, *, by_eta: bool = True
) -> list[Notice]:
    """The notices a position of the carrying rider (with its ETA) calls for; ``by_eta``: those the
    ETA alone decides too (a slip past the window, arriving by time)."""
    eta, seen = loc.eta, loc.position.at
    if eta is None:
        return []
    notices = [Notice(K.ON_THE_WAY, key(K.ON_THE_WAY), at, eta)]
    if by_eta and eta - facts.window_end > SLIP and seen < facts.window_end:
        notices.append(Notice(K.DELAYED, key(K.DELAYED, LATE), at, eta, LATE))
    near = distance_m(loc.position.lat, loc.position.lon, facts.lat, facts.lon) <= NEAR_M
    if near or (by_eta and eta - seen <= SOON):
        notices.append(Notice(K.ARRIVING, key(K.ARRIVING), at, eta))
    return notices


def on_clock(facts: OrderFacts, now: datetime) -> list[Notice]:
    """The delay an open order's clock calls for: its window ends within :data:`LEAD` and no ETA
    (not out yet) or one past the window says it will be kept. Said once, before the window ends."""
    if not now < facts.window_end <= now + LEAD:
        return []
    if facts.eta is not None and facts.eta - facts.window_end <= SLIP:
        return []
    return [Notice(K.DELAYED, key(K.DELAYED, LATE), now, facts.eta, LATE)]


#: A notice no longer worth saying once one of these was said (the news overtook it).
_OVERTAKEN: Final = {
    K.ON_THE_WAY: frozenset({K.ARRIVING, K.DELIVERED, K.FAILED}),
    K.ARRIVING: frozenset({K.DELIVERED, K.FAILED}),
    K.DELAYED: frozenset({K.DELIVERED, K.FAILED}),  # a flat tyre at the last corner is still news
    K.PICKED_UP: frozenset({K.DELIVERED, K.FAILED}),
}


def overtaken(notice: Notice, said: set[NoticeKind]) -> bool:
    """Whether ``notice`` comes too late, the order's customer having heard of ``said`` already."""
    return bool(_OVERTAKEN.get(notice.kind, frozenset()) & said)
