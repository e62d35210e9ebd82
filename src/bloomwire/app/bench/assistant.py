"""``bloomwire bench assistant``: how well the assistant reads customers, and how fast it answers.

Two parts, both printed:

* **reading** (no broker): the rules' intent accuracy over the labelled lines
  (``services/assistant/questions.tsv``), the held-out 30 % apart from the tuning 70 %, by
  language group; the share of lines handed to a person, labelled and predicted; hand-overs
  missed (a complaint or unanswerable line answered with a fact) and needless ones;
* **answering** (real processes): a private broker, the persister and the assistant as
  ``bloomwire up`` runs them (a temporary SQLite store); ``orders`` orders are created, then
  their customers send the held-out lines at ``rate`` lines/s. Answer time is from the customer's
  publish to the assistant's line on the canonical chat topic (two persister commits included).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from rich.console import Console

from bloomwire.app.bench import temporary_settings
from bloomwire.app.bench.report import Report
from bloomwire.app.supervisor import ASSISTANT, Stack, service_settings
from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.errors import BrokerError
from bloomwire.runtime.mqtt import Connection
from bloomwire.runtime.settings import Settings
from bloomwire.services.assistant import dataset
from bloomwire.services.assistant.intents import FORWARDED, HANDOVER, classify
from bloomwire.services.assistant.service import answer_id

CLIENT = "bench-assistant"
SHOP = "s1"
_PERSON = HANDOVER | FORWARDED


def _pct(n: int, d: int) -> str:
    return f"{100 * n / d:.1f} % ({n}/{d})" if d else "-"


def reading_report(tuning: list[dataset.Example], held: list[dataset.Example]) -> Report:
    """Accuracy and hand-over figures of the rules on both parts of the data set."""
    report = Report(
        "assistant: intent rules over the labelled lines (held out: never used to tune the rules)",
        (
            "part",
            "lines",
            "accuracy",
            "en / zh / mixed",
            "handed over (labelled → predicted)",
            "missed / needless",
        ),
    )
    for name, part in (("held out 30 %", held), ("tuning 70 %", tuning)):
        got = [classify(e.text).intent for e in part]
        right = Counter(e.group for e, g in zip(part, got, strict=True) if g == e.intent)
        total = Counter(e.group for e in part)
        groups = " / ".join(
            f"{100 * right[g] / total[g]:.0f} %" if total[g] else "-" for g in ("en", "zh", "mixed")
        )
        labelled = sum(e.intent in _PERSON for e in part)
        predicted = sum(g in _PERSON for g in got)
        missed = sum(e.intent in _PERSON and g not in _PERSON for e, g in zip(part, got, strict=True))
        needless = sum(e.intent not in _PERSON and g in _PERSON for e, g in zip(part, got, strict=True))
        report.add(
            name,
            len(part),
            _pct(sum(right.values()), len(part)),
            groups,
            f"{100 * labelled / len(part):.1f} % → {100 * predicted / len(part):.1f} %",
            f"{missed} / {needless}",
        )
    return report


def confusions(held: list[dataset.Example]) -> list[str]:
    """The held-out lines the rules got wrong, as ``label → predicted: text``."""
    out = []
    for e in held:
        got = classify(e.text).intent
        if got != e.intent:
            out.append(f"{e.intent.value} → {got.value}: {e.text}")
    return out


def _order(i: int, now: datetime) -> ev.OrderCreateEvent:
    data = ev.OrderCreated(
        order=f"ba-{i}",
        customer=ev.Customer(name=f"c{i}", phone="+49 30 555 01 23", lat=52.52, lon=13.40),
        window=ev.Window(start=now, end=now + timedelta(hours=2)),
    )
    return ev.OrderCreateEvent(source=f"{topics.SHOPS}/{SHOP}", data=data)


async def _answer_times(
    settings: Settings, lines: list[str], orders: int, rate: float
) -> tuple[list[float], list[float]]:
    """Seconds from each customer line's publish to the assistant's answer on the canonical chat, and
    (the same-run reference) to the customer's own line there, stored by the persister."""
    conn = Connection(service_settings(settings, CLIENT), CLIENT)
    conn.subscribe(topics.all_orders_filter(topics.OrderChannel.STATUS, shop=SHOP), qos=1)
    conn.subscribe(topics.all_orders_filter(topics.OrderChannel.CHAT, shop=SHOP), qos=1)
    conn.start()
    try:
        await conn.wait_connected(10)
        now = ev.now()
        for i in range(orders):
            conn.publish(
                topics.shop_command(SHOP, topics.Command.CREATE_ORDER), ev.encode(_order(i, now)), qos=1
            )
        await _until(conn, lambda topic: topic.endswith("/status"), orders)
        sent: dict[str, float] = {}
        got: dict[str, float] = {}
        answers: dict[str, str] = {}
        for n, text in enumerate(lines):
            customer = topics.customer_for_order(f"ba-{n % orders}")
            line = ev.OrderChatPostedEvent(
                source=f"{topics.CUSTOMERS}/{customer}", data=ev.OrderChat(text=text)
            )
            sent[answer_id(line.id)] = sent[line.id] = time.time()
            answers[answer_id(line.id)] = line.id
            conn.publish(topics.customer_chat(customer), ev.encode(line), qos=1)
            _collect(conn, got)
            await asyncio.sleep(1 / rate)
        deadline = time.monotonic() + 30
        while not sent.keys() <= got.keys():
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"{len(sent.keys() - got.keys())} of {len(sent)} lines got no answer in 30 s"
                )
            await conn.wait_message(0.05)
            _collect(conn, got)
        return [got[a] - sent[a] for a in answers], [got[q] - sent[q] for q in answers.values()]
    finally:
        await conn.stop()


