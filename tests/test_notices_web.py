"""The tracking page shows the notices (issue 16), in a real Chromium over an access-controlled stack:
broker (dynamic security), persister, dispatch, notices and web as processes, rider and shop scripted
over MQTT, the page logged in through the web service's bridge with its own login."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from playwright.sync_api import sync_playwright
from webkit import (
    DESKTOP,
    PHONE,
    ScriptedRider,
    ScriptedShop,
    launch_browser,
    page_errors,
    require_browser_and_broker,
    screenshot,
    secret,
)

from bloomwire.app.supervisor import Stack
from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.contract.lifecycle import OrderStatus
from bloomwire.runtime.settings import Settings
from bloomwire.services.notices import texts
from bloomwire.store import make_engine
from bloomwire.store.models import ORDERS

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Settings]]:
    require_browser_and_broker()
    tmp: Path = tmp_path_factory.mktemp("notices-web")
    settings = Settings(data_dir=tmp, database_url="", shop_names={"s1": "Blumen Anna"})
    stack = Stack(
        settings,
        services=("persister", "dispatch", "notices", "web"),
        access=True,
        shops=["s1"],
        riders=["r1"],
    )
    started = stack.start(timeout=90)
    try:
        yield stack, started
    finally:
        stack.stop()


def _language(settings: Settings, order: str) -> str | None:
    """The order's language as the store holds it."""
    engine = make_engine(settings.database_url, readonly=True)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.select(ORDERS.c.language).where(ORDERS.c.id == order)).scalar()
    finally:
        engine.dispose()


def test_the_tracking_page_shows_the_notices(web: tuple[Stack, Settings]) -> None:
    stack, settings = web
    shop = ScriptedShop(stack, settings, "s1")
    rider = ScriptedRider(stack, settings, "r1")
    order = "o-notice-page"
    try:
        shop.create(order)
        with sync_playwright() as playwright:
            browser = launch_browser(playwright)
            page = browser.new_context(viewport=PHONE, locale="en-GB").new_page()
            errors = page_errors(page)
            page.goto(shop.link(settings, order))
            page.wait_for_selector("#conn[data-state=online]", timeout=20_000)
            assert page.is_hidden("#notices-card")  # nothing told yet

            rider.at(52.5105, 13.3905)
            rider.online()
            rider.reply(rider.offer_for(order), accept=True)
            rider.status(order, OrderStatus.PICKED_UP)
            picked = texts.templates()["en"]["picked_up"].format(order=order)
            page.wait_for_selector(f"#notices li[data-kind='picked_up']:has-text('{picked}')", timeout=20_000)

            eta = ev.now().replace(microsecond=0) + timedelta(minutes=35)
            incident = ev.OrderIncidentReportedEvent(
                source=rider.source, data=ev.OrderIncident(order=order, reason="flat_tyre", eta=eta)
            )
            rider.send(topics.rider_order_status("r1", order), incident)
            page.wait_for_selector("#notices li[data-kind='delayed']:has-text('flat tyre')", timeout=20_000)
            assert page.inner_text("#notices li:first-child").find("flat tyre") >= 0  # newest first
            screenshot(page, "track-notices-phone")

            # A page opened now shows the last notice from the order's retained state.
            late = browser.new_context(viewport=PHONE, locale="en-GB").new_page()
            late.goto(shop.link(settings, order))
            late.wait_for_selector("#notices li[data-kind='delayed']", timeout=20_000)

            # The shop: the last notice in the order's panel, the next one in its conversation.
            board = browser.new_context(viewport=DESKTOP).new_page()
            shop_errors = page_errors(board)
            board.goto(settings.web_url + "/shop")
            board.fill("#login-user", "s1")
            board.fill("#login-password", secret(settings, "s1"))
            board.click("#login-submit")
            board.wait_for_selector("#conn[data-state=online]", timeout=20_000)
            board.click(f"tr[data-order='{order}']")
            board.wait_for_selector("#order-panel dd:has-text('delayed: Your order')", timeout=20_000)
            rider.status(order, OrderStatus.ARRIVED)
            board.wait_for_selector(
                "#order-chat .chat-line.from-notice:has-text('the rider is almost at your door')",
                timeout=20_000,
            )
            page.wait_for_selector("#notices li[data-kind='arriving']", timeout=20_000)
            screenshot(board, "shop-notices-desktop")

            # The shop's form names the customer's language: the order is created in Chinese.
            chinese = "o-notice-form-zh"
            board.click("#new-order")
            board.fill("#create-form [name=name]", "Li Wei")
            board.fill("#create-form [name=lat]", "52.5175")
            board.fill("#create-form [name=lon]", "13.4400")
            start = time.localtime(time.time() + 30 * 60)
            end = time.localtime(time.time() + 90 * 60)
            same_day = end.tm_mday == start.tm_mday
            board.fill(
                "#create-form [name=window_start]", time.strftime("%H:%M", start) if same_day else "23:58"
            )
            board.fill("#create-form [name=window_end]", time.strftime("%H:%M", end) if same_day else "23:59")
            board.select_option("#create-form [name=language]", "zh-CN")
            board.click("#create-form summary")
            board.fill("#create-form [name=order]", chinese)
            board.click("#create-submit")
            board.wait_for_selector(f"#create-status:has-text('Order {chinese} created')", timeout=20_000)
            # (the dashboard took login s1 over from the scripted shop: one login, one session)
            assert _language(settings, chinese) == "zh-CN"
            assert errors == [] and shop_errors == []
            browser.close()
    finally:
        rider.close()
        shop.close()


def test_an_amendment_is_told_once_on_the_tracking_page(web: tuple[Stack, Settings]) -> None:
    """The notice list tells the change; the status card keeps only the current instructions."""
    stack, settings = web
    shop = ScriptedShop(stack, settings, "s1")
    order = "o-notice-amend"
    try:
        shop.create(order)
        with sync_playwright() as playwright:
            browser = launch_browser(playwright)
            page = browser.new_context(viewport=PHONE, locale="en-GB").new_page()
            errors = page_errors(page)
            page.goto(shop.link(settings, order))
            page.wait_for_selector("#conn[data-state=online]", timeout=20_000)
            amend = ev.OrderAmendEvent(
                source="shops/s1",
                data=ev.OrderAmendment(
                    order=order,
                    address="Lindenallee 4",
                    instructions=ev.Instructions(
                        kind=ev.InstructionKind.LEAVE_AT_DOOR, text="behind the pot"
                    ),
                    asked_by="customer",
                    reason="she is out until later",
                ),
            )
            shop.client.publish(topics.shop_command("s1", topics.Command.AMEND_ORDER), ev.encode(amend))
            told = "#notices li[data-kind='amended']"
            page.wait_for_selector(f"{told}:has-text('Lindenallee 4')", timeout=20_000)
            assert "she is out until later" in page.inner_text(told)
            page.wait_for_selector("#instructions:has-text('Handover: left at your door — behind the pot')")
            assert page.is_hidden("#amended"), page.inner_text("#amended")  # not told a second time
            assert page.locator(told).count() == 1
            screenshot(page, "track-amended-once-phone")

            # A page opened later: the notice from the retained state, still said once.
            late = browser.new_context(viewport=PHONE, locale="en-GB").new_page()
            late.goto(shop.link(settings, order))
            late.wait_for_selector(f"{told}:has-text('Lindenallee 4')", timeout=20_000)
            late.wait_for_selector("#instructions:not([hidden])")
            assert late.is_hidden("#amended")
            assert errors == []
            browser.close()
    finally:
        shop.close()
