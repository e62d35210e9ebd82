"""The provisioner: the one service holding a dynamic-security admin login.

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

Everything runs in one thread over one MQTT connection (:class:`ControlClient`); at about 10
mints or revocations per second with 5,000 live orders it is bounded by the plugin rewriting
its whole JSON file on every change (``bloomwire bench access``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import json
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from bloomwire.access import policy
from bloomwire.access.accounts import Accounts, OrderAccess
from bloomwire.access.dynsec import ControlClient, Received
from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.contract.lifecycle import CLOSED, OrderStatus
from bloomwire.errors import BloomwireError, PayloadError, TopicError
from bloomwire.runtime.log import get_logger
from bloomwire.runtime.metrics import Figure, FiguresCollector, ServiceMetrics
from bloomwire.runtime.settings import Settings

log = get_logger("bloomwire.provisioner")

NAME = policy.PROVISIONER
SOURCE = f"{topics.SERVICES}/{NAME}"
#: How long a customer keeps access after the order closes (see the delivered status, chat).
DEFAULT_GRACE_S = 3600.0
#: Logins per order: the first (enrolment) one plus the devices it enrolled.
DEFAULT_MAX_DEVICES = 5
DEFAULT_RECONCILE_S = 60.0
#: Open orders of the store given an access per pass of the main loop when catching up.
CATCH_UP_PER_PASS = 1
STORE_CHUNK = 500

_STATUS_FILTER = topics.all_orders_filter(topics.OrderChannel.STATUS)


def _utc(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


class Provisioner:
    """Mints, enrols and revokes customer access (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        *,
        grace_s: float = DEFAULT_GRACE_S,
        max_devices: int = DEFAULT_MAX_DEVICES,
        reconcile_s: float = DEFAULT_RECONCILE_S,
        use_store: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.grace_s = grace_s
        self.max_devices = max_devices
        self.reconcile_s = reconcile_s
        self.use_store = use_store
        self.clock = clock
        self.ready = threading.Event()
        self.minted = 0
        self.revoked = 0
        self.devices = 0
        self.index: dict[str, OrderAccess] = {}
        self.by_customer: dict[str, str] = {}
        self.due: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._inbox: queue.Queue[Received] = queue.Queue()
        self._catch_up: deque[tuple[str, str, str | None]] = deque()
        self._engine: sa.Engine | None = None
        self._ctl: ControlClient | None = None
        self._accounts: Accounts | None = None

    # --- running --------------------------------------------------------------------------------

    async def run(
        self,
        settings: Settings | None = None,
        *,
        stop: asyncio.Event | None = None,
        install_signals: bool = True,
    ) -> None:
        """Run until ``stop`` (or SIGINT/SIGTERM); the work happens in one worker thread."""
        if settings is not None:
            self.settings = settings
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        if install_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, stop.set)
        halt = threading.Event()

        async def relay() -> None:
            await stop.wait()
            halt.set()

        relay_task = asyncio.create_task(relay())
        try:
            await asyncio.to_thread(self.run_blocking, halt)
        finally:
            relay_task.cancel()
            if install_signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    with contextlib.suppress(NotImplementedError, RuntimeError):
                        loop.remove_signal_handler(sig)

    def run_blocking(self, stop: threading.Event) -> None:
        """Connect, load the index, reconcile, then handle messages and due revocations."""
        s = self.settings
        password = s.broker_password.get_secret_value() if s.broker_password else ""
        ctl = ControlClient(
            s.broker_host,
            s.broker_port,
            s.broker_username or NAME,
            password,
            tls=s.broker_tls,
            ca_file=s.broker_ca_file,
            status_topic=topics.service_status(NAME),
            persistent=True,
            subscriptions={_STATUS_FILTER: 1, topics.ALL_DEVICE_REQUESTS_FILTER: 1},
            on_message=self._inbox.put,
            manual_ack=True,
        )
        ctl.connect(timeout=30.0)
        self._ctl, self._accounts = ctl, Accounts(ctl)
        try:
            self.index = self._accounts.order_accesses()
            self.by_customer = {a.customer: role for role, a in self.index.items()}
            self.reconcile()
            next_reconcile = self.clock() + self.reconcile_s
            self.ready.set()
            log.info("provisioner running", orders=len(self.index))
            while not stop.is_set():
                now = self.clock()
                wait = min(0.5, max(0.0, next_reconcile - now))
                if self._heap:
                    wait = min(wait, max(0.0, self._heap[0][0] - now))
                if self._catch_up:
                    wait = 0.0
                try:
                    msg: Received | None = self._inbox.get(timeout=wait)
                except queue.Empty:
                    msg = None
                if msg is not None:
                    self._handle(msg)
                elif self._catch_up:
                    item = self._catch_up.popleft()
                    self._guard(functools.partial(self.mint, *item), "catch-up mint", order=item[1])
                self.revoke_due()
                if self.clock() >= next_reconcile:
                    self.reconcile()
                    next_reconcile = self.clock() + self.reconcile_s
        finally:
            ctl.close()
            if self._engine is not None:
                self._engine.dispose()

    def figures(self) -> Iterator[Figure]:
        """What it did, for Prometheus (read at scrape time)."""
        yield Figure("bloomwire_provisioner_minted", "Customer accesses minted", self.minted)
        yield Figure("bloomwire_provisioner_revoked", "Customer accesses revoked", self.revoked)
        yield Figure("bloomwire_provisioner_devices", "Customer device logins enrolled", self.devices)
        yield Figure(
            "bloomwire_provisioner_accesses", "Customer accesses live", len(self.index), counter=False
        )

    def _guard(self, fn: Callable[[], object], what: str, **context: Any) -> bool:
        """Run ``fn``; log and return False on a Bloomwire error (the loop must go on)."""
        try:
            fn()
        except BloomwireError as exc:
            log.warning(f"{what} failed", error=str(exc), **context)
            return False
        return True

    def _handle(self, msg: Received) -> None:
        ctl = self._ctl
        assert ctl is not None
        if topics.matches(_STATUS_FILTER, msg.topic):
            done = self._guard(lambda: self._on_status(msg), "status", topic=msg.topic)
        elif topics.matches(topics.ALL_DEVICE_REQUESTS_FILTER, msg.topic):
            done = self._guard(lambda: self._on_device_request(msg), "device request", topic=msg.topic)
        else:
            done = True
        if done or ctl.connected.is_set():
            ctl.ack(msg)  # not on a lost connection: the broker redelivers it to the session

    # --- order status ---------------------------------------------------------------------------

    def _on_status(self, msg: Received) -> None:
        try:
            where = topics.parse_order_topic(msg.topic)
            event = ev.decode(msg.payload)
        except (TopicError, PayloadError) as exc:
            log.info("ignoring status message", topic=msg.topic[:200], reason=str(exc)[:200])
            return
        if not isinstance(event, ev.OrderStatusEvent):
            return  # incidents travel on the status topic too
        shop, order, status = where.shop, where.order, event.data.status
        role = policy.role_name(policy.Kind.CUSTOMER, shop, order)
        if status in CLOSED:
            if role in self.index:
                self.schedule(role, _utc(event.time).timestamp() + self.grace_s)
        elif role not in self.index:
            self.mint(shop, order)
        elif status is OrderStatus.CREATED:
            log.debug("access already minted", order=order)

    def mint(self, shop: str, order: str, customer: str | None = None) -> OrderAccess | None:
        """Create the order's access (unless it has one) and publish it for the shop."""
        role = policy.role_name(policy.Kind.CUSTOMER, shop, order)
        if role in self.index:
            return None
        ctl, accounts = self._ctl, self._accounts
        assert ctl is not None and accounts is not None
        customer = customer or self._customer_of(order) or policy.customer_id(order)
        access, login = accounts.mint_customer(shop, order, customer)
        self.index[role] = access
        self.by_customer[access.customer] = role
        s = self.settings
        endpoint = ev.BrokerEndpoint(  # what devices are told (BLOOMWIRE_PUBLIC_*), not our own view
            host=s.public_broker_host,
            port=s.public_broker_port,
            ws_port=s.public_broker_ws_port,
            tls=s.broker_tls,
        )
        data = ev.CustomerAccess(
            shop=shop,
            order=order,
            customer=access.customer,
            username=login.username,
            password=login.password,
            topics=[
                *(topics.order_topic(shop, order, ch) for ch in topics.CUSTOMER_CHANNELS),
                topics.customer_inbox_filter(access.customer),
            ],
            enrol_topic=topics.device_request_topic(access.customer),
            reply_topic=topics.device_reply_topic(access.customer),
            max_devices=self.max_devices,
            broker=endpoint,
        )
        ctl.publish(
            topics.access_topic(shop, order),
            ev.encode(ev.CustomerAccessEvent(source=SOURCE, data=data)),
            retain=True,
        )
        self.minted += 1
        log.info("customer access minted", shop=shop, order=order, customer=access.customer)
        return access

    def schedule(self, role: str, at: float) -> None:
        """Revoke ``role`` at ``at`` (the earliest date asked for wins)."""
        if role in self.due and self.due[role] <= at:
            return
        self.due[role] = at
        heapq.heappush(self._heap, (at, role))

    def revoke_due(self) -> int:
        """Revoke every access whose date has come; return how many."""
        done = 0
        now = self.clock()
        while self._heap and self._heap[0][0] <= now:
            at, role = heapq.heappop(self._heap)
            if self.due.get(role) != at:
                continue  # superseded by an earlier date, or already revoked
            if self._guard(lambda role=role: self.revoke(role), "revoke", role=role):  # type: ignore[misc]
                done += 1
            else:
                heapq.heappush(self._heap, (now + 5.0, role))
                self.due[role] = now + 5.0
                break
        return done

    def revoke(self, role: str) -> None:
        """Delete every login of the order (disconnecting them), its role; clear the access."""
        ctl, accounts = self._ctl, self._accounts
        assert ctl is not None and accounts is not None
        access = self.index.get(role)
        if access is None:
            self.due.pop(role, None)
            return
        accounts.revoke_customer(access)
        ctl.publish(topics.access_topic(access.shop, access.order), b"", retain=True)
        del self.index[role]
        self.due.pop(role, None)
        if self.by_customer.get(access.customer) == role:
            del self.by_customer[access.customer]
        self.revoked += 1
        log.info("customer access revoked", shop=access.shop, order=access.order)

    # --- devices --------------------------------------------------------------------------------

    def _on_device_request(self, msg: Received) -> None:
        ctl, accounts = self._ctl, self._accounts
        assert ctl is not None and accounts is not None
        try:
            customer = topics.parse_device_request(msg.topic)
        except TopicError as exc:
            log.info("ignoring device request", topic=msg.topic[:200], reason=str(exc)[:200])
            return
        role = self.by_customer.get(customer)
        access = self.index.get(role) if role else None
        if access is None:
            return  # revoked while the request was in flight
        try:
            obj = json.loads(msg.payload)
            request = str(obj["id"]) if isinstance(obj, dict) else ""
            ev.DeviceLogin(request=request)
        except (ValueError, KeyError, TypeError):
            log.info("ignoring malformed device request", customer=customer)
            return
        if role in self.due:
            answer = ev.DeviceLogin(request=request, error="the order is closed; no new devices")
        elif len(access.usernames) >= self.max_devices:
            answer = ev.DeviceLogin(
                request=request, error=f"this order already has {self.max_devices} logins"
            )
        else:
            login = accounts.add_device(access)
            answer = ev.DeviceLogin(request=request, username=login.username, password=login.password)
            self.devices += 1
            log.info("customer device enrolled", order=access.order, devices=len(access.usernames))
        payload = ev.encode(ev.DeviceLoginEvent(source=SOURCE, data=answer))
        ctl.publish(topics.device_reply_topic(customer), payload)

    # --- the store ------------------------------------------------------------------------------

    def _store(self) -> sa.Engine | None:
        if not self.use_store or not self.settings.database_url:
            return None
        if self._engine is None:
            from bloomwire.store import make_engine

            self._engine = make_engine(self.settings.database_url, readonly=True)
        return self._engine

    def _customer_of(self, order: str) -> str | None:
        engine = self._store()
        if engine is None:
            return None
        from bloomwire.store.models import ORDERS

        try:
            with engine.connect() as conn:
                value = conn.execute(
                    sa.select(ORDERS.c.customer_username).where(ORDERS.c.id == order)
                ).scalar()
        except sa.exc.SQLAlchemyError as exc:
            log.debug("store not readable", error=str(exc)[:200])
            return None
        return str(value) if value else None

    def reconcile(self) -> None:
        """Compare with the store: mint for open orders, date revocations of closed/unknown ones."""
        engine = self._store()
        if engine is None:
            return
        from bloomwire.store.models import ORDERS

        closed = [s.value for s in CLOSED]
        now = self.clock()
        cols = (ORDERS.c.id, ORDERS.c.shop, ORDERS.c.status, ORDERS.c.customer_username, ORDERS.c.closed_at)
        try:
            with engine.connect() as conn:
                open_rows = conn.execute(sa.select(*cols).where(ORDERS.c.status.not_in(closed))).all()
                known: dict[str, Any] = {}
                ids = [a.order for a in self.index.values()]
                for i in range(0, len(ids), STORE_CHUNK):
                    part = ids[i : i + STORE_CHUNK]
                    for row in conn.execute(sa.select(*cols).where(ORDERS.c.id.in_(part))):
                        known[row.id] = row
        except sa.exc.SQLAlchemyError as exc:
            log.debug("store not readable yet", error=str(exc)[:200])
            return
        queued = {(shop, order) for shop, order, _ in self._catch_up}
        for row in open_rows:
            role = policy.role_name(policy.Kind.CUSTOMER, row.shop, row.id)
            if role not in self.index and (row.shop, row.id) not in queued:
                self._catch_up.append((row.shop, row.id, row.customer_username))
        for role, access in list(self.index.items()):
            found = known.get(access.order)
            if found is None or found.shop != access.shop:
                self.schedule(role, now + self.grace_s)  # no such order: an orphan
            elif found.status in closed:
                at = _utc(found.closed_at).timestamp() if found.closed_at is not None else now
                self.schedule(role, at + self.grace_s)


def build(settings: Settings, *, metrics: ServiceMetrics | None = None) -> Provisioner:
    """The provisioner service for ``bloomwire service run provisioner``."""
    provisioner = Provisioner(
        settings,
        grace_s=settings.customer_access_grace_s,
        max_devices=settings.customer_max_devices,
    )
    if metrics is not None:
        metrics.registry.register(FiguresCollector(provisioner.figures))
        metrics.watch(queued=provisioner._inbox.qsize, oldest=lambda: None, ready=provisioner.ready.is_set)
    return provisioner


__all__ = ["NAME", "Provisioner", "build"]
