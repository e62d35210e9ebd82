"""Helpers of the web tests: a real access-controlled stack with the web service, Chromium
through Playwright, scripted riders and shops over MQTT, and screenshots as artifacts."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import MqttTestClient

from bloomwire.app.supervisor import Stack
from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.contract.lifecycle import OrderStatus
from bloomwire.errors import BrokerError
from bloomwire.runtime.broker import find_dynsec_plugin, find_mosquitto
from bloomwire.runtime.settings import Settings
from bloomwire.services.web.links import link_for_access

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SCREENSHOTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "screenshots"
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1366, "height": 900}
#: Alert thresholds small enough for a test (an unassigned order alerts after ~3 s).
FAST_RULES = "[defaults]\nunassigned_min = 0.05\nescalate_after_min = 600\n"


def require_browser_and_broker() -> None:
    """Skip with the reason when Mosquitto (with dynsec), Chromium or the npm packages are missing."""
    try:
        find_mosquitto()
        find_dynsec_plugin()
    except BrokerError as exc:
        pytest.skip(str(exc))
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium: run `make setup` (installs Debian's chromium)")
    root = Path(__file__).resolve().parents[1] / "web" / "node_modules" / "mqtt"
    if not root.is_dir():
        pytest.skip("web/node_modules missing: run `make setup` (npm ci in web/)")


def start_web_stack(
    tmp: Path, *, shops: list[str], riders: list[str], grace_s: float = 3.0
) -> tuple[Stack, Settings]:
    """Broker (access control), persister, dispatch, alerts, provisioner and web."""
    rules = tmp / "rules.toml"
    rules.write_text(FAST_RULES, encoding="utf-8")
    settings = Settings(
        data_dir=tmp,
        database_url="",
        customer_access_grace_s=grace_s,
        alerts_rules=rules,
        shop_names={"s1": "Blumen Anna"},
    )
    stack = Stack(
        settings,
        services=("persister", "dispatch", "alerts", "web"),
        access=True,
        shops=shops,
        riders=riders,
    )
    return stack, stack.start(timeout=90)


def secret(settings: Settings, name: str) -> str:
    return (settings.data_dir / "secrets" / name).read_text().strip()


def wait_for(check: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class Inbox:
    """Messages a test client received, by topic, kept in order."""

    client: MqttTestClient
    seen: list[tuple[str, bytes]] = field(default_factory=list)

    def pump(self) -> None:
        while True:
            try:
                msg = self.client.messages.get_nowait()
            except queue.Empty:
                return
            self.seen.append((msg.topic, bytes(msg.payload)))

    def find(
        self, match: Callable[[str, bytes], bool], timeout: float = 15.0, what: str = "message"
    ) -> bytes:
        def look() -> bytes | None:
            self.pump()
            for t, p in self.seen:
                if match(t, p):
                    return p
            return None

        found: bytes = wait_for(look, timeout, what)
        return found


class ScriptedShop:
    """Shop S over MQTT: creates orders and reads their customer access."""

    def __init__(self, stack: Stack, settings: Settings, shop: str) -> None:
        assert stack.broker is not None
        self.shop = shop
        self.client = MqttTestClient(stack.broker, shop, secret(settings, shop))
        assert not self.client.connect().is_failure
        self.client.subscribe(topics.shop_filter(shop))
        self.inbox = Inbox(self.client)

    def create(self, order: str, *, name: str = "Ada", items: tuple[str, ...] = ("12 red roses",)) -> None:
        start = ev.now() + timedelta(minutes=20)
        event = ev.OrderCreateEvent(
            source=f"{topics.SHOPS}/{self.shop}",
            data=ev.OrderCreated(
                order=order,
                customer=ev.Customer(name=name, lat=52.5200, lon=13.4050, address="Alexanderplatz 1"),
                window=ev.Window(start=start, end=start + timedelta(hours=1)),
                items=list(items),
                pickup_lat=52.5100,
                pickup_lon=13.3900,
            ),
        )
        self.client.publish(topics.shop_command(self.shop, topics.Command.CREATE_ORDER), ev.encode(event))

    def access(self, order: str) -> ev.CustomerAccess:
        topic = topics.access_topic(self.shop, order)
        raw = self.inbox.find(lambda t, p: t == topic and bool(p), 20, f"access of {order}")
        return ev.CustomerAccessGrantedEvent.model_validate_json(raw).data

    def link(self, settings: Settings, order: str) -> str:
        return link_for_access(settings.web_url, self.access(order))

    def close(self) -> None:
        self.client.close()


class ScriptedRider:
    """Rider R over MQTT: online, positions, accepts offers, reports status and chats."""

    def __init__(self, stack: Stack, settings: Settings, rider: str) -> None:
        assert stack.broker is not None
        self.rider = rider
        self.client = MqttTestClient(stack.broker, rider, secret(settings, rider))
        assert not self.client.connect().is_failure
        self.client.subscribe(topics.rider_inbox_filter(rider))
        self.inbox = Inbox(self.client)
        self.source = f"{topics.RIDERS}/{rider}"

    def send(self, topic: str, event: Any, *, retain: bool = False) -> None:
        self.client.publish(topic, ev.encode(event), retain=retain)

    def online(self, online: bool = True) -> None:
        status = ev.Presence.ONLINE if online else ev.Presence.OFFLINE
        event = ev.RiderPresenceChangedEvent(
            source=self.source, data=ev.RiderPresence(status=status, on_duty=True, capacity=3)
        )
        self.send(topics.rider_presence(self.rider), event, retain=True)

    def at(self, lat: float, lon: float) -> None:
        data = ev.RiderLocation(lat=lat, lon=lon, tst=int(time.time()), vel=18.0)
        self.send(
            topics.rider_location(self.rider), ev.RiderLocationReportedEvent(source=self.source, data=data)
        )

    def offer_for(self, order: str, timeout: float = 30.0) -> ev.DispatchOffer:
        offers = topics.rider_inbox(self.rider, topics.Inbox.OFFERS)

        def mine(t: str, p: bytes) -> bool:
            return t == offers and ev.DispatchOfferedEvent.model_validate_json(p).data.order == order

        return ev.DispatchOfferedEvent.model_validate_json(
            self.inbox.find(mine, timeout, f"offer of {order}")
        ).data

    def reply(self, offer: ev.DispatchOffer, accept: bool = True) -> None:
        data = ev.DispatchReply(offer=offer.offer, order=offer.order, accept=accept)
        self.send(topics.rider_replies(self.rider), ev.DispatchReplyEvent(source=self.source, data=data))

    def status(self, order: str, status: OrderStatus) -> None:
        data = ev.OrderStatusChanged(order=order, status=status)
        self.send(
            topics.rider_order_status(self.rider, order),
            ev.OrderStatusChangedEvent(source=self.source, data=data),
        )

    def chat(self, order: str, text: str) -> None:
        data = ev.OrderChat(order=order, text=text)
        self.send(
            topics.rider_order_chat(self.rider, order), ev.OrderChatPostedEvent(source=self.source, data=data)
        )

    def heard(self, text: str, timeout: float = 15.0) -> None:
        chat = topics.rider_inbox(self.rider, topics.Inbox.CHAT)
        self.inbox.find(lambda t, p: t == chat and text.encode() in p, timeout, f"chat {text!r} at the rider")

    def close(self) -> None:
        self.online(False)
        self.client.close()


def screenshot(page: Any, name: str, *, full_page: bool = True) -> Path:
    """Save a screenshot (the whole page, or what the window shows) under test-artifacts/screenshots/."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path


def launch_browser(playwright: Any) -> Any:
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


def page_errors(page: Any) -> list[str]:
    """Collect uncaught page errors (a stack trace must never reach the page)."""
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return errors


def browser_pages(browser: Any, viewport: dict[str, int], locale: str = "en-GB") -> Iterator[Any]:
    context = browser.new_context(viewport=viewport, locale=locale)
    try:
        yield context.new_page()
    finally:
        context.close()
