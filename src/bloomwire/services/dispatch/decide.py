"""The Dispatcher's decision: offers and expiries for what a pass read (no I/O).

- ``dispatch.offered`` for an order waiting in ``created``/``declined``: the cheapest eligible rider
  (:func:`planner.rank`), or one offer per pair of a joint assignment (:func:`planner.assign_joint`)
  when ``batch_threshold`` or more orders wait at once ("batch" mode). The deadline and the
  candidates with their costs travel in the event, so the shop can see why.
- ``dispatch.expired`` for an offer whose deadline passed unanswered; the persister puts the order
  back to ``declined`` (rider added to ``declined_by``) and dispatch moves on to the next rider.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Literal

from bloomwire.contract import events as ev
from bloomwire.runtime.log import get_logger
from bloomwire.services.dispatch.config import DispatchConfig
from bloomwire.services.dispatch.ids import SOURCE, expired_id, offer_id
from bloomwire.services.dispatch.planner import (
    Assignment,
    CandidateCost,
    Decision,
    RiderCandidate,
    assign_joint,
    rank,
)
from bloomwire.services.dispatch.reads import Snapshot, WaitingOrder

log = get_logger("bloomwire.dispatch")

#: Order ids named in the "no rider for orders yet" line (the rest are counted).
UNSERVED_SAMPLE = 10
Mode = Literal["single", "batch"]


@dataclass
class PassResult:
    """What one pass decided, with its timings (seconds)."""

    at: datetime
    mode: Literal["idle", "single", "batch"] = "idle"
    waiting: int = 0
    riders: int = 0
    offers: list[ev.DispatchOfferedEvent] = field(default_factory=list)
    expired: list[ev.DispatchExpiredEvent] = field(default_factory=list)
    read_s: float = 0.0
    plan_s: float = 0.0
    publish_s: float = 0.0
    #: Earliest arrival (epoch s) of the messages that woke this pass; None for a tick.
    trigger_at: float | None = None
    #: When the last event of this pass was handed to the MQTT client (epoch s).
    published_at: float | None = None


@dataclass
class _Sent:
    offer: str
    rider: str
    attempt: int
    at: float  # monotonic


class Decider:
    """The decisions over a :class:`Snapshot`, and what was sent but not yet stored.

    Thread-confined: one pass at a time (only :meth:`refused` may be called from another thread).
    """

    def __init__(self, config: DispatchConfig) -> None:
        self.config = config
        self._inflight: dict[str, _Sent] = {}
        self._expiring: dict[str, float] = {}
        self._refused: deque[str] = deque()
        self._unserved: set[tuple[str, int]] = set()

    def refused(self, event_id: str) -> None:
        """The persister refused one of our offers (thread-safe): forget it was sent, so the
        next pass decides again from the store. (A refused expiry is simply re-sent after
        ``resend_after_s`` while the store still shows the offer pending.)"""
        self._refused.append(event_id)

    def decide(self, snap: Snapshot, now: datetime, *, mono: float | None = None) -> PassResult:
        """Offers and expiries for ``snap`` at ``now``; remembers what it sent until the store
        shows it (so a rider's load counts offers still on their way to the persister)."""
        mono = time.monotonic() if mono is None else mono
        result = PassResult(at=now, riders=len(snap.riders))
        self._forget_refused()
        waiting = {o.id: o for o in snap.orders}
        held = self._held_offers(waiting, mono)
        result.expired = self._expiries(snap, now, mono)
        todo = [o for o in snap.orders if o.id not in self._inflight]
        result.waiting = len(todo)
        if not todo:
            return result
        riders = [replace(r, load=r.load + held[r.id]) if held[r.id] else r for r in snap.riders]
        deadline = now + timedelta(seconds=self.config.offer_timeout_s)
        batch = len(todo) >= self.config.batch_threshold
        result.mode = "batch" if batch else "single"
        plan = self._batch if batch else self._single
        result.offers = plan(todo, riders, now, deadline, snap.offline)
        for offer in result.offers:
            d = offer.data
            sent = _Sent(offer=d.offer, rider=d.rider, attempt=waiting[d.order].attempt, at=mono)
            self._inflight[d.order] = sent
        self._note_unserved(todo, result.offers, len(riders))
        return result

    def _forget_refused(self) -> None:
        """Offers the persister refused are no longer on their way: the next pass decides again."""
        while self._refused:
            gone = self._refused.popleft()
            for oid in [o for o, s in self._inflight.items() if s.offer == gone]:
                del self._inflight[oid]

    def _held_offers(self, waiting: dict[str, WaitingOrder], mono: float) -> Counter[str]:
        """Offers sent but not yet in the store, by rider (they count towards the rider's load).

        Still waiting in the store under the same attempt means the persister has not applied an
        offer yet; anything else (or no sign of it for ``resend_after_s``) means it is gone.
        """
        held: Counter[str] = Counter()
        for oid, sent in list(self._inflight.items()):
            o = waiting.get(oid)
            if o is None or o.attempt != sent.attempt or mono - sent.at > self.config.resend_after_s:
                del self._inflight[oid]
            else:
                held[sent.rider] += 1
        return held

    def _expiries(self, snap: Snapshot, now: datetime, mono: float) -> list[ev.DispatchExpiredEvent]:
        """An expiry for each overdue offer, re-sent after ``resend_after_s`` while still overdue."""
        if snap.full:
            overdue_ids = {p.offer for p in snap.overdue}
            for gone_offer in [k for k in self._expiring if k not in overdue_ids]:
                del self._expiring[gone_offer]
        out = []
        for p in snap.overdue:
            sent_at = self._expiring.get(p.offer)
            if sent_at is not None and mono - sent_at <= self.config.resend_after_s:
                continue
            self._expiring[p.offer] = mono
            out.append(
                ev.DispatchExpiredEvent(
                    id=expired_id(p.offer),
                    source=SOURCE,
                    time=now,
                    data=ev.DispatchExpired(offer=p.offer, order=p.order, rider=p.rider),
                )
            )
        return out

    def _note_unserved(
        self, todo: Sequence[WaitingOrder], offers: Sequence[ev.DispatchOfferedEvent], riders: int
    ) -> None:
        """Log once per order and attempt that no rider could take it: one line per pass (a
        line per order cost more than the pass itself at a peak of thousands)."""
        served = {o.data.order for o in offers}
        fresh = [o for o in todo if o.id not in served and (o.id, o.attempt) not in self._unserved]
        if fresh:
            self._unserved.update((o.id, o.attempt) for o in fresh)
            sample = [o.id for o in fresh[:UNSERVED_SAMPLE]]
            log.info("no rider for orders yet", orders=len(fresh), first=sample, riders=riders)
        if len(self._unserved) > 4 * self.config.max_waiting:
            self._unserved.clear()

    def _single(
        self,
        todo: Sequence[WaitingOrder],
        riders: list[RiderCandidate],
        now: datetime,
        deadline: datetime,
        offline: int,
    ) -> list[ev.DispatchOfferedEvent]:
        """Normal mode: oldest order first, each to its cheapest rider (loads updated as we go)."""
        out = []
        by_id = {r.id: i for i, r in enumerate(riders)}
        for o in sorted(todo, key=lambda x: (x.created_at, x.id)):
            decision = rank(o.request(), riders, now, self.config.weights)
            if decision.rider is None or decision.chosen is None:
                continue
            chosen = decision.chosen
            note = _decision_note(decision, offline)
            candidates = [_candidate(chosen, note)]
            candidates += [_candidate(c) for c in _eligible(decision, exclude=chosen.rider)]
            out.append(self._offer(o, chosen.rider, chosen.total or 0.0, "single", candidates, now, deadline))
            i = by_id[chosen.rider]
            riders[i] = replace(riders[i], load=riders[i].load + 1)
        return out

    def _batch(
        self,
        todo: Sequence[WaitingOrder],
        riders: list[RiderCandidate],
        now: datetime,
        deadline: datetime,
        offline: int,
    ) -> list[ev.DispatchOfferedEvent]:
        """Peak mode: every waiting order at once, minimum total cost (one offer per pair)."""
        cfg = self.config
        by_id = {o.id: o for o in todo}
        assignments = assign_joint([o.request() for o in todo], riders, now, cfg.weights)
        free = sum(max(r.capacity - r.load, 0) for r in riders if r.online and r.on_duty)
        total = sum(a.cost for a in assignments)
        summary = (
            f"joint assignment: {len(assignments)} of {len(todo)} waiting orders over "
            f"{len(riders)} online riders ({free} free slots), total {total:.0f} s"
        )
        explain = len(assignments) <= cfg.explain_batch_max
        loads = {r.id: r.load for r in riders}
        out = []
        for a in assignments:
            o = by_id[a.order]
            candidates = [_batch_candidate(a, loads.get(a.rider, 0), summary, offline)]
            if explain:
                decision = rank(o.request(), riders, now, cfg.weights)
                candidates += [_candidate(c) for c in _eligible(decision, exclude=a.rider)]
            out.append(self._offer(o, a.rider, a.cost, "batch", candidates, now, deadline))
        return out

    def _offer(
        self,
        order: WaitingOrder,
        rider: str,
        cost: float,
        mode: Mode,
        candidates: list[ev.Candidate],
        now: datetime,
        deadline: datetime,
    ) -> ev.DispatchOfferedEvent:
        oid = offer_id(order.id, order.attempt)
        return ev.DispatchOfferedEvent(
            id=oid,
            source=SOURCE,
            time=now,
            data=ev.DispatchOffer(
                offer=oid,
                order=order.id,
                rider=rider,
                deadline=deadline,
                cost=round(cost, 1),
                mode=mode,
                candidates=candidates[: max(1, min(self.config.top, 50))],
                pickup=order.pickup(),
                dropoff=ev.Place(lat=order.lat, lon=order.lon, address=order.address),
            ),
        )


def _eligible(decision: Decision, *, exclude: str) -> list[CandidateCost]:
    return [c for c in decision.considered if c.eligible and c.rider != exclude]


def _candidate(c: CandidateCost, note: str | None = None) -> ev.Candidate:
    return ev.Candidate(
        rider=c.rider,
        cost=round(c.total if c.total is not None else 0.0, 1),
        travel_s=round(c.travel_s or 0.0, 1),
        load=c.load,
        note=note if note is not None else c.describe(),
    )


def _not_offered(decision: Decision, offline: int) -> str:
    skipped = Counter((c.reason or "").split(" (")[0] for c in decision.considered if not c.eligible)
    if offline:
        skipped["offline"] += offline
    return ", ".join(f"{k}: {v}" for k, v in skipped.most_common())


def _decision_note(decision: Decision, offline: int) -> str:
    note = decision.reason
    skipped = _not_offered(decision, offline)
    return f"{note}; not offered: {skipped}" if skipped else note


def _batch_candidate(a: Assignment, load: int, summary: str, offline: int) -> ev.Candidate:
    note = f"{a.rider}: {a.travel_s:.0f} s travel, cost {a.cost:.0f} s; {summary}"
    if offline:
        note += f"; {offline} offline riders not considered"
    return ev.Candidate(
        rider=a.rider, cost=round(a.cost, 1), travel_s=round(a.travel_s, 1), load=load, note=note
    )
