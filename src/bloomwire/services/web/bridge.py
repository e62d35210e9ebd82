"""``/mqtt``: a browser's MQTT-over-websocket connection, piped byte for byte to the broker's TCP port.

Each page gets its own TCP connection to the broker and logs in with its own credentials, so the
broker authenticates it and its ACL decides what the page may read and write; nothing here reads
a packet. Why not Mosquitto's own websockets listener: it polls every websocket connection on
each pass of its loop and pins a core at a few thousand pages (docs/performance.md).

Backpressure both ways: a chunk from the broker is sent before the next one is read (the ASGI
server's send waits while the browser's socket is full), and a browser frame is written and
drained before the next one is received (the server stops reading the browser's socket until
then). When either side closes, the other is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from dataclasses import dataclass

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from bloomwire.runtime.log import get_logger

log = get_logger("bloomwire.services.web.bridge")

SUBPROTOCOL = "mqtt"
READ_CHUNK = 64 * 1024
CONNECT_TIMEOUT_S = 5.0
#: Close code for "the broker cannot be reached": RFC 6455's 1013 Try Again Later.
TRY_AGAIN_LATER = 1013


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


async def bridge(ws: WebSocket, upstream: Upstream, stats: BridgeStats) -> None:
    """Serve one websocket until either side closes."""
    offered = ws.scope.get("subprotocols") or []
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(upstream.host, upstream.port, ssl=upstream.tls), CONNECT_TIMEOUT_S
        )
    except (OSError, TimeoutError) as exc:
        stats.refused += 1
        log.warning(
            "broker unreachable for a page", broker=f"{upstream.host}:{upstream.port}", error=str(exc)
        )
        await ws.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
        await ws.close(TRY_AGAIN_LATER, "broker unavailable")
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    await ws.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
    stats.open += 1
    stats.opened += 1
    pumps = [
        asyncio.create_task(_page_to_broker(ws, writer)),
        asyncio.create_task(_broker_to_page(ws, reader)),
    ]
    try:
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        stats.open -= 1
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        if ws.application_state == WebSocketState.CONNECTED and ws.client_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await ws.close()


async def _page_to_broker(ws: WebSocket, writer: asyncio.StreamWriter) -> None:
    receive, write, drain = ws.receive, writer.write, writer.drain
    with contextlib.suppress(ConnectionError, RuntimeError, WebSocketDisconnect):
        while True:
            message = await receive()
            data = message.get("bytes")
            if data is None:
                if message["type"] != "websocket.receive":
                    return  # websocket.disconnect
                data = message.get("text", "").encode()
            write(data)
            await drain()


async def _broker_to_page(ws: WebSocket, reader: asyncio.StreamReader) -> None:
    read, send = reader.read, ws.send_bytes
    with contextlib.suppress(ConnectionError, RuntimeError, WebSocketDisconnect):
        while True:
            data = await read(READ_CHUNK)
            if not data:
                return  # the broker closed (e.g. it refused the login, or it is stopping)
            await send(data)
