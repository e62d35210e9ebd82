"""Proof of delivery (issue 16) through real processes.

* The handover code over a real broker, with the persister and the alerts service in-process on a
  simulated clock (the harness of test_alerts_service.py): a wrong code is refused and told to the
  rider and the shop, the right one delivers, and three wrong codes raise one alert.
* The rider page's photo input: too big is refused in the page, too small by the persister (its
  reason shown), a small JPEG is stored on the order.
* The photo over the access-controlled stack (broker with dynamic security, persister, dispatch,
  alerts, provisioner, web; the harness of test_web.py): a rider's photo reaches its customer's
  tracking page in Chromium, a text file posing as a JPEG is refused, and another order's
  customer cannot fetch the photo.
"""

from __future__ import annotations

import hashlib
import io
import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from playwright.sync_api import sync_playwright
from test_alerts_service import START, Backbone, Inbox, S, SimClock, World
from test_web_rider import accept_offer, device, go_on_duty, report, rider_page, sign_in
from webkit import (
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
from bloomwire.contract.events import AlertRule
from bloomwire.contract.lifecycle import OrderStatus
from bloomwire.runtime.settings import Settings
from bloomwire.services.web.links import parse_tracking_link

# --- the handover code --------------------------------------------------------------------------


@pytest.fixture
def world(
    database_url: str,
    make_settings: Callable[..., Settings],
    mqtt_user: Callable[..., tuple[str, str]],
    mqtt_client: Callable[..., Any],
    tmp_path: Path,
) -> Iterator[World]:
    """Persister and alerts on a simulated clock, the shop and devices over MQTT."""
    rules = tmp_path / "rules.toml"
    rules.write_text("[defaults]\nhandover_wrong_codes = 3\n", encoding="utf-8")
    backbone = Backbone(
        make_settings(None, database_url=database_url),
        make_settings(None, database_url=database_url),
        SimClock(START),
        rules,
    )
    backbone.start()
    w: World | None = None
    try:
        w = World(backbone, mqtt_client, mqtt_user, database_url)
        yield w
    finally:
        if w is not None:
            w.close()
        backbone.close()


def create_with_code(w: World, order: str) -> str:
    """A new order that requires its handover code; the code, as the shop's retained state has it."""
    now = w.clock()
    event = ev.OrderCreateEvent(
        source=f"shops/{w.shop}",
        time=now,
        data=ev.OrderCreated(
            order=order,
            customer=ev.Customer(name="Ms Zhang", lat=52.52, lon=13.405, address="Torstr. 1"),
            window=ev.Window(start=now + timedelta(minutes=30), end=now + timedelta(minutes=90)),
            handover_code_required=True,
        ),
    )
    w.shop_client.publish(topics.shop_command(w.shop, topics.Command.CREATE_ORDER), ev.encode(event), qos=1)
    w.status_seen(order, S.CREATED)
    state = topics.order_topic(w.shop, order, topics.OrderChannel.STATE)
    seen = w.inbox.take(lambda s: s.topic == state and bool(s.payload), f"state of {order}")
    assert seen.json["handover_code_required"] is True
    code: str = seen.json["handover_code"]
    return code


def deliver(w: World, order: str, rider: str, code: str) -> ev.OrderStatusChangedEvent:
    event = ev.OrderStatusChangedEvent(
        source=f"riders/{rider}",
        time=w.clock(),
        data=ev.OrderStatusChanged(order=order, status=S.DELIVERED, code=code),
    )
    w.devices.publish(topics.rider_order_status(rider, order), ev.encode(event), qos=1)
    return event


def test_a_required_code_is_refused_when_wrong_alerted_after_three_and_delivers_when_right(
    world: World, mqtt_user: Any, mqtt_client: Any
) -> None:
    w = world
    order, rider = w.new_ids()
    rider_client = mqtt_client(*mqtt_user())
    rider_client.subscribe(topics.rider_inbox(rider, topics.Inbox.ERRORS), qos=1)
    rider_inbox = Inbox(rider_client)
    code = create_with_code(w, order)
    w.presence(rider, ev.Presence.ONLINE)
    w.offer(order, rider)
    w.accept(order, rider)
    w.rider_status(order, rider, S.PICKED_UP)
    w.rider_status(order, rider, S.ARRIVED)
    wrong = "0000" if code != "0000" else "1111"

    for attempt in (1, 2):
        sent = deliver(w, order, rider, wrong)
        reason = w.error_seen(w.shop, f"wrong attempts: {attempt}")
        assert reason.startswith("handover_code:")
        told = rider_inbox.take(lambda s, i=sent.id: s.json.get("id") == i, "the rider's refusal")
        assert "wrong handover code" in told.json["reason"]
    w.backbone.wait_ticks(3)
    w.expect_none(ev.AlertRaisedEvent, rule=AlertRule.HANDOVER_CODE, order=order)

    deliver(w, order, rider, wrong)
    w.error_seen(w.shop, "wrong attempts: 3")
    raised = w.expect(ev.AlertRaisedEvent, rule=AlertRule.HANDOVER_CODE, order=order)
    assert "wrong handover code 3 times" in raised.data.message
    deliver(w, order, rider, wrong)  # a fourth: still one alert
    w.error_seen(w.shop, "wrong attempts: 4")
    w.backbone.wait_ticks(3)
    w.expect_none(ev.AlertRaisedEvent, rule=AlertRule.HANDOVER_CODE, order=order)
    [row] = w.alert_rows(AlertRule.HANDOVER_CODE, order)
    assert row.id == raised.data.alert  # the deterministic id of (rule, shop, order)

    deliver(w, order, rider, code)
    delivered = w.status_seen(order, S.DELIVERED)
    assert delivered.data.code is None, "the code is never published"
    resolved = w.expect(ev.AlertResolvedEvent, alert=raised.data.alert)
    assert resolved.data.alert == row.id
    rider_client.close()


# --- the photo, to the customer's page ---------------------------------------------------------------

WebStack = tuple[Stack, Settings]


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebStack]:
    require_browser_and_broker()
    stack, settings = start_web_stack(tmp_path_factory.mktemp("proof"), shops=["s1"], riders=["r1"])
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