def _collect(conn: Connection, got: dict[str, float]) -> None:
    """Note when each chat line arrived (``received_at``: taken on paho's thread, wall clock)."""
    for msg in conn.drain(1000):
        if msg.topic.endswith("/chat"):
            got.setdefault(str(ev.load_json(msg.payload).get("id")), msg.received_at)


async def _until(conn: Connection, wanted: Callable[[str], bool], count: int) -> None:
    seen, deadline = 0, time.monotonic() + 30
    while seen < count:
        if time.monotonic() > deadline:
            raise BrokerError(f"only {seen} of {count} orders created in 30 s")
        await conn.wait_message(0.05)
        seen += sum(1 for m in conn.drain(1000) if wanted(m.topic))


def _stack(settings: Settings, root: Path) -> Stack:
    own = temporary_settings(settings, root, database_url=f"sqlite:///{root / 'bench.db'}")
    return Stack(own, services=("persister", ASSISTANT), extra_users=[CLIENT])


def _row(name: str, times: list[float]) -> tuple[str, float, float, float]:
    ms = sorted(t * 1000 for t in times)
    return name, statistics.median(ms), ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))], ms[-1]


def answering_report(
    times: list[float], stored: list[float], *, orders: int, rate: float, load: tuple[float, float]
) -> Report:
    """Answer time percentiles of one run, beside the customer's own line's (same run)."""
    report = Report(
        f"assistant: customer line → on the canonical chat, {len(times)} lines of {orders} customers "
        f"at {rate:g}/s (real broker, persister, assistant; load avg 1 min {load[0]:.2f} → {load[1]:.2f})",
        ("what arrives", "P50 (ms)", "P99 (ms)", "max (ms)"),
    )
    answer, line = _row("the assistant's answer", times), _row("the customer's line (reference)", stored)
    for name, p50, p99, top in (answer, line):
        report.add(name, f"{p50:.1f}", f"{p99:.1f}", f"{top:.1f}")
    report.add("answer / reference", f"{answer[1] / line[1]:.2f}", f"{answer[2] / line[2]:.2f}", "")
    return report


def main(settings: Settings, *, orders: int, repeat: int, rate: float, console: Console) -> list[Report]:
    """Measure, print and return both tables."""
    tuning, held = dataset.split(dataset.load())
    reports = [reading_report(tuning, held)]
    console.print(reports[0].rich())
    for wrong in confusions(held):
        console.print(f"  held out, wrong: {wrong}")
    lines = [e.text for e in held] * repeat
    with tempfile.TemporaryDirectory(prefix="bloomwire-bench-assistant-") as tmp:
        stack = _stack(settings, Path(tmp))
        live = stack.start()
        try:
            before = os.getloadavg()[0]
            times, stored = asyncio.run(_answer_times(live, lines, orders, rate))
            after = os.getloadavg()[0]
        finally:
            stack.stop()
    reports.append(answering_report(times, stored, orders=orders, rate=rate, load=(before, after)))
    console.print(reports[1].rich())
    return reports
