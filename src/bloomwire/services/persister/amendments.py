"""Amendments (issue 18): a shop changes an order after it is placed, under rules that name themselves.

- ``nothing-after-final``: a delivered, cancelled, returned or failed order changes no more;
- ``address-until-arrived``: the address and position, until the rider has arrived;
- ``items-until-picked-up``: the items, until the order is picked up;
- the window, instructions, note and contacts: until delivered (the first rule).

The request carries only new values; the stored ``order.amended`` carries each changed field with
its old value too (:attr:`UnitOfWork.recorded`). The rider holding the order gets it in its inbox
(without the customer's numbers) and confirms what it must act on (``order.amendment_confirm``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.contract.events import AmendField, FieldChange
from bloomwire.contract.lifecycle import CLOSED, OUT_FOR_DELIVERY, RIDER_BOUND, OrderStatus
from bloomwire.contract.topics import InboundTopic
from bloomwire.services.persister import riders
from bloomwire.services.persister.lifecycle import close_offer, publish_status, set_status
from bloomwire.services.persister.projections import Projections
from bloomwire.services.persister.rows import Order
from bloomwire.services.persister.work import IgnoredError, RefusedError, UnitOfWork, derived_id

S = OrderStatus
F = AmendField

RULE_FINAL = "nothing-after-final"
RULE_ADDRESS = "address-until-arrived"
RULE_ITEMS = "items-until-picked-up"
#: Keys of an amendment's data that the backbone fills in (not part of what the shop sent).
FILLED_IN = ("changes",)


def as_sent(data: Any) -> Any:
    """Stored event data without what the backbone filled in: compared with a re-sent request."""
    if isinstance(data, dict) and any(k in data for k in FILLED_IN):
        return {k: v for k, v in data.items() if k not in FILLED_IN}
    return data


def _change(changes: dict[AmendField, FieldChange], field: AmendField, old: Any, new: Any) -> None:
    if new is not None and new != old:
        changes[field] = FieldChange(old=old, new=new)


def _iso(value: Any) -> Any:
    return value.isoformat() if value is not None else None


def changes_of(order: Order, d: ev.OrderAmendment) -> dict[AmendField, FieldChange]:
    """Each field ``d`` gives a new value for, with the order's current one (JSON values)."""
    out: dict[AmendField, FieldChange] = {}
    _change(out, F.WINDOW_START, _iso(order.window_start), _iso(d.window_start))
    _change(out, F.WINDOW_END, _iso(order.window_end), _iso(d.window_end))
    _change(out, F.ADDRESS, order.address, d.address)
    if d.lat is not None and d.lon is not None:
        _change(out, F.POSITION, {"lat": order.lat, "lon": order.lon}, {"lat": d.lat, "lon": d.lon})
    _change(out, F.ITEMS, list(order.items), None if d.items is None else list(d.items))
    _change(out, F.NOTE, order.note, d.note)
    _change(out, F.CUSTOMER_PHONE, order.customer_phone, d.customer_phone)
    _change(out, F.ALTERNATE_CONTACT, order.alternate_contact, d.alternate_contact)
    if d.instructions is not None:
        old = {"kind": order.instructions, "text": order.instructions_text}
        _change(out, F.INSTRUCTIONS, old, d.instructions.model_dump(mode="json"))
    return out


def check_rules(order: Order, fields: set[AmendField]) -> None:
    """Refuse a change the order's status no longer allows, naming the rule."""
    status = S(order.status)
    if status in CLOSED:
        raise RefusedError(
            f"rule {RULE_FINAL}: order {order.id!r} is {status.value}; nothing changes after a final state"
        )
    if fields & {F.ADDRESS, F.POSITION} and status is S.ARRIVED:
        raise RefusedError(
            f"rule {RULE_ADDRESS}: the address can change until the rider has arrived; "
            f"order {order.id!r} is {status.value}"
        )
    if F.ITEMS in fields and status in OUT_FOR_DELIVERY:
        raise RefusedError(
            f"rule {RULE_ITEMS}: the items can change until the order is picked up; "
            f"order {order.id!r} is {status.value}"
        )


def _window(order: Order, d: ev.OrderAmendment) -> ev.Window:
    """The promised window after the amendment (checked as at creation)."""
    try:
        return ev.Window(start=d.window_start or order.window_start, end=d.window_end or order.window_end)
    except ValidationError as exc:
        raise RefusedError(f"data.window: {ev.describe_validation_error(exc)}") from None


def _values(order: Order, d: ev.OrderAmendment, changes: dict[AmendField, FieldChange]) -> dict[str, Any]:
    """The order columns the changes set."""
    window = _window(order, d)
    values: dict[str, Any] = {"window_start": window.start, "window_end": window.end}
    if F.ADDRESS in changes:
        values["address"] = d.address
    if F.POSITION in changes:
        values["lat"], values["lon"] = d.lat, d.lon
    if F.ITEMS in changes:
        values["items"] = list(d.items or ())
    for field in (F.NOTE, F.CUSTOMER_PHONE, F.ALTERNATE_CONTACT):
        if field in changes:
            values[field.value] = getattr(d, field.value)
    if d.instructions is not None and F.INSTRUCTIONS in changes:
        values["instructions"] = d.instructions.kind.value
        values["instructions_text"] = d.instructions.text
    return values