def jpeg(size: tuple[int, int] = (120, 90)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 60)).save(out, "JPEG")
    return out.getvalue()


def http(settings: Settings, path: str, body: dict[str, Any] | None = None) -> tuple[int, bytes, str]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        settings.web_url + path, data=data, headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, response.read(), response.headers.get("content-type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), ""


def photo_token(settings: Settings, link: str) -> str:
    """What a page gets for proving its link (``/api/enrol``)."""
    fields = parse_tracking_link(link)
    status, body, _ = http(settings, "/api/enrol", {**fields, "label": "test"})
    assert status == 200, body
    token: str = json.loads(body)["photo_token"]
    return token


def send_photo(rider: ScriptedRider, order: str, data: bytes) -> str:
    """Publish a photo as the rider's device does; its event id."""
    rider.client.publish(topics.rider_order_photo(rider.rider, order), data, qos=1)
    return ev.photo_event_id(rider.rider, order, hashlib.sha256(data).hexdigest())


def test_a_photo_reaches_its_customers_page_and_no_one_else(web: WebStack, browser: Any) -> None:
    stack, settings = web
    shop = ScriptedShop(stack, settings, "s1")
    rider = ScriptedRider(stack, settings, "r1")
    order, other = "o-proof-a", "o-proof-b"
    try:
        shop.create(order)
        shop.create(other, name="Bea")
        link, other_link = shop.link(settings, order), shop.link(settings, other)
        page = browser.new_context(viewport={"width": 390, "height": 844}, locale="en-GB").new_page()
        errors = page_errors(page)
        page.goto(link)
        page.wait_for_selector("#conn[data-state=online]", timeout=20_000)
        page.wait_for_selector("#proof-code:has-text('Your handover code:')")
        rider.at(52.5105, 13.3905)
        rider.online()
        rider.reply(rider.offer_for(order), accept=True)
        rider.status(order, OrderStatus.PICKED_UP)
        rider.status(order, OrderStatus.ARRIVED)
        page.wait_for_selector("#status:has-text('rider')", state="attached")

        fake = b"Dear customer, this is a text file posing as a JPEG.\n"
        refused_id = send_photo(rider, order, fake)
        errors_topic = topics.rider_inbox("r1", topics.Inbox.ERRORS)
        raw = rider.inbox.find(
            lambda t, p: t == errors_topic and refused_id.encode() in p, 20, "the refused photo"
        )
        assert "not an image" in json.loads(raw)["reason"]

        data = jpeg()
        sha = hashlib.sha256(data).hexdigest()
        photo_id = send_photo(rider, order, data)
        acks = topics.rider_inbox("r1", topics.Inbox.ACKS)
        rider.inbox.find(lambda t, p: t == acks and photo_id.encode() in p, 20, "the photo's ack")
        page.wait_for_selector(f"#proof-photo[data-sha256='{sha}']", timeout=20_000)
        wait_for(
            lambda: page.evaluate("() => document.querySelector('#proof-photo').naturalWidth") == 120,
            15,
            "the photo loaded in the page",
        )
        screenshot(page, "track-proof-photo-phone")

        token, other_token = photo_token(settings, link), photo_token(settings, other_link)
        status, body, kind = http(settings, f"/api/photo/s1/{order}?t={token}")
        assert (status, kind, body) == (200, "image/jpeg", data)
        assert http(settings, f"/api/photo/s1/{order}?t={other_token}")[0] == 403
        assert http(settings, f"/api/photo/s1/{order}")[0] == 403
        assert http(settings, f"/api/photo/s1/{other}?t={other_token}")[0] == 404  # it has none
        stored = Path(settings.data_dir) / "photos" / sha[:2] / sha
        assert stored.read_bytes() == data

        # The shop's dashboard: the code, the photo (the order's link proves the shop may see it).
        dash = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-GB").new_page()
        dash_errors = page_errors(dash)
        dash.goto(settings.web_url + "/shop")
        dash.fill("#login-user", "s1")
        dash.fill("#login-password", secret(settings, "s1"))
        dash.click("#login-submit")
        dash.wait_for_selector("#conn[data-state=online]", timeout=20_000)
        dash.click(f"tr[data-order='{order}']")
        dash.wait_for_selector("#order-panel dt:text-is('Handover code')")
        dash.wait_for_selector(f"#order-photo[data-sha256='{sha}']", timeout=20_000)
        wait_for(
            lambda: dash.evaluate("() => document.querySelector('#order-photo').naturalWidth") == 120,
            15,
            "the photo in the dashboard",
        )
        screenshot(dash, "shop-proof-photo-desktop")

        # Delivered and rated: the dashboard averages it per rider and per day.
        rider.status(order, OrderStatus.DELIVERED)
        page.wait_for_selector("#status:has-text('Delivered')")
        page.click("#rating-stars [data-stars='4']")
        page.click("#rating-send")
        page.wait_for_selector("#rating-done:has-text('4 of 5')")
        dash.wait_for_selector("#ratings:has-text('4.00 stars over 1 rated orders')", timeout=20_000)
        assert "r1" in dash.inner_text("#ratings")
        assert errors == [] and dash_errors == []
        dash.context.close()
        page.context.close()
    finally:
        rider.close()
        shop.close()


def create_requiring_code(shop: ScriptedShop, order: str) -> None:
    """As ``ScriptedShop.create``, for an order whose delivery needs the customer's code."""
    start = ev.now() + timedelta(minutes=20)
    event = ev.OrderCreateEvent(
        source=f"{topics.SHOPS}/{shop.shop}",
        data=ev.OrderCreated(
            order=order,
            customer=ev.Customer(name="Cai", lat=52.5200, lon=13.4050, address="Alexanderplatz 1"),
            window=ev.Window(start=start, end=start + timedelta(hours=1)),
            items=["tulips"],
            pickup_lat=52.5100,
            pickup_lon=13.3900,
            handover_code_required=True,
        ),
    )
    shop.client.publish(topics.shop_command(shop.shop, topics.Command.CREATE_ORDER), ev.encode(event))


def test_the_rider_page_enters_the_customers_code(web: WebStack, browser: Any) -> None:
    stack, settings = web
    shop = ScriptedShop(stack, settings, "s1")
    order = "o-proof-code"
    page = rider_page(browser, settings)
    errors = page_errors(page)
    try:
        sign_in(page, device(settings, "web-proof"))
        go_on_duty(page)
        create_requiring_code(shop, order)
        state = topics.order_topic("s1", order, topics.OrderChannel.STATE)
        code = json.loads(shop.inbox.find(lambda t, p: t == state and bool(p), 20, "the state"))[
            "handover_code"
        ]
        accept_offer(page, order)
        report(page, order, "picked_up")
        report(page, order, "arrived")
        card = f".order[data-order='{order}']"
        assert page.is_visible(f"{card} .handover-code")
        page.fill(f"{card} .handover-code", "0000" if code != "0000" else "1111")
        page.click(f"{card} .next button[data-next=delivered]")
        page.wait_for_selector(f"{card} .refused:has-text('wrong handover code')", timeout=20_000)
        page.wait_for_selector(f"{card}[data-status=arrived]")
        screenshot(page, "rider-handover-refused-phone")
        page.fill(f"{card} .handover-code", code)
        report(page, order, "delivered")
        page.wait_for_selector(f"{card}[data-status=delivered][data-stored=true]", timeout=20_000)
        assert errors == []
    finally:
        page.context.close()
        shop.close()


def test_the_rider_page_sends_a_delivery_photo(web: WebStack, browser: Any) -> None:
    """The page's photo input: too big is refused in the page, a small JPEG ends up on the order."""
    stack, settings = web
    shop = ScriptedShop(stack, settings, "s1")
    order = "o-proof-page-photo"
    page = rider_page(browser, settings)
    errors = page_errors(page)
    try:
        sign_in(page, device(settings, "web-photo"))
        go_on_duty(page)
        shop.create(order)
        accept_offer(page, order)
        report(page, order, "picked_up")
        card = f".order[data-order='{order}']"
        state = f"{card} .photo-state"
        big = b"\xff\xd8" + bytes(251 * 1024)  # over 250 KiB: never published
        page.set_input_files(
            f"{card} .photo-file", files=[{"name": "big.jpg", "mimeType": "image/jpeg", "buffer": big}]
        )
        page.wait_for_selector(f"{state}[data-state=too_big]:has-text('at most 250 KiB')")

        tiny = [{"name": "tiny.jpg", "mimeType": "image/jpeg", "buffer": jpeg((8, 8))}]  # below 16 px a side
        page.set_input_files(f"{card} .photo-file", files=tiny)
        page.wait_for_selector(f"{state}[data-state=refused]:has-text('photo width is 8 px')", timeout=20_000)

        data = jpeg()
        files = [{"name": "door.jpg", "mimeType": "image/jpeg", "buffer": data}]
        page.set_input_files(f"{card} .photo-file", files=files)
        page.wait_for_selector(f"{state}[data-state=stored]:has-text('Photo stored')", timeout=20_000)
        screenshot(page, "rider-photo-stored-phone")
        topic = topics.order_topic("s1", order, topics.OrderChannel.STATE)
        sha = hashlib.sha256(data).hexdigest()

        def has_photo(t: str, p: bytes) -> bool:
            return t == topic and bool(p) and (json.loads(p).get("photo") or {}).get("sha256") == sha

        shop.inbox.find(has_photo, 20, "the order's retained state with the photo")
        assert errors == []
    finally:
        page.context.close()
        shop.close()
