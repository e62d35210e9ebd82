"""When and how a pass runs: the :class:`Dispatcher` (one pass: read, decide, publish) and the
:class:`PassLoop` (passes one at a time, in a worker thread, whenever woken)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from bloomwire.contract import events as ev
from bloomwire.runtime.aio import cancel_and_wait
from bloomwire.runtime.log import get_logger
from bloomwire.runtime.metrics import Figure
from bloomwire.services.dispatch.config import DispatchConfig
from bloomwire.services.dispatch.decide import Decider, PassResult
from bloomwire.services.dispatch.ids import EVENTS_TOPIC
from bloomwire.services.dispatch.reads import Snapshot, StoreReader

log = get_logger("bloomwire.dispatch")


class Dispatcher:
    """One pass over a read-only store: :class:`StoreReader` reads, :class:`Decider` decides, this
    publishes. Thread-confined: one pass at a time."""

    def __init__(
        self,
        engine: Engine,
        *,
        clock: Callable[[], datetime] = ev.now,
        config: DispatchConfig | None = None,
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.config = config or DispatchConfig()
        self.reader = StoreReader(engine, max_waiting=self.config.max_waiting)
        self.decider = Decider(self.config)

    def read(self, now: datetime, *, full: bool = True) -> Snapshot:
        """What a pass at ``now`` decides over (see :meth:`StoreReader.read`)."""
        return self.reader.read(now, full=full)

    def decide(self, snap: Snapshot, now: datetime, *, mono: float | None = None) -> PassResult:
        """Offers and expiries for ``snap`` (see :meth:`Decider.decide`)."""
        return self.decider.decide(snap, now, mono=mono)

    def refused(self, event_id: str) -> None:
        """The persister refused one of our events (thread-safe; see :meth:`Decider.refused`)."""
        self.decider.refused(event_id)

    def run_pass(self, publish: Callable[[str, bytes], None], *, full: bool = True) -> PassResult:
        """Read, decide and publish (expiries first, then offers). ``full``: see :meth:`read`."""
        now = self.clock()
        t0 = time.perf_counter()
        snap = self.read(now, full=full)
        t1 = time.perf_counter()
        result = self.decide(snap, now)
        t2 = time.perf_counter()
        for e in result.expired:
            publish(EVENTS_TOPIC, ev.encode(e))
        for offer in result.offers:
            publish(EVENTS_TOPIC, ev.encode(offer))
        t3 = time.perf_counter()
        result.read_s, result.plan_s, result.publish_s = t1 - t0, t2 - t1, t3 - t2
        if result.offers or result.expired:
            result.published_at = time.time()
        _log_pass(result)
        return result


def _log_pass(result: PassResult) -> None:
    """One line per pass that sent something, and one per expiry (offers at debug level)."""
    if result.offers or result.expired:
        log.info(
            "dispatch pass",
            mode=result.mode,
            waiting=result.waiting,
            riders=result.riders,
            offers=len(result.offers),
            expired=len(result.expired),
            read_ms=round(result.read_s * 1000, 2),
            plan_ms=round(result.plan_s * 1000, 2),
        )
    for e in result.expired:
        log.info("offer expired", offer=e.data.offer, order=e.data.order, rider=e.data.rider)
    for offer in result.offers:
        d = offer.data
        log.debug("offer", order=d.order, rider=d.rider, mode=d.mode, cost=d.cost, offer=d.offer)


@dataclass
class DispatchStats:
    """Counters and recent passes, for tests and the benchmark."""

    passes: int = 0
    offers: int = 0
    expired: int = 0
    failures: int = 0
    recent: deque[PassResult] = field(default_factory=lambda: deque(maxlen=1000))
    #: Passes by what they decided: idle (nothing to do), single or batch planning.
    modes: Counter[str] = field(default_factory=Counter)

    def figures(self) -> Iterator[Figure]:
        """These counters for Prometheus (read at scrape time)."""
        yield Figure("bloomwire_dispatch_offers", "Offers made to riders", self.offers)
        yield Figure("bloomwire_dispatch_expired", "Offers that timed out unanswered", self.expired)
        yield Figure("bloomwire_dispatch_pass_failures", "Passes that failed and were retried", self.failures)
        for mode, n in list(self.modes.items()):
            yield Figure("bloomwire_dispatch_passes", "Dispatch passes by mode", n, {"mode": mode})


class PassLoop:
    """Runs the dispatcher's passes one at a time, in a worker thread, whenever woken.

    Woken by the tick (a ``full`` pass: overdue offers too) and by events; wake-ups that come
    during a pass fold into the next one, which carries the earliest trigger time.
    """

    def __init__(
        self, dispatcher: Dispatcher, publish: Callable[[str, bytes], None], stats: DispatchStats
    ) -> None:
        self.dispatcher = dispatcher
        self.publish = publish
        self.stats = stats
        self._wake = asyncio.Event()
        self._trigger_at: float | None = None
        self._full = True
        self._settling = False
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def wake(self, trigger_at: float | None = None, *, full: bool = False) -> None:
        """Ask for a pass as soon as the current one (if any) is done (``full``: also look for
        overdue offers, as every tick does)."""
        self._full = self._full or full
        if trigger_at is not None and (self._trigger_at is None or trigger_at < self._trigger_at):
            self._trigger_at = trigger_at
        self._wake.set()

    def presence_changed(self, received_at: float) -> None:
        """A rider came or went: a pass now, and another once the persister has surely stored it."""
        self.wake(received_at)
        if not self._settling:
            self._settling = True
            asyncio.get_running_loop().call_later(0.25, self._settled)

    def _settled(self) -> None:
        self._settling = False
        self.wake()

    def start(self) -> None:
        """Start the loop, with a full pass first."""
        self._task = asyncio.create_task(self._run(), name="dispatch-passes")
        self.wake(full=True)

    async def stop(self, timeout: float = 30.0) -> None:
        """Let the current pass finish (``timeout`` at most, then cancel it) and end the loop."""
        self._stopping = True
        self._wake.set()
        task, self._task = self._task, None
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=timeout)
        except TimeoutError:
            await cancel_and_wait(task)

    async def _run(self) -> None:
        delay = 0.2
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            if self._stopping:
                break
            trigger, self._trigger_at = self._trigger_at, None
            full, self._full = self._full, False
            try:
                result = await asyncio.to_thread(self.dispatcher.run_pass, self.publish, full=full)
            except Exception as exc:
                self._full = self._full or full
                self.stats.failures += 1
                if isinstance(exc, SQLAlchemyError):  # e.g. no schema yet: the next tick retries
                    log.warning("store not readable; retrying", error=(str(exc).splitlines() or [""])[0])
                else:
                    log.exception("dispatch pass failed; retrying")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            delay = 0.2
            result.trigger_at = trigger
            self.stats.passes += 1
            self.stats.offers += len(result.offers)
            self.stats.expired += len(result.expired)
            self.stats.modes[result.mode] += 1
            self.stats.recent.append(result)
