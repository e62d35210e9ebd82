"""The people of ``bloomwire bench peak``: plain paho clients for shops, riders, customers, an operator.

Every client is a real MQTT connection with its own login (the broker uses the username as the
client id) and a persistent session (``clean_session`` off, QoS 1 subscriptions). One
:class:`Hub` thread drives all their sockets with epoll and reconnects a dropped client after
:data:`RECONNECT_S`: paho's own loop uses ``select()``, which cannot watch a descriptor above
1023, and each paho client holds three (its socket and a wake-up pair), so ``loop_start`` stops
connecting at a few hundred clients in one process. Callbacks only append
``(time, topic, payload)`` to a :class:`Journal`; everything is decoded and matched after the
run (:mod:`bloomwire.app.bench.peak_figures`), so the load generator spends its CPU on the wire,
not on bookkeeping.
"""

from __future__ import annotations

import contextlib
import selectors
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.contract.lifecycle import OrderStatus
from bloomwire.runtime.settings import Settings

#: Seconds before a dropped client tries again (paho's own first back-off is 1 s too).
RECONNECT_S = 1.0
KEEPALIVE_S = 30


@dataclass(frozen=True, slots=True)
class Received:
    """One message as a client saw it."""

    at: float
    who: str
    topic: str
    payload: bytes


@dataclass
class Link:
    """Connects and drops of one client (wall-clock seconds)."""

    connects: list[tuple[float, bool]] = field(default_factory=list)  # (at, session_present)
    drops: list[float] = field(default_factory=list)


