"""Riders and positions: presence, location (latest fix, ETA, trail), region transitions."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from bloomwire.contract import events as ev
from bloomwire.contract import geo, topics
from bloomwire.contract.lifecycle import OUT_FOR_DELIVERY, OrderStatus
from bloomwire.contract.topics import InboundKind, InboundTopic
from bloomwire.services.persister.decode import Decoded
from bloomwire.services.persister.projections import Projections
from bloomwire.services.persister.rows import Order
from bloomwire.services.persister.work import SERVICE_NAME, IgnoredError, UnitOfWork, derived_id

S = OrderStatus

#: Trail spacing: a point when the rider moved this far or this long since the last one. 50 m is
#: about one city block (enough to redraw the route on a map); 30 s bounds gaps when crawling.
TRAIL_MIN_DISTANCE_M = 50.0
TRAIL_MIN_INTERVAL_S = 30.0
#: Location events on the canonical topic expire: a stale position is worse than none.
LOCATION_EXPIRY_S = 60
#: The retained order state is refreshed from positions at most this often (status changes: always).
STATE_REFRESH_FROM_LOCATION_S = 10.0
#: A transition this close to a carried order's destination is about that order (a region a rider
#: draws around a door is ~100 m; the phone's own uncertainty widens it, up to the second figure).
DESTINATION_RADIUS_M = 150.0
DESTINATION_RADIUS_MAX_M = 500.0


def presence(
    p: Projections, work: UnitOfWork, where: InboundTopic, event: ev.RiderPresenceChangedEvent
) -> None:
    """A rider online or offline, on or off duty, its capacity; the same again changes nothing."""
    rider = p.rider(work, where.sender)
    d = event.data
    unchanged = (
        rider.presence == d.status.value
        and d.on_duty in (None, rider.on_duty)
        and d.capacity in (None, rider.capacity)
    )
    if unchanged and not work.is_new(p.riders, where.sender):
        raise IgnoredError()
    values: dict[str, Any] = {"presence": d.status.value, "presence_at": event.time, "updated_at": work.now}
    if d.on_duty is not None:
        values["on_duty"] = d.on_duty
    if d.capacity is not None:
        values["capacity"] = d.capacity
    work.change(p.riders, rider, **values)
    work.rider_states.setdefault(where.sender, set())


def locate(
    p: Projections, work: UnitOfWork, where: InboundTopic, event: ev.RiderLocationReportedEvent
) -> None:
    """A position: the rider's latest fix, and for each order it carries out: ETA, trail, location.

    Positions are not events of record: no event row, no dedupe.
    """
    d = event.data
    now = work.now
    at = datetime.fromtimestamp(d.tst, tz=now.tzinfo) if d.tst else event.time
    rider = p.rider(work, where.sender)
    work.ack(where, event.id)
    if rider.position_at is not None and at < rider.position_at:
        return  # an older fix arriving late: the newer one stands
    if (at, d.lat, d.lon) == (rider.position_at, rider.lat, rider.lon):
        return  # this very fix again (a batch retried after a partial commit): already shown
    fixes = p.fixes[where.sender]
    fixes.append(geo.Fix(d.lat, d.lon, at))
    speed = d.vel if d.vel is not None else geo.estimate_speed_kmh(list(fixes))
    work.change(p.riders, rider, lat=d.lat, lon=d.lon, position_at=at, speed_kmh=speed, updated_at=now)
    if _due(p.rider_state_sent_at.get(where.sender), now):
        work.rider_states.setdefault(where.sender, set())  # the retained position, now and then
    for order_id in p.rider_orders.get(where.sender, ()):
        order = p.orders.rows.get(order_id)
        if order is None or order.status not in OUT_FOR_DELIVERY:
            continue
        update_eta(p, work, order)
        _trail(p, work, order, where.sender, d.lat, d.lon, at)
        position = ev.Position(lat=d.lat, lon=d.lon, at=at, speed_kmh=speed)
        located = ev.OrderLocation(order=order_id, rider=where.sender, position=position, eta=order.eta)
        topic = topics.order_topic(order.shop, order_id, topics.OrderChannel.LOCATION)
        work.publish(topic, ev.encode(located), qos=0, expiry_s=LOCATION_EXPIRY_S)
        if _due(p.state_sent_at.get(order_id), now):
            work.states[order_id] = None


def _due(last_sent: datetime | None, now: datetime) -> bool:
    return last_sent is None or (now - last_sent).total_seconds() >= STATE_REFRESH_FROM_LOCATION_S


def update_eta(p: Projections, work: UnitOfWork, order: Order) -> None:
    """The order's ETA from its rider's last position."""
    rider = p.riders.rows.get(order.rider) if order.rider else None
    if rider is None or rider.lat is None or rider.lon is None:
        return
    speed = max(rider.speed_kmh or geo.DEFAULT_SPEED_KMH, 5.0)
    eta = geo.eta(rider.lat, rider.lon, order.lat, order.lon, work.now, speed)
    work.change(p.orders, order, eta=eta, updated_at=work.now)


def _trail(
    p: Projections, work: UnitOfWork, order: Order, rider: str, lat: float, lon: float, at: datetime
) -> None:
    last = p.last_trail.get(order.id)
    if last is not None:
        moved = geo.distance_m(last[0], last[1], lat, lon)
        if moved < TRAIL_MIN_DISTANCE_M and (at - last[2]).total_seconds() < TRAIL_MIN_INTERVAL_S:
            return
    p.last_trail[order.id] = (lat, lon, at)
    work.trail.append({"order_id": order.id, "rider": rider, "lat": lat, "lon": lon, "at": at})


def destination_order(
    p: Projections, rider: str, lat: float, lon: float, acc: float | None, names: tuple[str | None, ...]
) -> str | None:
    """The order ``rider`` carries whose destination a region is, if any: the region is named
    after the order (its ``desc`` or ``rid``), or the phone was near the order's address."""
    nearest: tuple[float, str] | None = None
    for order_id in sorted(p.rider_orders.get(rider, ())):
        order = p.orders.rows.get(order_id)
        if order is None:
            continue
        if order_id in names:
            return order_id
        metres = geo.distance_m(lat, lon, order.lat, order.lon)
        near = metres <= max(DESTINATION_RADIUS_M, min(acc or 0.0, DESTINATION_RADIUS_MAX_M))
        if near and (nearest is None or metres < nearest[0]):
            nearest = (metres, order_id)
    return nearest[1] if nearest else None


