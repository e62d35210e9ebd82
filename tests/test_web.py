"""The web service and its two pages in a real Chromium, over a real access-controlled stack.

Broker (dynamic security), persister, dispatch, alerts, provisioner and the web service run as
processes (``Stack``); the pages log in through the web service's ``/mqtt`` bridge with their
own credentials; riders and shops are scripted over MQTT. Screenshots of each page at phone and
desktop size land in ``test-artifacts/screenshots/``.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from conftest import MqttTestClient
from paho.mqtt.enums import CallbackAPIVersion
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
    start_web_stack,
    wait_for,
)

from bloomwire.app.supervisor import Stack
from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.contract.lifecycle import OrderStatus
from bloomwire.runtime.settings import Settings
from bloomwire.services.web.links import parse_tracking_link, tracking_link

pytestmark = pytest.mark.timeout(300)

WebStack = tuple[Stack, Settings]
NOT_AUTHORIZED = 0x87


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebStack]:
    require_browser_and_broker()
    stack, settings = start_web_stack(
        tmp_path_factory.mktemp("web"), shops=["s1", "s2", "s3"], riders=["r1", "r2", "r3"]
    )
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


def new_page(browser: Any, viewport: dict[str, int] = PHONE, locale: str = "en-GB") -> Any:
    context = browser.new_context(viewport=viewport, locale=locale)
    return context.new_page()


def conn_state(page: Any) -> str:
    return str(page.get_attribute("#conn", "data-state") or "")


def wait_online(page: Any, timeout: float = 20.0) -> None:
    page.wait_for_selector("#conn[data-state=online]", timeout=timeout * 1000)


def track_view(page: Any, expr: str) -> Any:
    return page.evaluate(f"() => {{ const v = window.bloomwireTrack; return v ? {expr} : null; }}")


def http(
    settings: Settings, path: str, body: dict[str, Any] | None = None
) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        settings.web_url + path, data=data, headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


# --- the web service without a browser ------------------------------------------------------------


def test_web_service_serves_pages_contract_and_refuses_bad_enrolments(web: WebStack) -> None:
    _stack, settings = web
    status, headers, body = http(settings, "/track")
    assert status == 200 and b'src="/app/track/main.js"' in body
    assert "default-src 'self'" in headers["content-security-policy"]
    assert headers["referrer-policy"] == "no-referrer"
    status, _, body = http(settings, "/contract.json")
    contract = json.loads(body)
    assert contract["topics"]["order_state"] == "shops/{shop}/orders/{order}/state"
    assert contract["types"]["OrderChatPosted"] == "order.chat_posted"
    assert "picked_up" in contract["lifecycle"]["out_for_delivery"]
    assert http(settings, "/vendor/mqtt/mqtt.esm.js")[0] == 200
    assert http(settings, "/vendor/mqtt/../package.json")[0] == 404  # only dist folders are served
    status, _, body = http(settings, "/healthz")  # compose's healthcheck of the web container
    assert status == 200 and body.startswith(b"ok ")

    assert http(settings, "/api/enrol", {"shop": "s1"})[0] == 400
    bad = {"shop": "s1", "order": "o/../x", "customer": "c", "username": "u", "password": "p"}
    status, _, body = http(settings, "/api/enrol", bad)
    assert status == 400 and b"order" in body
    unknown = {
        "shop": "s1",
        "order": "no-such-order",
        "customer": "c-x",
        "username": "cust@00",
        "password": "p",
    }
    status, _, body = http(settings, "/api/enrol", unknown)
    assert status == 404 and json.loads(body)["error"] == "unknown_order"


def test_bridge_carries_mqtt_and_the_broker_still_decides(web: WebStack) -> None:
    """A plain MQTT client over the websocket bridge: the broker authenticates and authorises it."""
    stack, settings = web
    assert stack.broker is not None

    class ViaBridge:  # MqttTestClient's broker protocol, pointing at the web service
        host = settings.web_host
        port = ws_port = settings.web_port

    wrong = MqttTestClient(ViaBridge(), "s3", "not-the-password", transport="websockets")  # type: ignore[arg-type]
    wrong.paho.ws_set_options(path="/mqtt")
    assert wrong.connect().is_failure
    shop = MqttTestClient(ViaBridge(), "s3", secret(settings, "s3"), transport="websockets")  # type: ignore[arg-type]
    shop.paho.ws_set_options(path="/mqtt")
    try:
        assert not shop.connect().is_failure
        shop.subscribe(topics.shop_filter("s3"))
        acks: dict[int, int] = {}
        shop.paho.on_publish = lambda _c, _u, mid, rc, _p: acks.__setitem__(mid, int(rc.value))
        info = shop.paho.publish(topics.rider_location("r1"), b"{}", qos=1)  # not its topic
        assert wait_for(lambda: acks.get(info.mid), 5, "PUBACK") == NOT_AUTHORIZED
        status_raw = _retained(settings, topics.service_status("web"))
        assert status_raw == b"online"
    finally:
        shop.close()


def _retained(settings: Settings, topic: str) -> bytes:
    assert topic.startswith(topics.SERVICES)

    got: list[bytes] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.username_pw_set("operator", secret(settings, "operator"))
    client.on_message = lambda _c, _u, m: got.append(bytes(m.payload))
    client.connect(settings.broker_host, settings.broker_port)
    client.loop_start()
    try:
        client.subscribe(topic, 1)
        wait_for(lambda: got, 10, f"retained {topic}")
    finally:
        client.disconnect()
        client.loop_stop()
    return got[0]


def test_tracking_link_format() -> None:
    link = tracking_link("http://h:1/", "s1", "o 1", "c-o1", "cust@ab", "p&w=x")
    assert link.startswith("http://h:1/track#")
    assert "p&w" not in link.split("#", 1)[1]  # escaped
    assert parse_tracking_link(link) == {
        "shop": "s1",
        "order": "o 1",
        "customer": "c-o1",
        "username": "cust@ab",
        "password": "p&w=x",
    }


# --- the customer's page ------------------------------------------------------------------------------


def test_customer_link_follows_an_order_from_created_to_delivered(web: WebStack, browser: Any) -> None:
    stack, settings = web
    shop = ScriptedShop(stack, settings, "s1")
    rider = ScriptedRider(stack, settings, "r1")
    order, other = "o-web-a", "o-web-b"
    try:
        shop.create(order, items=("12 red roses", "a card"))
        shop.create(other, name="Bea", items=("tulips",))
        page = new_page(browser)
        errors = page_errors(page)
        page.goto(shop.link(settings, order))
        wait_online(page)
        page.wait_for_selector("#status:has-text('Order received')")
        assert page.inner_text("#items") == "12 red roses\na card"
        assert page.inner_text("#shop-name") == "From Blumen Anna"
        assert page.get_attribute("#map", "data-rider") == "hidden"  # no rider before pickup
        screenshot(page, "track-created-phone")

        second = new_page(browser)
        second.goto(shop.link(settings, other))
        wait_online(second)
        second.wait_for_selector("#status:has-text('Order received')")

        rider.at(52.5105, 13.3905)
        rider.online()
        offer = rider.offer_for(order)
        rider.reply(offer, accept=True)
        page.wait_for_selector("#status:has-text('Rider heading to the shop')")
        assert page.get_attribute("#map", "data-rider") == "hidden"  # accepted, not yet picked up
        assert track_view(page, "v.position") is None

        rider.status(order, OrderStatus.PICKED_UP)
        page.wait_for_selector("#status:has-text('Picked up')")
        for i in range(4):  # the rider rides towards the customer
            rider.at(52.512 + 0.002 * i, 13.392 + 0.003 * i)
            time.sleep(0.3)
        wait_for(
            lambda: (track_view(page, "v.position") or {}).get("lat") == pytest.approx(0.518 + 52),
            15,
            "rider moved",
        )
        assert page.get_attribute("#map", "data-rider") == "shown"
        assert track_view(page, "v.trail.length") >= 2
        rider.status(order, OrderStatus.EN_ROUTE)
        page.wait_for_selector("#status:has-text('On the way to you')")
        page.wait_for_selector("#eta:has-text('Expected at')")

        hostile = "<script>window.pwned = 1</script><b>ring twice</b>"
        rider.chat(order, hostile)
        page.wait_for_selector(f".chat-text:text-is('{hostile}')")
        assert page.evaluate("() => document.querySelectorAll('#chat script, #chat b').length") == 0
        assert page.evaluate("() => window.pwned === undefined")
        page.fill("#chat-text", "Please leave them with the neighbour")
        page.click("#chat-form button")
        rider.heard("Please leave them with the neighbour")
        page.wait_for_selector(".chat-line.from-customer.ok:has-text('leave them with the neighbour')")
        screenshot(page, "track-en-route-phone")
        page.set_viewport_size(DESKTOP)
        screenshot(page, "track-en-route-desktop")
        page.set_viewport_size(PHONE)

        # The other order's page saw none of it.
        assert track_view(second, "v.position") is None
        assert second.get_attribute("#map", "data-rider") == "hidden"
        assert "neighbour" not in second.inner_text("#chat") and "ring twice" not in second.inner_text(
            "#chat"
        )
        assert second.inner_text("#status") in ("Order received", "Rider assigned", "Finding a rider")

        rider.status(order, OrderStatus.DELIVERED)
        page.wait_for_selector("#status:has-text('Delivered')")
        page.wait_for_selector("#final:has-text('Your flowers were delivered at')")
        assert page.get_attribute("#map", "data-rider") == "hidden"  # privacy after delivery
        assert page.is_hidden("#chat-form")
        # Rated at once: the grace (3 s here) ends the link soon after.
        page.click("#rating-stars [data-stars='4']")
        page.fill("#rating-comment", "Lovely roses")
        page.click("#rating-send")
        page.wait_for_selector("#rating-done:has-text('Thank you! You rated this delivery 4 of 5.')")
        assert page.get_attribute("#rating-card", "data-rating") == "ok"
        screenshot(page, "track-delivered-phone")

        # Grace is 3 s here: the provisioner revokes the logins, and the page says so.
        page.wait_for_selector("#page[data-page='page.expired']", timeout=60_000)
        assert page.inner_text("#page-title") == "This tracking link has expired"
        screenshot(page, "track-expired-phone")
        fresh = new_page(browser)
        fresh.goto(shop.link(settings, order))
        fresh.wait_for_selector("#page[data-page='page.expired']", timeout=20_000)
        assert errors == []
        fresh.context.close()
        second.context.close()
        page.context.close()
    finally:
        rider.close()
        shop.close()


def test_customer_page_in_chinese_and_bad_links(web: WebStack, browser: Any) -> None:
    stack, settings = web
    shop = ScriptedShop(stack, settings, "s1")
    try:
        shop.create("o-web-zh", name="李雷", items=("玫瑰 12 支",))
        link = shop.link(settings, "o-web-zh")
        page = new_page(browser, locale="zh-CN")
        errors = page_errors(page)
        page.goto(link)
        wait_online(page)
        page.wait_for_selector("#status:has-text('已接单')")
        assert page.inner_text("#items") == "玫瑰 12 支"
        screenshot(page, "track-zh-phone")
        page.click("#lang")  # switch to English
        page.wait_for_selector("#status:has-text('Order received')")
        page.click("#lang")
        page.wait_for_selector("#status:has-text('已接单')")

        fields = parse_tracking_link(link)
        unknown = tracking_link(
            settings.web_url, "s1", "o-never-made", "c-o-never-made", fields["username"], "x"
        )
        page.goto("about:blank")
        page.goto(unknown)
        page.wait_for_selector("#page[data-page='page.unknown']")
        page.click("#lang")
        assert page.inner_text("#page-title") == "Unknown order"
        screenshot(page, "track-unknown-phone")
        wrong = tracking_link(
            settings.web_url, "s1", "o-web-zh", fields["customer"], fields["username"], "wrong"
        )
        elsewhere = new_page(browser)  # a browser that never opened the right link
        elsewhere.goto(wrong)
        elsewhere.wait_for_selector("#page[data-page='page.invalid']")
        elsewhere.context.close()
        page.goto("about:blank")
        page.goto(settings.web_url + "/track#s=s1&o=o-web-zh")  # cut short
        page.wait_for_selector("#page[data-page='page.invalid']")
        assert errors == []
        page.context.close()
    finally:
        shop.close()


# --- the shop dashboard ---------------------------------------------------------------------------------


def dashboard(browser: Any, settings: Settings, shop: str, viewport: dict[str, int] = DESKTOP) -> Any:
    page = new_page(browser, viewport=viewport)
    page.goto(settings.web_url + "/shop")
    page.fill("#login-user", shop)
    page.fill("#login-password", secret(settings, shop))
    page.click("#login-submit")
    wait_online(page)
    page.wait_for_selector("#app:not([hidden])")
    return page


def board_cell(page: Any, order: str, column: str) -> str:
    """A board cell's text, whether or not its row is scrolled into view.

    (innerText is empty for rows the browser skips while off screen: content-visibility.)
    """
    return str(page.text_content(f"tr[data-order='{order}'] .col-{column}") or "").strip()


def board_status(page: Any, order: str) -> str:
    return board_cell(page, order, "status")


def test_shop_dashboard_runs_an_order_end_to_end(web: WebStack, browser: Any) -> None:
    stack, settings = web
    page = new_page(browser, viewport=DESKTOP)
    errors = page_errors(page)
    page.goto(settings.web_url + "/shop")
    page.fill("#login-user", "s2")
    page.fill("#login-password", "not the password")
    page.click("#login-submit")
    page.wait_for_selector("#login-error:has-text('Wrong login or password')")
    screenshot(page, "shop-login-refused-desktop")
    page.fill("#login-password", secret(settings, "s2"))
    page.click("#login-submit")
    wait_online(page)
    page.wait_for_selector("#app:not([hidden])")

    # Create an order with the form: first with mistakes, then right.
    page.click("#new-order")
    page.fill("#create-form [name=window_end]", "00:00")
    page.fill("#create-form [name=window_start]", "23:00")
    page.click("#create-submit")
    page.wait_for_selector("[data-error-for=name]:has-text('name is required')")
    assert "Latitude" in page.inner_text("[data-error-for=lat]")
    assert "end after it starts" in page.inner_text("[data-error-for=window_end]")
    screenshot(page, "shop-form-errors-desktop")
    order = "o-dash-1"
    page.fill("#create-form [name=name]", "Chen <b>Jing</b>")
    page.fill("#create-form [name=address]", "Karl-Marx-Allee 90")
    page.fill("#create-form [name=lat]", "52.5175")
    page.fill("#create-form [name=lon]", "13.4400")
    start = time.localtime(time.time() + 30 * 60)
    end = time.localtime(time.time() + 90 * 60)
    page.fill("#create-form [name=window_start]", time.strftime("%H:%M", start))
    page.fill(
        "#create-form [name=window_end]",
        time.strftime("%H:%M", end if end.tm_mday == start.tm_mday else start),
    )
    if end.tm_mday != start.tm_mday:  # near midnight: keep the window inside today
        page.fill("#create-form [name=window_start]", "23:58")
        page.fill("#create-form [name=window_end]", "23:59")
    page.fill("#create-form [name=items]", "Peonies\nVase")
    page.click("#create-form summary")
    page.fill("#create-form [name=order]", order)
    page.fill("#create-form [name=pickup_lat]", "52.5110")
    page.fill("#create-form [name=pickup_lon]", "13.4200")
    page.click("#create-submit")
    page.wait_for_selector(f"tr[data-order='{order}']")
    page.wait_for_selector(f"#create-status:has-text('Order {order} created')")
    assert board_cell(page, order, "customer") == "Chen <b>Jing</b>"  # text, not HTML

    # No rider is online: the alerts service raises "unassigned"; acknowledge it.
    page.wait_for_selector(f"#alerts li.alert[data-status=open]:has-text('order {order}')", timeout=40_000)
    page.click(f"#alerts li.alert[data-status=open]:has-text('order {order}') button")
    page.wait_for_selector(f"#alerts li.alert[data-status=acknowledged]:has-text('order {order}')")

    # The order's panel: the tracking link and its QR code, then the customer opens the link.
    page.click(f"tr[data-order='{order}']")
    page.wait_for_selector("#track-link")
    wait_for(lambda: page.input_value("#track-link").startswith(settings.web_url + "/track#"), 20, "link")
    link = page.input_value("#track-link")
    assert page.evaluate("() => document.querySelector('#track-qr').width") > 50
    # A command is "sending" until the persister answers on shops/S/acks or shops/S/errors.
    page.fill("#assign-rider", "r-nobody")
    page.click("#order-panel .inline-form:has(#assign-rider) button")
    page.wait_for_selector("#order-panel .feedback.error-text:has-text('Assign to r-nobody refused:')")
    customer = new_page(browser, viewport=PHONE)
    customer.goto(link)
    wait_online(customer)
    customer.wait_for_selector("#status:has-text('Order received')")

    # A simulated rider comes online near the shop; dispatch offers, the rider accepts and rides.
    rider = ScriptedRider(stack, settings, "r2")
    try:
        rider.at(52.5112, 13.4198)
        rider.online()
        rider.reply(rider.offer_for(order, timeout=40))
        wait_for(lambda: board_status(page, order) == "accepted", 20, "accepted on the board")
        assert board_cell(page, order, "rider") == "r2"
        rider.status(order, OrderStatus.PICKED_UP)
        wait_for(lambda: board_status(page, order) == "picked up", 20, "picked up on the board")
        positions = []
        for i in range(4):
            rider.at(52.512 + 0.0015 * i, 13.425 + 0.004 * i)
            wait_for(
                lambda i=i: (
                    page.evaluate(
                        "() => (window.bloomwireDashboard.store.riders.get('r2') || {}).position?.lat"
                    )
                    == pytest.approx(52.512 + 0.0015 * i)
                ),
                15,
                "rider position on the dashboard",
            )
            positions.append(i)
        assert page.evaluate("() => window.bloomwireDashboard.map.has('r:r2')")
        page.wait_for_selector("#order-panel dd:has-text('r2')")

        # Chat from the dashboard reaches the customer's page.
        page.fill("#order-chat-text", "Your peonies are on the way!")
        page.click("#order-panel .inline-form:has(#order-chat-text) button")
        customer.wait_for_selector(".chat-text:has-text('Your peonies are on the way!')")
        page.wait_for_selector("#order-panel .feedback.ok:has-text('Message: saved.')")
        page.wait_for_selector("#order-chat .chat-text:has-text('Your peonies are on the way!')")
        page.click("#new-order")  # close the form: the board, map, order and alerts in view
        screenshot(page, "shop-dashboard-desktop", full_page=False)
        page.set_viewport_size(PHONE)
        # On a phone the board fits its card: no sideways scrolling, the status still shown.
        widths = page.evaluate(
            "() => { const s = document.querySelector('.board-scroll');"
            " return [s.scrollWidth, s.clientWidth, document.documentElement.scrollWidth, innerWidth]; }"
        )
        assert widths[0] <= widths[1] and widths[2] <= widths[3], widths
        assert page.is_visible(f"#board-body tr[data-order='{order}'] .col-status")
        screenshot(page, "shop-dashboard-phone", full_page=False)
        page.set_viewport_size(DESKTOP)
        screenshot(customer, "track-chat-from-shop-phone")

        rider.status(order, OrderStatus.EN_ROUTE)
        wait_for(lambda: board_status(page, order) == "en route", 20, "en route on the board")
        rider.status(order, OrderStatus.DELIVERED)
        wait_for(lambda: board_status(page, order) == "delivered", 20, "delivered on the board")
        # The customer rates it; the shop sees the rating on the board and the order's panel.
        customer.click("#rating-stars [data-stars='5']")
        customer.fill("#rating-comment", "Beautiful peonies")
        customer.click("#rating-send")
        customer.wait_for_selector("#rating-done:has-text('You rated this delivery 5 of 5')")
        wait_for(lambda: board_cell(page, order, "alerts") == "★ 5/5", 20, "rating on the board")
        page.wait_for_selector("#order-panel dd:has-text('5/5 · “Beautiful peonies”')")
        assert errors == []
    finally:
        rider.close()
        customer.context.close()
        page.context.close()


# --- the dashboard with many orders -----------------------------------------------------------------

BUSY_SHOP, BUSY_PUBLISHER = "s1", "busy-pub"


@pytest.fixture(scope="module")
def busy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebStack]:
    """A password-file broker and the web service: a publisher stands in for the persister."""
    require_browser_and_broker()
    settings = Settings(data_dir=tmp_path_factory.mktemp("busy"), database_url="")
    stack = Stack(settings, services=("web",), extra_users=[BUSY_SHOP, BUSY_PUBLISHER])
    with ThreadPoolExecutor(1) as pool:  # Playwright's sync API runs an event loop in this thread
        live = pool.submit(stack.start).result()
    try:
        yield stack, live
    finally:
        stack.stop()


def _busy_state(order: int, status: str, rider: str | None = None) -> bytes:
    start = ev.now() + timedelta(minutes=30 + order % 90)
    return ev.encode(
        ev.OrderState(
            order=f"b{order}",
            shop=BUSY_SHOP,
            status=OrderStatus(status),
            rider=rider,
            customer=f"Customer {order}",
            window=ev.Window(start=start, end=start + timedelta(hours=1)),
            updated_at=ev.now(),
            destination=ev.Place(lat=52.50 + order * 0.0002, lon=13.40 + (order % 20) * 0.001),
        )
    )


def test_dashboard_shows_200_orders_and_updates_a_row_live(busy: WebStack, browser: Any) -> None:
    stack, settings = busy
    assert stack.broker is not None
    pub = MqttTestClient(stack.broker, BUSY_PUBLISHER, secret(settings, BUSY_PUBLISHER))
    assert not pub.connect().is_failure
    page = None
    try:
        for i in range(1, 201):
            pub.publish(
                topics.order_topic(BUSY_SHOP, f"b{i}", "state"), _busy_state(i, "created"), retain=True
            )
        page = dashboard(browser, settings, BUSY_SHOP)
        errors = page_errors(page)
        rows = "() => [...document.querySelectorAll('#board-body tr')].filter((tr) => !tr.hidden).length"
        wait_for(lambda: page.evaluate(rows) == 200, 30, "200 rows on the board")
        wait_for(lambda: page.inner_text("[data-filter=all] span") == "200", 10, "the All count")
        ids = page.evaluate(
            "() => [...document.querySelectorAll('#board-body tr')].map((tr) => tr.dataset.order)"
        )
        assert sorted(ids) == sorted(f"b{i}" for i in range(1, 201))
        # Rows out of view are skipped by the browser; the bottom one, scrolled to, is drawn.
        last = page.locator(f"tr[data-order='{ids[-1]}']")

        def drawn() -> bool:
            last.scroll_into_view_if_needed()  # again: a re-sort may have moved it meanwhile
            return last.is_visible() and last.locator(".col-customer").inner_text().startswith("Customer ")

        wait_for(drawn, 10, "the bottom row drawn once scrolled to")

        # One order goes out with a rider: its row changes in place, the others stay put.
        before = page.evaluate_handle("() => document.querySelector(\"tr[data-order='b150']\")")
        pub.publish(
            topics.order_topic(BUSY_SHOP, "b150", "state"), _busy_state(150, "en_route", "r7"), retain=True
        )
        wait_for(lambda: board_status(page, "b150") == "en route", 10, "b150 en route")
        assert board_cell(page, "b150", "rider") == "r7"
        location = ev.OrderLocation(
            order="b150", rider="r7", position=ev.Position(lat=52.51, lon=13.41, at=ev.now()), eta=ev.now()
        )
        pub.publish(topics.order_topic(BUSY_SHOP, "b150", "location"), ev.encode(location), qos=0)
        wait_for(
            lambda: page.evaluate("() => window.bloomwireDashboard.map.has('r:r7')"), 10, "r7 on the map"
        )
        wait_for(lambda: "·" in board_cell(page, "b150", "eta"), 10, "b150's ETA next to its promise")
        assert page.evaluate("(el) => el === document.querySelector(\"tr[data-order='b150']\")", before)
        assert page.evaluate(rows) == 200
        page.click("[data-filter=out]")
        wait_for(lambda: page.evaluate(rows) == 1, 10, "one order out")
        wait_for(lambda: page.inner_text("[data-filter=out] span") == "1", 10, "the Out count")
        screenshot(page, "shop-dashboard-200-orders-desktop", full_page=False)
        assert errors == []
    finally:
        pub.close()
        if page is not None:
            page.context.close()


# --- outages ---------------------------------------------------------------------------------------------


def test_pages_survive_the_broker_restarting(web: WebStack, browser: Any) -> None:
    """Broker down: both pages say "reconnecting" (no stack trace); back: live, with the current state."""
    stack, settings = web
    assert stack.broker is not None
    shop = ScriptedShop(stack, settings, "s1")
    try:
        order = "o-web-restart"
        shop.create(order)
        page = new_page(browser)
        errors = page_errors(page)
        page.goto(shop.link(settings, order))
        wait_online(page)
        page.wait_for_selector("#status:has-text('Order received')")
        shop.close()
        board = dashboard(browser, settings, "s3", viewport=PHONE)
        board_errors = page_errors(board)

        stack.broker.stop()  # the stack's supervision starts it again on the same ports
        wait_for(lambda: conn_state(page) == "reconnecting", 20, "the customer page to say reconnecting")
        wait_for(lambda: conn_state(board) == "reconnecting", 20, "the dashboard to say reconnecting")
        assert page.inner_text("#conn") == "Reconnecting…"
        screenshot(page, "track-reconnecting-phone")
        # same ports, same data dir: logins and retained states kept
        wait_for(lambda: stack.broker is not None and stack.broker.running, 30, "the broker to be back")

        wait_online(page, timeout=40)
        wait_online(board, timeout=40)
        assert page.is_visible("#content")
        # What happened while the page was away shows once it is back (the retained state).
        shop = ScriptedShop(stack, settings, "s1")
        _cancel(shop, order)
        page.wait_for_selector("#status:has-text('Cancelled')", timeout=30_000)
        assert errors == [] and board_errors == []
        board.context.close()
        page.context.close()
    finally:
        shop.close()


def _cancel(shop: ScriptedShop, order: str) -> None:
    event = ev.OrderCancelEvent(source=f"{topics.SHOPS}/{shop.shop}", data=ev.OrderCancelled(order=order))
    shop.client.publish(topics.shop_command(shop.shop, topics.Command.CANCEL_ORDER), ev.encode(event))
