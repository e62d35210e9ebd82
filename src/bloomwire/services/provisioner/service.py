"""The provisioner service: the one service holding a dynamic-security admin login.

* Edge-triggered: it reads every canonical ``shops/S/orders/O/status`` (persistent session,
  acknowledged after handling). ``created`` (or any open status of an order it has no access
  for) mints the order's customer role and first login and publishes them, retained, on the
  shop-only ``shops/S/orders/O/access``. A closing status (delivered, failed, cancelled,
  returned) schedules the revocation at close + grace: every login of the order is deleted
  (the broker disconnects them at once and refuses them after), then its role, and the
  retained access is cleared.
* Device enrolment: ``customers/C/devices`` from a login of C gets a new login for that device
  on ``customers/C/inbox/devices``, up to ``max_devices`` per order.
* Level-triggered: at start and every ``reconcile_s`` it reads the store (read-only): open
  orders without access get one, roles of closed or unknown orders get a revocation date.

A :class:`~bloomwire.runtime.mqtt.Service` like the others: its plugin commands travel on its own
connection (:class:`~bloomwire.access.dynsec.ControlChannel`), the decisions are
:class:`~bloomwire.services.provisioner.provisioner.Provisioner`'s, revocations and the
reconciliation are APScheduler jobs. With 5,000 live orders a mint or a revocation takes about a
tenth of a second: the plugin rewrites its whole JSON file on every change (``bloomwire bench
access``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator
from datetime import UTC, datetime
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from pydantic import ValidationError

from bloomwire.access.accounts import AsyncAccounts
from bloomwire.access.dynsec import ControlChannel
from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.errors import BloomwireError, PayloadError, TopicError
from bloomwire.runtime.log import get_logger
from bloomwire.runtime.metrics import Figure, FiguresCollector, ServiceMetrics
from bloomwire.runtime.mqtt import Message, Service
from bloomwire.runtime.settings import Settings
from bloomwire.services.provisioner.orders import OrderReader
from bloomwire.services.provisioner.provisioner import (
    DEFAULT_RECONCILE_S,
    NAME,
    Provisioner,
    ProvisionerConfig,
)

log = get_logger("bloomwire.provisioner")

STATUS_FILTER = topics.all_orders_filter(topics.OrderChannel.STATUS)


class ProvisionerService(Service):
    """The provisioner :class:`~bloomwire.runtime.mqtt.Service`; :attr:`provisioner` holds its
    decisions and counters while it runs (tests, the benchmark)."""

    provisioner: Provisioner | None = None

    def __init__(self, config: ProvisionerConfig, metrics: ServiceMetrics | None = None) -> None:
        super().__init__(NAME, persistent=True, metrics=metrics)
        self.config = config

    def figures(self) -> Iterator[Figure]:
        """What it did, for Prometheus (read at scrape time; nothing before it started)."""
        core = self.provisioner
        if core is None:
            return
        yield Figure("bloomwire_provisioner_minted", "Customer accesses minted", core.minted)
        yield Figure("bloomwire_provisioner_revoked", "Customer accesses revoked", core.revoked)
        yield Figure("bloomwire_provisioner_devices", "Customer device logins enrolled", core.devices)
        yield Figure(
            "bloomwire_provisioner_accesses", "Customer accesses live", len(core.index), counter=False
        )


def endpoint(settings: Settings) -> ev.BrokerEndpoint:
    """Where customer devices connect, as the access message tells them."""
    return ev.BrokerEndpoint(
        host=settings.public_broker_host,
        port=settings.public_broker_port,
        ws_port=settings.public_broker_ws_port,
        tls=settings.broker_tls,
    )


async def _guarded(work: Awaitable[None], what: str, **context: Any) -> None:
    """Run ``work``; a Bloomwire error (the broker busy or gone) is logged and the message
    acknowledged: the reconciliation catches up with what was missed."""
    try:
        await work
    except BloomwireError as exc:
        log.warning(f"{what} failed", error=str(exc), **context)


def build(
    settings: Settings,
    *,
    grace_s: float | None = None,
    max_devices: int | None = None,
    reconcile_s: float = DEFAULT_RECONCILE_S,
    use_store: bool = True,
    metrics: ServiceMetrics | None = None,
) -> ProvisionerService:
    """Declare the provisioner (grace and devices per order default to the settings')."""
    config = ProvisionerConfig(
        grace_s=settings.customer_access_grace_s if grace_s is None else grace_s,
        max_devices=settings.customer_max_devices if max_devices is None else max_devices,
        reconcile_s=reconcile_s,
        use_store=use_store,
    )
    service = ProvisionerService(config, metrics)
    if metrics is not None:
        metrics.registry.register(FiguresCollector(service.figures))
    scheduler: list[AsyncIOScheduler] = []

    def running() -> Provisioner:
        assert service.provisioner is not None, "provisioner not started"
        return service.provisioner

    def publish(topic: str, payload: bytes, retain: bool) -> None:
        service.publish(topic, payload, qos=1, retain=retain)

    @service.handle(STATUS_FILTER)
    async def on_status(msg: Message) -> None:
        try:
            where = topics.parse_order_topic(msg.topic)
            event = ev.decode(msg.payload)
        except (TopicError, PayloadError) as exc:
            log.info("ignoring status message", topic=msg.topic[:200], reason=str(exc)[:200])
            return
        if isinstance(event, ev.OrderStatusEvent):  # incidents travel on the status topic too
            status = event.data.status
            work = running().on_status(where.shop, where.order, status, event.time)
            await _guarded(work, "status", topic=msg.topic)

    @service.handle(topics.ALL_DEVICE_REQUESTS_FILTER)
    async def on_device_request(msg: Message) -> None:
        try:
            customer = topics.parse_device_request(msg.topic)
            request = ev.DeviceRequestEvent.model_validate_json(msg.payload)
        except (TopicError, ValidationError) as exc:
            service.dead_letter(msg, f"not a device request: {exc}")
            return
        await _guarded(running().enrol(customer, request.id), "device request", topic=msg.topic)

    @service.on_startup
    async def start() -> None:
        orders = await asyncio.to_thread(OrderReader, settings.database_url) if config.use_store else None
        sched = AsyncIOScheduler(timezone=UTC)
        accounts = AsyncAccounts(ControlChannel(service.conn))
        core = Provisioner(config, accounts, publish, endpoint(settings), sched, orders)
        service.provisioner = core  # before anything can fail: the shutdown hook cleans up
        scheduler.append(sched)
        await core.load()
        sched.add_job(
            core.reconcile,
            "interval",
            seconds=config.reconcile_s,
            id="reconcile",
            next_run_time=datetime.now(UTC),
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
        )
        sched.start()
        log.info("provisioner running", orders=len(core.index))

    @service.on_shutdown
    async def stop() -> None:
        while scheduler:
            sched = scheduler.pop()
            if sched.running:
                sched.shutdown(wait=False)
        core, service.provisioner = service.provisioner, None
        if core is not None and core.orders is not None:
            core.orders.close()

    return service


__all__ = ["NAME", "ProvisionerService", "build", "endpoint"]
