"""Shop and customer senders keep an outbox across a broker ``kill -9`` (issue #15, fault tests).

A shop terminal and a customer tracker send chat lines in a stream while the broker is SIGKILLed
(whatever it held since its last autosave is gone) and restarted on the same port. Every line is
stored exactly once (rows counted by event id), no client reported a line as refused or "not
sent", and the outboxes drain. Real processes: Mosquitto and ``bloomwire service run persister``.

At the command line, a line the backbone does not confirm in time is reported "queued, will be
re-sent (id …)" (exit 3), never "not sent"; the next command re-sends it with the same id.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import Broker
from test_clients import SHOP, Backbone, Persister, draft, eventually, run
from typer.testing import CliRunner

from bloomwire.app.cli import app
from bloomwire.app.clients.access import ProvisionedAccess, customer_username
from bloomwire.app.clients.base import Outcome
from bloomwire.app.clients.outbox import Outbox
from bloomwire.app.clients.sender import QueuedError, client_outbox_path, memory_outbox
from bloomwire.app.clients.shop import ShopTerminal
from bloomwire.app.clients.track import CustomerTracker
from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.contract.topics import Command
from bloomwire.runtime.settings import Settings
from bloomwire.store import open_store
from bloomwire.store.models import EVENTS

ORDER = "o-outbox"
#: Chat lines each client sends, and the round at which the broker is killed.
LINES, KILL_AT = 40, 12


@pytest.fixture
def stack(fresh_broker: Broker, tmp_path: Path) -> Iterator[Backbone]:
    """A broker of the test's own (free to kill), a persister child process, a SQLite store."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    url = f"sqlite:///{tmp_path / 'store.db'}"
    engine = open_store(url)  # migrated before the persister starts
    bb = Backbone(fresh_broker, data_dir, url, engine, Persister({}, tmp_path / "persister.log"))
    bb.user("persister")
    bb.user("operator")
    bb.persister.env = {**bb.env, "BLOOMWIRE_BROKER_USERNAME": "persister", "BLOOMWIRE_LOG_LEVEL": "INFO"}
    bb.start_persister()
    yield bb
    bb.persister.stop()
    engine.dispose()


def rows_by_id(bb: Backbone, ids: list[str]) -> dict[str, int]:
    """How many rows the store holds of each of ``ids``."""
    found = bb.rows(sa.select(EVENTS.c.id, sa.func.count()).where(EVENTS.c.id.in_(ids)).group_by(EVENTS.c.id))
    return {str(r[0]): int(r[1]) for r in found}


async def crash_broker(bb: Backbone) -> None:
    """SIGKILL the broker, leave it down a moment (the stream goes on), start it on the same port."""
    await asyncio.to_thread(bb.broker.kill)
    await asyncio.sleep(1.0)  # the outage itself: lines are typed while nothing answers
    await asyncio.to_thread(bb.broker.start)


def settled(bb: Backbone, said: Said, shop_box: Outbox, customer_box: Outbox) -> bool:
    """Every line stored and both outboxes empty (a re-sent duplicate is acked on ``shops/S/acks``
    and ``customers/C/inbox/acks``: an echo the crash swallowed leaves nothing queued)."""
    if customer_box.count() or shop_box.count() or len(said.outcomes) < 2 * LINES:
        return False
    return len(rows_by_id(bb, list(said.outcomes))) == 2 * LINES


