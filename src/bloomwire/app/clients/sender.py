"""Publishing an :class:`~bloomwire.app.clients.outbox.Outbox` until every event is confirmed.

Shared by the rider app, the shop terminal and the customer tracker: an event is kept in the
outbox first, then published; everything still unconfirmed is published again (same id) after
every reconnection and when it has waited ``resend_after_s``. The persister dedupes by id, so a
re-send never stores twice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bloomwire.app.clients.base import ClientError, Outcome, check_name, wait_event
from bloomwire.app.clients.outbox import LOCATION, Entry, Outbox
from bloomwire.runtime.aio import cancel_and_wait
from bloomwire.runtime.mqtt import Connection
from bloomwire.runtime.settings import Settings

#: Unconfirmed events are published again after this long (besides after every reconnect).
RESEND_AFTER_S = 20.0


class QueuedError(ClientError):
    """No confirmation in time (or no broker): the event stays in the outbox and is re-sent."""

    def __init__(self, event_id: str, what: str) -> None:
        super().__init__(f"{what}: queued, will be re-sent (id {event_id})")
        self.event_id = event_id


def client_outbox_path(settings: Settings, role: str, login: str) -> Path:
    """``DATA_DIR/clients/ROLE/LOGIN/outbox.db``: one outbox per shop or customer login."""
    return settings.data_dir / "clients" / role / check_name(login, "username") / "outbox.db"


def memory_outbox() -> Outbox:
    """An outbox that lives as long as the process (simulated clients, in-process terminals)."""
    return Outbox(Path(":memory:"))


async def wait_confirmed(fut: asyncio.Future[Outcome], timeout: float, event_id: str, what: str) -> Outcome:
    """The backbone's answer, or :class:`QueuedError` (the event is kept and re-sent)."""
    if not fut.done():
        await asyncio.wait({fut}, timeout=timeout)
    if not fut.done():
        raise QueuedError(event_id, what)
    return fut.result()


class OutboxSender:
    """Keeps ``outbox`` flowing over ``conn`` until each event is confirmed."""

    def __init__(
        self,
        conn: Connection,
        outbox: Outbox,
        *,
        resend_after_s: float = RESEND_AFTER_S,
        on_sent: Callable[[Entry, float], None] | None = None,
        position_ttl_s: float | None = None,
    ) -> None:
        self.conn = conn
        self.outbox = outbox
        self.resend_after_s = resend_after_s
        self.on_sent = on_sent
        #: Positions (the rider's) expire at the broker and are dropped from the outbox after this.
        self.position_ttl_s = position_ttl_s
        self.resends = 0
        self._kick = asyncio.Event()
        self._resend_all = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        conn.on_connect(self._on_connect)

    def _on_connect(self) -> None:  # paho's network thread: hand over to the event loop
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.connected_again)

    def connected_again(self) -> None:
        """Publish everything unconfirmed at the next turn."""
        self._resend_all.set()
        self._kick.set()

    def start(self) -> None:
        """Start the sending task (call once connected, from the event loop)."""
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name=f"outbox-{self.conn.client_id}")
        self.connected_again()

    async def stop(self) -> None:
        """Stop sending (unconfirmed events stay in the outbox)."""
        await cancel_and_wait(self._task)
        self._task = None

    def send(self, event_id: str, kind: str, topic: str, payload: bytes) -> None:
        """Keep the event (committed), then publish it if connected."""
        self.outbox.add(event_id, kind, topic, payload)
        if self.conn.connected.is_set() and self._task is not None:
            self._publish([Entry(0, event_id, kind, topic, payload, time.time(), None, 0)])
        else:
            self._kick.set()

    def _publish(self, entries: Sequence[Entry]) -> None:
        if not entries:
            return
        now = time.time()
        for e in entries:
            if e.kind == LOCATION and self.position_ttl_s is not None:
                self.conn.publish(e.topic, e.payload, qos=1, expiry_s=int(self.position_ttl_s))
            else:
                self.conn.publish(e.topic, e.payload, qos=1)
            if e.sent_at is not None:
                self.resends += 1
            if self.on_sent is not None:
                self.on_sent(e, now)
        self.outbox.mark_sent([e.id for e in entries], now=now)

    async def _run(self) -> None:
        last_due = time.monotonic()
        # Sends and reconnections kick the loop; the timeout only paces the overdue check (a
        # simulated crowd of trackers must not wake every half second for nothing).
        pace = min(5.0, self.resend_after_s / 4)
        while True:
            await wait_event(self._kick, pace)
            self._kick.clear()
            if not self.conn.connected.is_set():
                continue
            if self._resend_all.is_set():
                self._resend_all.clear()
                self._drop_stale()
                self._publish(self.outbox.pending())
                last_due = time.monotonic()
                continue
            self._publish(self.outbox.unsent())
            if time.monotonic() - last_due >= pace:
                last_due = time.monotonic()
                self._drop_stale()
                self._publish(self.outbox.due(self.resend_after_s))

    def _drop_stale(self) -> None:
        if self.position_ttl_s is not None:
            self.outbox.drop_stale_positions(self.position_ttl_s)
