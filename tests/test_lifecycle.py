"""The order lifecycle of docs/design.md §3."""

from __future__ import annotations

import itertools

import pytest

from bloomwire.contract.lifecycle import (
    CLOSED,
    OUT_FOR_DELIVERY,
    RIDER_BOUND,
    RIDER_REPORTABLE,
    TERMINAL,
    TRANSITIONS,
    UNASSIGNED,
    OrderStatus,
    can_transition,
    check_transition,
)
from bloomwire.errors import TransitionError

S = OrderStatus

LEGAL = sorted((a, b) for a, nexts in TRANSITIONS.items() for b in nexts)
ILLEGAL = sorted((a, b) for a in S for b in S if b not in TRANSITIONS[a])

HAPPY_PATH = [
    S.CREATED,
    S.ASSIGNED,
    S.ACCEPTED,
    S.PICKED_UP,
    S.EN_ROUTE,
    S.ARRIVED,
    S.DELIVERED,
]


def test_every_status_has_a_row() -> None:
    assert set(TRANSITIONS) == set(S)


@pytest.mark.parametrize(("current", "new"), LEGAL, ids=[f"{a}->{b}" for a, b in LEGAL])
def test_legal_transition_is_accepted(current: OrderStatus, new: OrderStatus) -> None:
    assert can_transition(current, new)
    check_transition(current, new)


@pytest.mark.parametrize(
    ("current", "new"),
    [
        (S.CREATED, S.DELIVERED),
        (S.CREATED, S.PICKED_UP),
        (S.CREATED, S.ACCEPTED),
        (S.CREATED, S.DECLINED),
        (S.ASSIGNED, S.PICKED_UP),
        (S.ACCEPTED, S.DELIVERED),
        (S.PICKED_UP, S.CANCELLED),
        (S.PICKED_UP, S.ACCEPTED),
        (S.EN_ROUTE, S.PICKED_UP),
        (S.ARRIVED, S.EN_ROUTE),
        (S.DECLINED, S.ACCEPTED),
        (S.FAILED, S.DELIVERED),
        (S.FAILED, S.ASSIGNED),
        (S.CREATED, S.CREATED),
    ],
    ids=str,
)
def test_illegal_transition_is_rejected_naming_both(current: OrderStatus, new: OrderStatus) -> None:
    assert not can_transition(current, new)
    with pytest.raises(TransitionError) as info:
        check_transition(current, new)
    message = str(info.value)
    assert f"is {current.value} cannot become {new.value}" in message
    allowed = ", ".join(sorted(s.value for s in TRANSITIONS[current]))
    assert f"(allowed next: {allowed})" in message


TERMINAL_MOVES = sorted((a, b) for a in TERMINAL for b in S)


@pytest.mark.parametrize(("current", "new"), TERMINAL_MOVES, ids=[f"{a}->{b}" for a, b in TERMINAL_MOVES])
def test_nothing_leaves_a_terminal_status(current: OrderStatus, new: OrderStatus) -> None:
    with pytest.raises(
        TransitionError, match=f"^order is already {current.value}; it cannot become {new.value}$"
    ):
        check_transition(current, new)


def test_every_illegal_pair_is_rejected() -> None:
    assert len(LEGAL) + len(ILLEGAL) == len(S) ** 2
    for current, new in ILLEGAL:
        with pytest.raises(TransitionError, match=f"{current.value}.*{new.value}"):
            check_transition(current, new)


def test_happy_path() -> None:
    for current, new in itertools.pairwise(HAPPY_PATH):
        check_transition(current, new)
    assert HAPPY_PATH[-1] in TERMINAL


@pytest.mark.parametrize(
    "path",
    [
        [S.CREATED, S.ASSIGNED, S.DECLINED, S.ASSIGNED, S.ACCEPTED, S.PICKED_UP, S.ARRIVED],
        [S.CREATED, S.ASSIGNED, S.ASSIGNED, S.ACCEPTED, S.ASSIGNED],  # reassignment
        [S.CREATED, S.ASSIGNED, S.ACCEPTED, S.PICKED_UP, S.EN_ROUTE, S.FAILED, S.RETURNED],
        [S.CREATED, S.ASSIGNED, S.ACCEPTED, S.PICKED_UP, S.EN_ROUTE, S.DELIVERED],
        [S.CREATED, S.ASSIGNED, S.ACCEPTED, S.PICKED_UP, S.RETURNED],
        [S.CREATED, S.CANCELLED],
        [S.CREATED, S.ASSIGNED, S.ACCEPTED, S.DECLINED, S.CANCELLED],
    ],
    ids=[
        "declined-then-reassigned",
        "reassign",
        "failed-returned",
        "skip-arrived",
        "return",
        "cancel-early",
        "cancel-after-decline",
    ],
)
def test_detours(path: list[OrderStatus]) -> None:
    for current, new in itertools.pairwise(path):
        check_transition(current, new)


def test_every_status_is_reachable_from_created() -> None:
    seen, todo = {S.CREATED}, [S.CREATED]
    while todo:
        for nxt in TRANSITIONS[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    assert seen == set(S)


def test_groups_are_consistent() -> None:
    assert all(not TRANSITIONS[s] for s in TERMINAL)
    assert all(TRANSITIONS[s] for s in set(S) - TERMINAL)
    assert TERMINAL | {S.FAILED} == CLOSED
    assert OUT_FOR_DELIVERY <= RIDER_BOUND
    assert not RIDER_BOUND & UNASSIGNED
    assert not RIDER_BOUND & CLOSED
    # a rider never reports the statuses the backbone sets for it
    assert not RIDER_REPORTABLE & {S.CREATED, S.ASSIGNED, S.ACCEPTED, S.CANCELLED}
