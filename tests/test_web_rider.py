"""The rider's web app (/rider) in a real Chromium, over a real access-controlled stack.

Broker (dynamic security), persister, dispatch, alerts, provisioner and the web service run as
processes; the page logs in with a rider device login (``r1@LABEL``) through ``/mqtt``; the
browser's position comes from Playwright's geolocation; offers come from the real dispatch.
What the page reported is checked in the store. Screenshots at phone size land in
``test-artifacts/screenshots/``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from playwright.sync_api import sync_playwright
from webkit import (
    PHONE,
    ScriptedShop,
    launch_browser,
    page_errors,
    require_browser_and_broker,
    screenshot,
    start_web_stack,
    wait_for,
)

from bloomwire.access import open_accounts
from bloomwire.app.supervisor import Stack
from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.runtime.settings import Settings
from bloomwire.services.web.contract_doc import contract_document
from bloomwire.store import make_engine
from bloomwire.store import models as m

pytestmark = pytest.mark.timeout(300)

WebStack = tuple[Stack, Settings]
RIDER = "r1"
#: Near the scripted shop's pickup point (52.5100, 13.3900).
NEAR_PICKUP = {"latitude": 52.5110, "longitude": 13.3910}


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebStack]:
    require_browser_and_broker()
    stack, settings = start_web_stack(tmp_path_factory.mktemp("web-rider"), shops=["s1"], riders=[RIDER])
    try:
        yield stack, settings
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def browser(web: WebStack) -> Iterator[Any]:
    with sync_playwright() as playwright:
        browser = launch_browser(playwright)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def engine(web: WebStack) -> Iterator[sa.Engine]:
    engine = make_engine(web[1].database_url, readonly=True)
    yield engine
    engine.dispose()


def device(settings: Settings, label: str) -> tuple[str, str]:
    """A new device login of the rider, as `bloomwire accounts device add rider r1 LABEL` makes it."""
    with open_accounts(settings, offline=False) as accounts:
        cred = accounts.add_device(RIDER, label)
    return cred.username, cred.password


def rider_page(browser: Any, settings: Settings, locale: str = "en-GB") -> Any:
    context = browser.new_context(
        viewport=PHONE, locale=locale, geolocation=NEAR_PICKUP, permissions=["geolocation"]
    )
    page = context.new_page()
    page.goto(settings.web_url + "/rider")
    return page


def sign_in_form(page: Any, login: tuple[str, str], *, remember: bool = False) -> None:
    page.fill("#login-user", login[0])
    page.fill("#login-pass", login[1])
    if remember:
        page.check("#login-remember")
    page.click("#login-submit")


def sign_in(page: Any, login: tuple[str, str], *, remember: bool = False) -> None:
    sign_in_form(page, login, remember=remember)
    page.wait_for_selector("#app:not([hidden])")
    page.wait_for_selector("#conn[data-state=online]")


def go_on_duty(page: Any) -> None:
    page.click("#duty")
    page.wait_for_selector("body[data-duty=on]")
    page.wait_for_selector("#geo[data-state=sent]")


def accept_offer(page: Any, order: str) -> None:
    """Wait for dispatch's offer of ``order``, accept it and wait for the store's ack."""
    page.wait_for_selector(f".offer[data-order='{order}'] .accept:not([disabled])", timeout=60_000)
    page.click(f".offer[data-order='{order}'] .accept")
    page.wait_for_selector(f".order[data-order='{order}'][data-status=accepted][data-stored=true]")


def wait_pending(page: Any, count: int, timeout: float = 30.0) -> None:
    page.wait_for_selector(f"#outbox[data-pending='{count}']", timeout=timeout * 1000)


def next_buttons(page: Any, order: str) -> list[str]:
    found = page.eval_on_selector_all(
        f".order[data-order='{order}'] .next button", "els => els.map(e => e.dataset.next)"
    )
    return sorted(found)


def report(page: Any, order: str, status: str) -> None:
    page.click(f".order[data-order='{order}'] .next button[data-next={status}]")
    page.wait_for_selector(f".order[data-order='{order}'][data-status={status}]")


def stored_statuses(engine: sa.Engine, order: str) -> list[tuple[str, str]]:
    """(event id, status) of the order's rider-reported status events, in the store's order."""
    e = m.EVENTS
    query = (
        sa.select(e.c.id, e.c.data)
        .where(e.c.order_id == order, e.c.type == "order.status_changed", e.c.source == f"riders/{RIDER}")
        .order_by(e.c.seq)
    )
    with engine.connect() as conn:
        return [(row.id, row.data["status"]) for row in conn.execute(query)]


def _status_event(engine: sa.Engine, order: str, status: str) -> dict[str, Any]:
    e = m.EVENTS
    query = sa.select(e.c.data).where(e.c.order_id == order, e.c.type == "order.status_changed")
    with engine.connect() as conn:
        found = [r.data for r in conn.execute(query) if r.data["status"] == status]
    assert len(found) == 1, found
    return found[0]


def scalar(engine: sa.Engine, query: Any) -> Any:
    with engine.connect() as conn:
        return conn.execute(query).scalar()


def shop_chat(shop: ScriptedShop, order: str, text: str) -> None:
    event = ev.OrderChatPostedEvent(
        source=f"{topics.SHOPS}/{shop.shop}", data=ev.OrderChat(order=order, text=text)
    )
    shop.client.publish(topics.shop_command(shop.shop, topics.Command.CHAT), ev.encode(event))


# --- the web service without a browser ------------------------------------------------------------


def test_contract_carries_the_riders_topics_and_transitions() -> None:
    doc = contract_document()
    assert doc["topics"]["rider_order_status"] == "riders/{rider}/orders/{order}/status"
    assert doc["topics"]["rider_acks"] == "riders/{rider}/inbox/acks"
    assert doc["topics"]["rider_inbox_all"] == "riders/{rider}/inbox/#"
    assert doc["sources"]["rider"] == "riders/{rider}"
    assert "picked_up" in doc["lifecycle"]["rider_reportable"]
    assert "accepted" not in doc["lifecycle"]["rider_reportable"]  # acceptance goes via replies
    assert doc["limits"]["incident_reason"] == 100


# --- the page ------------------------------------------------------------------------------------


def test_an_unreachable_broker_says_reconnecting(web: WebStack, browser: Any) -> None:
    """The bridge closes the page's socket (1013) when the broker is down: no stack trace, a retry."""
    _stack, settings = web
    context = browser.new_context(viewport=PHONE, locale="en-GB")
    page = context.new_page()
    errors = page_errors(page)
    attempts: list[str] = []

    def broker_down(ws: Any) -> None:
        attempts.append(ws.url)
        ws.close(code=1013, reason="broker unavailable")

    try:
        page.route_web_socket("**/mqtt", broker_down)
        page.goto(settings.web_url + "/rider")
        sign_in_form(page, (f"{RIDER}@web-x", "whatever"))
        page.wait_for_selector("#login-msg[data-msg='rider.login.unreachable']")
        assert page.inner_text("#login-msg") == "Cannot reach the server. Reconnecting…"
        page.wait_for_selector("#conn[data-state=reconnecting]")
        # Playwright runs the route handler only while it is called: evaluate() lets it
        wait_for(lambda: page.evaluate("() => 0") == 0 and len(attempts) >= 2, 20, "another attempt")
        screenshot(page, "rider-unreachable-phone")
        assert errors == []
    finally:
        context.close()


