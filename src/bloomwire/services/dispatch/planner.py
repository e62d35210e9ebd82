"""Which rider gets which order: costs, eligibility, one-by-one and joint (peak) assignment.

Pure functions over plain data (no I/O, no clock: ``now`` is always passed in).

Cost of offering order O to rider R, in seconds::

    travel(R -> shop of O)              haversine x road factor / speed
  + load_penalty_s x R.load             orders R already carries
  + decline_penalty_s x decay           R declined something recently (linear decay)
  - idle bonus                          tiny tie-break: the longer idle, the sooner offered

Riders that are offline, off duty, full, without a fresh position, or that declined O before
are not offered O at all. Every :class:`Decision` keeps the candidates and their costs so the
shop can see why a rider was chosen.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_array
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

from bloomwire.contract.geo import (
    DEFAULT_ROAD_FACTOR,
    DEFAULT_SPEED_KMH,
    distance_m,
    distance_matrix_m,
    travel_seconds,
    travel_seconds_array,
)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class RiderCandidate:
    """What dispatch knows about a rider at decision time (a projection of ``RiderRow``)."""

    id: str
    lat: float | None
    lon: float | None
    load: int
    capacity: int
    online: bool
    on_duty: bool
    position_at: datetime | None
    speed_kmh: float | None
    last_decline_at: datetime | None
    idle_since: datetime | None
    declined_orders: frozenset[str] = frozenset()


@dataclass(frozen=True)
class OrderRequest:
    """An order waiting for a rider; the rider must first go to the pickup point (the shop)."""

    id: str
    shop: str
    pickup_lat: float
    pickup_lon: float
    created_at: datetime


@dataclass(frozen=True)
class Weights:
    """Tuning of the cost function. All penalties are in seconds, comparable to travel time.

    ``idle_bonus`` is seconds per hour idle, capped at ``idle_cap_h`` hours: with the defaults at
    most 2 s (about 8 m of straight-line distance at 18 km/h), so it only separates near-ties.
    A rider's own recent speed counts only when faster than ``default_speed_kmh``: a rider
    standing at a shop or a red light will ride at the normal speed once given work.
    ``wait_credit_s_per_min`` is used by :func:`assign_joint` only when there are more orders
    than free slots: it lowers an order's whole row by that much per minute waited, so the
    longest-waiting orders are not starved by cheaper fresh ones (a row-constant shift, so it
    never changes which rider serves which order when every order can be served).
    """

    road_factor: float = DEFAULT_ROAD_FACTOR
    default_speed_kmh: float = DEFAULT_SPEED_KMH
    load_penalty_s: float = 300.0
    decline_penalty_s: float = 600.0
    decline_window_s: float = 1800.0
    stale_after_s: float = 120.0
    idle_bonus: float = 0.5
    idle_cap_h: float = 4.0
    wait_credit_s_per_min: float = 30.0


DEFAULT_WEIGHTS = Weights()


@dataclass(frozen=True, slots=True)
class CandidateCost:
    """One rider considered for one order: eligibility and the cost breakdown (seconds).

    ``total`` is None when the rider is not eligible (``reason`` says why); ``distance_m`` and
    ``travel_s`` are None when the rider has no known position.
    """

    rider: str
    reason: str | None
    distance_m: float | None
    travel_s: float | None
    load: int
    capacity: int
    load_penalty_s: float
    decline_penalty_s: float
    idle_bonus_s: float
    total: float | None

    @property
    def eligible(self) -> bool:
        """True if the rider may be offered the order."""
        return self.reason is None

    def describe(self) -> str:
        """One line for the shop, e.g. ``r7: 420 s travel (1.6 km) + 300 s load (1/3) = 720 s``."""
        where = ""
        if self.travel_s is not None and self.distance_m is not None:
            where = f"{self.travel_s:.0f} s travel ({self.distance_m / 1000:.1f} km away)"
        if self.total is None:
            return f"{self.rider}: not offered, {self.reason}" + (f"; {where}" if where else "")
        parts = [where]
        if self.load_penalty_s:
            parts.append(f"+ {self.load_penalty_s:.0f} s load ({self.load}/{self.capacity})")
        if self.decline_penalty_s:
            parts.append(f"+ {self.decline_penalty_s:.0f} s recent decline")
        if self.idle_bonus_s:
            parts.append(f"- {self.idle_bonus_s:.1f} s idle bonus")
        return f"{self.rider}: {' '.join(parts)} = {self.total:.0f} s"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for the decision event)."""
        return {
            "rider": self.rider,
            "eligible": self.eligible,
            "reason": self.reason,
            "distance_m": _round(self.distance_m),
            "travel_s": _round(self.travel_s),
            "load": self.load,
            "capacity": self.capacity,
            "load_penalty_s": _round(self.load_penalty_s),
            "decline_penalty_s": _round(self.decline_penalty_s),
            "idle_bonus_s": _round(self.idle_bonus_s, 2),
            "total_s": _round(self.total),
        }


