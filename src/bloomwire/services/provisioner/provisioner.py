"""The provisioner's decisions: which order gets a customer access, which device a login, and
when an access is revoked.

One :class:`Provisioner` per running service, over the plugin (:class:`AsyncAccounts`), a
publish function, APScheduler (one job per revocation date) and, if there is one, the store
(read-only). Its index of order roles and logins is read back from the plugin at start. Every
change runs under one lock, so handlers and scheduled jobs never interleave halfway.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy.exc import SQLAlchemyError

from bloomwire.access import policy
from bloomwire.access.accounts import AsyncAccounts, OrderAccess
from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.contract.lifecycle import CLOSED, OrderStatus
from bloomwire.errors import BloomwireError
from bloomwire.runtime.log import get_logger
from bloomwire.services.provisioner.orders import OrderReader, Orders

log = get_logger("bloomwire.provisioner")

NAME = policy.PROVISIONER
SOURCE = f"{topics.SERVICES}/{NAME}"
#: How long a customer keeps access after the order closes (see the delivered status, chat).
DEFAULT_GRACE_S = 3600.0
#: Logins per order: the first (enrolment) one plus the devices it enrolled.
DEFAULT_MAX_DEVICES = 5
DEFAULT_RECONCILE_S = 60.0
#: A revocation that failed (broker busy or gone) is tried again this much later.
RETRY_S = 5.0

#: ``publish(topic, payload, retain)``
Publish = Callable[[str, bytes, bool], None]


@dataclass(frozen=True, slots=True)
class ProvisionerConfig:
    """Tuning of the provisioner."""

    grace_s: float = DEFAULT_GRACE_S
    max_devices: int = DEFAULT_MAX_DEVICES
    reconcile_s: float = DEFAULT_RECONCILE_S
    #: False: never read the store (no reconciliation, customer ids by the default rule).
    use_store: bool = True


def role_of(shop: str, order: str) -> str:
    """The order role's name (``order/S/O``)."""
    return policy.role_name(policy.Kind.CUSTOMER, shop, order)