def amended(p: Projections, work: UnitOfWork, where: InboundTopic, event: ev.OrderAmendedEvent) -> None:
    """A shop changes its order: stored with old and new values, published, told to its rider."""
    d = event.data
    if d.changes:
        raise RefusedError("data.changes: filled in by the backbone; send only the new values")
    order = p.shop_order(where, d.order)
    changes = changes_of(order, d)
    check_rules(order, set(changes))
    if not changes:
        raise RefusedError(f"order {order.id!r}: nothing to change (every value given is the current one)")
    values = _values(order, d, changes)
    note = ev.AmendmentNote(
        id=event.id, at=event.time, fields=[f.value for f in changes], asked_by=d.asked_by, reason=d.reason
    )
    work.change(p.orders, order, **values, last_amendment=note.model_dump(mode="json"), updated_at=work.now)
    work.states[order.id] = None
    if F.POSITION in changes and order.status in OUT_FOR_DELIVERY:
        riders.update_eta(p, work, order)  # the ETA points at the new door at once
    recorded = event.model_copy(update={"data": d.model_copy(update={"changes": changes})})
    work.recorded[event.id] = recorded
    payload = ev.encode(recorded)
    work.publish(topics.order_topic(order.shop, order.id, topics.OrderChannel.STATUS), payload)
    _tell_rider(work, order, recorded)
    if changes.keys() & {F.ADDRESS, F.POSITION}:
        _replan(p, work, order, event)


def _tell_rider(work: UnitOfWork, order: Order, recorded: ev.OrderAmendedEvent) -> None:
    """The rider's copy in its inbox: what it must know, never the customer's numbers."""
    copy = rider_copy(recorded) if order.rider and order.status in RIDER_BOUND else None
    if order.rider and copy is not None:
        work.publish(topics.rider_inbox(order.rider, topics.Inbox.AMENDMENTS), ev.encode(copy))


def rider_copy(recorded: ev.OrderAmendedEvent) -> ev.OrderAmendedEvent | None:
    """What the rider is told of an amendment (None: nothing it needs to know)."""
    d = recorded.data
    seen = {k: v for k, v in d.changes.items() if k in ev.RIDER_SEES}
    if not seen:
        return None
    data = d.model_copy(update={"changes": seen, "customer_phone": None, "alternate_contact": None})
    return recorded.model_copy(update={"data": data})


def _replan(p: Projections, work: UnitOfWork, order: Order, event: ev.OrderAmendedEvent) -> None:
    """A new address for an order dispatch offered and nobody accepted: the offer is withdrawn and
    the order goes back to dispatch, which plans it again from the new position (a shop's own
    manual offer stands: the shop chose that rider)."""
    offer = p.offers.get(order.offer_id) if order.offer_id else None
    if order.status != S.ASSIGNED or offer is None or offer.status != "pending" or offer.mode == "manual":
        return
    close_offer(p, work, order, "withdrawn")
    set_status(p, work, order, S.DECLINED, event.time, rider=None)
    withdrawn = event.model_copy(update={"id": derived_id("amend-withdrawn", event.id)})
    publish_status(work, order, withdrawn, f"offer to {offer.rider} withdrawn: the address changed")


def confirmed(
    p: Projections, work: UnitOfWork, where: InboundTopic, event: ev.OrderAmendmentConfirmedEvent
) -> None:
    """The rider holding the order confirms its last amendment; the shop sees who and when."""
    d = event.data
    if d.rider not in (None, where.sender):
        raise RefusedError(f"data.rider {d.rider!r}: a rider confirms for itself only")
    order = p.rider_order(where, d.order)
    last = order.last_amendment
    if last is None or last.get("id") != d.amendment:
        raise RefusedError(f"amendment {d.amendment!r} is not the last amendment of order {order.id!r}")
    if last.get("confirmed_by"):
        raise IgnoredError()  # confirmed already (a second tap): nothing changes
    note = {**last, "confirmed_by": where.sender, "confirmed_at": event.time.isoformat()}
    work.change(p.orders, order, last_amendment=note, updated_at=work.now)
    work.states[order.id] = None
    canonical = event.model_copy(update={"data": d.model_copy(update={"rider": where.sender})})
    work.publish(topics.order_topic(order.shop, order.id, topics.OrderChannel.STATUS), ev.encode(canonical))


def state_fields(order: Order) -> dict[str, Any]:
    """The order's instructions and last amendment, for its retained state."""
    instructions = None
    if order.instructions != ev.InstructionKind.NONE or order.instructions_text:
        instructions = ev.Instructions.model_construct(
            kind=ev.InstructionKind(order.instructions), text=order.instructions_text
        )
    last = ev.AmendmentNote.model_validate(order.last_amendment) if order.last_amendment else None
    return {"instructions": instructions, "last_amendment": last}


def timeline_entry(order: Order) -> ev.TimelineEntry | None:
    """The order's last amendment on its timeline (the events hold every one)."""
    last = order.last_amendment
    if not last:
        return None
    note = ev.AmendmentNote.model_validate(last)
    return ev.TimelineEntry(status="amended", at=note.at, note=", ".join(note.fields))


HANDLERS: Mapping[type[ev._Envelope], Callable[[Projections, UnitOfWork, InboundTopic, Any], None]] = {
    ev.OrderAmendedEvent: amended,
    ev.OrderAmendmentConfirmedEvent: confirmed,
}
