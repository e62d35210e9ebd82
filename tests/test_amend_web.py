"""Amendments on the pages (issue 18), in a real Chromium over a real access-controlled stack: the
shop changes an order with the dashboard's edit form; the customer's tracking page says what
changed, whose wish it was and why, in English and Chinese, with the new handover instructions;
a change the rules refuse is shown on the dashboard with the rule's name; the rider's page shows
the new door and instructions and confirms them, and the shop hears it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import sync_playwright
from test_web_rider import accept_offer, device, go_on_duty, report, rider_page, sign_in
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
    start_web_stack,
)

from bloomwire.app.supervisor import Stack
from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.contract.lifecycle import OrderStatus
from bloomwire.runtime.settings import Settings

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Settings]]:
    require_browser_and_broker()
    stack, settings = start_web_stack(tmp_path_factory.mktemp("web-amend"), shops=["s1"], riders=["r1"])
    try:
        yield stack, settings
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def browser(web: tuple[Stack, Settings]) -> Iterator[Any]:
    with sync_playwright() as playwright:
        browser = launch_browser(playwright)
        yield browser
        browser.close()


def new_page(browser: Any, viewport: dict[str, int] = PHONE) -> Any:
    return browser.new_context(viewport=viewport, locale="en-GB").new_page()


def test_the_dashboard_changes_an_order_and_the_customer_page_says_so(
    web: tuple[Stack, Settings], browser: Any
) -> None:
    stack, settings = web
    shop = ScriptedShop(stack, settings, "s1")
    rider = ScriptedRider(stack, settings, "r1")
    order = "o-amend-web"
    try:
        shop.create(order)
        customer = new_page(browser)
        errors = page_errors(customer)
        customer.goto(shop.link(settings, order))
        customer.wait_for_selector("#status:has-text('Order received')")
        assert customer.is_hidden("#amended")

        dash = new_page(browser, DESKTOP)
        dash.goto(settings.web_url + "/shop")
        dash.fill("#login-user", "s1")
        dash.fill("#login-password", secret(settings, "s1"))
        dash.click("#login-submit")
        dash.wait_for_selector("#app:not([hidden])")
        dash.click(f"tr[data-order='{order}']")
        dash.evaluate("() => { document.querySelector('#amend-form').parentElement.open = true; }")
        later = time.localtime(time.time() + 150 * 60)
        if later.tm_mday == time.localtime().tm_mday:  # near midnight the window stays as it is
            dash.fill("#amend-form [name=window_end]", time.strftime("%H:%M", later))
        dash.fill("#amend-form [name=address]", "Lindenallee 4")
        dash.select_option("#amend-form [name=kind]", "leave_at_door")
        dash.fill("#amend-form [name=instructions_text]", "behind the blue pot")
        dash.check("#amend-form [name=customer_asked]")
        dash.fill("#amend-form [name=reason]", "she is out until later")
        dash.click("#amend-form button[type=submit]")

        customer.wait_for_selector("#amended:has-text('Changed at your request:')")
        text = customer.inner_text("#amended")
        assert "the address" in text and "the delivery instructions" in text, text
        assert "Why: she is out until later" in text
        how = "Handover: left at your door — behind the blue pot"
        customer.wait_for_selector(f"#instructions:has-text('{how}')")
        customer.wait_for_selector("#timeline li[data-status=amended]:has-text('Order changed')")
        screenshot(customer, "track-amended-phone")
        customer.click("#lang")
        customer.wait_for_selector("#amended:has-text('已按您的要求修改')")
        assert "原因：she is out until later" in customer.inner_text("#amended")
        assert "放在您的门口" in customer.inner_text("#instructions")
        dash.wait_for_selector("#order-panel dd:has-text('customer asked: she is out until later')")

        # A change the rules refuse is shown with the rule's name.
        shop_items = "#amend-form [name=items]"
        rider.at(52.5105, 13.3905)
        rider.online()
        offer = rider.offer_for(order)
        rider.reply(offer, accept=True)
        rider.status(order, OrderStatus.PICKED_UP)
        customer.wait_for_selector("#status:has-text('已取货')")
        dash.evaluate("() => { document.querySelector('#amend-form').parentElement.open = true; }")
        dash.fill(shop_items, "a vase")
        dash.click("#amend-form button[type=submit]")
        dash.wait_for_selector(".feedback:has-text('rule items-until-picked-up')")
        assert errors == []
        customer.context.close()
        dash.context.close()
    finally:
        rider.close()
        shop.close()


def test_the_rider_page_shows_the_change_and_confirms_it(web: tuple[Stack, Settings], browser: Any) -> None:
    stack, settings = web
    shop = ScriptedShop(stack, settings, "s1")
    order = "o-amend-rider"
    page = rider_page(browser, settings)
    errors = page_errors(page)
    try:
        sign_in(page, device(settings, "web-amend"))
        go_on_duty(page)
        shop.create(order)
        accept_offer(page, order)
        report(page, order, "picked_up")
        amend = ev.OrderAmendEvent(
            source="shops/s1",
            data=ev.OrderAmendment(
                order=order,
                address="Alexanderplatz 1, rear building",
                instructions=ev.Instructions(
                    kind=ev.InstructionKind.LEAVE_AT_DOOR, text="behind the planter"
                ),
                asked_by="customer",
                reason="not reachable by phone",
            ),
        )
        shop.client.publish(topics.shop_command("s1", topics.Command.AMEND_ORDER), ev.encode(amend))
        card = f".order[data-order='{order}']"
        page.wait_for_selector(
            f"{card} .instructions:has-text('Handover: leave at the door — behind the planter')"
        )
        page.wait_for_selector(f"{card} .amendment:has-text('at the customer')")
        assert "Alexanderplatz 1, rear building" in page.inner_text(card)
        screenshot(page, "rider-amended-phone")
        page.click(f"{card} .amendment .confirm")
        page.wait_for_selector(f"{card} .amendment[data-confirmed=true]")
        status = topics.order_topic("s1", order, topics.OrderChannel.STATUS)
        raw = shop.inbox.find(
            lambda t, p: t == status and b"order.amendment_confirmed" in p, 20, "the rider's confirmation"
        )
        confirmed = ev.decode(raw)
        assert isinstance(confirmed, ev.OrderAmendmentConfirmedEvent)
        assert (confirmed.data.rider, confirmed.data.amendment) == ("r1", amend.id)
        assert errors == []
        page.context.close()
    finally:
        shop.close()