@dataclass(frozen=True)
class Decision:
    """Outcome of :func:`rank`: the chosen rider (or None) and every rider considered.

    ``considered`` is sorted: eligible riders by total cost (cheapest first, ties by id), then the
    riders not offered the order, nearest first.
    """

    order: str
    rider: str | None
    decided_at: datetime
    considered: list[CandidateCost] = field(default_factory=list)

    @property
    def chosen(self) -> CandidateCost | None:
        """The chosen candidate's breakdown."""
        return self.considered[0] if self.rider is not None else None

    @property
    def reason(self) -> str:
        """A one-sentence explanation for the shop."""
        n = len(self.considered)
        eligible = [c for c in self.considered if c.eligible]
        if self.rider is None or not eligible:
            why = Counter((c.reason or "").split(" (")[0] for c in self.considered)
            detail = ", ".join(f"{k}: {v}" for k, v in why.most_common())
            return f"no eligible rider among {n}" + (f" ({detail})" if detail else "")
        best = eligible[0]
        text = f"{best.describe()}; cheapest of {len(eligible)} eligible among {n} riders"
        if len(eligible) > 1:
            runner_up = eligible[1]
            text += f"; next {runner_up.rider} at {runner_up.total or 0:.0f} s"
        return text

    def to_dict(self, top: int = 10) -> dict[str, Any]:
        """JSON-ready form: the ``top`` cheapest eligible candidates and counts of the rest."""
        eligible = [c for c in self.considered if c.eligible]
        skipped = Counter((c.reason or "").split(" (")[0] for c in self.considered if not c.eligible)
        return {
            "order": self.order,
            "rider": self.rider,
            "decided_at": self.decided_at.isoformat(),
            "reason": self.reason,
            "eligible": len(eligible),
            "considered": [c.to_dict() for c in eligible[:top]],
            "not_offered": dict(skipped),
        }


@dataclass(frozen=True, slots=True)
class Assignment:
    """One order given to one rider by :func:`assign_greedy` or :func:`assign_joint`."""

    order: str
    rider: str
    cost: float
    travel_s: float


# --- scalar path (one rider, one order) ------------------------------------------------------


