"""The dispatch service: offers waiting orders to riders (docs/design.md §4).

Dispatch only reads: the store (read-only engine; the persister creates and migrates it) and the
canonical topics. Its decisions go out as events on ``services/dispatch/events`` and become real
only once the persister has stored them:

- ``dispatch.offered`` for an order waiting in ``created``/``declined``: the cheapest eligible rider
  (:func:`planner.rank`), or one offer per pair of a joint assignment (:func:`planner.assign_joint`)
  when ``batch_threshold`` or more orders wait at once ("batch" mode). The deadline and the
  candidates with their costs travel in the event, so the shop can see why.
- ``dispatch.expired`` for an offer whose deadline passed unanswered; the persister puts the order
  back to ``declined`` (rider added to ``declined_by``) and dispatch moves on to the next rider.

Level-triggered and edge-triggered: an APScheduler tick looks at the store every ``tick_s``, and
canonical order status events, rider presence and refusals of our own events wake a pass at once.
Passes run one at a time. The store is the truth, so every pass is idempotent and a restart at any
point is safe: an order holding a pending offer is left alone, and ids are derived from the
store (offer id = uuid5 of order + number of earlier offers of that order), so a pass that
re-sends a decision produces the same event id, which the persister stores only once.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Literal

import sqlalchemy as sa
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.contract.lifecycle import UNASSIGNED, OrderStatus
from bloomwire.runtime.aio import cancel_and_wait
from bloomwire.runtime.log import get_logger
from bloomwire.runtime.metrics import Figure, FiguresCollector, ServiceMetrics
from bloomwire.runtime.mqtt import Message, Service
from bloomwire.runtime.settings import Settings
from bloomwire.services.dispatch.planner import (
    DEFAULT_WEIGHTS,
    Assignment,
    CandidateCost,
    Decision,
    OrderRequest,
    RiderCandidate,
    Weights,
    assign_joint,
    rank,
)
from bloomwire.store import make_engine
from bloomwire.store import models as m

NAME = "dispatch"
SOURCE = f"{topics.SERVICES}/{NAME}"
EVENTS_TOPIC = topics.service_events(NAME)
log = get_logger("bloomwire.dispatch")

ORDERS, RIDERS, OFFERS = m.ORDERS, m.RIDERS, m.OFFERS
_WAITING = sorted(s.value for s in UNASSIGNED)
#: Canonical statuses after which a pass may find work: an order waiting, or a rider freed.
_WAKE_STATUSES = frozenset(
    (
        OrderStatus.CREATED,
        OrderStatus.DECLINED,
        OrderStatus.DELIVERED,
        OrderStatus.FAILED,
        OrderStatus.RETURNED,
        OrderStatus.CANCELLED,
    )
)
_ID_NAMESPACE = uuid.NAMESPACE_URL
#: Order ids named in the "no rider for orders yet" line (the rest are counted).
UNSERVED_SAMPLE = 10
Mode = Literal["single", "batch"]


def offer_id(order: str, attempt: int) -> str:
    """The id of the ``attempt``-th offer of ``order`` (0-based; counts every earlier offer).

    Used as both the offer id and the event id, so re-sending a decision is deduplicated.
    """
    return str(uuid.uuid5(_ID_NAMESPACE, f"bloomwire:dispatch:offer:{order}:{attempt}"))


def expired_id(offer: str) -> str:
    """The event id of the expiry of ``offer`` (one per offer)."""
    return str(uuid.uuid5(_ID_NAMESPACE, f"bloomwire:dispatch:expired:{offer}"))


@dataclass(frozen=True)
class DispatchConfig:
    """Tuning of the service (the cost function itself is :class:`planner.Weights`)."""

    #: How long a rider has to answer an offer.
    offer_timeout_s: float = 45.0
    #: Period of the level-triggered look at the store.
    tick_s: float = 1.0
    #: This many orders waiting at once switch to joint (batch) assignment.
    batch_threshold: int = 3
    #: Candidates (cheapest eligible riders) carried in each offer event.
    top: int = 10
    #: In batch mode, explain each offer with a full ranking only up to this many offers per pass
    #: (a ranking costs ~1.5 ms at 500 riders; beyond it an offer carries the chosen rider only).
    explain_batch_max: int = 20
    #: An offer or expiry sent but not yet visible in the store is re-sent after this long (s).
    resend_after_s: float = 5.0
    #: At most this many waiting orders (oldest first) are considered per pass.
    max_waiting: int = 5000
    weights: Weights = DEFAULT_WEIGHTS


@dataclass(frozen=True, slots=True)
class WaitingOrder:
    """An order in ``created`` or ``declined``, as the store has it."""

    id: str
    shop: str
    status: str
    lat: float
    lon: float
    pickup_lat: float | None
    pickup_lon: float | None
    declined_by: tuple[str, ...]
    created_at: datetime
    #: Offers of this order so far (any mode, any outcome): the next offer's number.
    attempt: int
    address: str = ""

    def pickup(self) -> ev.Place | None:
        """Where the rider collects the order, if the shop said."""
        if self.pickup_lat is None or self.pickup_lon is None:
            return None
        return ev.Place(lat=self.pickup_lat, lon=self.pickup_lon)

    def request(self) -> OrderRequest:
        """The planner's view. The rider first rides to the pickup point: the order's own
        ``pickup_lat/lon`` when the shop gave one. There is no shops table yet, so without one
        the delivery address stands in for the shop's location -- an approximation that is fine
        for shops delivering nearby and wrong for far deliveries; shops should send pickup_*."""
        if self.pickup_lat is not None and self.pickup_lon is not None:
            lat, lon = self.pickup_lat, self.pickup_lon
        else:
            lat, lon = self.lat, self.lon
        return OrderRequest(self.id, self.shop, lat, lon, self.created_at)


@dataclass(frozen=True, slots=True)
class OverdueOffer:
    """A pending offer whose deadline has passed."""

    offer: str
    order: str
    rider: str
    deadline: datetime


@dataclass(frozen=True)
class Snapshot:
    """What one pass read from the store."""

    orders: list[WaitingOrder]
    riders: list[RiderCandidate]
    offline: int
    overdue: list[OverdueOffer]
    #: False when overdue offers were not looked for (a pass woken by an event, not the clock).
    full: bool = True


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


class Dispatcher:
    """The decisions, over a read-only store. Thread-confined: one pass at a time."""

    def __init__(
        self,
        engine: Engine,
        *,
        clock: Callable[[], datetime] = ev.now,
        config: DispatchConfig | None = None,
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.config = config or DispatchConfig()
        self._inflight: dict[str, _Sent] = {}
        self._expiring: dict[str, float] = {}
        self._refused: deque[str] = deque()
        self._unserved: set[tuple[str, int]] = set()
        self._offline = 0

    # --- reading the store ----------------------------------------------------------------------

    def read(self, now: datetime, *, full: bool = True) -> Snapshot:
        """Waiting orders (with their offer counts) and online riders; with ``full`` also the
        overdue offers and the number of offline riders (else the last count), which only the
        clock changes -- so a pass woken by an event costs two queries, a tick's four."""
        n_offers = (
            sa.select(sa.func.count())
            .select_from(OFFERS)
            .where(OFFERS.c.order_id == ORDERS.c.id)
            .scalar_subquery()
        )
        orders_q = (
            sa.select(
                ORDERS.c.id,
                ORDERS.c.shop,
                ORDERS.c.status,
                ORDERS.c.lat,
                ORDERS.c.lon,
                ORDERS.c.pickup_lat,
                ORDERS.c.pickup_lon,
                ORDERS.c.address,
                ORDERS.c.declined_by,
                ORDERS.c.created_at,
                n_offers.label("n_offers"),
            )
            .where(ORDERS.c.status.in_(_WAITING))
            .order_by(ORDERS.c.created_at, ORDERS.c.id)
            .limit(self.config.max_waiting)
        )
        overdue_q = sa.select(ORDERS.c.id, ORDERS.c.offer_id, ORDERS.c.rider, ORDERS.c.offer_deadline).where(
            ORDERS.c.status == OrderStatus.ASSIGNED.value,
            ORDERS.c.offer_id.is_not(None),
            ORDERS.c.offer_deadline <= now,
        )
        riders_q = sa.select(RIDERS).where(RIDERS.c.presence == topics.PRESENCE_ONLINE)
        offline_q = (
            sa.select(sa.func.count()).select_from(RIDERS).where(RIDERS.c.presence != topics.PRESENCE_ONLINE)
        )
        with self.engine.connect() as conn:
            # Orders before riders: a rider's load read later can only include more of our offers.
            order_rows = conn.execute(orders_q).all()
            overdue_rows = conn.execute(overdue_q).all() if full else []
            rider_rows = conn.execute(riders_q).all()
            if full:
                self._offline = int(conn.execute(offline_q).scalar_one())
        offline = self._offline
        orders = [
            WaitingOrder(
                id=r.id,
                shop=r.shop,
                status=r.status,
                lat=r.lat,
                lon=r.lon,
                pickup_lat=r.pickup_lat,
                pickup_lon=r.pickup_lon,
                declined_by=tuple(r.declined_by or ()),
                created_at=r.created_at,
                attempt=int(r.n_offers),
                address=r.address or "",
            )
            for r in order_rows
        ]
        declined: dict[str, set[str]] = {}
        for o in orders:
            for rider in o.declined_by:
                declined.setdefault(rider, set()).add(o.id)
        riders = [
            RiderCandidate(
                id=r.id,
                lat=r.lat,
                lon=r.lon,
                load=int(r.load),
                capacity=int(r.capacity),
                online=r.presence == topics.PRESENCE_ONLINE,
                on_duty=bool(r.on_duty),
                position_at=r.position_at,
                speed_kmh=r.speed_kmh,
                last_decline_at=r.last_decline_at,
                idle_since=r.idle_since,
                declined_orders=frozenset(declined.get(r.id, ())),
            )
            for r in rider_rows
        ]
        overdue = [
            OverdueOffer(offer=r.offer_id, order=r.id, rider=r.rider, deadline=r.offer_deadline)
            for r in overdue_rows
            if r.rider is not None
        ]
        return Snapshot(orders=orders, riders=riders, offline=offline, overdue=overdue, full=full)

    # --- deciding -------------------------------------------------------------------------------

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

    # --- one pass -------------------------------------------------------------------------------

    def run_pass(self, publish: Callable[[str, bytes], None], *, full: bool = True) -> PassResult:
        """Read, decide and publish (expiries first, then offers). ``full``: see :meth:`read`."""
        now = self.clock()
        t0 = time.perf_counter()
        snap = self.read(now, full=full)
        t1 = time.perf_counter()
        result = self.decide(snap, now)
        t2 = time.perf_counter()
        for e in result.expired:
            publish(EVENTS_TOPIC, ev.encode(e))
        for offer in result.offers:
            publish(EVENTS_TOPIC, ev.encode(offer))
        t3 = time.perf_counter()
        result.read_s, result.plan_s, result.publish_s = t1 - t0, t2 - t1, t3 - t2
        if result.offers or result.expired:
            result.published_at = time.time()
            log.info(
                "dispatch pass",
                mode=result.mode,
                waiting=result.waiting,
                riders=result.riders,
                offers=len(result.offers),
                expired=len(result.expired),
                read_ms=round(result.read_s * 1000, 2),
                plan_ms=round(result.plan_s * 1000, 2),
            )
        for e in result.expired:
            log.info("offer expired", offer=e.data.offer, order=e.data.order, rider=e.data.rider)
        for offer in result.offers:
            d = offer.data
            log.debug("offer", order=d.order, rider=d.rider, mode=d.mode, cost=d.cost, offer=d.offer)
        return result


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


