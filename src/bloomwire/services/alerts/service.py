"""The alerts service's declaration: its handlers, its start-up state, its hooks (docs/design.md §4).

The logic is :class:`~bloomwire.services.alerts.engine.AlertEngine` (how it decides:
:mod:`bloomwire.services.alerts.engine`). Handlers get their payload decoded once by the runtime
(``model=``); what the service holds while it runs is one :class:`AlertsState`, returned by its
start-up hook.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.runtime.metrics import Figure, FiguresCollector, ServiceMetrics
from bloomwire.runtime.mqtt import Message, Service
from bloomwire.runtime.settings import Settings
from bloomwire.services.alerts.config import RulesConfig, load_rules
from bloomwire.services.alerts.engine import GRACE_S, AlertEngine, log
from bloomwire.services.alerts.ids import (
    NAME,
    alert_id,
    escalated_event_id,
    followup_event_id,
    raised_event_id,
    resolved_event_id,
)
from bloomwire.services.alerts.reads import readonly_engine

__all__ = [
    "FOLLOWUP_S",
    "NAME",
    "RIDER_STATE_FILTER",
    "TICK_S",
    "AlertEngine",
    "AlertsService",
    "AlertsState",
    "alert_id",
    "build",
    "escalated_event_id",
    "followup_event_id",
    "raised_event_id",
    "resolved_event_id",
]

#: Live rider snapshots (published by the persister after each commit that changes a rider).
RIDER_STATE_FILTER: Final = topics.ALL_RIDER_STATE_FILTER
#: Default seconds between two ticks over the store.
TICK_S: Final = 5.0
#: Default seconds between two looks for due follow-ups.
FOLLOWUP_S: Final = 30.0

# The tests and the bench open the store as the service does.
_readonly_engine = readonly_engine


@dataclass
class AlertsState:
    """What the alerts service holds while it runs (its start-up state)."""

    engine: AlertEngine
    scheduler: AsyncIOScheduler
    stop_worker: asyncio.Event
    #: The worker and the scheduled jobs still running (awaited at shutdown).
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def keep(self, task: asyncio.Task[Any]) -> None:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


@dataclass(frozen=True)
class _Options:
    clock: Callable[[], datetime]
    tick_s: float
    followup_s: float
    grace_s: float


class AlertsService(Service[AlertsState]):
    """The alerts :class:`~bloomwire.runtime.mqtt.Service`; :attr:`engine` is its logic (tests, bench)."""

    def __init__(
        self, settings: Settings, config: RulesConfig, options: _Options, metrics: ServiceMetrics | None
    ) -> None:
        super().__init__(NAME, metrics=metrics)
        self.database_url = settings.database_url
        self.config = config
        self.options = options

    @property
    def engine(self) -> AlertEngine | None:
        """The running engine (None before start-up and after shutdown)."""
        return self.state.engine if self.has_state else None

    def figures(self) -> Iterator[Figure]:
        """Open alerts by rule and status, and what the engine did, for Prometheus (at scrape time)."""
        core = self.engine
        if core is None:
            return
        open_now = Counter((t.key[0].value, t.status) for t in list(core.book.values()))
        for (rule, status), n in sorted(open_now.items()):
            yield Figure(
                "bloomwire_alerts_open",
                "Alerts not resolved, by rule and status",
                n,
                {"rule": rule, "status": status},
                counter=False,
            )
        stats = core.stats
        yield Figure("bloomwire_alerts_raised", "Alerts raised", stats.raised)
        yield Figure("bloomwire_alerts_escalated", "Alert escalations", stats.escalated)
        yield Figure("bloomwire_alerts_resolved", "Alerts resolved", stats.resolved)
        yield Figure("bloomwire_alerts_tick_errors", "Ticks that failed", stats.tick_errors)

    def _publish(self, topic: str, payload: bytes) -> None:
        self.publish(topic, payload, qos=1)

    # --- start-up and shutdown --------------------------------------------------------------------

    async def on_start(self) -> AlertsState:
        """Open the store read-only, load it (first tick), start the worker and the scheduler."""
        logging.getLogger("apscheduler").setLevel(logging.WARNING)
        opts = self.options
        db = await asyncio.to_thread(readonly_engine, self.database_url)
        core = AlertEngine(db, self.config, self._publish, clock=opts.clock, grace_s=opts.grace_s)
        state = AlertsState(core, AsyncIOScheduler(timezone=UTC), asyncio.Event())
        loaded = await core.tick()
        if not loaded:
            log.warning(
                "store not readable yet (is the persister up?); retrying", url=db.url.render_as_string()
            )
        state.keep(asyncio.ensure_future(core.work(state.stop_worker)))
        first = datetime.now(UTC)
        every = {"max_instances": 1, "coalesce": True, "misfire_grace_time": None}
        state.scheduler.add_job(
            _shielded(state, core.tick), "interval", seconds=opts.tick_s, id="tick",
            next_run_time=first + timedelta(seconds=opts.tick_s if loaded else min(opts.tick_s, 0.5)),
            **every,
        )  # fmt: skip
        state.scheduler.add_job(
            _shielded(state, core.followups), "interval", seconds=opts.followup_s, id="followups",
            next_run_time=first, **every,
        )  # fmt: skip
        state.scheduler.start()
        log.info(
            "alerts running",
            tick_s=opts.tick_s,
            followup_s=opts.followup_s,
            rules=str(self.config.source or "defaults"),
            orders=core.stats.last_orders,
            open_alerts=core.stats.last_open,
        )
        return state

    async def on_stop(self) -> None:
        """Stop the worker and the scheduler, wait for running jobs, close the store."""
        if not self.has_state:  # the start-up failed before anything was opened
            return
        state = self.state
        state.stop_worker.set()
        state.engine.mark_stopping()
        if state.scheduler.running:
            state.scheduler.shutdown(wait=False)
        if state.tasks:
            await asyncio.gather(*state.tasks, return_exceptions=True)
        state.engine.engine.dispose()

    # --- handlers ---------------------------------------------------------------------------------

    async def on_status(self, event: ev.Event, msg: Message) -> None:
        """An order's status changed: look at that order again."""
        order = getattr(event.data, "order", None)
        if msg.retain or not isinstance(order, str):
            return
        if isinstance(event, ev.OrderAmendedEvent):  # its window or address may have made alerts moot
            self.state.engine.note_amended(order, [f.value for f in event.data.changes])
        else:
            self.state.engine.mark(("order", order))

    async def on_rider_state(self, state: ev.RiderState | None, msg: Message) -> None:
        """A rider's state changed: look at that rider again."""
        if not msg.retain and state is not None:
            self.state.engine.mark(("rider", state.rider))

    async def on_alert(self, event: ev.Event, msg: Message) -> None:
        """An alert event (ours or an acknowledgement): the engine's book learns it."""
        self.state.engine.learn(event)


