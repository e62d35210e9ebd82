"""The alerts service's incremental evaluation finds what a full evaluation finds (#19).

:class:`Watch` looks again only at changed rows and at subjects whose rule is due; these tests
compare it, step by step, with :func:`evaluate_by_key` over the whole state at the same time.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from hypothesis import example, given, settings
from hypothesis import strategies as st

from bloomwire.contract.events import AlertRule, Presence
from bloomwire.contract.lifecycle import FailureReason, OrderStatus
from bloomwire.services.alerts.config import RulesConfig, Thresholds
from bloomwire.services.alerts.rules import (
    OrderView,
    RiderView,
    Span,
    evaluate_by_key,
    order_spans,
    rider_offline_spans,
)
from bloomwire.services.alerts.watch import Watch

S = OrderStatus
BASE = datetime(2027, 2, 14, 12, 0, tzinfo=UTC)
MIN = timedelta(minutes=1)
CONFIG = RulesConfig(
    shops={
        "s1": Thresholds(unassigned_min=3, stale_position_min=2, rider_offline_min=0),
        "s2": Thresholds(disabled=frozenset({AlertRule.OVERDUE, AlertRule.CUSTOMER_UNREACHABLE})),
    }
)
RIDERS = ("r1", "r2", "r3")
ORDERS = ("o1", "o2", "o3", "o4", "o5")

minutes = st.integers(min_value=-90, max_value=90).map(lambda m: BASE + m * MIN)
maybe_minutes = st.none() | minutes


@st.composite
def order_views(draw: st.DrawFn, oid: str) -> OrderView:
    status = draw(st.sampled_from(list(OrderStatus)))
    end = draw(minutes)
    return OrderView(
        id=oid,
        shop=draw(st.sampled_from(("s1", "s2", "s3"))),
        status=status,
        rider=draw(st.none() | st.sampled_from(RIDERS)),
        customer_name="C",
        window_start=end - 60 * MIN,
        window_end=end,
        eta=draw(maybe_minutes),
        created_at=draw(minutes),
        closed_at=draw(maybe_minutes),
        failure_reason=draw(st.none() | st.sampled_from([r.value for r in FailureReason])),
        updated_at=draw(minutes),
    )


@st.composite
def rider_views(draw: st.DrawFn, rid: str) -> RiderView:
    return RiderView(
        id=rid,
        presence=draw(st.sampled_from(list(Presence))),
        presence_at=draw(maybe_minutes),
        position_at=draw(maybe_minutes),
    )


def _full(orders: dict[str, OrderView], riders: dict[str, RiderView], now: datetime) -> set[object]:
    return set(evaluate_by_key(orders.values(), riders, now, CONFIG.for_shop))


def _held(spans: list[tuple[object, Span]], now: datetime) -> set[object]:
    return {key for key, span in spans if span.holds(now)}


ON_WAY = OrderView(
    id="o1", shop="s3", status=S.EN_ROUTE, rider="r1", window_start=BASE - 60 * MIN, window_end=BASE,
    eta=BASE + 20 * MIN, created_at=BASE - 90 * MIN, updated_at=BASE - 10 * MIN,
)  # fmt: skip
OFFLINE = RiderView(id="r1", presence=Presence.OFFLINE, presence_at=BASE - MIN, position_at=BASE - 4 * MIN)


@given(order=order_views("o1"), rider=rider_views("r1"), now=minutes)
@example(order=ON_WAY, rider=OFFLINE, now=BASE)  # eta_slip until overdue takes over, at the boundary
@example(order=ON_WAY, rider=OFFLINE, now=BASE + 5 * MIN + timedelta(microseconds=1))
@example(order=replace(ON_WAY, shop="s1"), rider=OFFLINE, now=BASE - 2 * MIN)  # stale at exactly 2 min
@example(
    order=replace(ON_WAY, status=S.FAILED, failure_reason="customer_unreachable", shop="s2"),
    rider=OFFLINE,
    now=BASE,
)  # customer_unreachable disabled: delivery_failed takes it
def test_spans_hold_exactly_when_the_rules_find(order: OrderView, rider: RiderView, now: datetime) -> None:
    riders = {rider.id: rider}
    expected = _full({order.id: order}, riders, now)
    rider_view = riders.get(order.rider) if order.rider else None
    spans = order_spans(order, rider_view, CONFIG.for_shop(order.shop))
    offline = rider_offline_spans(rider, [order], CONFIG.for_shop) if order.rider == rider.id else []
    assert _held([*spans, *offline], now) == expected


steps = st.lists(
    st.one_of(
        st.tuples(st.just("time"), st.integers(min_value=0, max_value=40)),
        st.tuples(st.just("order"), st.sampled_from(ORDERS)),
        st.tuples(st.just("rider"), st.sampled_from(RIDERS)),
        st.tuples(st.just("drop"), st.sampled_from(ORDERS + RIDERS)),
    ),
    max_size=25,
)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), plan=steps)
@example(data=None, plan=[("time", 3), ("time", 1)])
def test_watch_finds_what_a_full_evaluation_finds_at_every_step(
    data: st.DataObject, plan: list[tuple[str, object]]
) -> None:
    if data is None:  # the explicit example: a fixed state, time alone moving
        orders = {"o1": ON_WAY, "o2": replace(ON_WAY, id="o2", status=S.CREATED, rider=None, shop="s1")}
        riders = {"r1": OFFLINE}
    else:
        orders = {o: data.draw(order_views(o)) for o in ORDERS}
        riders = {r: data.draw(rider_views(r)) for r in RIDERS}
    now = BASE - 30 * MIN
    watch = Watch(CONFIG.for_shop)
    for kind, arg in [("time", 0), *plan]:
        if kind == "time":
            now += int(arg) * MIN + timedelta(seconds=17)  # type: ignore[call-overload]
        elif kind == "order" and data is not None:
            orders = {**orders, str(arg): data.draw(order_views(str(arg)))}
        elif kind == "rider" and data is not None:
            riders = {**riders, str(arg): data.draw(rider_views(str(arg)))}
        elif kind == "drop":
            orders = {k: v for k, v in orders.items() if k != arg}
            riders = {k: v for k, v in riders.items() if k != arg}
        watch.update(orders, riders, now)
        full = evaluate_by_key(orders.values(), riders, now, CONFIG.for_shop)
        assert set(watch.found) == set(full), (kind, arg, now)
        for key, finding in full.items():
            assert watch.finding(key, now) == finding


def test_watch_visits_only_what_changed_or_is_due() -> None:
    waiting = [
        OrderView(id=f"o{i}", shop="s3", status=S.CREATED, window_start=BASE + 60 * MIN,
                  window_end=BASE + 120 * MIN, created_at=BASE + i * MIN, updated_at=BASE)
        for i in range(100)
    ]  # fmt: skip
    orders = {o.id: o for o in waiting}
    watch = Watch(CONFIG.for_shop)
    watch.update(orders, {}, BASE)
    assert watch.visited == 100 and not watch.found
    # Unassigned after 10 minutes: at +10.5 min only o0 is due; nothing else is looked at.
    watch.update(orders, {}, BASE + 10 * MIN + 30 * timedelta(seconds=1))
    assert watch.visited == 1 and set(watch.found) == {(AlertRule.UNASSIGNED, "s3", "o0", None)}
    # One row changes (accepted): only it is looked at, and its alert condition clears.
    orders = {**orders, "o0": replace(orders["o0"], status=S.ACCEPTED, rider="r1")}
    watch.update(orders, {}, BASE + 10 * MIN + 31 * timedelta(seconds=1))
    assert watch.visited == 2 and not watch.found  # the order, and rider r1's offline rule
    # The clock going back starts over (a span looked at may flip back).
    watch.update(orders, {}, BASE)
    assert watch.visited == 101
