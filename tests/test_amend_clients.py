"""Amendments through the clients (issue 18): the shop terminal and ``bloomwire shop order amend``
change an order, the rider's app shows the change and confirms it, the shop's feed says who
confirmed what. A real broker and a persister child process, as in tests/test_clients.py."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Broker
from rich.console import Console
from test_clients import SHOP, Backbone, Persister, accepted_order, eventually, run
from typer.testing import CliRunner

from bloomwire.app.cli import app
from bloomwire.app.clients.outbox import Outbox
from bloomwire.app.clients.rider import RiderApp, RiderDevice, needs_confirmation
from bloomwire.app.clients.shop import AmendDraft, ShopTerminal, parse_instructions
from bloomwire.contract import events as ev
from bloomwire.store import open_store


@pytest.fixture
def backbone(fresh_broker: Broker, tmp_path: Path) -> Iterator[Backbone]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    url = f"sqlite:///{tmp_path / 'store.db'}"
    engine = open_store(url)
    bb = Backbone(fresh_broker, data_dir, url, engine, Persister({}, tmp_path / "persister.log"))
    bb.user("persister")
    bb.user("operator")
    bb.persister.env = {**bb.env, "BLOOMWIRE_BROKER_USERNAME": "persister", "BLOOMWIRE_LOG_LEVEL": "INFO"}
    bb.start_persister()
    yield bb
    bb.persister.stop()
    engine.dispose()


class Heard:
    """A rider listener keeping the amendments it is told of."""

    def __init__(self) -> None:
        self.amendments: list[ev.OrderAmendedEvent] = []

    def offer(self, offer: ev.DispatchOfferedEvent) -> None: ...
    def chat(self, chat: ev.OrderChatPostedEvent) -> None: ...
    def stored(self, entries: Any) -> None: ...
    def refused(self, entry: Any, refusal: ev.Refusal) -> None: ...

    def amendment(self, amendment: ev.OrderAmendedEvent) -> None:
        self.amendments.append(amendment)


@pytest.mark.timeout(180)
def test_the_shop_amends_the_rider_confirms_the_shop_sees_it(backbone: Backbone, tmp_path: Path) -> None:
    bb, order, rider = backbone, "o-am", "r-am"
    run(accepted_order(bb, order, rider, tmp_path / "outbox.db"))

    async def scene() -> None:
        terminal = ShopTerminal(bb.settings, SHOP, bb.user(SHOP))
        box = Outbox(tmp_path / "outbox.db")
        heard = Heard()
        device = RiderDevice(bb.settings, rider, bb.user(rider), box, listener=heard)
        await terminal.start()
        await device.start()
        try:
            assert (await device.wait(device.status(order, "picked_up"))).stored
            draft = AmendDraft(
                order=order,
                address="Lindenallee 4, Berlin",
                position=(52.54, 13.43),
                instructions=parse_instructions("leave_at_door"),
                asked_by="customer",
                reason="she is at her sister's",
            )
            outcome = await terminal.amend(draft)
            assert outcome.stored, outcome.reason
            await eventually(lambda: bool(heard.amendments), what="the rider's amendment")
            [told] = heard.amendments
            assert needs_confirmation(told)
            assert (await device.wait(device.confirm(order))).stored
            said = "r-am confirmed the new address and instructions"
            await eventually(
                lambda: any(said in f for f in terminal.view.feed), what="the confirmation in the shop's feed"
            )
            assert any("amended: address, position, instructions (customer" in f for f in terminal.view.feed)

            refused = await terminal.amend(AmendDraft(order=order, items=["a vase"]))
            assert not refused.stored and "rule items-until-picked-up" in refused.reason
        finally:
            await device.stop()
            box.close()
            await terminal.stop()

    asyncio.run(scene())

    result = CliRunner().invoke(
        app, ["shop", "order", "amend", order, "--shop", SHOP, "--note", "ring twice"], env=bb.env
    )
    assert result.exit_code == 0, result.output
    refused = CliRunner().invoke(
        app, ["shop", "order", "amend", order, "--shop", SHOP, "--item", "a vase"], env=bb.env
    )
    assert refused.exit_code == 1 and "rule items-until-picked-up" in refused.output, refused.output


def test_nothing_to_change_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["--data-dir", str(tmp_path), "shop", "order", "amend", "o1", "--shop", SHOP, "--reason", "x"]
    )
    assert result.exit_code == 2 and "nothing to change" in result.output


def test_the_rider_app_shows_the_change_and_asks_for_a_confirmation() -> None:
    console = Console(record=True, width=200)
    rider_app = RiderApp.__new__(RiderApp)  # only its console is used to show an amendment
    rider_app.console = console
    data = ev.OrderAmendment(
        order="o1",
        instructions=ev.Instructions(kind=ev.InstructionKind.OTHER, text="side gate, not the front"),
        asked_by="customer",
        reason="dog in the front garden",
        changes={
            ev.AmendField.INSTRUCTIONS: ev.FieldChange(
                old={"kind": "none", "text": ""}, new={"kind": "other", "text": "side gate, not the front"}
            )
        },
    )
    rider_app.amendment(ev.OrderAmendedEvent(source="shops/s1", data=data))
    text = console.export_text()
    assert "order o1 changed (at the customer's request: dog in the front garden)" in text
    assert "instructions: other — side gate, not the front" in text
    assert "type `confirm o1` once you have seen it" in text