def _rider_state(payload: bytes) -> ev.RiderState | None:
    """A rider snapshot; None for the empty payload that clears a retained one."""
    return ev.RiderState.model_validate_json(payload) if payload else None


def _shielded(state: AlertsState, job: Callable[[], Any]) -> Callable[[], Any]:
    # The scheduler cancels running jobs when it shuts down; a read in a worker thread cannot
    # be cancelled, so let the job finish and wait for it in the shutdown hook.
    async def run() -> None:
        task = asyncio.ensure_future(job())
        state.keep(task)
        await asyncio.shield(task)

    return run


def build(
    settings: Settings,
    *,
    clock: Callable[[], datetime] = ev.now,
    rules_path: Path | None = None,
    tick_s: float = TICK_S,
    followup_s: float = FOLLOWUP_S,
    grace_s: float = GRACE_S,
    metrics: ServiceMetrics | None = None,
) -> AlertsService:
    """Declare the alerts service.

    Reads the rules file now: a broken one raises :class:`~bloomwire.errors.ConfigError` naming
    the file, line and key, before anything connects.
    """
    config = load_rules(rules_path if rules_path is not None else settings.alerts_rules)
    options = _Options(clock=clock, tick_s=tick_s, followup_s=followup_s, grace_s=grace_s)
    service = AlertsService(settings, config, options, metrics)
    if metrics is not None:
        metrics.registry.register(FiguresCollector(service.figures))
    service.on_startup(service.on_start)
    service.handle(topics.all_orders_filter(topics.OrderChannel.STATUS), model=ev.decode)(service.on_status)
    service.handle(RIDER_STATE_FILTER, model=_rider_state)(service.on_rider_state)
    service.handle(topics.ALL_ALERTS_FILTER, model=ev.decode)(service.on_alert)
    service.on_shutdown(service.on_stop)
    return service
