"""The day of ``bloomwire bench peak``: connect the people, seed the day, play the peak.

Shops create orders (``create-order``), the real dispatch offers them to riders, riders accept
and pick up at once; the provisioner mints each order's customer login, which the customer then
connects with (over TCP, or through the web service's ``/mqtt`` websocket bridge) to follow the
order. During the peak riders send a position every 5 s, shops take new orders at K x a normal
day's rate and chat with customers, customers chat back. Everything sent or received is stamped
in the :class:`~bloomwire.app.bench.peak_load.Journal`.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as paho

from bloomwire.app.bench import peak_load as load
from bloomwire.app.bench.peak_figures import SYS_CONNECTED, SYS_SENT, Plan, mark
from bloomwire.app.bench.peak_proxy import LossyProxy
from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.runtime.broker import ensure_secret
from bloomwire.runtime.settings import Settings

#: A normal day, per shop: 40 orders over 10 opening hours. A busy city florist with delivery
#: takes a few dozen orders a day; the issue's "tens of times the normal orders" on Valentine's
#: Day is the multiplier on top of this.
NORMAL_ORDERS_PER_SHOP_DAY = 40
OPEN_HOURS = 10
#: Seconds between a rider's positions (Google Fleet Engine's default range is 5-10 s).
POSITION_EVERY_S = 5.0
#: Each shop writes to one of its customers this often (s); each customer answers once a minute.
SHOP_CHAT_EVERY_S = 10.0
CUSTOMER_CHAT_EVERY_S = 60.0
CENTRE = (52.52, 13.405)
TICK_S = 0.05
OPERATOR = "operator"


@dataclass
class PeakConfig:
    """What the drill plays (every dimension is a flag)."""

    shops: int = 20
    riders: int = 200
    multiplier: float = 20.0
    customers: int = 500
    ws_share: float = 0.2
    duration: float = 90.0
    #: Customers following their order in the browser page (``/track``, Chromium), apart.
    browsers: int = 0

    @property
    def orders_per_s(self) -> float:
        """New orders per second during the peak: K x a normal day spread over its opening hours."""
        return self.shops * NORMAL_ORDERS_PER_SHOP_DAY * self.multiplier / (OPEN_HOURS * 3600)


def _spot(i: int, n: int, radius: float = 0.03) -> tuple[float, float]:
    """A point on a ring around the centre (riders, customers spread over the city)."""
    angle = 2 * math.pi * i / max(n, 1)
    return round(CENTRE[0] + radius * math.sin(angle), 5), round(CENTRE[1] + radius * math.cos(angle), 5)


class Drill:
    """The people of one run and what they do."""

    def __init__(self, settings: Settings, config: PeakConfig, journal: load.Journal) -> None:
        self.settings = settings
        self.config = config
        self.journal = journal
        self.plan = Plan()
        self.shops = [f"s{i}" for i in range(1, config.shops + 1)]
        self.riders = [f"r{i}" for i in range(1, config.riders + 1)]
        self.clients: dict[str, paho.Client] = {}
        self.accesses: dict[str, ev.CustomerAccess] = {}
        self.status: dict[str, tuple[str, str | None]] = {}
        self.answered: set[str] = set()
        self.customers: dict[str, str] = {}  # login -> order
        self._cursor = 0
        self._lock = threading.Lock()
        self.stop = threading.Event()
        self.hub = load.Hub(journal)
        #: Multiplies the position and order rates (``--find-limit`` steps it up).
        self.speed = 1.0
        #: A rider whose connection goes through a proxy (``--faults``: its network goes bad).
        self.proxy: LossyProxy | None = None
        self.proxied: str | None = None

    def through_proxy(self, rider: str) -> None:
        """Connect ``rider`` through a :class:`LossyProxy` to the broker (call before connecting)."""
        self.proxy = LossyProxy((self.settings.broker_host, self.settings.broker_port))
        self.proxy.start()
        self.proxied = rider

    # --- clients ----------------------------------------------------------------------------------

    def _connect(self, who: str, password: str, filters: list[str], ws: bool = False) -> None:
        client = load.make_client(
            self.journal, who, password, filters, ws=load.ws_endpoint(self.settings) if ws else None
        )
        self.clients[who] = client
        host, port = (
            (self.settings.web_host, self.settings.web_port)
            if ws
            else (self.settings.broker_host, self.settings.broker_port)
        )
        if self.proxy is not None and who == self.proxied:
            host, port = "127.0.0.1", self.proxy.port
        self.hub.add(client, host, port)

    def _wait_connected(self, names: list[str], timeout: float, what: str) -> None:
        links = self.journal.links

        def waiting() -> list[str]:
            return [n for n in names if n not in links or not links[n].connects]

        try:
            load.wait_until(lambda: not waiting(), timeout, what)
        except TimeoutError as exc:
            left = waiting()
            refused = {n: self.journal.refused[n] for n in left if n in self.journal.refused}
            raise TimeoutError(
                f"{exc}: {len(left)} of {len(names)} not connected (e.g. {', '.join(left[:3])}); "
                f"refused by the broker: {len(refused)} ({', '.join(sorted(set(refused.values())))})"
            ) from None

    def connect_staff(self) -> None:
        """The operator (``$SYS``, dead letters), every shop and rider; riders go on duty."""
        data_dir = self.settings.data_dir
        self._connect(
            OPERATOR, ensure_secret(data_dir, OPERATOR), [SYS_SENT, SYS_CONNECTED, topics.DEADLETTER]
        )
        for shop in self.shops:
            filters = [
                f"{topics.SHOPS}/{shop}/orders/+/{topics.ACCESS}",
                topics.all_orders_filter(topics.OrderChannel.STATUS, shop=shop),
            ]
            self._connect(shop, ensure_secret(data_dir, shop), filters)
        for rider in self.riders:
            self._connect(rider, ensure_secret(data_dir, rider), [topics.rider_inbox_filter(rider)])
        names = [OPERATOR, *self.shops, *self.riders]
        self._wait_connected(names, 30 + 0.05 * len(names), "shops and riders connecting")
        for i, rider in enumerate(self.riders):
            topic, payload = load.presence(rider)
            self.clients[rider].publish(topic, payload, qos=1, retain=True)
            topic, _eid, payload = load.position(rider, *_spot(i, len(self.riders), 0.01))
            self.clients[rider].publish(topic, payload, qos=1)

    # --- what comes back --------------------------------------------------------------------------

    def scan(self) -> None:
        """Handle what arrived since the last look: accesses, offers to answer, order statuses."""
        with self._lock:
            received = self.journal.received
            end = len(received)
            for r in received[self._cursor : end]:
                if r.topic.endswith("/inbox/offers"):
                    self._answer(r.who, r.payload)
                elif r.topic.endswith("/access") and r.payload:
                    access = ev.CustomerAccessGrantedEvent.model_validate_json(r.payload).data
                    self.accesses[access.order] = access
                elif r.topic.endswith("/status") and r.topic.startswith(topics.SHOPS):
                    data = json.loads(r.payload)["data"]
                    self.status[data["order"]] = (data["status"], data.get("rider"))
            self._cursor = end

    def _answer(self, rider: str, payload: bytes) -> None:
        """A rider takes every offer and picks the bouquet up straight away."""
        offer = ev.DispatchOfferedEvent.model_validate_json(payload).data
        if offer.offer in self.answered:
            return
        self.answered.add(offer.offer)
        client = self.clients[rider]
        for topic, eid, body in (
            load.reply(rider, offer.offer, offer.order),
            load.picked_up(rider, offer.order),
        ):
            client.publish(topic, body, qos=1)
            self.journal.sent_one("rider-event", eid, rider)

    def _wait(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        def check() -> bool:
            self.scan()
            return condition()

        load.wait_until(check, timeout, what, step=0.2)

    # --- the morning: orders out for delivery, customers following -------------------------------

    def seed(self, progress: Callable[[str], None]) -> None:
        """``customers`` orders created, dispatched, picked up; their customers' logins minted."""
        n = self.config.customers
        orders = [f"o{i}" for i in range(1, n + 1)]
        for i, order in enumerate(orders):
            shop = self.shops[i % len(self.shops)]
            topic, eid, body = load.create_order(shop, order, *_spot(i, n))
            self.clients[shop].publish(topic, body, qos=1)
            self.journal.sent_one("create-order", eid, shop)
        # Each login minted is two dynamic-security file rewrites, slower as the file grows:
        # thousands of customers take many minutes on 2 cores (5,000: about 33 minutes).
        timeout = 60 + 0.5 * n
        progress(f"seeding: {n} orders created, waiting for dispatch and customer logins")
        try:
            self._wait(
                lambda: all(self.status.get(o, ("",))[0] == "picked_up" for o in orders),
                timeout,
                "seeded orders picked up",
            )
        except TimeoutError as exc:
            where = Counter(self.status.get(o, ("no status seen",))[0] for o in orders)
            minted = sum(o in self.accesses for o in orders)
            raise TimeoutError(f"{exc}: {dict(where)}; customer logins minted {minted}/{n}") from None
        self._wait(lambda: all(o in self.accesses for o in orders), timeout, "customer logins minted")
        for order in orders:
            access = self.accesses[order]
            rider = self.status[order][1]
            assert rider is not None
            self.plan.followers.setdefault(rider, []).append(access.username)
            self.plan.order_people[order] = (access.username, rider)
            self.customers[access.username] = order

    def seed_browser_orders(self) -> dict[str, ev.CustomerAccess]:
        """``browsers`` more orders (``b1``…) of the first shop, for customers in the browser page;
        no chat is planned on them, so a line the shop writes is the first their page shows."""
        orders = [f"b{i}" for i in range(1, self.config.browsers + 1)]
        shop = self.shops[0]
        for i, order in enumerate(orders):
            topic, eid, body = load.create_order(shop, order, *_spot(i, len(orders)))
            self.clients[shop].publish(topic, body, qos=1)
            self.journal.sent_one("create-order", eid, shop)
        self._wait(lambda: all(o in self.accesses for o in orders), 60 + 2.0 * len(orders), "browser logins")
        return {o: self.accesses[o] for o in orders}

    def connect_customers(self) -> None:
        """Every customer follows their order; the first ``ws_share`` over websockets."""
        n_ws = round(len(self.customers) * self.config.ws_share)
        for i, (login, order) in enumerate(self.customers.items()):
            access = self.accesses[order]
            self._connect(login, access.password, list(access.topics), ws=i < n_ws)
        names = list(self.customers)
        self._wait_connected(names, 30 + 0.1 * len(names), "customers connecting")

    # --- the peak ---------------------------------------------------------------------------------

    def play(self) -> None:
        """Run the peak's load until :attr:`stop` is set (a thread of its own).

        :attr:`speed` multiplies the position and order rates (``--find-limit`` turns it up).
        """
        start = last = time.monotonic()
        due = _Due(start)
        n = len(self.riders)
        # Rider i sends first at i/n of the interval: the load is spread evenly over it.
        due.next_position = {r: start + POSITION_EVERY_S * i / n for i, r in enumerate(self.riders)}
        while not self.stop.is_set():
            now = time.monotonic()
            self._positions(now, due)
            due.order_credit += (now - last) * self.config.orders_per_s * self.speed
            last = now
            self._new_orders(due)
            self._chats(now - start, due)
            self.scan()
            time.sleep(TICK_S)

    def _positions(self, now: float, due: _Due) -> None:
        n = len(self.riders)
        interval = POSITION_EVERY_S / self.speed
        for i, rider in enumerate(self.riders):
            while due.next_position[rider] <= now:
                due.next_position[rider] += interval
                due.positions[rider] = due.positions.get(rider, 0) + 1
                lat, lon = _spot(i, n, 0.01)
                lat = round(lat + 1e-6 * due.positions[rider], 6)
                topic, eid, body = load.position(rider, lat, lon)
                self.plan.marks[mark(rider, lat, lon)] = eid
                self.journal.sent_one("position", eid, rider)
                self.clients[rider].publish(topic, body, qos=1)

    def _new_orders(self, due: _Due) -> None:
        while due.order_credit >= 1:
            due.order_credit -= 1
            due.orders += 1
            shop = self.shops[due.orders % len(self.shops)]
            topic, eid, body = load.create_order(shop, f"p{due.orders}", *_spot(due.orders, 97))
            self.journal.sent_one("create-order", eid, shop)
            self.clients[shop].publish(topic, body, qos=1)

    def _chats(self, elapsed: float, due: _Due) -> None:
        orders = list(self.plan.order_people)
        if not orders:
            return
        shop_wanted = int(elapsed * len(self.shops) / SHOP_CHAT_EVERY_S)
        while due.shop_chats < shop_wanted:
            due.shop_chats += 1
            order = orders[(due.shop_chats * 7919) % len(orders)]
            shop = self.accesses[order].shop
            topic, eid, body = load.shop_chat(shop, order, f"Your roses are on their way ({due.shop_chats})")
            self.plan.chats[eid] = order
            self.journal.sent_one("shop-chat", eid, shop)
            self.clients[shop].publish(topic, body, qos=1)
        customer_wanted = int(elapsed * len(orders) / CUSTOMER_CHAT_EVERY_S)
        while due.customer_chats < customer_wanted:
            order = orders[due.customer_chats % len(orders)]
            due.customer_chats += 1
            access = self.accesses[order]
            topic, eid, body = load.customer_chat(access.customer, order, "Thank you!")
            self.journal.sent_one("customer-chat", eid, access.username)
            self.clients[access.username].publish(topic, body, qos=1)

    def close(self) -> None:
        """Everyone disconnects."""
        self.hub.stop()
        if self.proxy is not None:
            self.proxy.stop()


@dataclass
class _Due:
    """How much of each kind of load was sent so far."""

    started: float
    orders: int = 0
    shop_chats: int = 0
    customer_chats: int = 0
    order_credit: float = 0.0

    def __post_init__(self) -> None:
        self.positions: dict[str, int] = {}
        self.next_position: dict[str, float] = {}
