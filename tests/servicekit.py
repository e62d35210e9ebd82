"""Services run in a background event loop, and a decoded watch of a test client's messages.

Shared by the tests that drive a service's handlers through a real broker without a supervisor
(the assistant, the notices).
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from bloomwire.runtime.mqtt import Service
from bloomwire.runtime.settings import Settings

WAIT = 20.0
Build = Callable[[Settings], Service[Any]]


class Running:
    """Services started in order (each ready before the next), in a loop on a thread until closed."""

    def __init__(self, *services: tuple[Build, Settings]) -> None:
        self.services = services
        self.settings = services[0][1]
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, name="services", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self.error = exc
            self.ready.set()

    async def _main(self) -> None:
        self.loop, self.stop = asyncio.get_running_loop(), asyncio.Event()
        tasks: list[asyncio.Task[None]] = []
        for build, settings in self.services:
            service = build(settings)
            task = asyncio.create_task(service.run(settings, stop=self.stop, install_signals=False))
            tasks.append(task)
            ready = asyncio.create_task(service.ready.wait())
            await asyncio.wait({task, ready}, timeout=WAIT, return_when=asyncio.FIRST_COMPLETED)
            if not ready.done():
                ready.cancel()
                if task.done():
                    await task  # its error
                raise TimeoutError(f"{service.name} not ready")
        self.ready.set()
        await asyncio.gather(*tasks)

    def __enter__(self) -> Running:
        self.thread.start()
        assert self.ready.wait(WAIT), "services did not start"
        if self.error is not None:
            raise self.error
        return self

    def __exit__(self, *exc: object) -> None:
        if self.loop is not None and self.stop is not None:
            self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(WAIT)


class Watch:
    """Every message a test client receives, decoded, searchable with a deadline."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def _keep(self, msg: Any) -> None:
        if msg.payload:
            self.seen.append((msg.topic, json.loads(msg.payload)))

    def drain(self) -> None:
        """Take in what has arrived."""
        while not self.client.messages.empty():
            self._keep(self.client.messages.get_nowait())

    def until(self, test: Callable[[str, dict[str, Any]], bool], what: str) -> dict[str, Any]:
        """The first message seen (or arriving within :data:`WAIT`) that passes ``test``."""
        deadline = time.monotonic() + WAIT
        self.drain()
        while True:
            for topic, body in self.seen:
                if test(topic, body):
                    return body
            try:
                self._keep(self.client.messages.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                pytest.fail(f"not seen within {WAIT} s: {what}")
            self.drain()