# --- the service ----------------------------------------------------------------------------------


@dataclass
class DispatchStats:
    """Counters and recent passes, for tests and the benchmark."""

    passes: int = 0
    offers: int = 0
    expired: int = 0
    failures: int = 0
    recent: deque[PassResult] = field(default_factory=lambda: deque(maxlen=1000))
    #: Passes by what they decided: idle (nothing to do), single or batch planning.
    modes: Counter[str] = field(default_factory=Counter)

    def figures(self) -> Iterator[Figure]:
        """These counters for Prometheus (read at scrape time)."""
        yield Figure("bloomwire_dispatch_offers", "Offers made to riders", self.offers)
        yield Figure("bloomwire_dispatch_expired", "Offers that timed out unanswered", self.expired)
        yield Figure("bloomwire_dispatch_pass_failures", "Passes that failed and were retried", self.failures)
        for mode, n in list(self.modes.items()):
            yield Figure("bloomwire_dispatch_passes", "Dispatch passes by mode", n, {"mode": mode})


class PassLoop:
    """Runs the dispatcher's passes one at a time, in a worker thread, whenever woken.

    Woken by the tick (a ``full`` pass: overdue offers too) and by events; wake-ups that come
    during a pass fold into the next one, which carries the earliest trigger time.
    """

    def __init__(
        self, dispatcher: Dispatcher, publish: Callable[[str, bytes], None], stats: DispatchStats
    ) -> None:
        self.dispatcher = dispatcher
        self.publish = publish
        self.stats = stats
        self._wake = asyncio.Event()
        self._trigger_at: float | None = None
        self._full = True
        self._settling = False
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def wake(self, trigger_at: float | None = None, *, full: bool = False) -> None:
        """Ask for a pass as soon as the current one (if any) is done (``full``: also look for
        overdue offers, as every tick does)."""
        self._full = self._full or full
        if trigger_at is not None and (self._trigger_at is None or trigger_at < self._trigger_at):
            self._trigger_at = trigger_at
        self._wake.set()

    def presence_changed(self, received_at: float) -> None:
        """A rider came or went: a pass now, and another once the persister has surely stored it."""
        self.wake(received_at)
        if not self._settling:
            self._settling = True
            asyncio.get_running_loop().call_later(0.25, self._settled)

    def _settled(self) -> None:
        self._settling = False
        self.wake()

    def start(self) -> None:
        """Start the loop, with a full pass first."""
        self._task = asyncio.create_task(self._run(), name="dispatch-passes")
        self.wake(full=True)

    async def stop(self, timeout: float = 30.0) -> None:
        """Let the current pass finish (``timeout`` at most, then cancel it) and end the loop."""
        self._stopping = True
        self._wake.set()
        task, self._task = self._task, None
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=timeout)
        except TimeoutError:
            await cancel_and_wait(task)

    async def _run(self) -> None:
        delay = 0.2
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            if self._stopping:
                break
            trigger, self._trigger_at = self._trigger_at, None
            full, self._full = self._full, False
            try:
                result = await asyncio.to_thread(self.dispatcher.run_pass, self.publish, full=full)
            except Exception as exc:
                self._full = self._full or full
                self.stats.failures += 1
                if isinstance(exc, SQLAlchemyError):  # e.g. no schema yet: the next tick retries
                    log.warning("store not readable; retrying", error=(str(exc).splitlines() or [""])[0])
                else:
                    log.exception("dispatch pass failed; retrying")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            delay = 0.2
            result.trigger_at = trigger
            self.stats.passes += 1
            self.stats.offers += len(result.offers)
            self.stats.expired += len(result.expired)
            self.stats.modes[result.mode] += 1
            self.stats.recent.append(result)


