"""A delaying, lossy TCP proxy: one rider's bad mobile network in ``bloomwire bench peak --faults``.

``tc netem`` is not in this kernel, so the rider's client connects to this proxy, which forwards
to the broker. Normally it forwards at once. While :meth:`LossyProxy.impair` is on, every chunk
read from either side waits ``delay_s`` before it is written on, and a "lost" one (probability
``loss``) waits a retransmission timeout more, as TCP would resend it; order is kept, so a lost
segment holds up the ones behind it (head-of-line blocking), as on a real link.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from dataclasses import dataclass

CHUNK = 65536


@dataclass
class Impairment:
    """What the link does to each chunk."""

    delay_s: float = 0.0
    loss: float = 0.0
    #: Extra wait of a lost chunk: Linux's minimum TCP retransmission timeout is 200 ms.
    rto_s: float = 0.2


class LossyProxy:
    """Listens on a free loopback port; each connection is piped to ``target``."""

    def __init__(self, target: tuple[str, int], *, seed: int = 7) -> None:
        self.target = target
        self.impairment = Impairment()
        self.port = 0
        self.connections = 0
        self.lost_chunks = 0
        self._rng = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._thread = threading.Thread(target=self._run, name="peak-proxy", daemon=True)

    def start(self) -> int:
        """Start listening; return the port."""
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("bench peak: the network proxy did not start")
        return self.port

    def impair(self, delay_s: float, loss: float) -> None:
        """From now on delay every chunk and lose some."""
        self.impairment = Impairment(delay_s, loss)

    def clear(self) -> None:
        """Back to a clean link."""
        self.impairment = Impairment()

    def stop(self) -> None:
        """Close every connection and the listener."""
        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        up_w: asyncio.StreamWriter | None = None
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
            await asyncio.gather(self._pipe(down_r, up_w), self._pipe(up_r, down_w))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (down_w, up_w):
                if w is not None:
                    w.close()
                    with contextlib.suppress(OSError, asyncio.CancelledError):
                        await w.wait_closed()
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Forward until either side closes (then close the other, as a broken link would).

        Reading goes on while earlier chunks wait: the delay is latency, not a throughput cap.
        """
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        sender = asyncio.create_task(self._deliver(queue, writer))
        due = 0.0
        try:
            while chunk := await reader.read(CHUNK):
                imp = self.impairment
                now = time.monotonic()
                if imp.delay_s or imp.loss:
                    lost = self._rng.random() < imp.loss
                    self.lost_chunks += lost
                    now += imp.delay_s + (imp.rto_s if lost else 0.0)
                due = max(due, now)  # in order: a chunk never overtakes the one before it
                queue.put_nowait((due, chunk))
            queue.put_nowait((due, b""))
            await sender
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await sender
            writer.close()

    @staticmethod
    async def _deliver(queue: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter) -> None:
        while True:
            due, chunk = await queue.get()
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            if not chunk:
                return
            writer.write(chunk)
            await writer.drain()