def test_rider_accepts_a_dispatch_offer_and_delivers(web: WebStack, browser: Any, engine: sa.Engine) -> None:
    stack, settings = web
    shop = ScriptedShop(stack, settings, "s1")
    order = "o-ride-a"
    page = rider_page(browser, settings)
    errors = page_errors(page)
    try:
        screenshot(page, "rider-login-phone")
        login = device(settings, "web-a")
        sign_in_form(page, (login[0], "wrong"))
        page.wait_for_selector("#login-msg[data-msg='rider.login.wrong']")
        assert page.inner_text("#login-msg") == "Wrong login or password."
        assert page.is_hidden("#app")

        sign_in(page, login)  # the same login again, now with its password
        assert page.inner_text("#who") == f"{RIDER}@web-a"
        go_on_duty(page)
        wait_for(
            lambda: _rider_at(engine, NEAR_PICKUP["latitude"]), 20, "the browser's position in the store"
        )

        shop.create(order, items=("12 red roses",))
        page.wait_for_selector(f".offer[data-order='{order}'] .countdown", timeout=60_000)
        assert "Answer within" in page.inner_text(f".offer[data-order='{order}'] .countdown")
        assert "null" not in page.inner_text(f".offer[data-order='{order}']")
        screenshot(page, "rider-offer-phone")
        accept_offer(page, order)
        assert next_buttons(page, order) == ["declined", "picked_up"]  # only the legal moves

        report(page, order, "picked_up")
        assert next_buttons(page, order) == ["arrived", "en_route", "returned"]
        report(page, order, "en_route")
        page.context.set_geolocation({"latitude": 52.5150, "longitude": 13.3990})  # ~700 m on
        wait_for(lambda: _rider_at(engine, 52.515), 20, "the new position in the store")

        page.click(f".order[data-order='{order}'] .trouble summary")
        page.fill(f".order[data-order='{order}'] .delay", "20")
        page.click(f".order[data-order='{order}'] .incident")
        page.wait_for_selector(f".order[data-order='{order}'] .notice")
        shop_chat(shop, order, "<b>ring twice</b>")
        page.wait_for_selector(f".order[data-order='{order}'] .chat-text:text-is('<b>ring twice</b>')")
        page.fill(f".order[data-order='{order}'] .chat-form input", "Five minutes away")
        page.click(f".order[data-order='{order}'] .chat-form button")
        chat = topics.order_topic("s1", order, topics.OrderChannel.CHAT)
        shop.inbox.find(lambda t, p: t == chat and b"Five minutes away" in p, 20, "the rider's chat")
        card = page.inner_text(f".order[data-order='{order}']")
        assert "On the way" in card and "null" not in card
        screenshot(page, "rider-en-route-phone")

        report(page, order, "arrived")
        report(page, order, "delivered")
        assert next_buttons(page, order) == []
        page.wait_for_selector(f".order[data-order='{order}'][data-stored=true]")
        wait_pending(page, 0)
        screenshot(page, "rider-delivered-phone")

        statuses = [s for _, s in stored_statuses(engine, order)]
        assert statuses == ["picked_up", "en_route", "arrived", "delivered"]
        o = m.ORDERS
        assert scalar(engine, sa.select(o.c.status).where(o.c.id == order)) == "delivered"
        assert scalar(engine, sa.select(o.c.rider).where(o.c.id == order)) == RIDER
        incidents = sa.select(sa.func.count()).where(
            m.EVENTS.c.order_id == order, m.EVENTS.c.type == "order.incident_reported"
        )
        assert scalar(engine, incidents) == 1
        assert page.evaluate("() => document.querySelectorAll('.chat b').length") == 0
        assert errors == []
    finally:
        page.context.close()
        shop.close()