@dataclass
class DispatchState:
    """What the dispatch service holds while it runs (its start-up state)."""

    dispatcher: Dispatcher
    passes: PassLoop
    scheduler: AsyncIOScheduler


class DispatchService(Service[DispatchState]):
    """The dispatch :class:`Service`: its handlers, start-up and shutdown, and its statistics."""

    def __init__(
        self,
        config: DispatchConfig,
        metrics: ServiceMetrics | None = None,
        *,
        database_url: str = "",
        clock: Callable[[], datetime] = ev.now,
    ) -> None:
        super().__init__(NAME, metrics=metrics)
        self.config = config
        self.database_url = database_url
        self.clock = clock
        self.stats = DispatchStats()

    @property
    def dispatcher(self) -> Dispatcher | None:
        """The running dispatcher (None unless running)."""
        return self.state.dispatcher if self.has_state else None

    def _publish(self, topic: str, payload: bytes) -> None:
        self.publish(topic, payload, qos=1)

    async def on_status(self, event: ev.Event, msg: Message) -> None:
        """An order was created, became ready again or closed (a rider freed): a pass soon."""
        if isinstance(event, ev.OrderStatusChangedEvent) and event.data.status in _WAKE_STATUSES:
            self.state.passes.wake(msg.received_at)

    async def on_presence(self, msg: Message) -> None:
        """A rider came or went (the payload does not matter: the store says which)."""
        # The raw presence reaches us about when it reaches the persister: look now, and again
        # once the persister has surely committed it (the tick would catch it anyway).
        self.state.passes.presence_changed(msg.received_at)

    async def on_refusal(self, refusal: ev.Refusal, msg: Message) -> None:
        """The persister refused one of our events (dead letter): the dispatcher forgets it."""
        if refusal.topic != EVENTS_TOPIC:
            return
        log.warning("persister refused a dispatch event", id=refusal.id, reason=refusal.reason)
        if refusal.id is not None:
            self.state.dispatcher.refused(refusal.id)

    async def on_start(self) -> DispatchState:
        """Open the store read-only, start the pass loop and the tick."""
        logging.getLogger("apscheduler").setLevel(logging.WARNING)
        engine = await asyncio.to_thread(make_engine, self.database_url, readonly=True)
        dispatcher = Dispatcher(engine, clock=self.clock, config=self.config)
        passes = PassLoop(dispatcher, self._publish, self.stats)
        scheduler = AsyncIOScheduler(timezone=UTC)
        scheduler.add_job(
            _tick,
            "interval",
            args=(passes,),
            seconds=self.config.tick_s,
            id="dispatch-tick",
            max_instances=1,
            coalesce=True,
        )
        passes.start()
        scheduler.start()
        return DispatchState(dispatcher, passes, scheduler)

    async def on_stop(self) -> None:
        """Stop the tick, let the current pass finish (30 s at most), close the store."""
        if not self.has_state:  # the start-up failed before anything was opened
            return
        state = self.state
        if state.scheduler.running:
            state.scheduler.shutdown(wait=False)
        await state.passes.stop()
        state.dispatcher.engine.dispose()


