"""The topic tree of docs/design.md §1: builders, parsing, validation and filter matching."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bloomwire.contract import topics as t
from bloomwire.contract.topics import Command, Identity, InboundKind, Inbox, OrderChannel
from bloomwire.errors import TopicError

# --- builders produce the contract's strings ---------------------------------------------------

BUILT: list[tuple[str, Callable[..., str], tuple[object, ...]]] = [
    ("riders/r7/location", t.rider_location, ("r7",)),
    ("riders/r7/orders/o42/status", t.rider_order_status, ("r7", "o42")),
    ("riders/r7/orders/o42/chat", t.rider_order_chat, ("r7", "o42")),
    ("riders/r7/replies", t.rider_replies, ("r7",)),
    ("riders/r7/presence", t.rider_presence, ("r7",)),
    ("owntracks/r7/pixel-8", t.owntracks, ("r7", "pixel-8")),
    ("customers/c9/chat", t.customer_chat, ("c9",)),
    ("services/dispatch/events", t.service_events, ("dispatch",)),
    ("shops/s1/alerts", t.shop_alerts, ("s1",)),
    ("shops/s1/riders/r7/state", t.shop_rider_state, ("s1", "r7")),
    ("shops/s1/errors", t.shop_errors, ("s1",)),
    ("customers/c9/inbox/errors", t.customer_inbox, ("c9", Inbox.ERRORS)),
    ("services/alerts/status", t.service_status, ("alerts",)),
    ("shops/s1/orders/o42/access", t.access_topic, ("s1", "o42")),
    ("customers/c9/devices", t.device_request_topic, ("c9",)),
    ("customers/c9/inbox/devices", t.device_reply_topic, ("c9",)),
    *[(f"shops/s1/commands/{c}", t.shop_command, ("s1", c)) for c in Command],
    *[(f"shops/s1/orders/o42/{ch}", t.order_topic, ("s1", "o42", ch)) for ch in OrderChannel],
    *[(f"riders/r7/inbox/{box}", t.rider_inbox, ("r7", box)) for box in Inbox],
]


@pytest.mark.parametrize(("expected", "build", "args"), BUILT, ids=[e for e, _, _ in BUILT])
def test_builder_produces_contract_string(
    expected: str, build: Callable[..., str], args: tuple[object, ...]
) -> None:
    assert build(*args) == expected


def test_deadletter_topic() -> None:
    assert t.DEADLETTER == "services/deadletter"


def test_builders_accept_enum_values_as_plain_strings() -> None:
    assert t.shop_command("s1", "create-order") == "shops/s1/commands/create-order"
    assert t.order_topic("s1", "o1", "state") == "shops/s1/orders/o1/state"
    assert t.rider_inbox("r1", "acks") == "riders/r1/inbox/acks"


@pytest.mark.parametrize(
    ("build", "needle"),
    [
        (lambda: t.shop_command("s1", "teleport"), "unknown shop command 'teleport'"),
        (lambda: t.order_topic("s1", "o1", "gossip"), "unknown order channel 'gossip'"),
        (lambda: t.rider_inbox("r1", "spam"), "unknown inbox 'spam'"),
        (lambda: t.customer_inbox("c1", "spam"), "unknown inbox 'spam'"),
        (lambda: t.all_orders_filter("gossip"), "unknown order channel 'gossip'"),
    ],
    ids=["command", "order-channel", "rider-inbox", "customer-inbox", "filter-channel"],
)
def test_builders_reject_unknown_levels_with_topic_error(build: Callable[[], str], needle: str) -> None:
    with pytest.raises(TopicError, match=needle):
        build()


def test_filters() -> None:
    assert t.all_orders_filter() == "shops/+/orders/+/#"
    assert t.all_orders_filter(OrderChannel.STATUS) == "shops/+/orders/+/status"
    assert t.all_orders_filter("state", shop="s1") == "shops/s1/orders/+/state"
    assert t.shop_filter("s1") == "shops/s1/#"
    assert t.rider_inbox_filter("r7") == "riders/r7/inbox/#"
    assert t.customer_inbox_filter("c9") == "customers/c9/inbox/#"
    assert t.ALL_ALERTS_FILTER == "shops/+/alerts"
    assert t.ALL_PRESENCE_FILTER == "riders/+/presence"
    assert t.ALL_REPLIES_FILTER == "riders/+/replies"
    assert t.ALL_SERVICE_STATUS_FILTER == "services/+/status"
    assert t.ALL_ACCESS_FILTER == "shops/+/orders/+/access"
    assert t.ALL_DEVICE_REQUESTS_FILTER == "customers/+/devices"
    assert t.ALL_DEVICE_REPLIES_FILTER == "customers/+/inbox/devices"
    # the access topic is no order channel: "shops/+/orders/+/<channel>" grants never cover it
    assert t.ACCESS not in {ch.value for ch in OrderChannel}
    assert not any(t.matches(t.all_orders_filter(ch), t.access_topic("s1", "o1")) for ch in OrderChannel)


def test_parse_order_and_device_request_topics() -> None:
    assert t.parse_order_topic("shops/s1/orders/o42/status") == t.OrderTopic("s1", "o42", "status")
    assert t.parse_order_topic(t.access_topic("s1", "o42")).channel == t.ACCESS
    assert t.parse_device_request(t.device_request_topic("c-o42")) == "c-o42"
    for bad in (
        "shops/s1/orders/o42/gossip",
        "shops/s1/alerts",
        "shops/s+/orders/o1/state",
        "riders/r1/location",
    ):
        with pytest.raises(TopicError):
            t.parse_order_topic(bad)
    for bad in ("customers/c1/chat", "customers/c1/inbox/devices", "customers/#/devices"):
        with pytest.raises(TopicError):
            t.parse_device_request(bad)


# --- identifiers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "good",
    ["r7", "R7", "7", "rider_7", "a.b", "user@shop", "urn:x", "41151CB8-4C3B-4A0A", "x" * 64],
)
def test_check_id_accepts_safe_levels(good: str) -> None:
    assert t.check_id(good, "rider") == good


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ("", "rider is empty"),
        ("r+7", "contains '\\+'"),
        ("+", "contains '\\+'"),
        ("r#", "contains '#'"),
        ("#", "contains '#'"),
        ("r/7", "contains '/'"),
        ("r\x007", "contains NUL"),
        ("x" * 65, "65 characters long \\(max 64\\)"),
        ("r 7", "must start with a letter or digit"),
        ("rider\u00e9", "must start with a letter or digit"),
        ("\u7d05", "must start with a letter or digit"),
        ("-r7", "must start with a letter or digit"),
        (".", "must start with a letter or digit"),
        ("r7\n", "must start with a letter or digit"),
        ("$SYS", "must start with a letter or digit"),
    ],
    ids=[
        "empty",
        "plus-inside",
        "plus",
        "hash-inside",
        "hash",
        "slash",
        "nul",
        "65-chars",
        "space",
        "non-ascii-latin",
        "non-ascii-cjk",
        "leading-dash",
        "dot",
        "newline",
        "dollar",
    ],
)
def test_check_id_rejects_with_named_problem(bad: str, needle: str) -> None:
    with pytest.raises(TopicError, match=needle) as info:
        t.check_id(bad, "rider")
    assert str(info.value).startswith("rider ")


def test_check_id_rejects_non_strings() -> None:
    with pytest.raises(TopicError, match="rider must be a string, not int"):
        t.check_id(7, "rider")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("build", "what"),
    [
        (lambda: t.rider_location("a/b"), "rider"),
        (lambda: t.rider_order_status("r1", "o+1"), "order"),
        (lambda: t.owntracks("r1", "dev#"), "device"),
        (lambda: t.shop_command("", Command.ASSIGN), "shop"),
        (lambda: t.customer_chat("c 1"), "customer"),
        (lambda: t.service_events("x" * 65), "service"),
        (lambda: t.shop_filter("+"), "shop"),
    ],
    ids=["rider", "order", "device", "shop", "customer", "service", "filter"],
)
def test_builders_name_the_bad_id(build: Callable[[], str], what: str) -> None:
    with pytest.raises(TopicError, match=f"^{what} "):
        build()


# --- parse_inbound -------------------------------------------------------------------------------

INBOUND: list[tuple[str, t.InboundTopic]] = [
    (
        t.rider_location("r7"),
        t.InboundTopic(Identity.RIDER, "r7", InboundKind.LOCATION),
    ),
    (
        t.rider_order_status("r7", "o42"),
        t.InboundTopic(Identity.RIDER, "r7", InboundKind.STATUS, order="o42"),
    ),
    (
        t.rider_order_chat("r7", "o42"),
        t.InboundTopic(Identity.RIDER, "r7", InboundKind.CHAT, order="o42"),
    ),
    (
        t.rider_order_photo("r7", "o42"),
        t.InboundTopic(Identity.RIDER, "r7", InboundKind.PHOTO, order="o42"),
    ),
    (
        t.rider_replies("r7"),
        t.InboundTopic(Identity.RIDER, "r7", InboundKind.REPLY),
    ),
    (
        t.rider_presence("r7"),
        t.InboundTopic(Identity.RIDER, "r7", InboundKind.PRESENCE),
    ),
    (
        t.owntracks("r7", "pixel-8"),
        t.InboundTopic(Identity.RIDER, "r7", InboundKind.OWNTRACKS, device="pixel-8"),
    ),
    (
        t.owntracks("r7", "pixel-8", "event"),
        t.InboundTopic(Identity.RIDER, "r7", InboundKind.OWNTRACKS, device="pixel-8"),
    ),
    (
        t.customer_chat("c9"),
        t.InboundTopic(Identity.CUSTOMER, "c9", InboundKind.CHAT),
    ),
    (
        t.service_events("dispatch"),
        t.InboundTopic(Identity.SERVICE, "dispatch", InboundKind.EVENTS),
    ),
    *[
        (
            t.shop_command("s1", c),
            t.InboundTopic(Identity.SHOP, "s1", InboundKind.COMMAND, command=c),
        )
        for c in Command
    ],
]


@pytest.mark.parametrize(("topic", "expected"), INBOUND, ids=[tp for tp, _ in INBOUND])
def test_parse_inbound_round_trips_every_inbound_builder(topic: str, expected: t.InboundTopic) -> None:
    assert t.parse_inbound(topic) == expected


@pytest.mark.parametrize(
    ("topic", "source", "error_topic"),
    [
        ("riders/r7/location", "riders/r7", "riders/r7/inbox/errors"),
        ("owntracks/r7/phone", "riders/r7", "riders/r7/inbox/errors"),
        ("shops/s1/commands/assign", "shops/s1", "shops/s1/errors"),
        ("customers/c9/chat", "customers/c9", "customers/c9/inbox/errors"),
        ("services/dispatch/events", "services/dispatch", None),
    ],
)
def test_inbound_source_and_error_topic(topic: str, source: str, error_topic: str | None) -> None:
    parsed = t.parse_inbound(topic)
    assert parsed.source == source
    assert parsed.error_topic() == error_topic


@pytest.mark.parametrize(
    ("topic", "needle"),
    [
        ("", "topic is empty"),
        ("riders//location", "has an empty level"),
        ("riders/r1/location/", "has an empty level"),
        ("/riders/r1/location", "has an empty level"),
        ("riders/+/location", "contains a wildcard"),
        ("riders/r1/#", "contains a wildcard"),
        ("shops/s1/commands/+", "contains a wildcard"),
        ("riders/r1\x00/location", "contains NUL"),
        ("riders/" + "r" * 600 + "/location", "characters long \\(max 512\\)"),
        ("riders/r1/teleport", "not an inbound topic"),
        ("riders/r1/orders/o1/teleport", "not an inbound topic"),
        ("shops/s1/commands/teleport", "unknown shop command 'teleport'"),
        ("riders/r1", "not an inbound topic"),
        ("riders/r1/orders/o1", "not an inbound topic"),
        ("riders/r1/location/extra", "not an inbound topic"),
        ("owntracks/r1", "not an inbound topic"),
        ("owntracks/r1/phone/teleport", "not an inbound topic"),
        ("owntracks/r1/phone/event/x", "not an inbound topic"),
        ("shops/s1/commands", "not an inbound topic"),
        ("shops/s1/commands/assign/now", "not an inbound topic"),
        ("customers/c1/chat/x", "not an inbound topic"),
        ("services/dispatch", "not an inbound topic"),
        ("trucks/t1/location", "not an inbound topic"),
        ("riders", "not an inbound topic"),
        ("riders/r 1/location", "^rider 'r 1' must start"),
        ("riders/r1/orders/o\u00e9/status", "^order 'o\u00e9' must start"),
        ("owntracks/r1/" + "d" * 65, "^device is 65 characters long"),
        ("shops/s\u00e91/commands/assign", "^shop "),
        ("customers/c:1:%/chat", "^customer "),
        ("services/-x/events", "^service "),
    ],
)
def test_parse_inbound_rejects_malformed_topics(topic: str, needle: str) -> None:
    with pytest.raises(TopicError, match=needle):
        t.parse_inbound(topic)


def test_unknown_kind_error_quotes_the_topic() -> None:
    with pytest.raises(TopicError) as info:
        t.parse_inbound("riders/r1/teleport")
    assert "'riders/r1/teleport'" in str(info.value)


# --- output topics are not inbound ---------------------------------------------------------------

OUTPUT_TOPICS = [
    *[t.order_topic("s1", "o42", ch) for ch in OrderChannel],
    t.shop_alerts("s1"),
    t.shop_rider_state("s1", "r7"),
    t.shop_errors("s1"),
    *[t.rider_inbox("r7", box) for box in Inbox],
    *[t.customer_inbox("c9", box) for box in Inbox],
    t.service_status("dispatch"),
    t.DEADLETTER,
    # access-control mode: the provisioner's topics never reach the persister either
    t.access_topic("s1", "o42"),
    t.device_request_topic("c9"),
    t.device_reply_topic("c9"),
]


@pytest.mark.parametrize("topic", OUTPUT_TOPICS)
def test_output_topics_match_no_inbound_filter(topic: str) -> None:
    """The persister never consumes what it (or another service) publishes itself."""
    assert not [f for f in t.INBOUND_FILTERS if t.matches(f, topic)]
    with pytest.raises(TopicError):
        t.parse_inbound(topic)


@pytest.mark.parametrize(("topic", "_expected"), INBOUND, ids=[tp for tp, _ in INBOUND])
def test_every_inbound_topic_matches_exactly_one_inbound_filter(
    topic: str, _expected: t.InboundTopic
) -> None:
    assert len([f for f in t.INBOUND_FILTERS if t.matches(f, topic)]) == 1


def test_every_inbound_filter_is_used_by_a_builder() -> None:
    for topic_filter in t.INBOUND_FILTERS:
        assert any(t.matches(topic_filter, topic) for topic, _ in INBOUND), topic_filter


# --- matches() -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("riders/r1/location", "riders/r1/location", True),
        ("riders/r1/location", "riders/r2/location", False),
        ("riders/+/location", "riders/r1/location", True),
        ("riders/+/location", "riders/r1/replies", False),
        ("riders/+/location", "riders/r1/location/x", False),
        ("riders/+/location", "riders/location", False),
        ("riders/+/orders/+/status", "riders/r1/orders/o1/status", True),
        ("riders/+/orders/+/status", "riders/r1/orders/o1/chat", False),
        ("+/+/+", "riders/r1/location", True),
        ("+/+", "riders/r1/location", False),
        ("+", "riders", True),
        ("#", "riders/r1/location", True),
        ("riders/#", "riders/r1/location", True),
        ("riders/#", "riders", True),  # '#' also matches the parent level (MQTT 4.7.1.2)
        ("riders/r1/inbox/#", "riders/r1/inbox/acks", True),
        ("riders/r1/inbox/#", "riders/r1/inboxes", False),
        ("riders/r1/inbox/#", "riders/r2/inbox/acks", False),
        ("shops/+/orders/+/#", "shops/s1/orders/o1/state", True),
        ("shops/+/orders/+/#", "shops/s1/riders/r1/state", False),
        ("shops/s1/#", "shops/s1/orders/o1/status", True),
        ("shops/s1/#", "shops/s2/orders/o1/status", False),
        ("riders/+", "riders/", True),  # '+' matches an empty level
        ("riders/r1", "Riders/r1", False),  # topics are case-sensitive
    ],
)
def test_matches(topic_filter: str, topic: str, expected: bool) -> None:
    assert t.matches(topic_filter, topic) is expected
