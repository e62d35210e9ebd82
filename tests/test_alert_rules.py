"""The alert rules: each fires on a realistic state, not without its condition, and at the edge."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import pytest

from bloomwire.contract.events import AlertRule, Presence, Severity
from bloomwire.contract.lifecycle import OrderStatus
from bloomwire.services.alerts.config import RulesConfig, Thresholds
from bloomwire.services.alerts.rules import (
    Finding,
    OrderView,
    RiderView,
    alert_key,
    bench_tick,
    customer_unreachable,
    delivery_failed,
    escalation_due,
    eta_slip,
    evaluate,
    followup_due,
    overdue,
    rider_offline,
    stale_position,
    unassigned,
)

S = OrderStatus
NOW = datetime(2027, 2, 14, 14, 45, tzinfo=UTC)
MIN = timedelta(minutes=1)
SEC = timedelta(seconds=1)
T = Thresholds()


def at(hhmm: str) -> datetime:
    hour, minute = map(int, hhmm.split(":"))
    return NOW.replace(hour=hour, minute=minute)


def make_order(**changes: object) -> OrderView:
    base = OrderView(
        id="o42",
        shop="s1",
        status=S.EN_ROUTE,
        rider="r7",
        customer_name="Ms Zhang",
        window_start=at("13:30"),
        window_end=at("14:30"),
        eta=None,
        created_at=at("12:00"),
        accepted_at=at("12:05"),
        updated_at=at("14:40"),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def make_rider(**changes: object) -> RiderView:
    base = RiderView(
        id="r7",
        presence=Presence.ONLINE,
        presence_at=at("12:00"),
        position_at=NOW - 6 * MIN,
        lat=52.52,
        lon=13.40,
        load=1,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def has_berlin() -> bool:
    try:
        ZoneInfo("Europe/Berlin")
    except Exception:
        return False
    return True


# --- overdue ----------------------------------------------------------------------------------


def test_overdue_fires_with_a_human_sentence() -> None:
    found = overdue(make_order(), make_rider(), NOW, T)
    assert found is not None
    assert found.rule is AlertRule.OVERDUE
    assert found.severity is Severity.CRITICAL
    assert (found.shop, found.order, found.rider) == ("s1", "o42", None)
    assert found.message == (
        "Order o42 for Ms Zhang is 15 min past its promise (window ended 14:30); "
        "rider r7 last seen 6 min ago."
    )
    assert found.action.startswith("Call the rider")
    assert found.subject == ("o42", None)
    assert found.key == (AlertRule.OVERDUE, "s1", "o42", None)


def test_overdue_boundary_is_the_grace() -> None:
    order = make_order()
    edge = order.window_end + T.overdue_grace
    assert overdue(order, make_rider(), edge, T) is None
    assert overdue(order, make_rider(), edge + SEC, T) is not None


@pytest.mark.parametrize("status", [S.DELIVERED, S.FAILED, S.CANCELLED, S.RETURNED])
def test_overdue_not_for_closed_orders(status: OrderStatus) -> None:
    assert overdue(make_order(status=status), make_rider(), NOW, T) is None


def test_overdue_without_rider_says_so_and_suggests_assigning() -> None:
    found = overdue(make_order(status=S.CREATED, rider=None), None, NOW, T)
    assert found is not None
    assert "no rider assigned" in found.message
    assert found.action.startswith("Assign a rider")


def test_overdue_mentions_eta_and_offline_rider() -> None:
    rider = make_rider(presence=Presence.OFFLINE, presence_at=at("14:20"))
    found = overdue(make_order(eta=at("14:55")), rider, NOW, T)
    assert found is not None
    assert "ETA 14:55" in found.message
    assert "rider r7 is offline since 14:20" in found.message


def test_times_in_the_shop_time_zone_and_dated_when_not_today() -> None:
    if not has_berlin():
        pytest.skip("no time zone database")
    berlin = Thresholds(timezone="Europe/Berlin")
    found = overdue(make_order(), make_rider(), NOW, berlin)
    assert found is not None
    assert "window ended 15:30" in found.message
    late = make_order(window_start=NOW - 26 * 60 * MIN, window_end=NOW - 25 * 60 * MIN)
    found = overdue(late, make_rider(), NOW, T)
    assert found is not None
    assert "window ended 13 Feb 13:45" in found.message
    assert "25 h past" in found.message


# --- eta_slip ---------------------------------------------------------------------------------


def test_eta_slip_fires_while_en_route() -> None:
    now = at("14:10")
    found = eta_slip(make_order(eta=at("14:50")), make_rider(position_at=now - 2 * MIN), now, T)
    assert found is not None
    assert found.rule is AlertRule.ETA_SLIP
    assert found.severity is Severity.WARNING
    assert found.message == (
        "Order o42 for Ms Zhang will be about 20 min late: ETA 14:50, window ends 14:30; "
        "rider r7 last seen 2 min ago."
    )
    assert "customer" in found.action


def test_eta_slip_boundary() -> None:
    now = at("14:10")
    order = make_order(eta=at("14:30") + T.eta_slip)
    assert eta_slip(order, make_rider(), now, T) is None
    assert eta_slip(replace(order, eta=order.window_end + T.eta_slip + SEC), None, now, T)


@pytest.mark.parametrize("status", [S.ACCEPTED, S.ARRIVED, S.DELIVERED, S.CREATED])
def test_eta_slip_only_on_the_way(status: OrderStatus) -> None:
    order = make_order(status=status, eta=at("15:30"))
    assert eta_slip(order, make_rider(), at("14:10"), T) is None


def test_eta_slip_needs_an_eta() -> None:
    assert eta_slip(make_order(eta=None), make_rider(), at("14:10"), T) is None


def test_eta_slip_gives_way_to_overdue_unless_overdue_is_disabled() -> None:
    order = make_order(eta=at("15:00"))
    assert eta_slip(order, make_rider(), NOW, T) is None
    assert overdue(order, make_rider(), NOW, T) is not None
    no_overdue = Thresholds(disabled=frozenset({AlertRule.OVERDUE}))
    assert eta_slip(order, make_rider(), NOW, no_overdue) is not None


# --- stale_position ---------------------------------------------------------------------------


def test_stale_position_fires_for_a_quiet_rider() -> None:
    found = stale_position(make_order(), make_rider(position_at=at("14:37")), NOW, T)
    assert found is not None
    assert found.rule is AlertRule.STALE_POSITION
    assert found.subject == ("o42", "r7")
    assert found.message == (
        "No position from rider r7 for 8 min (last at 14:37) while order o42 for Ms Zhang is en route."
    )
    assert found.action.startswith("Call the rider")


def test_stale_position_boundary() -> None:
    edge = NOW - T.stale_position
    assert stale_position(make_order(), make_rider(position_at=edge), NOW, T) is None
    assert stale_position(make_order(), make_rider(position_at=edge - SEC), NOW, T) is not None


@pytest.mark.parametrize("status", [S.ACCEPTED, S.ARRIVED, S.DELIVERED, S.FAILED])
def test_stale_position_only_when_picked_up_or_en_route(status: OrderStatus) -> None:
    order = make_order(status=status)
    assert stale_position(order, make_rider(position_at=at("14:00")), NOW, T) is None


def test_stale_position_of_a_rider_that_never_sent_one_counts_from_the_order() -> None:
    order = make_order(status=S.PICKED_UP, updated_at=at("14:38"))
    found = stale_position(order, make_rider(position_at=None), NOW, T)
    assert found is not None
    assert "has sent no position" in found.message
    assert "picked up" in found.message
    recent = replace(order, updated_at=at("14:42"))
    assert stale_position(recent, make_rider(position_at=None), NOW, T) is None
    assert stale_position(order, None, NOW, T) is not None


def test_stale_position_notes_an_offline_rider() -> None:
    rider = make_rider(position_at=at("14:30"), presence=Presence.OFFLINE)
    found = stale_position(make_order(), rider, NOW, T)
    assert found is not None
    assert found.message.endswith("; the rider is offline.")


# --- rider_offline ----------------------------------------------------------------------------


def test_rider_offline_one_finding_per_shop() -> None:
    rider = make_rider(presence=Presence.OFFLINE, presence_at=at("14:35"))
    carried = [
        make_order(id="o43"),
        make_order(id="o42", status=S.ARRIVED),
        make_order(id="o50", shop="s2", status=S.PICKED_UP, customer_name="Mr Li"),
    ]
    found = rider_offline(rider, carried, NOW, T)
    assert [(f.shop, f.order, f.rider) for f in found] == [("s1", None, "r7"), ("s2", None, "r7")]
    assert all(f.rule is AlertRule.RIDER_OFFLINE for f in found)
    assert found[0].message == ("Rider r7 went offline 10 min ago (14:35) while carrying 2 orders: o42, o43.")
    assert found[1].message == (
        "Rider r7 went offline 10 min ago (14:35) while carrying order o50 for Mr Li."
    )
    assert found[0].key != found[1].key


def test_rider_offline_only_while_carrying() -> None:
    rider = make_rider(presence=Presence.OFFLINE, presence_at=at("14:00"))
    assert rider_offline(rider, [], NOW, T) == []
    not_carried = [make_order(status=S.ACCEPTED), make_order(id="o9", status=S.DELIVERED)]
    assert rider_offline(rider, not_carried, NOW, T) == []
    someone_elses = [make_order(rider="r8")]
    assert rider_offline(rider, someone_elses, NOW, T) == []


def test_rider_offline_not_when_online() -> None:
    assert rider_offline(make_rider(), [make_order()], NOW, T) == []


def test_rider_offline_boundary_and_unknown_since() -> None:
    edge = NOW - T.rider_offline
    rider = make_rider(presence=Presence.OFFLINE, presence_at=edge)
    assert rider_offline(rider, [make_order()], NOW, T) == []
    assert rider_offline(replace(rider, presence_at=edge - SEC), [make_order()], NOW, T)
    found = rider_offline(replace(rider, presence_at=None), [make_order()], NOW, T)
    assert found
    assert "Rider r7 is offline while carrying" in found[0].message


def test_rider_offline_uses_each_shops_thresholds() -> None:
    config = RulesConfig(shops={"s2": Thresholds(rider_offline_min=30)})
    rider = make_rider(presence=Presence.OFFLINE, presence_at=at("14:35"))
    carried = [make_order(), make_order(id="o50", shop="s2")]
    found = rider_offline(rider, carried, NOW, config.for_shop)
    assert [f.shop for f in found] == ["s1"]


def test_rider_offline_lists_at_most_five_orders() -> None:
    rider = make_rider(presence=Presence.OFFLINE, presence_at=None)
    carried = [make_order(id=f"o{i}") for i in range(7)]
    (found,) = rider_offline(rider, carried, NOW, T)
    assert "7 orders: o0, o1, o2, o3, o4 and 2 more" in found.message


# --- unassigned -------------------------------------------------------------------------------


def test_unassigned_fires_for_an_order_nobody_took() -> None:
    order = make_order(status=S.CREATED, rider=None, created_at=at("14:33"), accepted_at=None)
    found = unassigned(order, None, NOW, T)
    assert found is not None
    assert found.rule is AlertRule.UNASSIGNED
    assert found.subject == ("o42", None)
    assert found.message == (
        "Order o42 for Ms Zhang has waited 12 min for a rider "
        "(created 14:33; window starts 13:30): no rider found yet."
    )
    assert found.action == "Assign a rider by hand"


def test_unassigned_boundary() -> None:
    order = make_order(status=S.CREATED, rider=None, accepted_at=None)
    edge = order.created_at + T.unassigned
    assert unassigned(order, None, edge, T) is None
    assert unassigned(order, None, edge + SEC, T) is not None


def test_unassigned_offered_and_declined() -> None:
    offered = make_order(status=S.ASSIGNED, accepted_at=None)
    found = unassigned(offered, make_rider(), NOW, T)
    assert found is not None
    assert "offered to rider r7, not accepted yet" in found.message
    assert found.action == "Call rider r7 or assign another rider"
    declined = make_order(status=S.DECLINED, rider=None)
    found = unassigned(declined, None, NOW, T)
    assert found is not None
    assert "declined" in found.message


@pytest.mark.parametrize("status", [S.ACCEPTED, S.PICKED_UP, S.EN_ROUTE, S.CANCELLED])
def test_unassigned_not_once_accepted(status: OrderStatus) -> None:
    assert unassigned(make_order(status=status), make_rider(), NOW, T) is None


# --- customer_unreachable and delivery_failed -------------------------------------------------


def failed(**changes: object) -> OrderView:
    return replace(
        make_order(
            status=S.FAILED,
            failure_reason="customer_unreachable",
            closed_at=at("14:40"),
        ),
        **changes,  # type: ignore[arg-type]
    )


def test_customer_unreachable_fires_while_the_bouquet_is_out() -> None:
    found = customer_unreachable(failed(), make_rider(), NOW, T)
    assert found is not None
    assert found.rule is AlertRule.CUSTOMER_UNREACHABLE
    assert found.severity is Severity.CRITICAL
    assert found.message == (
        "Rider r7 cannot reach Ms Zhang for order o42 (reported 14:40); the delivery is marked failed."
    )
    assert found.action.startswith("Call the customer")
    reported_at_door = failed(status=S.ARRIVED, closed_at=None, updated_at=at("14:41"))
    found = customer_unreachable(reported_at_door, make_rider(), NOW, T)
    assert found is not None
    assert "(reported 14:41)." in found.message


def test_customer_unreachable_clears_when_returned_or_other_reason() -> None:
    assert customer_unreachable(failed(status=S.RETURNED), make_rider(), NOW, T) is None
    assert customer_unreachable(failed(failure_reason="damaged"), make_rider(), NOW, T) is None
    assert customer_unreachable(make_order(), make_rider(), NOW, T) is None


def test_delivery_failed_fires_for_failed_and_returned() -> None:
    found = delivery_failed(failed(failure_reason="address_wrong"), make_rider(), NOW, T)
    assert found is not None
    assert found.rule is AlertRule.DELIVERY_FAILED
    assert found.message == "Delivery of order o42 for Ms Zhang failed at 14:40: address wrong."
    returned = failed(status=S.RETURNED, closed_at=at("14:44"))
    found = delivery_failed(returned, make_rider(), NOW, T)
    assert found is not None
    assert found.message == (
        "Order o42 for Ms Zhang was returned to the shop at 14:44 "
        "after a failed delivery (customer unreachable)."
    )


@pytest.mark.parametrize("status", [S.EN_ROUTE, S.ARRIVED, S.DELIVERED, S.CANCELLED])
def test_delivery_failed_not_for_other_outcomes(status: OrderStatus) -> None:
    assert delivery_failed(make_order(status=status), make_rider(), NOW, T) is None


def test_delivery_failed_leaves_unreachable_customers_to_their_rule() -> None:
    assert delivery_failed(failed(), make_rider(), NOW, T) is None
    off = Thresholds(disabled=frozenset({AlertRule.CUSTOMER_UNREACHABLE}))
    assert delivery_failed(failed(), make_rider(), NOW, off) is not None


# --- evaluate ---------------------------------------------------------------------------------


def busy_state() -> tuple[list[OrderView], dict[str, RiderView]]:
    riders = {
        "r7": make_rider(position_at=at("14:30")),  # stale
        "r8": make_rider(id="r8", presence=Presence.OFFLINE, presence_at=at("14:30"), position_at=NOW - MIN),
        "r9": make_rider(id="r9", position_at=NOW - MIN),
    }
    orders = [
        make_order(id="o1"),  # r7: overdue + stale position
        make_order(id="o2", window_end=at("15:30"), eta=at("15:45")),  # r7: eta slip + stale
        make_order(id="o3", rider="r8", window_end=at("16:00")),  # r8 offline, carrying
        make_order(id="o4", rider="r8", shop="s2", window_end=at("16:00"), status=S.ARRIVED),
        make_order(id="o5", rider="r8", status=S.ACCEPTED, window_end=at("16:00")),
        make_order(id="o6", status=S.CREATED, rider=None, window_end=at("16:00")),  # unassigned
        make_order(id="o7", shop="s2", status=S.CREATED, rider=None, window_end=at("16:00")),
        failed(id="o8", rider="r9"),  # customer unreachable
        failed(id="o9", rider="r9", failure_reason="damaged"),  # delivery failed
        make_order(id="o10", rider="r9", status=S.DELIVERED, delivered_at=at("14:00")),
        make_order(id="o11", rider="r9", window_end=at("16:00")),  # all fine
    ]
    return orders, riders


def test_evaluate_runs_every_rule_once_per_subject() -> None:
    orders, riders = busy_state()
    config = RulesConfig(shops={"s2": Thresholds(unassigned_min=180)})
    found = evaluate(iter(orders), riders, NOW, config.for_shop)
    got = sorted((f.rule.value, f.shop, f.order or "", f.rider or "") for f in found)
    assert got == [
        ("customer_unreachable", "s1", "o8", ""),
        ("delivery_failed", "s1", "o9", ""),
        ("eta_slip", "s1", "o2", ""),
        ("overdue", "s1", "o1", ""),
        ("rider_offline", "s1", "", "r8"),
        ("rider_offline", "s2", "", "r8"),
        ("stale_position", "s1", "o1", "r7"),
        ("stale_position", "s1", "o2", "r7"),
        ("unassigned", "s1", "o6", ""),  # o7 is in s2, which waits 180 min
    ]
    assert len({f.key for f in found}) == len(found)


def test_evaluate_dedupes_repeated_orders() -> None:
    orders, riders = busy_state()
    found = evaluate(orders + orders, riders, NOW, RulesConfig().for_shop)
    assert len({f.key for f in found}) == len(found)
    assert len(found) == len(evaluate(orders, riders, NOW, RulesConfig().for_shop))


def test_evaluate_skips_disabled_rules_per_shop() -> None:
    orders, riders = busy_state()
    off = frozenset({AlertRule.STALE_POSITION, AlertRule.RIDER_OFFLINE})
    config = RulesConfig(shops={"s1": Thresholds(disabled=off)})
    found = evaluate(orders, riders, NOW, config.for_shop)
    rules_s1 = {f.rule for f in found if f.shop == "s1"}
    assert not rules_s1 & off
    assert (AlertRule.RIDER_OFFLINE, "s2") in {(f.rule, f.shop) for f in found}


def test_evaluate_asks_for_each_shops_thresholds_once() -> None:
    orders, riders = busy_state()
    asked: list[str] = []

    def thresholds_for(shop: str) -> Thresholds:
        asked.append(shop)
        return T

    evaluate(orders, riders, NOW, thresholds_for)
    assert sorted(asked) == ["s1", "s2"]


def test_evaluate_of_a_calm_state_is_empty() -> None:
    orders, riders = busy_state()
    calm: Callable[[str], Thresholds] = RulesConfig().for_shop
    early = at("12:05")
    quiet = [o for o in orders if o.status is not S.FAILED and o.id != "o2"]
    fresh = {k: replace(r, presence=Presence.ONLINE, position_at=early) for k, r in riders.items()}
    assert evaluate(quiet, fresh, early, calm) == []


def test_finding_key_matches_a_stored_alert() -> None:
    found = overdue(make_order(), make_rider(), NOW, T)
    assert found is not None
    assert found.key == alert_key("overdue", "s1", "o42", None)
    assert found.key == ("overdue", "s1", "o42", None)
    assert isinstance(found, Finding)


# --- views, helpers, bench --------------------------------------------------------------------


def test_views_from_store_like_rows() -> None:
    order = make_order(eta=at("14:50"), failure_reason=None)
    row = SimpleNamespace(
        **{name: getattr(order, name) for name in OrderView.__slots__},
        address="Hauptstr. 1",
    )
    row.status = "en_route"
    view = OrderView.from_row(row)
    assert view == order
    assert view.status is S.EN_ROUTE
    rider = make_rider()
    rrow = SimpleNamespace(**{name: getattr(rider, name) for name in RiderView.__slots__})
    rrow.presence = "online"
    assert RiderView.from_row(rrow) == rider
    row.status = "teleported"
    with pytest.raises(ValueError, match="teleported"):
        OrderView.from_row(row)


def test_escalation_and_followup_due() -> None:
    assert not escalation_due(NOW - T.escalate_after, NOW, T)
    assert escalation_due(NOW - T.escalate_after - SEC, NOW, T)
    delivered = make_order(status=S.DELIVERED, delivered_at=NOW - T.followup_after)
    assert not followup_due(delivered, NOW, T)
    assert followup_due(delivered, NOW + SEC, T)
    assert not followup_due(failed(), NOW + 10 * T.followup_after, T)


def test_bench_tick_returns_seconds() -> None:
    seconds = bench_tick(n_orders=300, n_riders=60)
    assert isinstance(seconds, float)
    assert seconds > 0
