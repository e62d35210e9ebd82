"""``/contract.json``: the topic templates, event types and lifecycle the pages use, from the code.

The pages never spell a topic or a type themselves: ``web/src/lib/contract.js`` reads this
document, so a renamed topic or event type in :mod:`bloomwire.contract` reaches them unchanged.
Templates keep ``{shop}``-style placeholders, filled in by the page.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from bloomwire.contract import events as ev
from bloomwire.contract import lifecycle, topics
from bloomwire.contract.photo import MAX_PHOTO_BYTES

_MARK = "P0"


def template(build: Callable[..., str], *args: str) -> str:
    """``build(*args)`` with each ``{name}`` argument kept as a placeholder."""
    marks = {f"{_MARK}{a[1:-1]}": a for a in args if a.startswith("{")}
    built = build(*(f"{_MARK}{a[1:-1]}" if a.startswith("{") else a for a in args))
    return "/".join(marks.get(level, level) for level in built.split("/"))


def _topics() -> dict[str, str]:
    order = ("{shop}", "{order}")
    found = {
        f"order_{ch.value}": template(topics.order_topic, *order, ch.value) for ch in topics.OrderChannel
    }
    found |= {
        f"command_{c.name.lower()}": template(topics.shop_command, "{shop}", c.value) for c in topics.Command
    }
    found |= {
        "order_access": template(topics.access_topic, *order),
        "shop_all": template(topics.shop_filter, "{shop}"),
        "shop_alerts": template(topics.shop_alerts, "{shop}"),
        "shop_errors": template(topics.shop_errors, "{shop}"),
        "shop_acks": template(topics.shop_acks, "{shop}"),
        "shop_rider_state": template(topics.shop_rider_state, "{shop}", "{rider}"),
        "customer_chat": template(topics.customer_chat, "{customer}"),
        "customer_inbox_all": template(topics.customer_inbox_filter, "{customer}"),
        "customer_acks": template(topics.customer_inbox, "{customer}", topics.Inbox.ACKS),
        "customer_errors": template(topics.customer_inbox, "{customer}", topics.Inbox.ERRORS),
    }
    return found | _rider_topics()


def _rider_topics() -> dict[str, str]:
    """What the rider's page writes (its inbound topics) and reads (its inbox)."""
    rider, order = "{rider}", "{order}"
    found = {
        "rider_location": template(topics.rider_location, rider),
        "rider_order_status": template(topics.rider_order_status, rider, order),
        "rider_order_chat": template(topics.rider_order_chat, rider, order),
        "rider_order_photo": template(topics.rider_order_photo, rider, order),
        "rider_replies": template(topics.rider_replies, rider),
        "rider_presence": template(topics.rider_presence, rider),
        "rider_inbox_all": template(topics.rider_inbox_filter, rider),
    }
    found |= {f"rider_{box.value}": template(topics.rider_inbox, rider, box.value) for box in topics.Inbox}
    return found


def _types() -> dict[str, str]:
    """Class name without ``Event`` -> type string, e.g. ``OrderChatPosted`` -> ``order.chat_posted``."""
    classes = {**ev.EVENT_TYPES, **ev.ACCESS_EVENT_TYPES}
    return {cls.__name__.removesuffix("Event"): name for name, cls in classes.items()}


def _lifecycle() -> dict[str, Any]:
    return {
        "statuses": [s.value for s in lifecycle.OrderStatus],
        "transitions": {s.value: sorted(n.value for n in nxt) for s, nxt in lifecycle.TRANSITIONS.items()},
        "out_for_delivery": sorted(s.value for s in lifecycle.OUT_FOR_DELIVERY),
        "closed": sorted(s.value for s in lifecycle.CLOSED),
        "unassigned": sorted(s.value for s in lifecycle.UNASSIGNED),
        "failure_reasons": [r.value for r in lifecycle.FailureReason],
        "rider_reportable": sorted(s.value for s in lifecycle.RIDER_REPORTABLE),
    }


def _max_length(model: type[BaseModel], field: str) -> int:
    """A field's ``max_length`` as the payload model declares it."""
    for rule in model.model_fields[field].metadata:
        limit = getattr(rule, "max_length", None)
        if isinstance(limit, int):
            return limit
    raise LookupError(f"{model.__name__}.{field} declares no max_length")


def contract_document() -> dict[str, Any]:
    """The whole document (built once per process)."""
    return {
        "topics": _topics(),
        "types": _types(),
        "lifecycle": _lifecycle(),
        "sources": {
            "shop": template(lambda s: f"{topics.SHOPS}/{topics.check_id(s)}", "{shop}"),
            "customer": template(lambda c: f"{topics.CUSTOMERS}/{topics.check_id(c)}", "{customer}"),
            "rider": template(lambda r: f"{topics.RIDERS}/{topics.check_id(r)}", "{rider}"),
        },
        "limits": {
            "chat_text": _max_length(ev.OrderChat, "text"),
            "items": _max_length(ev.OrderCreated, "items"),
            "customer_name": _max_length(ev.Customer, "name"),
            "incident_reason": _max_length(ev.OrderIncident, "reason"),
            "max_payload_bytes": ev.MAX_PAYLOAD_BYTES,
            "photo_bytes": MAX_PHOTO_BYTES,
        },
        "presence": {"online": topics.PRESENCE_ONLINE, "offline": topics.PRESENCE_OFFLINE},
    }