class Said:
    """What each client told its user about each line: stored, queued or refused."""

    def __init__(self) -> None:
        self.outcomes: dict[str, str] = {}

    async def line(self, who: str, send: asyncio.Future[Outcome] | asyncio.Task[Outcome]) -> None:
        try:
            outcome = await send
        except QueuedError as exc:
            self.outcomes[exc.event_id] = f"{who}:queued"
            return
        self.outcomes[outcome.event_id] = f"{who}:" + ("stored" if outcome.stored else outcome.reason)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_shop_and_customer_lines_survive_a_broker_kill(stack: Backbone, tmp_path: Path) -> None:
    bb = stack
    shop_box, customer_box = Outbox(tmp_path / "shop.db"), Outbox(tmp_path / "customer.db")

    async def scenario() -> tuple[Said, int, int]:
        terminal = ShopTerminal(
            bb.settings,
            SHOP,
            bb.user(SHOP),
            access=ProvisionedAccess(bb.user),
            outbox=shop_box,
            resend_after_s=3,
            persistent=True,  # as the shop command line runs it
        )
        await terminal.start()
        created = await terminal.create_order(draft(ORDER))
        assert created.outcome.stored and created.access is not None and created.access.password
        tracker = CustomerTracker(
            bb.settings, SHOP, ORDER, created.access.password, outbox=customer_box, resend_after_s=3
        )
        await tracker.start()
        said, sends = Said(), []
        crash: asyncio.Task[None] | None = None
        try:
            await eventually(lambda: tracker.view.state is not None, what="the order's retained state")
            for k in range(LINES):
                if k == KILL_AT:
                    crash = asyncio.create_task(crash_broker(bb))
                shop_line = asyncio.create_task(terminal.chat(ORDER, f"shop line {k}", timeout=2.0))
                customer_line = asyncio.create_task(tracker.chat(f"customer line {k}", timeout=2.0))
                sends += [said.line("shop", shop_line), said.line("customer", customer_line)]
                await asyncio.sleep(0.1)  # a person's typing pace, not a wait for anything
            assert crash is not None
            await crash
            await asyncio.gather(*sends)
            try:
                await eventually(lambda: settled(bb, said, shop_box, customer_box), 60, "outboxes drained")
            except AssertionError:
                left = [e.id for e in shop_box.pending()], [e.id for e in customer_box.pending()]
                raise AssertionError(f"left in the outboxes (shop, customer): {left}") from None
            return said, terminal.sender.resends, tracker.sender.resends
        finally:
            await tracker.stop()
            await terminal.stop()

    try:
        said, shop_resends, customer_resends = run(scenario())
    finally:
        shop_box.close()
        customer_box.close()
    ids = list(said.outcomes)
    assert len(ids) == 2 * LINES
    told = sorted(set(said.outcomes.values()))
    assert set(told) <= {"shop:stored", "shop:queued", "customer:stored", "customer:queued"}, told
    counts = rows_by_id(bb, ids)
    missing = [i for i in ids if i not in counts]
    twice = {i: n for i, n in counts.items() if n != 1}
    assert not missing and not twice, (missing, twice, said.outcomes)
    queued = sum(v.endswith(":queued") for v in said.outcomes.values())
    assert shop_resends + customer_resends + queued > 0, "the kill did not touch the stream"


@pytest.mark.timeout(120)
def test_shop_command_resent_after_a_broker_restart_is_acked(stack: Backbone, tmp_path: Path) -> None:
    """A stored command whose confirmation the crash swallowed is re-sent; the duplicate's ack
    (the persister does not echo a duplicate) drains the shop's outbox."""
    bb = stack
    box = Outbox(tmp_path / "shop.db")

    async def scenario() -> tuple[Outcome, list[str]]:
        first = ShopTerminal(bb.settings, SHOP, bb.user(SHOP), access=ProvisionedAccess(bb.user))
        await first.start()
        try:
            assert (await first.create_order(draft(ORDER))).outcome.stored
            event = ev.OrderChatPostedEvent(
                source=f"shops/{SHOP}", data=ev.OrderChat(order=ORDER, text="ring twice")
            )
            stored = await first.publish_command(Command.CHAT, event)
        finally:
            await first.stop()
        await crash_broker(bb)
        # What a terminal that crashed before the echo came holds: the stored line, unconfirmed.
        box.add(event.id, Command.CHAT.value, topics.shop_command(SHOP, Command.CHAT), ev.encode(event))
        acks: list[str] = []
        again = ShopTerminal(
            bb.settings,
            SHOP,
            bb.user(SHOP),
            access=ProvisionedAccess(bb.user),
            outbox=box,
            resend_after_s=3,  # the persister may not have subscribed again yet: re-sent until acked
            on_message=lambda topic, _r: acks.append(topic),
        )
        await again.start(timeout=30)
        try:
            await eventually(lambda: box.count() == 0, 30, "the shop's outbox drained by the ack")
        finally:
            await again.stop()
        return stored, acks

    try:
        stored, acks = run(scenario())
    finally:
        box.close()
    assert stored.stored
    assert rows_by_id(bb, [stored.event_id]) == {stored.event_id: 1}
    assert f"shops/{SHOP}/acks" in acks