async def _tick(passes: PassLoop) -> None:
    passes.wake(full=True)


def build(
    settings: Settings,
    *,
    clock: Callable[[], datetime] = ev.now,
    offer_timeout_s: float = 45.0,
    tick_s: float = 1.0,
    batch_threshold: int = 3,
    weights: Weights = DEFAULT_WEIGHTS,
    top: int = 10,
    config: DispatchConfig | None = None,
    metrics: ServiceMetrics | None = None,
) -> DispatchService:
    """Declare the dispatch service. ``config`` (if given) overrides the individual options."""
    cfg = config or DispatchConfig(
        offer_timeout_s=offer_timeout_s,
        tick_s=tick_s,
        batch_threshold=batch_threshold,
        weights=weights,
        top=top,
    )
    if cfg.offer_timeout_s <= 0 or cfg.tick_s <= 0 or cfg.batch_threshold < 1:
        raise ValueError("offer_timeout_s and tick_s must be > 0 and batch_threshold >= 1")
    service = DispatchService(cfg, metrics, database_url=settings.database_url, clock=clock)
    if metrics is not None:
        metrics.registry.register(FiguresCollector(service.stats.figures))
    service.on_startup(service.on_start)
    service.handle(topics.all_orders_filter(topics.OrderChannel.STATUS), model=ev.decode)(service.on_status)
    service.handle(topics.ALL_PRESENCE_FILTER)(service.on_presence)
    service.handle(topics.DEADLETTER, model=ev.Refusal)(service.on_refusal)
    service.on_shutdown(service.on_stop)
    return service