def with_subject(p: Projections, decoded: Decoded) -> Decoded:
    """An OwnTracks transition with the order it is about: the carried order whose destination its
    region is, else the rider's only carried order (part of that delivery's story), else none."""
    event, where = decoded.event, decoded.where
    if not isinstance(event, ev.RiderRegionChangedEvent) or where.kind is not InboundKind.OWNTRACKS:
        return decoded
    d = event.data
    carried = sorted(p.rider_orders.get(where.sender, ()))
    found = destination_order(p, where.sender, d.lat, d.lon, d.acc, (d.region, d.region_id))
    subject = found or (carried[0] if len(carried) == 1 else None)
    return Decoded(decoded.msg, where, event.model_copy(update={"subject": subject}))


def region_changed(
    p: Projections, work: UnitOfWork, where: InboundTopic, event: ev.RiderRegionChangedEvent
) -> None:
    """A transition is stored as it is; entering an order's destination asks "arrived?"."""
    d = event.data
    if d.event != "enter":
        return
    order_id = destination_order(p, where.sender, d.lat, d.lon, d.acc, (d.region, d.region_id))
    order = p.orders.rows.get(order_id) if order_id else None
    if order is None or order.status not in (S.PICKED_UP, S.EN_ROUTE):
        return
    text = (
        f"You have reached the destination of order {order.id}"
        f"{f' ({d.region})' if d.region else ''}. Report 'arrived'?"
    )
    prompt = ev.OrderChatPostedEvent(
        id=derived_id("arrival-prompt", event.id),
        source=f"{topics.SERVICES}/{SERVICE_NAME}",
        time=event.time,
        data=ev.OrderChat(order=order.id, text=text, author=f"service:{SERVICE_NAME}"),
    )
    work.publish(topics.rider_inbox(where.sender, topics.Inbox.CHAT), ev.encode(prompt))


HANDLERS: Mapping[type[ev._Envelope], Callable[[Projections, UnitOfWork, InboundTopic, Any], None]] = {
    ev.RiderPresenceChangedEvent: presence,
    ev.RiderRegionChangedEvent: region_changed,
}
