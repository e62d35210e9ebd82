"""Run a planned day against a live backbone, through the real clients, and say what happened."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from datetime import time as dtime

from bloomwire.app.clients.base import UsageError
from bloomwire.app.simulate.agents import SimConfig, SimRider, SimShop, World
from bloomwire.app.simulate.clock import SimClock
from bloomwire.app.simulate.metrics import Metrics
from bloomwire.app.simulate.plan import DayPlan, outcome_of
from bloomwire.contract.lifecycle import TERMINAL
from bloomwire.runtime.log import get_logger
from bloomwire.runtime.settings import Settings

log = get_logger("bloomwire.app.simulate")

#: Share of the real time budget the simulated day takes; the rest is for the last deliveries.
DAY_SHARE = 0.9
TERMINAL_VALUES = frozenset(s.value for s in TERMINAL)


def parse_day_start(text: str) -> dtime:
    """``HH:MM`` -> time of day, or :class:`UsageError`."""
    try:
        return dtime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"day start {text!r} must be HH:MM, e.g. 10:00") from None


@dataclass
class SimResult:
    """What a run did, as seen over MQTT by the simulated shops."""

    plan: DayPlan
    outcomes: dict[str, str | None]
    statuses: dict[str, str | None]
    metrics: Metrics
    real_s: float
    sim_minutes: float
    speed: float
    stopped_early: bool = False
    manual_assignments: int = 0
    foreign_messages: int = 0
    unacked: dict[str, int] = field(default_factory=dict)

    def expected(self) -> dict[str, str]:
        """The plan's outcomes."""
        return self.plan.outcomes()

    def mismatches(self) -> list[str]:
        """Orders whose outcome differs from the plan (still open ones included)."""
        expected = self.expected()
        return [o for o, want in expected.items() if self.outcomes.get(o) != want]

    def open_orders(self) -> list[str]:
        """Orders not finished when the run ended."""
        return [o for o, st in self.statuses.items() if st not in TERMINAL_VALUES]

    def outcome_counts(self) -> Counter[str]:
        """How the orders ended (``open`` for unfinished ones)."""
        return Counter(v or "open" for v in self.outcomes.values())


