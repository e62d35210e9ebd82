"""Dispatch's joint assignment at a peak keeps only the riders near some pickup point (#19): a
fleet spread over a city no longer makes every order-by-rider matrix, and the result is the same."""

from __future__ import annotations

import pytest
from test_planner import NOW, W, order, rider

from bloomwire.services.dispatch import planner
from bloomwire.services.dispatch.planner import _Fleet, assign_joint, total_cost


def test_nearby_keeps_twice_the_slots_each_pickup_point_needs_nearest_first() -> None:
    # 10 orders at a shop, 2 at another 5 km east; riders every 100 m going west, and 5 km east.
    orders = [order(f"a{i}") for i in range(10)] + [order(f"b{i}", 5_000) for i in range(2)]
    west = [rider(f"w{i:03}", -100 * i) for i in range(100)]
    east = [rider(f"e{i:03}", 5_000 + 100 * i) for i in range(20)]
    fleet = _Fleet.build([*west, *east], NOW, W)
    kept = {r.id for r, k in zip(fleet.riders, fleet.nearby(orders).tolist(), strict=True) if k}
    # 2 x 10 + 8 nearest of the first shop, 2 x 2 + 8 of the second.
    assert kept == {f"w{i:03}" for i in range(28)} | {f"e{i:03}" for i in range(12)}


def test_a_pruned_sparse_assignment_equals_the_dense_one_on_a_spread_fleet(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    orders = [order(f"o{i}", 300 * (i % 7), 200 * (i // 7), age_s=i) for i in range(60)]
    riders = [rider(f"r{j:03}", 150 * (j % 20) - 1_000, 150 * (j // 20) - 500) for j in range(300)]
    riders += [rider(f"far{j}", 40_000 + j) for j in range(200)]  # another town: never kept
    dense = assign_joint(orders, riders, NOW, W)
    monkeypatch.setattr(planner, "DENSE_PAIRS_MAX", 0)
    sparse = assign_joint(orders, riders, NOW, W)
    assert len(sparse) == len(dense) == len(orders)
    assert not any(a.rider.startswith("far") for a in sparse)
    assert total_cost(sparse) == pytest.approx(total_cost(dense), rel=0.01)
