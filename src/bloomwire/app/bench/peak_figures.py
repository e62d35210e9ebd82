"""The four rows of ``bloomwire bench peak``, computed from its journal for a window of time.

Matching is exact: a position is found again at a customer by the rider and its coordinates (each
of the rider's positions is unique), an ack and a chat line by the event's id. ``expected`` counts
what each subscriber should have got by the contract (every customer of an order the rider
carries gets each of the rider's positions; the customer and rider of an order get each shop
chat line); anything expected and not received is ``lost``, anything received twice
``duplicated``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bloomwire.app.bench.peak_load import Journal, Received
from bloomwire.app.bench.peak_procs import Sampler

SYS_SENT = "$SYS/broker/publish/messages/sent"
SYS_CONNECTED = "$SYS/broker/clients/connected"


@dataclass
class Plan:
    """Who should get what: fixed once the day is seeded."""

    #: rider -> customers (logins) following an order that rider carries.
    followers: dict[str, list[str]] = field(default_factory=dict)
    #: order -> (customer login, rider).
    order_people: dict[str, tuple[str, str]] = field(default_factory=dict)
    #: position mark ``rider|lat|lon`` -> event id.
    marks: dict[str, str] = field(default_factory=dict)
    #: shop chat event id -> order.
    chats: dict[str, str] = field(default_factory=dict)


def mark(rider: str, lat: float, lon: float) -> str:
    """The key a position is recognised by at the customer."""
    return f"{rider}|{lat!r}|{lon!r}"


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) of ``values``, nan when empty."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[max(0, int(q * 10) - 1)]


def spread(values: Sequence[float]) -> dict[str, float | int]:
    """avg/P50/P99/max (ms) and how many."""
    if not values:
        return {"n": 0, "avg": float("nan"), "p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    return {
        "n": len(values),
        "avg": round(statistics.fmean(values), 1),
        "p50": round(pct(values, 50), 1),
        "p99": round(pct(values, 99), 1),
        "max": round(max(values), 1),
    }


@dataclass
class Matched:
    """The journal decoded once: first arrival of everything we look for."""

    sent: dict[str, tuple[float, str, str]] = field(default_factory=dict)  # id -> (at, kind, who)
    acked: dict[str, float] = field(default_factory=dict)  # id -> first ack
    ack_times: list[float] = field(default_factory=list)
    #: (event id, receiver) -> arrival times (more than one: duplicated).
    arrivals: dict[tuple[str, str], list[float]] = field(default_factory=lambda: defaultdict(list))
    refused: list[tuple[float, str]] = field(default_factory=list)
    sys: dict[str, list[tuple[float, float]]] = field(default_factory=lambda: defaultdict(list))


def match(journal: Journal, plan: Plan) -> Matched:
    """Decode every received message once."""
    out = Matched()
    for at, kind, key, who in list(journal.sent):
        out.sent.setdefault(key, (at, kind, who))
    for r in list(journal.received):
        _one(out, plan, r)
    return out


def _one(out: Matched, plan: Plan, r: Received) -> None:
    topic = r.topic
    if topic.endswith("/inbox/acks"):
        for eid in json.loads(r.payload).get("ids", []):
            out.acked.setdefault(eid, r.at)
            out.ack_times.append(r.at)
    elif topic.endswith("/location") and topic.startswith("shops/"):
        data = json.loads(r.payload)
        pos = data["position"]
        eid = plan.marks.get(mark(data["rider"], pos["lat"], pos["lon"]))
        if eid is not None:
            out.arrivals[(eid, r.who)].append(r.at)
    elif topic.endswith("/chat") or topic.endswith("/inbox/chat"):
        eid = json.loads(r.payload).get("id")
        if eid in plan.chats:
            out.arrivals[(eid, r.who)].append(r.at)
    elif topic == "services/deadletter":
        out.refused.append((r.at, str(json.loads(r.payload).get("reason", "?"))))
    elif topic.startswith("$SYS/"):
        with contextlib.suppress(ValueError, IndexError):
            out.sys[topic].append((r.at, float(r.payload.split()[0])))


def _expected(plan: Plan, m: Matched, t0: float, t1: float) -> Iterable[tuple[str, str, str, float]]:
    """(event id, receiver, kind, sent at) of every delivery the contract promises for the window."""
    for eid, (at, kind, who) in m.sent.items():
        if not t0 <= at < t1:
            continue
        if kind == "position":
            for customer in plan.followers.get(who, ()):
                yield eid, customer, "customer", at
        elif kind == "shop-chat":
            customer, rider = plan.order_people[plan.chats[eid]]
            yield eid, customer, "customer", at
            yield eid, rider, "rider", at


@dataclass
class Window:
    """A stretch of the run to report on."""

    name: str
    t0: float
    t1: float
    recovery_s: float | None = None
    #: What the fault was like, in a line ("" for none).
    note: str = ""


def figures(plan: Plan, m: Matched, sampler: Sampler, w: Window) -> dict[str, Any]:
    """The four rows (and the processes) for ``w``."""
    return {
        "window": w.name,
        "seconds": round(w.t1 - w.t0, 1),
        "recovery_s": None if w.recovery_s is None else round(w.recovery_s, 2),
        "rows": {
            "connection_stability": {},  # filled in by the caller (needs the fault's moment)
            "latency": latency(plan, m, w),
            "concurrency": concurrency(m, w),
            "reliability": reliability(plan, m, w),
        },
        "processes": sampler.usage(w.t0, w.t1),
    }


def latency(plan: Plan, m: Matched, w: Window) -> dict[str, Any]:
    """rider → customer, rider → stored, shop command → rider inbox (ms)."""
    to_customer: list[float] = []
    to_rider: list[float] = []
    for eid, receiver, role, at in _expected(plan, m, w.t0, w.t1):
        got = m.arrivals.get((eid, receiver))
        if not got:
            continue
        kind = m.sent[eid][1]
        if kind == "position" or role == "customer":
            if kind == "position":
                to_customer.append((got[0] - at) * 1000)
        else:
            to_rider.append((got[0] - at) * 1000)
    stored = [
        (m.acked[eid] - at) * 1000
        for eid, (at, kind, _who) in m.sent.items()
        if kind == "position" and w.t0 <= at < w.t1 and eid in m.acked
    ]
    return {
        "rider_to_customer_ms": spread(to_customer),
        "rider_to_stored_ms": spread(stored),
        "shop_command_to_rider_inbox_ms": spread(to_rider),
    }


def concurrency(m: Matched, w: Window) -> dict[str, Any]:
    """Events the store accepted per second, broker deliveries per second, connections."""
    acks = [t for t in m.ack_times if w.t0 <= t < w.t1]
    per_second = Counter(int(t) for t in acks)
    seconds = max(w.t1 - w.t0, 1e-9)
    return {
        "events_accepted_per_s": round(len(acks) / seconds, 1),
        "events_accepted_peak_per_s": max(per_second.values(), default=0),
        "broker_delivered_per_s": _sys_rate(m.sys.get(SYS_SENT, []), w),
        "connections_max": _connections(m.sys.get(SYS_CONNECTED, []), w),
    }


def _connections(samples: Sequence[tuple[float, float]], w: Window) -> int:
    """Most clients connected in the window (``$SYS`` says so only on a change: the last value
    before the window counts too)."""
    before = [v for t, v in samples if t < w.t0]
    inside = [v for t, v in samples if w.t0 <= t <= w.t1]
    return int(max([*before[-1:], *inside], default=0))


def _sys_rate(samples: Sequence[tuple[float, float]], w: Window) -> float | None:
    """A ``$SYS`` counter's rate over the window (a broker restart resets it: counted from 0).
    The last sample before the window starts the count: the broker says it every 10 s, and a
    fault's window can be shorter than two of them."""
    before = [(t, v) for t, v in samples if t < w.t0][-1:]
    inside = before + [(t, v) for t, v in samples if w.t0 <= t <= w.t1]
    if len(inside) < 2:
        return None
    total = 0.0
    for (_t0, a), (_t1, b) in itertools.pairwise(inside):
        total += b - a if b >= a else b
    return round(total / (inside[-1][0] - inside[0][0]), 1)


