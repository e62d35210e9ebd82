"""``/mqtt``: a browser's MQTT-over-websocket connection, piped byte for byte to the broker's TCP port.

Each page gets its own TCP connection to the broker and logs in with its own credentials, so the
broker authenticates it and its ACL decides what the page may read and write; nothing here reads
a packet. Why not Mosquitto's own websockets listener: it polls every websocket connection on
each pass of its loop and pins a core at a few thousand pages (docs/performance.md).

Why a protocol under uvicorn and not an ASGI endpoint: an ASGI websocket kept ~175 objects per
page that the garbage collector walks (a coroutine per middleware layer, three tasks, queues, a
stream reader and writer); at 10,000 pages one full collection stopped the service for 1 to 3.7 s,
which was the whole latency tail, and every message woke three tasks. Here a page is uvicorn's
websocket protocol (:class:`PageProtocol`, which still serves every other websocket path through
ASGI) and a :class:`BrokerProtocol`; bytes are written out in the callback that read them.

Backpressure both ways: when the page's socket is full the broker's side stops reading, and when
the broker's is full the page's side stops reading. When either side closes, the other is closed.
No websocket pings: the page's MQTT keepalive already lets the broker drop a dead page, and the
broker's closing closes the page.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState
from websockets.frames import Frame
from websockets.http11 import Request

from bloomwire.runtime.log import get_logger
from bloomwire.services.web.heap import PageHeap

log = get_logger("bloomwire.services.web.bridge")

PATH = "/mqtt"
SUBPROTOCOL = "mqtt"
CONNECT_TIMEOUT_S = 5.0
#: Close code for "the broker cannot be reached": RFC 6455's 1013 Try Again Later.
TRY_AGAIN_LATER = 1013
NORMAL_CLOSURE = 1000


@dataclass
class BridgeStats:
    """Counters for the service's log and the benchmark."""

    open: int = 0
    opened: int = 0
    refused: int = 0


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where the broker's plain MQTT listener is."""

    host: str
    port: int
    tls: ssl.SSLContext | None = None


class BrokerProtocol(asyncio.Protocol):
    """The broker's end of one page's pipe: what it reads goes to the page as it comes."""

    __slots__ = ("page",)

    def __init__(self, page: PageProtocol) -> None:
        self.page = page

    def data_received(self, data: bytes) -> None:
        self.page.to_page(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.page.broker_closed()

    def pause_writing(self) -> None:
        self.page.transport.pause_reading()

    def resume_writing(self) -> None:
        self.page.transport.resume_reading()


class PageProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websocket protocol, with ``/mqtt`` piped to the broker in place of an ASGI call.

    uvicorn builds one per upgraded connection; :func:`page_protocol` gives it the broker's address
    and the counters. A frame's payload is written to the broker as is (MQTT is a byte stream: the
    frame boundaries mean nothing), a broker read is sent as one binary frame.
    """

    upstream: Upstream
    stats: BridgeStats
    heap: PageHeap

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bridged = False
        self.broker: asyncio.Transport | None = None

    # --- the handshake -----------------------------------------------------------------------------

    def handle_connect(self, event: Request) -> None:
        if event.path.partition("?")[0] != PATH:
            super().handle_connect(event)
            return
        self.bridged = True
        self.handshake_initiated = True
        self.response = self.conn.accept(event)
        if self.response.status_code != 101:  # not a valid upgrade: answered and closed
            self.handshake_complete = self.close_sent = True
            self.conn.send_response(self.response)
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.transport.close()
            return
        offered = [p.strip() for h in event.headers.get_all("Sec-WebSocket-Protocol") for p in h.split(",")]
        if SUBPROTOCOL in offered:
            self.response.headers["Sec-WebSocket-Protocol"] = SUBPROTOCOL
        # websockets' parser keeps the request for the page's lifetime: its headers are not needed.
        event.headers.clear()
        self.transport.pause_reading()  # the page may speak once the broker is there
        task = self.loop.create_task(self._open())
        self.tasks.add(task)
        task.add_done_callback(self.on_task_complete)

    async def _open(self) -> None:
        """Connect to the broker, then answer the handshake (or accept and close with 1013)."""
        up = self.upstream
        try:
            broker, _ = await asyncio.wait_for(
                self.loop.create_connection(lambda: BrokerProtocol(self), up.host, up.port, ssl=up.tls),
                CONNECT_TIMEOUT_S,
            )
        except (OSError, TimeoutError) as exc:
            self.stats.refused += 1
            log.warning("broker unreachable for a page", broker=f"{up.host}:{up.port}", error=str(exc))
            self._accept()
            self._close(TRY_AGAIN_LATER, "broker unavailable")
            return
        if self.disconnected or self.transport.is_closing():  # the page left meanwhile
            broker.close()
            return
        self.broker = broker
        self.stats.open += 1
        self.stats.opened += 1
        self._accept()
        self.heap.page_opened()

    def _accept(self) -> None:
        self.handshake_complete = True
        if self.disconnected or self.transport.is_closing():
            return
        self.conn.send_response(self.response)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.response.headers.clear()  # sent; kept by uvicorn's protocol for the page's lifetime
        self.transport.resume_reading()

    def _close(self, code: int, reason: str = "") -> None:
        """Start the closing handshake; the page's answer (or a timeout) closes the socket."""
        if self.close_sent or self.disconnected or self.transport.is_closing():
            return
        self.conn.send_close(code, reason)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        self.transport.resume_reading()
        self.close_timer = self.loop.call_later(self.close_timeout, self.transport.close)

    # --- bytes both ways ---------------------------------------------------------------------------

    def to_page(self, data: bytes) -> None:
        """What the broker sent, as one binary frame."""
        try:
            self.conn.send_binary(data)
        except InvalidState:  # the page is closing: nothing more goes to it
            return
        self.transport.write(b"".join(self.conn.data_to_send()))

    def _to_broker(self, event: Frame) -> None:
        if self.broker is not None:
            self.broker.write(event.data)

    def handle_bytes(self, event: Frame) -> None:
        if self.bridged:
            self._to_broker(event)
        else:
            super().handle_bytes(event)

    def handle_text(self, event: Frame) -> None:
        if self.bridged:
            self._to_broker(event)
        else:
            super().handle_text(event)

    def handle_cont(self, event: Frame) -> None:
        if self.bridged:
            self._to_broker(event)
        else:
            super().handle_cont(event)

    def pause_writing(self) -> None:
        if self.broker is not None:
            self.broker.pause_reading()
        super().pause_writing()

    def resume_writing(self) -> None:
        if self.broker is not None:
            self.broker.resume_reading()
        super().resume_writing()

    # --- either side closing -----------------------------------------------------------------------

    def broker_closed(self) -> None:
        """The broker closed (it refused the login, dropped the page, or it is stopping)."""
        if self.broker is None:
            return
        self.broker = None
        self._closed()
        self._close(NORMAL_CLOSURE)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        broker, self.broker = self.broker, None
        if broker is not None:
            broker.close()
            self._closed()

    def _closed(self) -> None:
        self.stats.open -= 1
        self.heap.page_closed(self.stats.open)


def page_protocol(upstream: Upstream, stats: BridgeStats, heap: PageHeap) -> type[PageProtocol]:
    """The websocket protocol class for uvicorn's ``ws`` setting, bound to this broker and counters."""
    bound = {"upstream": upstream, "stats": stats, "heap": heap}
    return type("BoundPageProtocol", (PageProtocol,), bound)