def _rider_at(engine: sa.Engine, lat: float) -> bool:
    """True once the store has the rider at latitude ``lat`` (positions update the rider's row)."""
    r = m.RIDERS
    stored = scalar(engine, sa.select(r.c.lat).where(r.c.id == RIDER))
    return stored is not None and abs(stored - lat) < 1e-6


def test_statuses_reported_offline_are_stored_once_in_order(
    web: WebStack, browser: Any, engine: sa.Engine
) -> None:
    stack, settings = web
    shop = ScriptedShop(stack, settings, "s1")
    order = "o-ride-b"
    page = rider_page(browser, settings)
    errors = page_errors(page)
    try:
        sign_in(page, device(settings, "web-b"))
        go_on_duty(page)
        shop.create(order)
        accept_offer(page, order)

        page.context.set_offline(True)
        page.wait_for_selector("#conn:not([data-state=online])", timeout=60_000)
        report(page, order, "picked_up")
        report(page, order, "en_route")
        wait_pending(page, 2)
        assert page.is_visible(f".order[data-order='{order}'] .unsent")
        screenshot(page, "rider-offline-phone")
        assert stored_statuses(engine, order) == []  # nothing got through

        page.context.set_offline(False)
        page.wait_for_selector("#conn[data-state=online]", timeout=60_000)
        wait_pending(page, 0)
        page.wait_for_selector(f".order[data-order='{order}'][data-stored=true]")
        stored = stored_statuses(engine, order)
        assert [s for _, s in stored] == ["picked_up", "en_route"]  # each once, in order
        assert len({i for i, _ in stored}) == 2
        o = m.ORDERS
        assert scalar(engine, sa.select(o.c.status).where(o.c.id == order)) == "en_route"
        assert errors == []
    finally:
        page.context.close()
        shop.close()


