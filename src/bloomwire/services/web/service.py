"""``bloomwire service run web``: the ASGI app under uvicorn, and ``services/web/status`` like every service.

It binds its socket before anything else (``web_port`` 0 = a free port, logged), says ``online``
on its retained status topic once uvicorn serves (``offline`` when it stops, or as its Last
Will), and stops on SIGINT/SIGTERM or a ``stop`` event. Each page holds two file descriptors (its
websocket and its broker connection), so it first raises its own open-files limit to the hard one.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
from collections.abc import Iterator
from typing import Any, Literal

import uvicorn

from bloomwire.contract import topics
from bloomwire.runtime.log import get_logger
from bloomwire.runtime.metrics import Figure, FiguresCollector, ServiceMetrics
from bloomwire.runtime.mqtt import Connection
from bloomwire.runtime.settings import Settings
from bloomwire.services.web.app import create_app, upstream_of
from bloomwire.services.web.assets import web_root
from bloomwire.services.web.bridge import BridgeStats, page_protocol
from bloomwire.services.web.heap import PageHeap
from bloomwire.services.web.links import record_web_url

NAME = "web"
#: Largest websocket message a page may send (the broker's own packet limit is 256 KiB).
WS_MAX_SIZE = 512 * 1024
#: File descriptors besides the pages' (listening socket, status connection, store, logs).
FDS_RESERVED = 64
log = get_logger("bloomwire.services.web")


def raise_open_files() -> int:
    """Raise this process's open-files limit (soft) to its hard limit; the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def page_capacity(open_files: int) -> int:
    """Pages one process can bridge under an open-files limit: two descriptors each."""
    return max(0, (open_files - FDS_RESERVED) // 2)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0 = a free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class WebService:
    """The web service: ``await WebService(settings).run(settings)``."""

    name = NAME

    def figures(self) -> Iterator[Figure]:
        """The bridge's counters, for Prometheus (read at scrape time)."""
        stats = self.stats
        yield Figure(
            "bloomwire_web_pages_open", "Pages connected through /mqtt now", stats.open, counter=False
        )
        yield Figure("bloomwire_web_pages_opened", "Pages connected through /mqtt", stats.opened)
        yield Figure("bloomwire_web_pages_refused", "Pages refused: broker unreachable", stats.refused)

    def __init__(self, settings: Settings) -> None:
        self.root = web_root(settings.web_root)  # a missing `npm ci` fails here, clearly
        self.stats = BridgeStats()
        self.port: int | None = None
        self.ready = asyncio.Event()

    async def run(
        self,
        settings: Settings,
        *,
        stop: asyncio.Event | None = None,
        install_signals: Literal[False] = False,
    ) -> None:
        """Serve until ``stop`` is set. Signals are the entry point's (``install_signals``: False
        only, accepted for callers written before they moved there)."""
        if install_signals:
            raise TypeError("WebService.run installs no signal handlers: the entry point does")
        stop = stop or asyncio.Event()
        open_files = raise_open_files()
        sock = bind(settings.web_host, settings.web_port)
        self.port = sock.getsockname()[1]
        app = create_app(settings, self.root, stats=self.stats)
        config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            ws=page_protocol(upstream_of(settings), self.stats, PageHeap()),
            ws_max_size=WS_MAX_SIZE,
            # A compressor per page costs memory on every page for small, mostly unique packets.
            ws_per_message_deflate=False,
            lifespan="off",
            server_header=False,
        )
        server = uvicorn.Server(config)
        status = Connection(
            settings, settings.broker_username or NAME, status_topic=topics.service_status(NAME)
        )
        status.announce_online = False
        status.start()
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            await self._until_started(server, serving)
            status.announce_online = True
            if status.connected.is_set():
                status.publish(status.status_topic or "", status.online_payload, retain=True)
            self.ready.set()
            public = settings.model_copy(update={"web_port": self.port}).web_url
            record_web_url(settings, public)
            log.info(
                "web service running",
                url=public,
                broker=f"{settings.broker_host}:{settings.broker_port}",
                open_files=open_files,
                max_pages=page_capacity(open_files),
            )
            await self._until_stopped(server, serving, stop)
        finally:
            server.should_exit = True
            with contextlib.suppress(Exception):
                await serving
            sock.close()
            await status.stop()
            log.info("web service stopped", pages_served=self.stats.opened)

    @staticmethod
    async def _until_started(server: uvicorn.Server, serving: asyncio.Task[Any]) -> None:
        while not server.started:
            if serving.done():
                serving.result()  # raises what stopped it
                return
            await asyncio.sleep(0.01)

    @staticmethod
    async def _until_stopped(server: uvicorn.Server, serving: asyncio.Task[Any], stop: asyncio.Event) -> None:
        waiter = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait([serving, waiter], return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        server.should_exit = True


def build(settings: Settings, *, metrics: ServiceMetrics | None = None) -> WebService:
    """Declare the web service (checks that the pages and npm packages are there)."""
    service = WebService(settings)
    if metrics is not None:
        metrics.registry.register(FiguresCollector(service.figures))
    return service
