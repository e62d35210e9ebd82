"""``/mqtt`` (services/web/bridge.py) under a real uvicorn and a real Mosquitto: bytes both ways,
the broker still deciding, either side's close closing the other, 1013 when the broker is down,
and the heap sweep once pages closed."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvicorn
from conftest import Broker, MqttTestClient
from webkit import wait_for
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from bloomwire.services.web.bridge import TRY_AGAIN_LATER, BridgeStats, Upstream, page_protocol
from bloomwire.services.web.heap import PageHeap

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _unfrozen() -> Iterator[None]:
    """The bridge freezes the heap of the process it runs in: here, the test session's."""
    yield
    gc.unfreeze()


async def _no_app(scope: Any, receive: Any, send: Any) -> None:
    """Every path but /mqtt: refused (a websocket close before accepting is a 403)."""
    if scope["type"] == "websocket":
        await send({"type": "websocket.close"})


class Front:
    """uvicorn serving only the bridge, on a free port, in a thread of its own."""

    def __init__(self, upstream: Upstream, heap: PageHeap) -> None:
        self.stats = BridgeStats()
        self.heap = heap
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(
            _no_app,
            ws=page_protocol(upstream, self.stats, heap),
            ws_per_message_deflate=False,
            lifespan="off",
            log_config=None,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])))

    def __enter__(self) -> Front:
        self.thread.start()
        wait_for(lambda: self.server.started, 10, "uvicorn started")
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@contextlib.contextmanager
def _front(broker: Broker, heap: PageHeap | None = None) -> Iterator[Front]:
    with Front(Upstream(broker.host, broker.port), heap or PageHeap()) as front:
        yield front


class ViaFront:
    """MqttTestClient's broker protocol, pointing at the front."""

    def __init__(self, front: Front) -> None:
        self.host = "127.0.0.1"
        self.port = self.ws_port = front.port


def test_mqtt_goes_both_ways_and_the_broker_still_decides(
    broker: Broker, mqtt_user: Callable[..., tuple[str, str]]
) -> None:
    name, password = mqtt_user()
    with _front(broker) as front:
        wrong = MqttTestClient(ViaFront(front), name, "not-the-password", transport="websockets")  # type: ignore[arg-type]
        wrong.paho.ws_set_options(path="/mqtt")
        try:
            assert wrong.connect().is_failure
        finally:
            wrong.close()
        page = MqttTestClient(ViaFront(front), name, password, transport="websockets")  # type: ignore[arg-type]
        page.paho.ws_set_options(path="/mqtt")
        try:
            assert not page.connect().is_failure
            assert front.stats.open == 1
            page.subscribe(f"bridge/{name}")
            page.publish(f"bridge/{name}", b"x" * 70_000, qos=1)  # larger than one socket read
            assert page.expect(1)[0].payload == b"x" * 70_000
        finally:
            page.close()
        wait_for(lambda: front.stats.open == 0, 10, "the page's broker connection closed")
        assert front.stats.opened == 2 and front.stats.refused == 0


def test_the_broker_closing_closes_the_page(broker: Broker) -> None:
    with _front(broker) as front, connect(f"ws://127.0.0.1:{front.port}/mqtt", subprotocols=["mqtt"]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "mqtt"
        ws.send(b"\xf0\x00")  # not an MQTT packet: the broker drops the connection
        with pytest.raises(ConnectionClosed):
            ws.recv(10)
        wait_for(lambda: front.stats.open == 0, 10, "the bridge counted the page closed")


def test_an_unreachable_broker_is_try_again_later() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: refused
        with (
            Front(Upstream("127.0.0.1", port), PageHeap()) as front,
            connect(f"ws://127.0.0.1:{front.port}/mqtt") as ws,
        ):
            with pytest.raises(ConnectionClosed) as closed_by:
                ws.recv(10)
            assert closed_by.value.rcvd is not None and closed_by.value.rcvd.code == TRY_AGAIN_LATER
            assert front.stats.refused == 1 and front.stats.open == 0


def test_other_paths_are_left_to_the_asgi_app(broker: Broker) -> None:
    with _front(broker) as front, pytest.raises(Exception, match="403"):
        connect(f"ws://127.0.0.1:{front.port}/elsewhere").close()


def test_closed_pages_are_swept(broker: Broker, mqtt_user: Callable[..., tuple[str, str]]) -> None:
    name, password = mqtt_user()
    heap = PageHeap(sweep_after=3)
    with _front(broker, heap) as front:
        for _ in range(3):
            page = MqttTestClient(ViaFront(front), name, password, transport="websockets")  # type: ignore[arg-type]
            page.paho.ws_set_options(path="/mqtt")
            try:
                assert not page.connect().is_failure
            finally:
                page.close()
            wait_for(lambda: front.stats.open == 0, 10, "the page closed")
        wait_for(lambda: heap.sweeps == 1, 10, "a sweep after the third page closed")
        assert heap.closed_since_sweep == 0