def _round(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(x, nd)


def _fmt_age(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _has_position(r: RiderCandidate) -> bool:
    return r.lat is not None and r.lon is not None and r.position_at is not None


def _static_reason(r: RiderCandidate, now: datetime, w: Weights) -> str | None:
    """Ineligibility that does not depend on the order."""
    if not r.online:
        return "offline"
    if not r.on_duty:
        return "off duty"
    if r.load >= r.capacity:
        return f"full ({r.load}/{r.capacity})"
    if not _has_position(r):
        return "no position"
    assert r.position_at is not None
    age = (now - r.position_at).total_seconds()
    if age > w.stale_after_s:
        return f"position stale ({_fmt_age(age)} old)"
    return None


def eligibility(
    rider: RiderCandidate, order: OrderRequest, now: datetime, weights: Weights = DEFAULT_WEIGHTS
) -> str | None:
    """None if ``rider`` may be offered ``order``, else a reason a person can read."""
    reason = _static_reason(rider, now, weights)
    if reason is None and order.id in rider.declined_orders:
        return "declined this order before"
    return reason


def _dispatch_speed(speed_kmh: float | None, w: Weights) -> float:
    if speed_kmh is None or not math.isfinite(speed_kmh) or speed_kmh <= 0:
        return w.default_speed_kmh
    return max(speed_kmh, w.default_speed_kmh)


def _decline_penalty(last_decline_at: datetime | None, now: datetime, w: Weights) -> float:
    if last_decline_at is None or w.decline_window_s <= 0:
        return 0.0
    age = max((now - last_decline_at).total_seconds(), 0.0)
    return w.decline_penalty_s * max(0.0, 1.0 - age / w.decline_window_s)


def _idle_bonus(idle_since: datetime | None, now: datetime, w: Weights) -> float:
    if idle_since is None:
        return 0.0
    hours = max((now - idle_since).total_seconds(), 0.0) / 3600.0
    return w.idle_bonus * min(hours, w.idle_cap_h)


def cost(
    rider: RiderCandidate, order: OrderRequest, now: datetime, weights: Weights = DEFAULT_WEIGHTS
) -> CandidateCost:
    """Eligibility and cost breakdown of offering ``order`` to ``rider`` at ``now``."""
    w = weights
    reason = eligibility(rider, order, now, w)
    dist: float | None = None
    travel: float | None = None
    if rider.lat is not None and rider.lon is not None:
        dist = distance_m(rider.lat, rider.lon, order.pickup_lat, order.pickup_lon)
        travel = travel_seconds(dist, _dispatch_speed(rider.speed_kmh, w), w.road_factor)
    load_pen = w.load_penalty_s * rider.load
    decline = _decline_penalty(rider.last_decline_at, now, w)
    idle = _idle_bonus(rider.idle_since, now, w)
    total = None
    if reason is None and travel is not None:
        total = travel + load_pen + decline - idle
    return CandidateCost(
        rider=rider.id,
        reason=reason,
        distance_m=dist,
        travel_s=travel,
        load=rider.load,
        capacity=rider.capacity,
        load_penalty_s=load_pen,
        decline_penalty_s=decline,
        idle_bonus_s=idle,
        total=total,
    )


# --- vectorised path (many riders, many orders) ------------------------------------------------


@dataclass(frozen=True)
class _Fleet:
    """Riders as column arrays, sorted by id (so every tie resolves by rider id)."""

    riders: list[RiderCandidate]
    lat: FloatArray
    lon: FloatArray
    has_pos: BoolArray
    speed: FloatArray
    load: IntArray
    capacity: IntArray
    decline: FloatArray
    idle: FloatArray
    reasons: list[str | None]
    ok: BoolArray

    @classmethod
    def build(cls, riders: Sequence[RiderCandidate], now: datetime, w: Weights) -> _Fleet:
        rs = sorted(riders, key=lambda r: r.id)
        reasons = [_static_reason(r, now, w) for r in rs]
        has_pos = np.array([_has_position(r) for r in rs], dtype=np.bool_)
        return cls(
            riders=rs,
            lat=np.array([r.lat if r.lat is not None else 0.0 for r in rs], dtype=np.float64),
            lon=np.array([r.lon if r.lon is not None else 0.0 for r in rs], dtype=np.float64),
            has_pos=has_pos,
            speed=np.array([_dispatch_speed(r.speed_kmh, w) for r in rs], dtype=np.float64),
            load=np.array([r.load for r in rs], dtype=np.intp),
            capacity=np.array([r.capacity for r in rs], dtype=np.intp),
            decline=np.array([_decline_penalty(r.last_decline_at, now, w) for r in rs]),
            idle=np.array([_idle_bonus(r.idle_since, now, w) for r in rs], dtype=np.float64),
            reasons=reasons,
            ok=np.array([x is None for x in reasons], dtype=np.bool_),
        )

    def distances(self, orders: Sequence[OrderRequest]) -> FloatArray:
        """Straight-line metres, shape ``(len(orders), len(riders))``.

        Computed once per distinct pickup point: a shop's waiting orders share theirs, so at a
        peak there are far fewer points than orders.
        """
        points = np.array([(o.pickup_lat, o.pickup_lon) for o in orders], dtype=np.float64).reshape(-1, 2)
        unique, back = np.unique(points, axis=0, return_inverse=True)
        by_point = distance_matrix_m(unique[:, 0], unique[:, 1], self.lat, self.lon)
        out: FloatArray = by_point[back.reshape(-1)]
        return out

    def subset(self, keep: BoolArray) -> _Fleet:
        """The riders of ``keep`` only (still sorted by id)."""
        idx = np.flatnonzero(keep)
        return _Fleet(
            riders=[self.riders[j] for j in idx.tolist()],
            lat=self.lat[idx],
            lon=self.lon[idx],
            has_pos=self.has_pos[idx],
            speed=self.speed[idx],
            load=self.load[idx],
            capacity=self.capacity[idx],
            decline=self.decline[idx],
            idle=self.idle[idx],
            reasons=[self.reasons[j] for j in idx.tolist()],
            ok=self.ok[idx],
        )

    def nearby(self, orders: Sequence[OrderRequest]) -> BoolArray:
        """Riders worth a place in a sparse joint assignment: for each distinct pickup point with
        n waiting orders, its 2n + :data:`SPARSE_RIDERS_PER_ORDER` nearest riders that can take one
        (each has a free slot, so they hold at least twice the slots the point needs). Without
        this, a peak's matrices are every order by every rider: 5,000 x 12,500 is 500 MB each."""
        free = self.ok & (self.capacity > self.load) & self.has_pos
        able = np.flatnonzero(free)
        keep = np.zeros(len(self.riders), dtype=np.bool_)
        if not len(able):
            return keep
        points = np.array([(o.pickup_lat, o.pickup_lon) for o in orders], dtype=np.float64).reshape(-1, 2)
        unique, counts = np.unique(points, axis=0, return_counts=True)
        for lo in range(0, len(unique), NEARBY_CHUNK):  # bounded memory: a chunk of points at a time
            part = unique[lo : lo + NEARBY_CHUNK]
            dist = distance_matrix_m(part[:, 0], part[:, 1], self.lat[able], self.lon[able])
            for row, n in zip(dist, counts[lo : lo + NEARBY_CHUNK].tolist(), strict=True):
                k = min(len(able), 2 * n + SPARSE_RIDERS_PER_ORDER)
                nearest = np.argpartition(row, k - 1)[:k] if k < len(able) else np.arange(len(able))
                keep[able[nearest]] = True
        return keep

    def declined(self, orders: Sequence[OrderRequest]) -> BoolArray:
        """``[i, j]`` True if rider j declined order i before."""
        out = np.zeros((len(orders), len(self.riders)), dtype=np.bool_)
        index = {o.id: i for i, o in enumerate(orders)}
        for j, r in enumerate(self.riders):
            for oid in r.declined_orders:
                i = index.get(oid)
                if i is not None:
                    out[i, j] = True
        return out


def rank(
    order: OrderRequest,
    riders: Sequence[RiderCandidate],
    now: datetime,
    weights: Weights = DEFAULT_WEIGHTS,
) -> Decision:
    """Choose the cheapest eligible rider for one order (normal mode) and say why."""
    w = weights
    fleet = _Fleet.build(riders, now, w)
    n = len(fleet.riders)
    if n == 0:
        return Decision(order=order.id, rider=None, decided_at=now, considered=[])
    dist = fleet.distances([order])[0]
    travel = travel_seconds_array(dist, fleet.speed, w.road_factor)
    load_pen = w.load_penalty_s * fleet.load.astype(np.float64)
    total = travel + load_pen + fleet.decline - fleet.idle
    ok = fleet.ok & ~fleet.declined([order])[0]
    # Eligible first by total; the rest nearest first (unknown position last); ties by id order.
    primary = np.where(ok, total, np.where(fleet.has_pos, dist, np.inf))
    perm = np.lexsort((np.arange(n), primary, ~ok))

    considered: list[CandidateCost] = []
    tr, di, lp, tot = travel.tolist(), dist.tolist(), load_pen.tolist(), total.tolist()
    dec, idl, okl, hp = fleet.decline.tolist(), fleet.idle.tolist(), ok.tolist(), fleet.has_pos
    for j in perm.tolist():
        r = fleet.riders[j]
        reason = fleet.reasons[j]
        if reason is None and not okl[j]:
            reason = "declined this order before"
        pos = bool(hp[j])
        considered.append(
            CandidateCost(
                rider=r.id,
                reason=reason,
                distance_m=di[j] if pos else None,
                travel_s=tr[j] if pos else None,
                load=r.load,
                capacity=r.capacity,
                load_penalty_s=lp[j],
                decline_penalty_s=dec[j],
                idle_bonus_s=idl[j],
                total=tot[j] if okl[j] else None,
            )
        )
    chosen = considered[0].rider if considered[0].eligible else None
    return Decision(order=order.id, rider=chosen, decided_at=now, considered=considered)


def _base_matrix(
    orders: Sequence[OrderRequest], fleet: _Fleet, w: Weights
) -> tuple[FloatArray, FloatArray, BoolArray]:
    """Travel seconds, cost without the load term, and feasibility; all ``(orders, riders)``."""
    travel = travel_seconds_array(fleet.distances(orders), fleet.speed, w.road_factor)
    base = travel + (fleet.decline - fleet.idle)
    feasible = fleet.ok & ~fleet.declined(orders)
    return travel, base, feasible


def _by_age(orders: Sequence[OrderRequest]) -> list[OrderRequest]:
    return sorted(orders, key=lambda o: (o.created_at, o.id))


def assign_greedy(
    orders: Sequence[OrderRequest],
    riders: Sequence[RiderCandidate],
    now: datetime,
    weights: Weights = DEFAULT_WEIGHTS,
) -> list[Assignment]:
    """Oldest order first, each to the cheapest rider with a free slot at that moment."""
    w = weights
    todo = _by_age(orders)
    fleet = _Fleet.build(riders, now, w)
    if not todo or not fleet.riders:
        return []
    travel, base, feasible = _base_matrix(todo, fleet, w)
    load = fleet.load.astype(np.float64)
    free = np.where(fleet.ok, np.maximum(fleet.capacity - fleet.load, 0), 0)
    out: list[Assignment] = []
    for i, o in enumerate(todo):
        row = np.where(feasible[i] & (free > 0), base[i] + w.load_penalty_s * load, np.inf)
        j = int(np.argmin(row))
        if not math.isfinite(row[j]):
            continue
        out.append(Assignment(o.id, fleet.riders[j].id, float(row[j]), float(travel[i, j])))
        free[j] -= 1
        load[j] += 1
    return out


#: A joint assignment with more order x slot pairs than this solves a sparse candidate graph
#: (:func:`_solve_sparse`) instead of the dense matrix: the dense solver grows with the
#: product, and at a peak (thousands of orders and slots) takes seconds.
DENSE_PAIRS_MAX = 250_000
#: Sparse candidates: each order's cheapest riders, and each rider's cheapest orders.
SPARSE_RIDERS_PER_ORDER = 8
SPARSE_ORDERS_PER_RIDER = 100
#: Pickup points whose distances to every rider are computed at once by :meth:`_Fleet.nearby`.
NEARBY_CHUNK = 256


@dataclass(frozen=True)
class _Slots:
    """Rider slots (columns): a rider with load L and capacity C has C - L of them, the k-th
    costing ``load_penalty_s x (L + k)``."""

    rider: IntArray  # the rider (fleet index) of each slot
    first: IntArray  # each rider's first slot
    free: IntArray  # each rider's slots
    load_pen: FloatArray  # each slot's load penalty

    @classmethod
    def of(cls, fleet: _Fleet, w: Weights) -> _Slots:
        free = np.where(fleet.ok, np.maximum(fleet.capacity - fleet.load, 0), 0)
        n = int(free.sum())
        rider = np.repeat(np.arange(len(fleet.riders)), free)
        first = np.cumsum(free) - free
        k = np.arange(n) - np.repeat(first, free)
        load_pen = w.load_penalty_s * (fleet.load[rider] + k).astype(np.float64)
        return cls(rider=rider, first=first, free=free, load_pen=load_pen)


def assign_joint(
    orders: Sequence[OrderRequest],
    riders: Sequence[RiderCandidate],
    now: datetime,
    weights: Weights = DEFAULT_WEIGHTS,
) -> list[Assignment]:
    """Peak mode: assign all waiting orders at once with minimum total cost.

    Columns are rider slots (:class:`_Slots`), so the matrix is rectangular. Pairs that may not
    happen get one large finite cost (larger than any set of real pairs can add up to, so the
    solver first maximises the number of real pairs) and are dropped afterwards. Orders that
    get no rider are simply absent from the result. Above :data:`DENSE_PAIRS_MAX` pairs, the
    minimum is over the riders near some pickup point (:meth:`_Fleet.nearby`), each order's
    cheapest of them and each one's cheapest orders (:func:`_solve_sparse`), not over every pair.
    """
    w = weights
    todo = _by_age(orders)
    fleet = _Fleet.build(riders, now, w)
    slots = _Slots.of(fleet, w)
    n_cols = len(slots.rider)
    if not todo or n_cols == 0:
        return []
    if len(todo) * n_cols > DENSE_PAIRS_MAX:  # sparse: only riders near some pickup point count
        fleet = fleet.subset(fleet.nearby(todo))
        slots = _Slots.of(fleet, w)
        n_cols = len(slots.rider)
        if n_cols == 0:
            return []
    travel, base, feasible = _base_matrix(todo, fleet, w)
    feasible &= slots.free > 0
    if not feasible.any():
        return []
    credit = np.zeros(len(todo))
    if len(todo) > n_cols and w.wait_credit_s_per_min:
        waited_min = np.array([max((now - o.created_at).total_seconds(), 0.0) for o in todo]) / 60
        credit = w.wait_credit_s_per_min * waited_min
    solve = _solve_dense if len(todo) * n_cols <= DENSE_PAIRS_MAX else _solve_sparse
    out: list[Assignment] = []
    for i, c in solve(base, feasible, credit, slots):
        j = int(slots.rider[c])
        cost = float(base[i, j] + slots.load_pen[c])
        out.append(Assignment(todo[i].id, fleet.riders[j].id, cost, float(travel[i, j])))
    return out


def _big(costs: FloatArray, k: int) -> float:
    """A cost larger than any ``k`` real pairs (of ``costs``) can add up to."""
    lo, hi = float(costs.min()), float(costs.max())
    return hi + (k + 1) * (hi - lo + 1.0)


def _solve_dense(
    base: FloatArray, feasible: BoolArray, credit: FloatArray, slots: _Slots
) -> list[tuple[int, int]]:
    """(order, slot) pairs of the exact minimum over the whole (orders, slots) matrix."""
    ok = feasible[:, slots.rider]
    solve = base[:, slots.rider] + slots.load_pen - credit[:, None]
    big = _big(solve[ok], min(len(base), len(slots.rider)))
    rows, cols = linear_sum_assignment(np.where(ok, solve, big))
    return [(i, c) for i, c in zip(rows.tolist(), cols.tolist(), strict=True) if ok[i, c]]


def _solve_sparse(
    base: FloatArray, feasible: BoolArray, credit: FloatArray, slots: _Slots
) -> list[tuple[int, int]]:
    """(order, slot) pairs of the minimum over a candidate graph: each order's
    :data:`SPARSE_RIDERS_PER_ORDER` cheapest riders, each rider's :data:`SPARSE_ORDERS_PER_RIDER`
    cheapest orders (all their slots). Every slot also has a dummy order at the large cost, so a
    full matching of the slots always exists; a rider left with a dummy while orders it could
    take went unserved gets every one of its pairs, and the graph is solved once more."""
    cost = np.where(feasible, base, np.inf)
    n_orders, n_riders = cost.shape
    per_order = min(SPARSE_RIDERS_PER_ORDER, n_riders - 1)
    per_rider = min(SPARSE_ORDERS_PER_RIDER, n_orders - 1)
    orders = [
        np.repeat(np.arange(n_orders), per_order + 1),
        # Along rows of the transpose, made contiguous: along axis 0 the strides cost seconds.
        np.argpartition(np.ascontiguousarray(cost.T), per_rider, axis=1)[:, : per_rider + 1].ravel(),
    ]
    riders = [
        np.argpartition(cost, per_order, axis=1)[:, : per_order + 1].ravel(),
        np.repeat(np.arange(n_riders), per_rider + 1),
    ]
    pairs = _match(cost, credit, slots, np.concatenate(orders), np.concatenate(riders))
    unserved = np.ones(n_orders, dtype=np.bool_)
    used = np.zeros(len(slots.rider), dtype=np.bool_)
    for i, c in pairs:
        unserved[i], used[c] = False, True
    short = np.unique(slots.rider[~used])
    wanted = short[np.isfinite(cost[np.ix_(unserved, short)]).any(axis=0)] if unserved.any() else short[:0]
    if not len(wanted):
        return pairs
    orders.append(np.tile(np.arange(n_orders), len(wanted)))
    riders.append(np.repeat(wanted, n_orders))
    return _match(cost, credit, slots, np.concatenate(orders), np.concatenate(riders))


def _match(
    cost: FloatArray, credit: FloatArray, slots: _Slots, orders: IntArray, riders: IntArray
) -> list[tuple[int, int]]:
    """Minimum-cost full matching of the slots over the (order, rider) candidate pairs given."""
    n_orders = len(cost)
    candidate = np.zeros(cost.shape, dtype=np.bool_)
    candidate[orders, riders] = True  # each pair once, however many lists named it
    o, r = np.nonzero(candidate & np.isfinite(cost))
    per = slots.free[r]
    rows = np.repeat(o, per)
    cols = np.repeat(slots.first[r], per) + (np.arange(int(per.sum())) - np.repeat(np.cumsum(per) - per, per))
    values = cost[rows, slots.rider[cols]] + slots.load_pen[cols] - credit[rows]
    n_cols = len(slots.rider)
    big = _big(values, min(n_orders, n_cols))
    lo = float(values.min())
    # Weights must be positive (an explicit zero is no edge): shifted by the same constant for all.
    graph = csr_array(
        (
            np.concatenate([values - lo + 1.0, np.full(n_cols, big - lo + 1.0)]),
            (np.concatenate([rows, n_orders + np.arange(n_cols)]), np.concatenate([cols, np.arange(n_cols)])),
        ),
        shape=(n_orders + n_cols, n_cols),
    )
    matched_rows, matched_cols = min_weight_full_bipartite_matching(graph)
    return [(i, c) for i, c in zip(matched_rows.tolist(), matched_cols.tolist(), strict=True) if i < n_orders]


def total_cost(assignments: Sequence[Assignment]) -> float:
    """Sum of the assignments' costs (seconds)."""
    return float(sum(a.cost for a in assignments))


# --- benchmark -------------------------------------------------------------------------------

#: Berlin bounding box (lat, lon) for random city-sized instances.
BERLIN_BBOX = (52.34, 13.09, 52.68, 13.76)


def random_instance(
    n_orders: int, n_riders: int, seed: int, now: datetime, n_shops: int = 60
) -> tuple[list[OrderRequest], list[RiderCandidate]]:
    """A reproducible random Berlin instance: orders at shops, riders spread over the city."""
    rng = np.random.default_rng(seed)
    lat0, lon0, lat1, lon1 = BERLIN_BBOX
    shops = rng.uniform((lat0, lon0), (lat1, lon1), size=(n_shops, 2))
    orders = []
    for i in range(n_orders):
        s = int(rng.integers(n_shops))
        orders.append(
            OrderRequest(
                id=f"o{i}",
                shop=f"s{s}",
                pickup_lat=float(shops[s, 0]),
                pickup_lon=float(shops[s, 1]),
                created_at=now - timedelta(seconds=float(rng.uniform(0, 1800))),
            )
        )
    riders = []
    for j in range(n_riders):
        load = int(rng.integers(0, 3))
        riders.append(
            RiderCandidate(
                id=f"r{j}",
                lat=float(rng.uniform(lat0, lat1)),
                lon=float(rng.uniform(lon0, lon1)),
                load=load,
                capacity=3,
                online=bool(rng.random() > 0.03),
                on_duty=True,
                position_at=now - timedelta(seconds=float(rng.uniform(0, 150))),
                speed_kmh=float(rng.uniform(0, 30)) if rng.random() < 0.7 else None,
                last_decline_at=(
                    now - timedelta(seconds=float(rng.uniform(0, 3600))) if rng.random() < 0.1 else None
                ),
                idle_since=(now - timedelta(seconds=float(rng.uniform(0, 7200))) if load == 0 else None),
                declined_orders=frozenset(f"o{int(x)}" for x in rng.integers(0, max(n_orders, 1), size=2))
                if rng.random() < 0.1
                else frozenset(),
            )
        )
    return orders, riders


def bench_batch(
    n_orders: int = 1000, n_riders: int = 500, seed: int = 0, repeat: int = 3
) -> dict[str, float]:
    """Time peak-mode joint assignment and one normal-mode :func:`rank` (seconds, median)."""
    now = datetime(2027, 2, 14, 9, 30, tzinfo=UTC)
    orders, riders = random_instance(n_orders, n_riders, seed, now)

    def timed(fn: Callable[[], list[Assignment]]) -> tuple[float, float, list[Assignment]]:
        """Median wall and CPU seconds (on a shared machine the CPU is the figure that holds)."""
        times: list[float] = []
        cpu: list[float] = []
        result: list[Assignment] = []
        for _ in range(max(repeat, 1)):
            t0, c0 = time.perf_counter(), time.process_time()
            result = fn()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        return statistics.median(times), statistics.median(cpu), result

    rank(orders[0], riders, now)  # warm-up (imports, caches)
    joint_s, joint_cpu_s, joint = timed(lambda: assign_joint(orders, riders, now))
    greedy_s, _, greedy = timed(lambda: assign_greedy(orders, riders, now))
    rank_times = []
    for o in orders[: max(repeat, 1) * 10]:
        t0 = time.perf_counter()
        rank(o, riders, now)
        rank_times.append(time.perf_counter() - t0)
    fleet = _Fleet.build(riders, now, DEFAULT_WEIGHTS)
    free = int(np.where(fleet.ok, fleet.capacity - fleet.load, 0).sum())
    return {
        "orders": float(n_orders),
        "riders": float(n_riders),
        "free_slots": float(free),
        "joint_s": joint_s,
        "joint_cpu_s": joint_cpu_s,
        "greedy_s": greedy_s,
        "rank_s": statistics.median(rank_times),
        "joint_assigned": float(len(joint)),
        "greedy_assigned": float(len(greedy)),
        "joint_total_cost_s": total_cost(joint),
        "greedy_total_cost_s": total_cost(greedy),
    }
