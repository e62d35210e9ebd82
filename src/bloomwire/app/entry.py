"""What belongs to a process, not to the library: its signals and its garbage collector.

``bloomwire service run`` (and the in-process benches) start a service through
:func:`run_service`: SIGINT and SIGTERM stop it, and once it is ready the heap it built while
starting is collected and frozen (:func:`settle_heap`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from typing import Protocol

from bloomwire.runtime.settings import Settings

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Runnable(Protocol):
    """A service as the entry point sees it (a :class:`~bloomwire.runtime.mqtt.Service`, the web
    service)."""

    @property
    def ready(self) -> asyncio.Event: ...

    async def run(self, settings: Settings, *, stop: asyncio.Event | None = None) -> None: ...


def settle_heap() -> None:
    """Collect once, then move every object alive out of the cyclic collector's sight.

    A full collection walks every tracked object: the ~100k made by imports and start-up would
    turn each one into a pause of tens of milliseconds for every queued message. Frozen objects
    are still freed by reference counting.
    """
    gc.collect()
    gc.freeze()


async def settle_when_ready(service: Runnable) -> None:
    """Wait until ``service`` is ready (started, subscribed), then :func:`settle_heap`."""
    await service.ready.wait()
    settle_heap()


async def run_service(service: Runnable, settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Run ``service`` until ``stop`` is set or SIGINT/SIGTERM arrives; settle the heap once ready."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    settling = asyncio.create_task(settle_when_ready(service))
    try:
        await service.run(settings, stop=stop)
    finally:
        settling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await settling
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
