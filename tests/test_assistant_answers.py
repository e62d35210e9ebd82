"""The assistant's answers from given facts: every fact said is one given, hand-overs as designed."""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from bloomwire.contract.lifecycle import OrderStatus
from bloomwire.errors import ConfigError
from bloomwire.runtime.settings import Settings
from bloomwire.services.assistant import build, dataset
from bloomwire.services.assistant.answers import OrderFacts, answer, sentences
from bloomwire.services.assistant.intents import Intent, Lang, Reading

NOW = datetime(2027, 2, 14, 9, 0, tzinfo=UTC)
OUT = OrderFacts(
    order="o42",
    shop="s1",
    status=OrderStatus.EN_ROUTE,
    rider="r7",
    eta=NOW + timedelta(minutes=12, seconds=10),
    window_start=NOW,
    window_end=NOW + timedelta(hours=2),
    phone="+49 30 1234 5678",
    delivered_at=None,
    failure_reason=None,
)


def _say(
    intent: Intent, facts: OrderFacts = OUT, lang: Lang = Lang.EN, *, handed: bool = False
) -> tuple[str, str | None]:
    reply = answer(Reading(intent, lang), "the text", facts, NOW, UTC, handed_over=handed)
    return reply.text, reply.alert


def test_where_out_for_delivery_says_the_rider_and_the_stored_eta() -> None:
    text, alert = _say(Intent.WHERE)
    said = "Rider r7 has your order o42 and is on the way."
    assert text == f"{said} It should be with you in about 13 min (around 09:12 UTC)."
    assert alert is None


def test_chinese_answer_uses_the_same_facts() -> None:
    text, _ = _say(Intent.WHERE, lang=Lang.ZH)
    assert "骑手 r7" in text and "09:12 UTC" in text and "13 分钟" in text


@pytest.mark.parametrize("status", [OrderStatus.CREATED, OrderStatus.ACCEPTED, OrderStatus.PICKED_UP])
def test_no_eta_in_the_store_means_no_arrival_time_said(status: OrderStatus) -> None:
    facts = replace(OUT, status=status, eta=None)
    for intent in (Intent.WHERE, Intent.ETA):
        text, _ = _say(intent, facts)
        assert "min" not in text
        # the only clock times said are the promised window's
        assert set(re.findall(r"\d\d:\d\d", text)) <= {"09:00", "11:00"}


def test_no_rider_yet_is_said_not_invented() -> None:
    text, _ = _say(Intent.RIDER, replace(OUT, status=OrderStatus.CREATED, rider=None, eta=None))
    assert text == sentences()["en"]["rider_none"]


def test_call_without_a_phone_number_is_handed_over() -> None:
    text, alert = _say(Intent.CALL, replace(OUT, phone=""))
    assert text.startswith(sentences()["en"]["call_no_phone"])
    assert alert is not None and "no phone number" in alert


def test_a_call_is_for_the_shop_to_arrange_and_only_two_digits_are_said() -> None:
    text, alert = _say(Intent.CALL)
    # riders are never given the number: the answer must not say they have it
    assert text == sentences()["en"]["call_rider"].format(rider="r7", phone_tail="78")
    assert "5678" not in text and alert is not None and "called by the rider" in alert


@pytest.mark.parametrize(
    "intent", [Intent.COMPLAINT, Intent.OTHER, Intent.CHANGE_TIME, Intent.CHANGE_ADDRESS, Intent.CALL]
)
def test_hand_overs_raise_one_alert_per_open_conversation(intent: Intent) -> None:
    _, first = _say(intent)
    assert first is not None and "o42" in first and "the text" in first
    text, again = _say(intent, handed=True)
    assert again is None
    if intent in (Intent.COMPLAINT, Intent.OTHER):
        assert text == sentences()["en"]["handover_again"]


def test_the_held_out_part_is_a_fixed_30_percent() -> None:
    examples = dataset.load()
    tuning, held = dataset.split(examples)
    assert len(examples) >= 150 and len(held) == round(0.3 * len(examples))
    assert {e.text for e in tuning}.isdisjoint(e.text for e in held)
    assert dataset.split(examples) == (tuning, held)
    assert {e.group for e in held} == {"en", "zh", "mixed"}


def test_an_offered_order_is_not_said_to_be_with_the_rider() -> None:
    text, _ = _say(Intent.RIDER, replace(OUT, status=OrderStatus.ASSIGNED, eta=None))
    assert text == "Your order o42 is at the shop; rider r7 has been asked to take it."


def test_clock_times_are_said_in_the_configured_zone() -> None:
    reply = answer(
        Reading(Intent.ETA, Lang.EN), "when?", OUT, NOW, ZoneInfo("Asia/Shanghai"), handed_over=False
    )
    assert "around 17:12 CST" in reply.text


def test_an_unknown_zone_is_refused_before_connecting() -> None:
    with pytest.raises(ConfigError, match="Mars/Olympus"):
        build(Settings(assistant_timezone="Mars/Olympus"))