def reliability(plan: Plan, m: Matched, w: Window) -> dict[str, Any]:
    """Delivered / expected, stored / sent, lost, duplicated, refused with reasons."""
    expected = delivered = duplicated = 0
    missing: list[dict[str, Any]] = []
    for eid, receiver, _role, at in _expected(plan, m, w.t0, w.t1):
        expected += 1
        got = m.arrivals.get((eid, receiver), [])
        delivered += 1 if got else 0
        duplicated += max(0, len(got) - 1)
        if not got and len(missing) < 5:
            acked = m.acked.get(eid)
            missing.append(
                {
                    "kind": m.sent[eid][1],
                    "id": eid,
                    "to": receiver,
                    "sent_at": round(at, 3),
                    "stored_after_s": None if acked is None else round(acked - at, 3),
                }
            )
    acked_kinds = ("position", "customer-chat")
    sent = [eid for eid, (at, kind, _) in m.sent.items() if kind in acked_kinds and w.t0 <= at < w.t1]
    stored = sum(1 for eid in sent if eid in m.acked)
    reasons = Counter(reason for t, reason in m.refused if w.t0 <= t < w.t1)
    return {
        "delivered": delivered,
        "expected": expected,
        "delivered_ratio": round(delivered / expected, 5) if expected else None,
        "stored": stored,
        "sent": len(sent),
        "stored_ratio": round(stored / len(sent), 5) if sent else None,
        "lost": expected - delivered + len(sent) - stored,
        "lost_deliveries": expected - delivered,
        "lost_events": len(sent) - stored,
        "duplicated": duplicated,
        "refused": sum(reasons.values()),
        "refused_reasons": dict(reasons.most_common(5)),
        "lost_examples": missing,
    }


def stability(journal: Journal, w: Window, fault_at: float | None) -> dict[str, Any]:
    """Drops in the window; after a broker restart, reconnect times and sessions resumed."""
    drops = sum(1 for link in journal.links.values() for t in link.drops if w.t0 <= t < w.t1)
    who = sorted({n for n, link in journal.links.items() for t in link.drops if w.t0 <= t < w.t1})
    times = sorted(t - w.t0 for link in journal.links.values() for t in link.drops if w.t0 <= t < w.t1)
    out: dict[str, Any] = {"clients": len(journal.links), "drops": drops, "dropped": who[:5]}
    if times:
        out["drops_between_s"] = [round(times[0], 1), round(times[-1], 1)]
    if fault_at is None:
        return out
    back: list[float] = []
    resumed = 0
    for link in journal.links.values():
        if not any(fault_at <= t < w.t1 for t in link.drops):
            continue
        again = [(t, sp) for t, sp in link.connects if t >= fault_at]
        if again:
            back.append(again[0][0] - fault_at)
            resumed += 1 if again[0][1] else 0
    out["dropped_clients"] = sum(
        1 for link in journal.links.values() if any(fault_at <= t < w.t1 for t in link.drops)
    )
    out["reconnected"] = len(back)
    out["reconnect_p50_s"] = round(pct(back, 50), 2) if back else None
    out["reconnect_p99_s"] = round(pct(back, 99), 2) if back else None
    out["sessions_resumed"] = resumed
    return out