def queued_id(output: str) -> str:
    """The event id of a "queued, will be re-sent (id …)" message."""
    flat = " ".join(output.split())
    assert "queued, will be re-sent (id " in flat, output
    return flat.split("queued, will be re-sent (id ", 1)[1].split(")", 1)[0]


@pytest.mark.timeout(180)
def test_cli_reports_queued_and_the_next_command_resends(stack: Backbone) -> None:
    bb = stack
    runner = CliRunner()
    bb.user(SHOP)
    bb.user(customer_username("o-q"))
    args = ["shop", "order", "create", "--shop", SHOP, "--name", "Mia Wolf", "--at", "52.53,13.42"]
    hours = f"{(ev.now() + timedelta(hours=1)).isoformat()}/{(ev.now() + timedelta(hours=2)).isoformat()}"
    window = ["--window", hours, "--order-id", "o-q"]
    created = runner.invoke(app, [*args, *window], env=bb.env)
    assert created.exit_code == 0, created.output

    bb.persister.stop()  # nothing is confirmed from here on
    chat = runner.invoke(
        app, ["shop", "chat", "o-q", "are you home?", "--shop", SHOP, "--wait", "1"], env=bb.env
    )
    assert chat.exit_code == 3, chat.output
    assert "not sent" not in chat.output
    shop_line = queued_id(chat.output)
    said = runner.invoke(
        app, ["track", "o-q", "--shop", SHOP, "--once", "--chat", "ring twice", "--wait", "1"], env=bb.env
    )
    assert said.exit_code == 3, said.output
    assert "not sent" not in said.output
    customer_line = queued_id(said.output)
    for role, login, event_id in (("shops", SHOP, shop_line), ("customers", "c-o-q", customer_line)):
        box = Outbox(client_outbox_path(bb.settings, role, login))
        try:
            assert [e.id for e in box.pending()] == [event_id]
        finally:
            box.close()

    bb.start_persister()
    watched = runner.invoke(app, ["shop", "watch", "--shop", SHOP, "--once"], env=bb.env)
    assert watched.exit_code == 0, watched.output
    assert "1 command(s) queued earlier: confirmed" in watched.output
    tracked = runner.invoke(app, ["track", "o-q", "--shop", SHOP, "--once"], env=bb.env)
    assert tracked.exit_code == 0, tracked.output

    async def drained() -> None:
        await eventually(
            lambda: rows_by_id(bb, [shop_line, customer_line]) == {shop_line: 1, customer_line: 1},
            30,
            "both lines stored",
        )

    run(drained())


def test_queued_message_names_the_id_and_outboxes_live_per_login(tmp_path: Path) -> None:
    queued = QueuedError("01a2-id", "chat on o-1")
    assert str(queued) == "chat on o-1: queued, will be re-sent (id 01a2-id)" and queued.event_id == "01a2-id"
    settings = Settings(data_dir=tmp_path)
    assert client_outbox_path(settings, "shops", "s1@till") == tmp_path / "clients/shops/s1@till/outbox.db"
    box = memory_outbox()
    try:
        box.add("e1", "create-order", "shops/s1/commands/create-order", b"{}")
        box.add("e1", "create-order", "shops/s1/commands/create-order", b"{}")  # the same id once
        assert [e.id for e in box.pending()] == ["e1"]
    finally:
        box.close()