class Simulation:
    """One simulated day: shops, riders and customers on their own MQTT connections."""

    def __init__(
        self,
        settings: Settings,
        plan: DayPlan,
        config: SimConfig,
        provision: Callable[[str], str],
        metrics: Metrics | None = None,
    ) -> None:
        if not config.minutes > 0:
            raise UsageError(f"--minutes must be positive, not {config.minutes}")
        self.plan = plan
        self.config = config
        self.metrics = metrics or Metrics()
        start = datetime.combine(date.today(), parse_day_start(config.day_start))
        self.clock = SimClock(self.speed_for(plan, config.minutes), start)
        self.world = World(plan, self.clock, self.metrics, config, settings, provision)
        self.shops = [SimShop(self.world, site) for site in plan.shops]
        self.riders = [SimRider(self.world, rp) for rp in plan.riders]
        for shop in self.shops:
            self.world.shops[shop.site.id] = shop
        for rider in self.riders:
            self.world.riders[rider.id] = rider
        self.started_at: float | None = None
        self.finished = False

    @staticmethod
    def speed_for(plan: DayPlan, minutes: float) -> float:
        """Simulated seconds per real second when the day takes about ``minutes`` real minutes."""
        return plan.day_minutes * 60.0 / (minutes * 60.0 * DAY_SHARE)

    @staticmethod
    def users(plan: DayPlan, *, customers: bool = True) -> list[str]:
        """Every MQTT identity the run connects as (customers: unless the provisioner issues them)."""
        people = [*(r.id for r in plan.riders), *(s.id for s in plan.shops)]
        return [*people, *plan.customers_tracking()] if customers else people

    # --- state for views ------------------------------------------------------------------------

    def status(self, order: str) -> str | None:
        """An order's status as its shop's terminal shows it (None before it is created)."""
        shop = self.world.shops[self.plan.order(order).shop]
        return shop.status(order)

    def status_counts(self) -> Counter[str]:
        """Orders per status (``planned`` for those not created yet)."""
        return Counter(self.status(o.id) or "planned" for o in self.plan.orders)

    def day_fraction(self) -> float:
        """How much of the simulated day has passed (0..1)."""
        if self.started_at is None:
            return 0.0
        return min(1.0, self.clock.minutes() / self.plan.day_minutes)

    def riders_up(self) -> int:
        """Riders whose app is running."""
        return sum(1 for r in self.riders if r.app_up.is_set())

    def _done(self) -> bool:
        if not all(s.creating_done.is_set() for s in self.shops):
            return False
        created = set().union(*(s.created for s in self.shops))
        return all(self.status(o) in TERMINAL_VALUES for o in created)

    # --- running ----------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> SimResult:
        """Connect everyone, play the day, wait for the last deliveries, disconnect everyone."""
        self.config.outbox_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        try:
            await self._connect_everyone()
            stopped_early = await self._play_day(stop)
            await self._flush(5.0)
        finally:
            unacked = await self._disconnect_everyone()
        return self._result(time.monotonic() - t0, stopped_early=stopped_early, unacked=unacked)

    async def _connect_everyone(self) -> None:
        results = await asyncio.gather(
            *(s.start() for s in self.shops), *(r.start() for r in self.riders), return_exceptions=True
        )
        for r in results:
            if isinstance(r, BaseException):
                raise r

    async def _play_day(self, stop: asyncio.Event | None) -> bool:
        """Start the clock and every agent; wait until every order is done (or ``stop``, or the
        deadline). True when stopped early."""
        await asyncio.sleep(0.5)  # presence reaches the persister before any assignment
        self.clock.start()
        self.started_at = time.monotonic()
        for shop in self.shops:
            shop.run()
        for rider in self.riders:
            rider.run()
        deadline = self.started_at + self.config.minutes * 60.0 + self.config.drain_grace_s
        while not self._done():
            if stop is not None and stop.is_set():
                return True
            if time.monotonic() > deadline:
                log.warning("simulation deadline reached with orders still open")
                return False
            await asyncio.sleep(0.25)
        return False

    async def _disconnect_everyone(self) -> dict[str, int]:
        """Stop every agent; returns each rider's outbox records still unacknowledged."""
        self.world.stopping.set()
        unacked = {r.id: r.device.outbox.count(records_only=True) for r in self.riders if r.device}
        for rider in self.riders:
            with contextlib.suppress(Exception):
                await rider.stop()
        for shop in self.shops:
            with contextlib.suppress(Exception):
                await shop.stop()
        self.finished = True
        return unacked

    def _result(self, real_s: float, *, stopped_early: bool, unacked: dict[str, int]) -> SimResult:
        statuses: dict[str, str | None] = {}
        outcomes: dict[str, str | None] = {}
        for o in self.plan.orders:
            line = self.world.shops[o.shop].terminal.view.orders.get(o.id)
            statuses[o.id] = line.status if line else None
            done = line is not None and line.status in TERMINAL_VALUES
            outcomes[o.id] = outcome_of(line.status, line.reason) if line is not None and done else None
        return SimResult(
            plan=self.plan,
            outcomes=outcomes,
            statuses=statuses,
            metrics=self.metrics,
            real_s=real_s,
            sim_minutes=self.clock.minutes() if self.started_at else 0.0,
            speed=self.clock.speed,
            stopped_early=stopped_early,
            manual_assignments=sum(s.manual_assignments for s in self.shops),
            foreign_messages=sum(c.foreign for c in self.world.customers),
            unacked=unacked,
        )

    async def _flush(self, timeout: float) -> None:
        """Give the riders' outboxes a moment to hear their last acks."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            waiting = sum(
                r.device.outbox.count(records_only=True) for r in self.riders if r.device is not None
            )
            dead = sum(1 for r in self.riders if r.device is None)
            if waiting == 0 and dead == 0:
                return
            await asyncio.sleep(0.1)