class Provisioner:
    """Mints, enrols and revokes customer access (see the module docstring)."""

    def __init__(
        self,
        config: ProvisionerConfig,
        accounts: AsyncAccounts,
        publish: Publish,
        endpoint: ev.BrokerEndpoint,
        scheduler: AsyncIOScheduler,
        orders: OrderReader | None = None,
    ) -> None:
        self.config = config
        self.accounts = accounts
        self.publish = publish
        self.endpoint = endpoint
        self.scheduler = scheduler
        self.orders = orders
        self.lock = asyncio.Lock()
        self.minted = 0
        self.revoked = 0
        self.devices = 0
        #: Order role -> its access (role, logins), as the plugin has them.
        self.index: dict[str, OrderAccess] = {}
        #: Customer id -> order role.
        self.by_customer: dict[str, str] = {}
        #: Order role -> when (epoch s) its access is revoked.
        self.due: dict[str, float] = {}

    async def load(self) -> None:
        """Read every order role and its logins back from the plugin."""
        self.index = await self.accounts.order_accesses()
        self.by_customer = {a.customer: role for role, a in self.index.items()}

    # --- edge-triggered: canonical statuses, device requests ------------------------------------

    async def on_status(self, shop: str, order: str, status: OrderStatus, at: datetime) -> None:
        """An order's canonical status: mint its access while open, date the revocation once closed."""
        role = role_of(shop, order)
        async with self.lock:
            if status in CLOSED:
                if role in self.index:
                    self.schedule(role, at.timestamp() + self.config.grace_s)
            elif role not in self.index:
                await self.mint(shop, order)

    async def enrol(self, customer: str, request: str) -> None:
        """A device of ``customer`` asks for a login of its own: answer on its inbox."""
        async with self.lock:
            role = self.by_customer.get(customer)
            access = self.index.get(role) if role else None
            if access is None:
                log.debug("device request of no open access", customer=customer)
                return  # revoked while the request was in flight
            if role in self.due:
                answer = ev.DeviceLogin(request=request, error="the order is closed; no new devices")
            elif len(access.usernames) >= self.config.max_devices:
                error = f"this order already has {self.config.max_devices} logins"
                answer = ev.DeviceLogin(request=request, error=error)
            else:
                login = await self.accounts.add_customer_device(access)
                answer = ev.DeviceLogin(request=request, username=login.username, password=login.password)
                self.devices += 1
                log.info("customer device enrolled", order=access.order, devices=len(access.usernames))
            event = ev.DeviceLoginEvent(source=SOURCE, data=answer)
            self.publish(topics.device_reply_topic(customer), ev.encode(event), False)

    # --- minting and revoking -------------------------------------------------------------------

    async def mint(self, shop: str, order: str, customer: str | None = None) -> OrderAccess | None:
        """Create the order's access (unless it has one) and publish it for the shop (hold the lock)."""
        role = role_of(shop, order)
        if role in self.index:
            return None
        customer = customer or await self._customer_of(order) or policy.customer_id(order)
        access, login = await self.accounts.mint_customer(shop, order, customer)
        self.index[role] = access
        self.by_customer[access.customer] = role
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
            max_devices=self.config.max_devices,
            broker=self.endpoint,
        )
        event = ev.CustomerAccessGrantedEvent(source=SOURCE, data=data)
        self.publish(topics.access_topic(shop, order), ev.encode(event), True)
        self.minted += 1
        log.info("customer access minted", shop=shop, order=order, customer=access.customer)
        return access

    def schedule(self, role: str, at: float) -> None:
        """Revoke ``role`` at ``at`` (epoch s; the earliest date asked for wins)."""
        if role in self.due and self.due[role] <= at:
            return
        self.due[role] = at
        self.scheduler.add_job(
            self.revoke_due,
            "date",
            run_date=datetime.fromtimestamp(at, UTC),
            args=(role,),
            id=f"revoke:{role}",
            replace_existing=True,
            misfire_grace_time=None,  # a date already past (a late start) runs at once
        )

    async def revoke_due(self, role: str) -> None:
        """The scheduled revocation of ``role``; a failed one is tried again :data:`RETRY_S` later."""
        async with self.lock:
            if role not in self.due:
                return
            try:
                await self.revoke(role)
            except BloomwireError as exc:
                log.warning("revoke failed; retrying", role=role, error=str(exc), retry_s=RETRY_S)
                self.due.pop(role, None)
                self.schedule(role, datetime.now(UTC).timestamp() + RETRY_S)

    async def revoke(self, role: str) -> None:
        """Delete every login of the order (disconnecting them), its role; clear the access."""
        access = self.index.get(role)
        if access is None:
            self.due.pop(role, None)
            return
        await self.accounts.revoke_customer(access)
        self.publish(topics.access_topic(access.shop, access.order), b"", True)
        del self.index[role]
        self.due.pop(role, None)
        if self.by_customer.get(access.customer) == role:
            del self.by_customer[access.customer]
        self.revoked += 1
        log.info("customer access revoked", shop=access.shop, order=access.order)

    # --- level-triggered: the store -------------------------------------------------------------

    async def _customer_of(self, order: str) -> str | None:
        if self.orders is None:
            return None
        try:
            return await asyncio.to_thread(self.orders.customer_of, order)
        except SQLAlchemyError as exc:
            log.debug("store not readable", error=str(exc)[:200])
            return None

    async def reconcile(self) -> None:
        """Compare with the store: date the revocations of closed and unknown orders, then mint
        for open orders without access, one at a time (handlers go on in between)."""
        if self.orders is None:
            return
        try:
            seen = await asyncio.to_thread(self.orders.read, [a.order for a in self.index.values()])
        except SQLAlchemyError as exc:
            log.debug("store not readable yet", error=str(exc)[:200])
            return
        async with self.lock:
            self._date_revocations(seen)
        for row in seen.open:
            async with self.lock:
                if role_of(row.shop, row.id) in self.index:
                    continue
                try:
                    await self.mint(row.shop, row.id, row.customer)
                except BloomwireError as exc:
                    log.warning("catch-up mint failed; next round", order=row.id, error=str(exc))
                    return

    def _date_revocations(self, seen: Orders) -> None:
        now = datetime.now(UTC).timestamp()
        for role, access in list(self.index.items()):
            found = seen.known.get(access.order)
            if found is None or found.shop != access.shop:
                self.schedule(role, now + self.config.grace_s)  # no such order: an orphan
            elif found.closed:
                at = found.closed_at.timestamp() if found.closed_at is not None else now
                self.schedule(role, at + self.config.grace_s)


__all__ = ["NAME", "Provisioner", "ProvisionerConfig", "role_of"]
