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
reconciliation are APScheduler jobs; orders wanting an access are minted by one task, a batch per
control message (:mod:`~bloomwire.services.provisioner.minting`). With 5,000 live orders a mint
or a revocation takes about a tenth of a second: the plugin rewrites its whole JSON file after
every command (``bloomwire bench access``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator
from datetime import UTC, datetime
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from bloomwire.access.accounts import AsyncAccounts
from bloomwire.access.dynsec import ControlChannel
from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.errors import BloomwireError, TopicError
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


class ProvisionerService(Service[Provisioner]):
    """The provisioner :class:`~bloomwire.runtime.mqtt.Service`; its state is the
    :class:`Provisioner` (decisions and counters) it started with."""

    def __init__(self, config: ProvisionerConfig, metrics: ServiceMetrics | None = None) -> None:
        super().__init__(NAME, persistent=True, metrics=metrics)
        self.config = config

    @property
    def provisioner(self) -> Provisioner | None:
        """The running provisioner (None unless running: tests, the benchmark)."""
        return self.state if self.has_state else None

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
        yield Figure("bloomwire_provisioner_mint_batches", "Control messages of mints sent", core.batches)
        yield Figure("bloomwire_provisioner_mint_given_up", "Orders whose access was given up", core.given_up)
        yield Figure(
            "bloomwire_provisioner_mint_waiting",
            "Orders waiting for an access",
            len(core.queue),
            counter=False,
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

    def publish(topic: str, payload: bytes, retain: bool) -> None:
        service.publish(topic, payload, qos=1, retain=retain)

    @service.handle(STATUS_FILTER, model=ev.decode)
    async def on_status(event: ev.Event, msg: Message) -> None:
        if not isinstance(event, ev.OrderStatusChangedEvent):  # incidents travel on the status topic too
            return
        try:
            where = topics.parse_order_topic(msg.topic)
        except TopicError as exc:
            log.info("ignoring status message", topic=msg.topic[:200], reason=str(exc)[:200])
            return
        work = service.state.on_status(where.shop, where.order, event.data.status, event.time, msg)
        await _guarded(work, "status", topic=msg.topic)

    @service.handle(topics.ALL_DEVICE_REQUESTS_FILTER, model=ev.DeviceRequestEvent)
    async def on_device_request(request: ev.DeviceRequestEvent, msg: Message) -> None:
        try:
            customer = topics.parse_device_request(msg.topic)
        except TopicError as exc:
            service.dead_letter(msg, f"not a device request: {exc}")
            return
        await _guarded(service.state.enrol(customer, request.id), "device request", topic=msg.topic)

    @service.on_startup
    async def start() -> Provisioner:
        orders = await asyncio.to_thread(OrderReader, settings.database_url) if config.use_store else None
        accounts = AsyncAccounts(ControlChannel(service.conn))
        core = Provisioner(
            config,
            accounts,
            publish,
            endpoint(settings),
            AsyncIOScheduler(timezone=UTC),
            orders,
            dead_letter=service.dead_letter,
        )
        try:
            await core.load()
        except BaseException:  # not the service's state yet: the shutdown hook would not see it
            if orders is not None:
                orders.close()
            raise
        core.scheduler.add_job(
            core.reconcile,
            "interval",
            seconds=config.reconcile_s,
            id="reconcile",
            next_run_time=datetime.now(UTC),
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
        )
        core.scheduler.start()
        core.start_minting()
        log.info("provisioner running", orders=len(core.index))
        return core

    @service.on_shutdown
    async def stop() -> None:
        if not service.has_state:
            return
        core = service.state
        await core.stop_minting()
        if core.scheduler.running:
            core.scheduler.shutdown(wait=False)
        if core.orders is not None:
            core.orders.close()

    return service


__all__ = ["NAME", "ProvisionerService", "build", "endpoint"]