class Journal:
    """Everything sent and received, stamped (thread-safe appends)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received: list[Received] = []
        self.sent: list[tuple[float, str, str, str]] = []  # (at, kind, key, who)
        self.links: dict[str, Link] = defaultdict(Link)
        self.stopping = False
        self.drop_reasons: Counter[str] = Counter()
        #: Logins the broker refused at CONNECT, and why.
        self.refused: dict[str, str] = {}

    def got(self, who: str, topic: str, payload: bytes) -> None:
        """A client received a message."""
        self.received.append(Received(time.time(), who, topic, payload))

    def sent_one(self, kind: str, key: str, who: str, at: float | None = None) -> None:
        """A client published an event we will look for (``key``: its id or a unique mark)."""
        self.sent.append((at or time.time(), kind, key, who))

    def connected(self, who: str, session_present: bool) -> None:
        with self.lock:
            self.links[who].connects.append((time.time(), session_present))

    def dropped(self, who: str, reason: str) -> None:
        if not self.stopping:
            with self.lock:
                self.links[who].drops.append(time.time())
                self.drop_reasons[reason] += 1

    def count(self, kind: str) -> int:
        """How many ``kind`` events were sent so far (progress)."""
        return sum(1 for s in self.sent if s[1] == kind)


def make_client(
    journal: Journal,
    who: str,
    password: str,
    filters: Sequence[str],
    *,
    ws: tuple[str, int] | None = None,
) -> paho.Client:
    """A paho client logged in as ``who`` that subscribes ``filters`` (QoS 1) on every connect."""
    transport: Any = "websockets" if ws else "tcp"
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=who,
        clean_session=False,
        protocol=paho.MQTTv311,
        transport=transport,
    )
    if ws:
        client.ws_set_options(path="/mqtt")
    client.username_pw_set(who, password)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)

    def on_connect(c: paho.Client, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            journal.refused[who] = str(reason)
            return
        journal.connected(who, bool(flags.session_present))
        if filters:
            c.subscribe([(f, 1) for f in filters])

    def on_disconnect(_c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        journal.dropped(who, str(reason))

    def on_message(_c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        journal.got(who, msg.topic, bytes(msg.payload))

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_message = on_message
    return client


def mask_every_frame(wrapper: Any) -> None:
    """Make this websocket mask its control frames too (this connection only).

    paho 2.2.0 answers the server's ping with an UNMASKED pong (``_create_frame(..., 0)``);
    RFC 6455 5.1 has the server close a connection on an unmasked client frame, and the web
    service's uvicorn pings every 20 s: without this every websocket client drops every 20 s.
    """
    create = type(wrapper)._create_frame

    def masked(opcode: int, data: bytearray, do_masking: int = 1) -> bytearray:
        return bytearray(create(wrapper, opcode, data, 1))

    wrapper._create_frame = masked


class Hub:
    """One thread with epoll under every client: reads, leftover writes, keepalive, reconnects.

    Publishing needs no hub: a client without a loop thread writes in ``publish()`` itself.
    """

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.sel = selectors.DefaultSelector()
        self.clients: list[paho.Client] = []
        self.due: dict[paho.Client, float] = {}  # client -> (re)connect at (monotonic)
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-hub", daemon=True)
        self._thread.start()

    def add(self, client: paho.Client, host: str, port: int) -> None:
        """Connect ``client`` from the hub's thread (and again whenever it drops)."""
        client.connect_async(host, port, KEEPALIVE_S)
        client.on_socket_open = self._opened
        client.on_socket_close = self._closed
        with self.lock:
            self.clients.append(client)
            self.due[client] = 0.0

    def _opened(self, client: paho.Client, _u: Any, sock: Any) -> None:
        stale = self.sel.get_map().get(sock.fileno())
        if stale is not None:  # a closed socket's number, reused
            self.sel.unregister(stale.fileobj)
        self.sel.register(sock, selectors.EVENT_READ, client)
        if hasattr(sock, "_create_frame"):
            mask_every_frame(sock)

    def _closed(self, client: paho.Client, _u: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.sel.unregister(sock)
        if not self.journal.stopping:
            with self.lock:
                self.due[client] = time.monotonic() + RECONNECT_S

    def _connect_due(self) -> None:
        now = time.monotonic()
        with self.lock:
            ready = [c for c, at in self.due.items() if at <= now]
            for c in ready:
                del self.due[c]
        for c in ready:
            try:
                c.reconnect()
            except (OSError, ValueError):
                with self.lock:
                    self.due[c] = time.monotonic() + RECONNECT_S

    def _run(self) -> None:
        last_misc = time.monotonic()
        while not self._stop.is_set():
            self._connect_due()
            if not self.sel.get_map():
                time.sleep(0.01)
                continue
            try:
                events = self.sel.select(0.01)
            except (OSError, ValueError, KeyError):
                events = []
            for key, _mask in events:
                self._read(key.data, key.fileobj)
            with self.lock:
                clients = list(self.clients)
            for c in clients:
                if c.want_write():
                    c.loop_write()
            if time.monotonic() - last_misc >= 0.5:
                last_misc = time.monotonic()
                for c in clients:
                    c.loop_misc()

    @staticmethod
    def _read(client: paho.Client, sock: Any) -> None:
        client.loop_read()
        pending = getattr(sock, "pending", None)  # a websocket frame may hold several packets
        while pending is not None and pending() > 0 and client.socket() is sock:
            client.loop_read()

    def stop(self) -> None:
        """Disconnect everyone and stop the thread."""
        self.journal.stopping = True
        with self.lock:
            clients = list(self.clients)
            self.due.clear()
        for c in clients:
            with contextlib.suppress(Exception):
                c.disconnect()
        self._stop.set()
        self._thread.join(5)
        self.sel.close()


def wait_until(condition: Any, timeout: float, what: str, step: float = 0.1) -> None:
    """Poll ``condition()`` until true; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"bench peak: {what} not done within {timeout:.0f} s")
        time.sleep(step)


# --- what each kind of client publishes ------------------------------------------------------------


def presence(rider: str) -> tuple[str, bytes]:
    """A rider on duty with room for many orders (the peak's riders carry several at once)."""
    event = ev.RiderPresenceChangedEvent(
        source=f"{topics.RIDERS}/{rider}",
        data=ev.RiderPresence(status=ev.Presence.ONLINE, on_duty=True, capacity=20),
    )
    return topics.rider_presence(rider), ev.encode(event)


def position(rider: str, lat: float, lon: float) -> tuple[str, str, bytes]:
    """A rider's position: topic, event id, payload."""
    data = ev.RiderLocation(lat=lat, lon=lon, tst=int(time.time()), vel=18.0)
    event = ev.RiderLocationReportedEvent(source=f"{topics.RIDERS}/{rider}", data=data)
    return topics.rider_location(rider), event.id, ev.encode(event)


def reply(rider: str, offer: str, order: str) -> tuple[str, str, bytes]:
    """The rider accepts ``offer``."""
    data = ev.DispatchReply(offer=offer, order=order, accept=True)
    event = ev.DispatchReplyEvent(source=f"{topics.RIDERS}/{rider}", data=data)
    return topics.rider_replies(rider), event.id, ev.encode(event)


def picked_up(rider: str, order: str) -> tuple[str, str, bytes]:
    """The rider has the bouquet: the customer sees the rider from now on."""
    data = ev.OrderStatusChanged(order=order, status=OrderStatus.PICKED_UP)
    event = ev.OrderStatusChangedEvent(source=f"{topics.RIDERS}/{rider}", data=data)
    return topics.rider_order_status(rider, order), event.id, ev.encode(event)


def create_order(shop: str, order: str, lat: float, lon: float) -> tuple[str, str, bytes]:
    """A shop takes an order for delivery within two hours."""
    now = ev.now()
    data = ev.OrderCreated(
        order=order,
        customer=ev.Customer(name=f"Customer {order}", lat=lat, lon=lon),
        window=ev.Window(start=now, end=now + timedelta(hours=2)),
        items=["roses"],
    )
    event = ev.OrderCreateEvent(source=f"{topics.SHOPS}/{shop}", data=data)
    return topics.shop_command(shop, topics.Command.CREATE_ORDER), event.id, ev.encode(event)


def assign(shop: str, order: str, rider: str) -> tuple[str, str, bytes]:
    """The shop hands ``order`` to ``rider`` (the rider's offer carries this event's id)."""
    event = ev.OrderAssignEvent(
        source=f"{topics.SHOPS}/{shop}", data=ev.OrderAssigned(order=order, rider=rider)
    )
    return topics.shop_command(shop, topics.Command.ASSIGN), event.id, ev.encode(event)


def shop_chat(shop: str, order: str, text: str) -> tuple[str, str, bytes]:
    """A line from the shop on ``order`` (to its customer and its rider)."""
    event = ev.OrderChatPostedEvent(
        source=f"{topics.SHOPS}/{shop}", data=ev.OrderChat(order=order, text=text)
    )
    return topics.shop_command(shop, topics.Command.CHAT), event.id, ev.encode(event)


def customer_chat(customer: str, order: str, text: str) -> tuple[str, str, bytes]:
    """A line from the customer of ``order``."""
    event = ev.OrderChatPostedEvent(
        source=f"{topics.CUSTOMERS}/{customer}", data=ev.OrderChat(order=order, text=text)
    )
    return topics.customer_chat(customer), event.id, ev.encode(event)


def ws_endpoint(settings: Settings) -> tuple[str, int]:
    """Where browsers' MQTT goes: the web service's ``/mqtt`` bridge."""
    return settings.web_host, settings.web_port
