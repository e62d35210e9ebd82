"""The assistant's answer to a classified line, from the order's stored facts only.

Sentences live in ``answers.toml`` (one table per language); this module picks them and fills in
facts of an :class:`OrderFacts` read from the store. Nothing here invents a fact: a sentence whose
fact is missing is not chosen.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, tzinfo
from functools import cache
from importlib import resources
from typing import Final

from bloomwire.contract.lifecycle import RIDER_BOUND, OrderStatus
from bloomwire.services.assistant.intents import FORWARDED, HANDOVER, Intent, Lang, Reading

S = OrderStatus
_WAITING: Final = frozenset({S.CREATED, S.DECLINED})
_OUT: Final = frozenset({S.PICKED_UP, S.EN_ROUTE})
_STATUS_KEY: Final = {
    S.ASSIGNED: "status_assigned",
    S.ACCEPTED: "status_accepted",
    S.ARRIVED: "status_arrived",
    S.DELIVERED: "status_delivered",
    S.FAILED: "status_failed",
    S.CANCELLED: "status_cancelled",
    S.RETURNED: "status_returned",
}
#: What the shop's alert says the customer wants, by intent.
_ASKS: Final = {
    Intent.CHANGE_TIME: "asks to change the delivery time",
    Intent.CHANGE_ADDRESS: "asks to change the delivery address",
    Intent.COMPLAINT: "complains",
    Intent.CALL: "asks to be called by the rider",
}


@dataclass(frozen=True, slots=True)
class OrderFacts:
    """What the store says about one order (``orders`` row), as the answers need it."""

    order: str
    shop: str
    status: OrderStatus
    rider: str | None
    eta: datetime | None
    window_start: datetime
    window_end: datetime
    phone: str
    delivered_at: datetime | None
    failure_reason: str | None


@dataclass(frozen=True, slots=True)
class Reply:
    """The chat line to send, and what to tell the shop (None: nothing)."""

    text: str
    alert: str | None = None


@cache
def sentences() -> Mapping[str, Mapping[str, str]]:
    """``answers.toml``: language -> key -> sentence."""
    raw = resources.files(__package__).joinpath("answers.toml").read_text(encoding="utf-8")
    return tomllib.loads(raw)


def _clock(at: datetime, tz: tzinfo) -> str:
    local = at.astimezone(tz)
    return f"{local:%H:%M} {local.tzname()}"


def _fields(facts: OrderFacts, lang: Lang, now: datetime, tz: tzinfo) -> dict[str, str]:
    """Placeholder values; absent facts are left out (their sentences are never chosen)."""
    said = sentences()[lang.value]
    window = f"{_clock(facts.window_start, tz)}–{_clock(facts.window_end, tz)}"
    values = {"order": facts.order, "window": window, "rider": facts.rider or ""}
    if facts.eta is not None:
        values["eta_min"] = str(max(1, math.ceil((facts.eta - now).total_seconds() / 60)))
        values["eta_clock"] = _clock(facts.eta, tz)
    if facts.delivered_at is not None:
        values["delivered_clock"] = _clock(facts.delivered_at, tz)
    digits = [c for c in facts.phone if c.isdigit()]
    values["phone_tail"] = "".join(digits[-2:])
    values["reason"] = said.get(f"failure_{facts.failure_reason}", said["failure_other"])
    return values


def status_key(facts: OrderFacts) -> str:
    """The sentence saying where the order is."""
    if facts.status in _WAITING or (facts.status is S.ASSIGNED and not facts.rider):
        return "status_waiting"
    if facts.status in _OUT:
        return "status_out"
    return _STATUS_KEY[facts.status]


def eta_key(facts: OrderFacts, now: datetime) -> str:
    """The sentence saying when it arrives."""
    if facts.status in _OUT:
        return "eta_known" if facts.eta is not None and facts.eta > now else "eta_unknown"
    if facts.status in (S.ARRIVED, S.DELIVERED, S.FAILED, S.CANCELLED, S.RETURNED):
        return status_key(facts) if facts.status is not S.FAILED else "eta_closed"
    return "eta_window"


def _keys(reading: Reading, facts: OrderFacts, now: datetime) -> list[str]:
    """The sentences answering ``reading`` (one or two)."""
    match reading.intent:
        case Intent.WHERE:
            keys = [status_key(facts)]
            if facts.status in _OUT and facts.eta is not None and facts.eta > now:
                keys.append("eta_known")
            return keys
        case Intent.ETA:
            return [eta_key(facts, now)]
        case Intent.RIDER:
            if facts.status is S.ASSIGNED or facts.status not in RIDER_BOUND:
                return [status_key(facts) if facts.rider else "rider_none"]
            return ["rider_known"]
        case Intent.CALL:
            if not any(c.isdigit() for c in facts.phone):
                return ["call_no_phone"]
            return ["call_rider" if facts.rider and facts.status in RIDER_BOUND else "call_no_rider"]
        case Intent.CHANGE_TIME:
            return ["forwarded_time"]
        case Intent.CHANGE_ADDRESS:
            return ["forwarded_address"]
        case Intent.SMALLTALK:
            return ["smalltalk"]
        case _:
            return ["handover"]


def answer(
    reading: Reading, text: str, facts: OrderFacts, now: datetime, tz: tzinfo, *, handed_over: bool
) -> Reply:
    """The reply to the customer's ``text``; ``handed_over``: a person already has this order's chat."""
    said = sentences()[reading.lang.value]
    keys = _keys(reading, facts, now)
    no_phone = keys == ["call_no_phone"]
    if reading.intent in HANDOVER and handed_over:
        keys = ["handover_again"]
    elif no_phone:
        keys.append("handover_again" if handed_over else "handover")
    values = _fields(facts, reading.lang, now, tz)
    line = "" if reading.lang is Lang.ZH else " "
    reply = line.join(said[k].format(**values) for k in keys)
    if reading.intent not in HANDOVER | FORWARDED or handed_over:  # one open hand-over per order
        return Reply(reply)
    asks = _ASKS.get(reading.intent, "asked something the assistant cannot answer")
    if no_phone:
        asks = "asks to be called, but the order has no phone number"
    quoted = text if len(text) <= 300 else text[:299] + "…"
    return Reply(reply, f"The customer of order {facts.order} {asks}: “{quoted}”")
