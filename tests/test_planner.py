"""Dispatch planner: eligibility, costs, one-order ranking, greedy vs joint batch assignment."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from dataclasses import fields, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest

from bloomwire.contract.geo import EARTH_RADIUS_M, distance_m
from bloomwire.services.dispatch import planner
from bloomwire.services.dispatch.planner import (
    Assignment,
    CandidateCost,
    OrderRequest,
    RiderCandidate,
    Weights,
    assign_greedy,
    assign_joint,
    bench_batch,
    cost,
    eligibility,
    random_instance,
    rank,
    total_cost,
)

NOW = datetime(2027, 2, 14, 9, 30, tzinfo=UTC)
W = Weights()
LAT0, LON0 = 52.5163, 13.3777  # Brandenburg Gate
M_PER_DEG_LAT = EARTH_RADIUS_M * math.pi / 180
M_PER_DEG_LON = M_PER_DEG_LAT * math.cos(math.radians(LAT0))


def at(east_m: float, north_m: float = 0.0) -> tuple[float, float]:
    """A point ``east_m`` / ``north_m`` metres from the Brandenburg Gate."""
    return LAT0 + north_m / M_PER_DEG_LAT, LON0 + east_m / M_PER_DEG_LON


def rider(rid: str, east_m: float = 0.0, north_m: float = 0.0, **kw: Any) -> RiderCandidate:
    lat, lon = at(east_m, north_m)
    base = RiderCandidate(
        id=rid,
        lat=lat,
        lon=lon,
        load=0,
        capacity=3,
        online=True,
        on_duty=True,
        position_at=NOW - timedelta(seconds=10),
        speed_kmh=None,
        last_decline_at=None,
        idle_since=None,
    )
    return replace(base, **kw)


def order(oid: str, east_m: float = 0.0, north_m: float = 0.0, age_s: float = 0) -> OrderRequest:
    lat, lon = at(east_m, north_m)
    return OrderRequest(oid, "s1", lat, lon, NOW - timedelta(seconds=age_s))


O1 = order("o1")


# --- eligibility ---------------------------------------------------------------------------


def test_eligible_rider_has_no_reason() -> None:
    assert eligibility(rider("r1", 500), O1, NOW, W) is None


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"online": False}, "offline"),
        ({"on_duty": False}, "off duty"),
        ({"load": 3}, "full (3/3)"),
        ({"load": 2, "capacity": 2}, "full (2/2)"),
        ({"position_at": NOW - timedelta(minutes=5)}, "position stale (5 min old)"),
        ({"position_at": None}, "no position"),
        ({"lat": None, "lon": None}, "no position"),
        ({"declined_orders": frozenset({"o1"})}, "declined this order before"),
    ],
)
def test_ineligibility_reasons(changes: dict[str, Any], reason: str) -> None:
    r = rider("r1", 500, **changes)
    assert eligibility(r, O1, NOW, W) == reason
    c = cost(r, O1, NOW, W)
    assert c.reason == reason
    assert not c.eligible
    assert c.total is None


def test_position_just_within_stale_limit_is_fresh() -> None:
    r = rider("r1", position_at=NOW - timedelta(seconds=W.stale_after_s))
    assert eligibility(r, O1, NOW, W) is None
    assert eligibility(rider("r1"), O1, NOW, Weights(stale_after_s=5)) == "position stale (10 s old)"


def test_declining_another_order_does_not_exclude() -> None:
    r = rider("r1", declined_orders=frozenset({"o9"}))
    assert eligibility(r, O1, NOW, W) is None


# --- cost ----------------------------------------------------------------------------------


def test_cost_breakdown() -> None:
    r = rider(
        "r1",
        1000,
        load=1,
        last_decline_at=NOW - timedelta(seconds=900),
        idle_since=NOW - timedelta(hours=2),
    )
    c = cost(r, O1, NOW, W)
    assert c.distance_m == pytest.approx(1000, rel=1e-3)
    assert c.travel_s is not None
    assert c.travel_s == pytest.approx(260, rel=1e-3)  # 1.3 km of road at 18 km/h
    assert c.load_penalty_s == 300
    assert c.decline_penalty_s == pytest.approx(300)  # halfway through the 30 min decay
    assert c.idle_bonus_s == pytest.approx(1.0)  # 0.5 s per hour idle
    assert c.total == pytest.approx(c.travel_s + 300 + 300 - 1.0)
    assert "r1" in c.describe() and "load (1/3)" in c.describe()


def test_decline_penalty_decays_to_zero() -> None:
    penalties = [
        cost(rider("r1", last_decline_at=NOW - timedelta(seconds=s)), O1, NOW, W).decline_penalty_s
        for s in (0, 600, 1200, 1800, 7200)
    ]
    assert penalties == pytest.approx([600, 400, 200, 0, 0])


def test_idle_bonus_is_capped_and_tiny() -> None:
    forever = cost(rider("r1", idle_since=NOW - timedelta(days=3)), O1, NOW, W)
    assert forever.idle_bonus_s == pytest.approx(W.idle_bonus * W.idle_cap_h)
    twenty_m = cost(rider("r2", 20), O1, NOW, W).travel_s
    assert twenty_m is not None
    assert forever.idle_bonus_s < twenty_m


def test_rider_speed_only_counts_when_faster_than_default() -> None:
    base = cost(rider("r1", 1000), O1, NOW, W).travel_s
    assert base is not None
    assert cost(rider("r1", 1000, speed_kmh=36.0), O1, NOW, W).travel_s == pytest.approx(base / 2)
    # Standing at a red light (5 km/h estimate) does not make the rider look slow.
    assert cost(rider("r1", 1000, speed_kmh=5.0), O1, NOW, W).travel_s == pytest.approx(base)


# --- rank (normal mode) --------------------------------------------------------------------


def test_nearest_rider_chosen() -> None:
    riders = [rider("far", 3000), rider("near", 400), rider("mid", 1200)]
    d = rank(O1, riders, NOW, W)
    assert d.rider == "near"
    assert [c.rider for c in d.considered] == ["near", "mid", "far"]


def test_load_penalty_lets_slightly_farther_idle_rider_win() -> None:
    busy_near = rider("busy", 500, load=1)
    idle_far = rider("idle", 800, load=0)
    assert rank(O1, [busy_near, idle_far], NOW, W).rider == "idle"
    # ...but not a much farther one: 5 km is ~1300 s of riding, more than one order's penalty.
    assert rank(O1, [busy_near, rider("idle", 5000)], NOW, W).rider == "busy"


def test_recent_decline_penalty_shifts_choice() -> None:
    decliner = rider("a", 300, last_decline_at=NOW - timedelta(minutes=1))
    other = rider("b", 900)
    assert rank(O1, [decliner, other], NOW, W).rider == "b"
    later = NOW + timedelta(hours=1)
    fresh = [replace(r, position_at=later) for r in (decliner, other)]
    assert rank(O1, fresh, later, W).rider == "a"


def test_idle_time_breaks_ties() -> None:
    a = rider("a", 1000, north_m=0, idle_since=NOW - timedelta(minutes=10))
    b = rider("b", 0, north_m=1000, idle_since=NOW - timedelta(hours=2))
    assert rank(O1, [a, b], NOW, W).rider == "b"
    # Identical riders: deterministic by id.
    assert rank(O1, [rider("z", 100), rider("y", 100)], NOW, W).rider == "y"
    # The bonus never beats a real distance difference (50 m).
    near = rider("near", 950)
    long_idle = rider("idle", 1000, idle_since=NOW - timedelta(days=2))
    assert rank(O1, [long_idle, near], NOW, W).rider == "near"


def test_decision_lists_costs_and_reasons() -> None:
    riders = [
        rider("r1", 600),
        rider("r2", 300, load=1),
        rider("r3", 100, online=False),
        rider("r4", 200, declined_orders=frozenset({"o1"})),
        rider("r5", position_at=None, lat=None, lon=None),
        rider("r6", 2000, last_decline_at=NOW - timedelta(minutes=3)),
    ]
    d = rank(O1, riders, NOW, W)
    assert d.rider == "r1"
    assert len(d.considered) == len(riders)
    eligible = [c for c in d.considered if c.eligible]
    assert [c.rider for c in eligible] == ["r1", "r2", "r6"]
    totals = [c.total or 0.0 for c in eligible]
    assert totals == sorted(totals)
    # The vectorised ranking agrees with the scalar cost function.
    by_id = {r.id: r for r in riders}
    for c in d.considered:
        _assert_same(c, cost(by_id[c.rider], O1, NOW, W))
    # Not offered: nearest first, unknown position last, each with its reason.
    rest = [(c.rider, c.reason) for c in d.considered if not c.eligible]
    assert rest == [
        ("r3", "offline"),
        ("r4", "declined this order before"),
        ("r5", "no position"),
    ]
    assert d.chosen is not None and d.chosen.rider == "r1"
    assert "r1" in d.reason and "3 eligible among 6" in d.reason
    payload = d.to_dict(top=2)
    json.dumps(payload)
    assert [c["rider"] for c in payload["considered"]] == ["r1", "r2"]
    assert payload["not_offered"] == {
        "offline": 1,
        "declined this order before": 1,
        "no position": 1,
    }


def _assert_same(a: CandidateCost, b: CandidateCost) -> None:
    for f in fields(CandidateCost):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, float) and isinstance(y, float):
            assert x == pytest.approx(y, rel=1e-9, abs=1e-6), f.name
        else:
            assert x == y, f.name


def test_no_eligible_rider() -> None:
    d = rank(O1, [rider("a", online=False), rider("b", load=3)], NOW, W)
    assert d.rider is None
    assert d.chosen is None
    assert d.reason.startswith("no eligible rider among 2")
    assert "offline: 1" in d.reason and "full: 1" in d.reason
    empty = rank(O1, [], NOW, W)
    assert empty.rider is None and empty.considered == []


# --- batch: greedy vs joint ----------------------------------------------------------------


def _per_rider(assignments: list[Assignment]) -> Counter[str]:
    return Counter(a.rider for a in assignments)


def test_joint_beats_greedy() -> None:
    # o1 (older) at 0 m, o2 at +2 km; rider A at +1 km, rider B at -1.5 km; one slot each.
    # Greedy gives o1 the nearest (A, 1 km), leaving B 3.5 km from o2: 4.5 km in total.
    # Jointly, B takes o1 (1.5 km) and A takes o2 (1 km): 2.5 km.
    orders = [order("o1", 0, age_s=120), order("o2", 2000, age_s=60)]
    riders = [rider("A", 1000, load=2), rider("B", -1500, load=2)]
    greedy = assign_greedy(orders, riders, NOW, W)
    joint = assign_joint(orders, riders, NOW, W)
    assert {(a.order, a.rider) for a in greedy} == {("o1", "A"), ("o2", "B")}
    assert {(a.order, a.rider) for a in joint} == {("o1", "B"), ("o2", "A")}
    assert total_cost(joint) < total_cost(greedy)
    assert total_cost(greedy) - total_cost(joint) == pytest.approx(2000 * 1.3 / 5, rel=1e-3)


def test_joint_respects_capacity() -> None:
    orders = [order(f"o{i}", 10 * i) for i in range(5)]
    riders = [rider("near", 0, load=1, capacity=3), rider("far", 4000)]
    joint = assign_joint(orders, riders, NOW, W)
    counts = _per_rider(joint)
    assert counts["near"] == 2
    assert counts["far"] == 3
    assert len({a.order for a in joint}) == 5
    # The k-th extra order of a rider carries load + k penalties.
    near_costs = sorted(a.cost - a.travel_s for a in joint if a.rider == "near")
    assert near_costs == pytest.approx([300, 600])


def test_joint_more_orders_than_slots() -> None:
    orders = [order(f"o{i}", 100 * i, age_s=60) for i in range(6)]
    riders = [rider("a", 0, load=2), rider("b", 300, load=1), rider("c", online=False)]
    joint = assign_joint(orders, riders, NOW, W)
    assert len(joint) == 3
    assert _per_rider(joint) == Counter({"a": 1, "b": 2})
    assert len({a.order for a in joint}) == 3


def test_joint_more_slots_than_orders() -> None:
    orders = [order("o1", 100), order("o2", 5000)]
    riders = [rider(f"r{i}", 1000 * i) for i in range(6)]
    joint = assign_joint(orders, riders, NOW, W)
    assert {a.order for a in joint} == {"o1", "o2"}
    assert dict((a.order, a.rider) for a in joint) == {"o1": "r0", "o2": "r5"}


def test_joint_never_assigns_infeasible_pairs() -> None:
    orders = [order("o1"), order("o2", 100)]
    only = rider("r1", 50, declined_orders=frozenset({"o1"}))
    joint = assign_joint(orders, [only], NOW, W)
    assert [(a.order, a.rider) for a in joint] == [("o2", "r1")]
    assert assign_joint([order("o1")], [only], NOW, W) == []
    assert assign_joint([], [only], NOW, W) == []
    assert assign_joint(orders, [], NOW, W) == []
    assert assign_greedy([order("o1")], [only], NOW, W) == []


def test_wait_credit_serves_long_waiting_orders_when_short_of_riders() -> None:
    old_far = order("old", 3000, age_s=40 * 60)
    fresh_near = order("fresh", 100)
    one_slot = [rider("r", 0, load=2)]
    credit = assign_joint([old_far, fresh_near], one_slot, NOW, W)
    assert [a.order for a in credit] == ["old"]
    no_credit = assign_joint([old_far, fresh_near], one_slot, NOW, Weights(wait_credit_s_per_min=0))
    assert [a.order for a in no_credit] == ["fresh"]
    # With enough riders the credit changes nothing.
    two = [rider("r", 0, load=2), rider("s", 3000, load=2)]
    assert {(a.order, a.rider) for a in assign_joint([old_far, fresh_near], two, NOW, W)} == {
        ("old", "s"),
        ("fresh", "r"),
    }


def _brute_force_min(orders: list[OrderRequest], riders: list[RiderCandidate]) -> float:
    best = math.inf
    for choice in itertools.product(range(len(riders)), repeat=len(orders)):
        loads = Counter(choice)
        total = 0.0
        for i, j in enumerate(choice):
            c = cost(riders[j], orders[i], NOW, W)
            if c.total is None:
                total = math.inf
                break
            total += c.total
        for j, extra in loads.items():
            r = riders[j]
            if r.load + extra > r.capacity:
                total = math.inf
            total += W.load_penalty_s * extra * (extra - 1) / 2
        best = min(best, total)
    return best


@pytest.mark.parametrize("seed", range(8))
def test_joint_is_optimal_on_small_random_instances(seed: int) -> None:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(-3000, 3000, (8, 2)).tolist()
    orders = [order(f"o{i}", xy[i][0], xy[i][1], age_s=i) for i in range(4)]
    riders = [rider(f"r{j}", xy[4 + j][0], xy[4 + j][1], load=int(rng.integers(0, 3))) for j in range(4)]
    if sum(r.capacity - r.load for r in riders) < len(orders):
        riders.append(rider("spare", 0))
    joint = assign_joint(orders, riders, NOW, W)
    greedy = assign_greedy(orders, riders, NOW, W)
    assert len(joint) == len(greedy) == len(orders)
    assert total_cost(joint) == pytest.approx(_brute_force_min(orders, riders))
    assert total_cost(joint) <= total_cost(greedy) + 1e-6


def test_random_city_instance_is_consistent() -> None:
    orders, riders = random_instance(200, 60, seed=4, now=NOW)
    joint = assign_joint(orders, riders, NOW, W)
    greedy = assign_greedy(orders, riders, NOW, W)
    by_id = {r.id: r for r in riders}
    for result in (joint, greedy):
        assert len({a.order for a in result}) == len(result)
        for rid, n in _per_rider(result).items():
            r = by_id[rid]
            assert r.load + n <= r.capacity
        for a in result:
            o = next(o for o in orders if o.id == a.order)
            assert eligibility(by_id[a.rider], o, NOW, W) is None
    assert len(joint) == len(greedy)


@pytest.mark.parametrize(("per_order", "per_rider"), [(8, 100), (1, 1)], ids=["default", "repaired"])
def test_sparse_joint_assignment_serves_as_many_orders_at_about_the_dense_cost(
    monkeypatch: pytest.MonkeyPatch, per_order: int, per_rider: int
) -> None:
    orders, riders = random_instance(600, 200, seed=7, now=NOW)
    dense = assign_joint(orders, riders, NOW, W)
    monkeypatch.setattr(planner, "DENSE_PAIRS_MAX", 0)
    monkeypatch.setattr(planner, "SPARSE_RIDERS_PER_ORDER", per_order)
    monkeypatch.setattr(planner, "SPARSE_ORDERS_PER_RIDER", per_rider)
    sparse = assign_joint(orders, riders, NOW, W)
    by_id = {r.id: r for r in riders}
    assert len({a.order for a in sparse}) == len(sparse) == len(dense), "as many orders served"
    for rid, n in _per_rider(sparse).items():
        assert by_id[rid].load + n <= by_id[rid].capacity
    for a in sparse:
        o = next(o for o in orders if o.id == a.order)
        assert eligibility(by_id[a.rider], o, NOW, W) is None
    assert total_cost(sparse) == pytest.approx(total_cost(dense), rel=0.02)


def test_orders_sharing_a_pickup_point_get_the_same_distances() -> None:
    orders = [order("o1", 0), order("o2", 0), order("o3", 1500)]
    riders = [rider("a", 300), rider("b", -900)]
    fleet = planner._Fleet.build(riders, NOW, W)
    got = fleet.distances(orders)
    assert got.shape == (3, 2)
    assert list(got[0]) == list(got[1])
    for i, o in enumerate(orders):
        for j, r in enumerate(fleet.riders):
            assert r.lat is not None and r.lon is not None
            assert got[i, j] == pytest.approx(distance_m(o.pickup_lat, o.pickup_lon, r.lat, r.lon), rel=1e-9)


def test_total_cost() -> None:
    assert total_cost([]) == 0.0
    assert total_cost([Assignment("o1", "r1", 10.0, 5.0), Assignment("o2", "r1", 2.5, 1.0)]) == 12.5


def test_bench_batch_smoke() -> None:
    result = bench_batch(n_orders=30, n_riders=12, seed=1, repeat=1)
    for key in ("joint_s", "greedy_s", "rank_s", "joint_total_cost_s", "greedy_total_cost_s"):
        assert result[key] >= 0
    assert result["joint_assigned"] == result["greedy_assigned"]