def test_a_reload_resends_what_the_outbox_kept(web: WebStack, browser: Any, engine: sa.Engine) -> None:
    stack, settings = web
    shop = ScriptedShop(stack, settings, "s1")
    order = "o-ride-c"
    page = rider_page(browser, settings, locale="zh-CN")
    context = page.context
    try:
        assert page.inner_text("#login-submit") == "登录"
        sign_in(page, device(settings, "web-c"), remember=True)
        go_on_duty(page)
        shop.create(order)
        accept_offer(page, order)

        context.set_offline(True)
        page.wait_for_selector("#conn:not([data-state=online])", timeout=60_000)
        report(page, order, "picked_up")
        wait_pending(page, 1)
        screenshot(page, "rider-pending-zh-phone")
        page.close()  # the tab goes away with the event only in IndexedDB
        assert stored_statuses(engine, order) == []

        context.set_offline(False)
        page = context.new_page()
        errors = page_errors(page)
        page.goto(settings.web_url + "/rider")  # the remembered login opens the app at once
        page.wait_for_selector(f".order[data-order='{order}'][data-status=picked_up]")
        page.wait_for_selector("#conn[data-state=online]")
        page.wait_for_selector(f".order[data-order='{order}'][data-stored=true]")
        wait_pending(page, 0)
        assert [s for _, s in stored_statuses(engine, order)] == ["picked_up"]
        assert next_buttons(page, order) == ["arrived", "en_route", "returned"]
        page.click("#lang")
        page.wait_for_selector(f".order[data-order='{order}'] .next button:text-is('On my way')")
        other = context.new_page()  # a second tab of the same login would throw this one out
        other.goto(settings.web_url + "/rider")
        other.wait_for_selector("#login-msg[data-msg='rider.login.other_tab']")
        other.close()
        assert page.get_attribute("#conn", "data-state") == "online"

        # A failed delivery with its reason; then only "returned" is left.
        page.click(f".order[data-order='{order}'] .trouble summary")
        page.select_option(f".order[data-order='{order}'] .fail-reason", "customer_unreachable")
        page.fill(f".order[data-order='{order}'] .fail-note", "nobody at the door")
        page.click(f".order[data-order='{order}'] .fail")
        page.wait_for_selector(f".order[data-order='{order}'][data-status=failed]")
        assert next_buttons(page, order) == ["returned"]
        page.wait_for_selector(f".order[data-order='{order}'][data-stored=true]")
        assert page.query_selector(f".order[data-order='{order}'] .unsent") is None
        failed = _status_event(engine, order, "failed")
        assert (failed["reason"], failed["note"]) == ("customer_unreachable", "nobody at the door")

        with open_accounts(settings, offline=False) as accounts:  # the phone is lost: revoke it
            accounts.revoke_device(f"{RIDER}@web-c")
        page.wait_for_selector("#login-msg[data-msg='rider.login.wrong']", timeout=30_000)
        assert page.is_hidden("#app") and page.input_value("#login-pass") == ""
        assert errors == []
    finally:
        context.close()
        shop.close()
