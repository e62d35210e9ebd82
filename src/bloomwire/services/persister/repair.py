"""The retained snapshots repaired after start-up, a slice at a time, once the persister is online.

A crash between a batch's commit and its publishes can leave a retained snapshot one step behind
(and a broker that lost its store holds none): the store is right, so every live order's and
rider's snapshot is published again from it. Done before ``online`` it held a restart with
100,000 open orders for half a minute (150,000 QoS 1 publishes); here it runs after, in slices
that wait for the broker's acknowledgements, so batches go on in between. Each snapshot is built
when its slice goes out, from the projections as they are then: a batch that changed the order
meanwhile has published the same or an older state, never a newer one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from bloomwire.runtime.log import get_logger
from bloomwire.runtime.mqtt import first_line
from bloomwire.services.persister.messages import Outbound
from bloomwire.services.persister.projector import Projector
from bloomwire.services.persister.snapshots import order_state_msg, rider_state_msgs

log = get_logger("bloomwire.persister")

#: Snapshots built and published per slice (a few milliseconds of the event loop).
SLICE = 200
#: A slice waits while more of the connection's QoS 1 publishes than this await their PUBACK.
MAX_IN_FLIGHT = 1_000
_OLDEST = datetime.min.replace(tzinfo=UTC)


class Repair:
    """What is left to republish: live orders, then riders, most recently changed first (a crash
    between commit and publish left those behind, if any)."""

    def __init__(self, projector: Projector) -> None:
        self.projector = projector
        p = projector.projections
        orders = sorted(p.orders.values(), key=lambda o: o.updated_at, reverse=True)
        riders = sorted(p.riders.values(), key=lambda r: r.updated_at or _OLDEST, reverse=True)
        # Reversed again: pop() from the end takes the most recent first.
        self.orders = [o.id for o in reversed(orders)]
        self.riders = [r.id for r in reversed(riders)]
        self.total = len(self.orders) + len(self.riders)

    @property
    def done(self) -> bool:
        """Nothing left to republish."""
        return not self.orders and not self.riders

    def take(self, n: int) -> list[Outbound]:
        """The current snapshots of the next ``n`` orders or riders still live (one gone since
        was published by the batch that closed it)."""
        p, clearings = self.projector.projections, self.projector.clearings
        now = self.projector.clock()
        out: list[Outbound] = []
        while self.orders and n > 0:
            order = p.orders.rows.get(self.orders.pop())
            n -= 1
            if order is not None:
                out.append(order_state_msg(p, clearings, order, now))
        while self.riders and n > 0:
            rider = p.riders.rows.get(self.riders.pop())
            n -= 1
            if rider is not None:
                out.extend(rider_state_msgs(p, rider, now))
        return out


async def repair_states(
    repair: Repair,
    publish: Callable[[Sequence[Outbound]], None],
    in_flight: Callable[[], int],
    *,
    slice_size: int = SLICE,
    max_in_flight: int = MAX_IN_FLIGHT,
) -> None:
    """Republish every snapshot of ``repair``, a slice whenever the broker has caught up."""
    started, sent = time.monotonic(), 0
    while not repair.done:
        if in_flight() > max_in_flight:
            await asyncio.sleep(0.005)
            continue
        out = repair.take(slice_size)
        try:
            publish(out)
        except Exception as exc:  # disconnected: paho keeps QoS 1; a refusal is not worth a crash
            log.warning("retained states not repaired", error=first_line(exc))
        sent += len(out)
        await asyncio.sleep(0)  # a batch waiting goes first
    log.info(
        "retained states repaired",
        orders_and_riders=repair.total,
        published=sent,
        seconds=round(time.monotonic() - started, 2),
    )
