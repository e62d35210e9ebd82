"""The demo's amendments (issue 18): a few orders change after they are placed, as in the seed's
scenes: a later window at the customer's request, a corrected address once the rider is on the
way, and "leave it at the door" after the customer could not be reached by phone.

Only orders the day's plan ends as delivered are amended, and none moves its delivery point, so
every order still ends as planned (the simulation's own check).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

from bloomwire.app.clients.shop import AmendDraft
from bloomwire.app.simulate.clock import SimClock
from bloomwire.app.simulate.plan import Fate, OrderPlan
from bloomwire.contract import events as ev
from bloomwire.contract.lifecycle import OrderStatus


class Scene(StrEnum):
    """What changes, and when."""

    LATER_WINDOW = "later window"
    NEW_ADDRESS = "new address"
    LEAVE_AT_DOOR = "leave at the door"


#: The status that sets each scene off (None: as soon as the order is created).
TRIGGER: dict[Scene, OrderStatus | None] = {
    Scene.LATER_WINDOW: None,
    Scene.NEW_ADDRESS: OrderStatus.PICKED_UP,
    Scene.LEAVE_AT_DOOR: OrderStatus.EN_ROUTE,
}
#: Which delivered order of the day (by its place among them) gets which scene: the 2nd, 4th and
#: 6th of every six (no draw from the plan's random stream, so the day stays the same).
_BY_PLACE = {1: Scene.LATER_WINDOW, 3: Scene.NEW_ADDRESS, 5: Scene.LEAVE_AT_DOOR}


def scenes(orders: Sequence[OrderPlan]) -> dict[str, Scene]:
    """The amendment each order of the day gets (orders not named get none)."""
    delivered = [o for o in sorted(orders, key=lambda o: o.index) if o.fate is Fate.DELIVERED]
    return {o.id: scene for place, o in enumerate(delivered) if (scene := _BY_PLACE.get(place % 6))}


def draft_for(scene: Scene, order: OrderPlan, clock: SimClock) -> AmendDraft:
    """The shop's change for ``scene``, as the customer asked for it."""
    if scene is Scene.LATER_WINDOW:
        return AmendDraft(
            order=order.id,
            window_end=clock.real_at(order.window_end_min + 30),
            asked_by="customer",
            reason="she will be home half an hour later",
        )
    if scene is Scene.NEW_ADDRESS:
        return AmendDraft(
            order=order.id,
            address=f"{order.address}, rear building, 3rd floor",
            asked_by="customer",
            reason="the front house is the wrong door",
        )
    return AmendDraft(
        order=order.id,
        instructions=ev.Instructions(kind=ev.InstructionKind.LEAVE_AT_DOOR, text="behind the planter"),
        alternate_contact="neighbour, 2nd floor left",
        asked_by="customer",
        reason="not reachable by phone; reached on another number: leave it at the door",
    )
