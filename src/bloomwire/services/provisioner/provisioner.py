"""The provisioner's decisions: which order gets a customer access, which device a login, and
when an access is revoked.

One :class:`Provisioner` per running service, over the plugin (:class:`AsyncAccounts`), a
publish function, APScheduler (one job per revocation date) and, if there is one, the store
(read-only). Its index of order roles and logins is read back from the plugin at start. Every
change runs under one lock, so handlers and scheduled jobs never interleave halfway.

Orders wanting an access wait in a :class:`~bloomwire.services.provisioner.minting.MintQueue`;
one task (:meth:`Provisioner.mint_loop`) mints them a batch per control message, checks every
order's answer on its own, tries a failed one again and gives it up after its tries (its
status message dead-lettered; the reconciliation catches up later).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy.exc import SQLAlchemyError

from bloomwire.access import policy
from bloomwire.access.accounts import AsyncAccounts, Minted, MintRequest, OrderAccess
from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.contract.lifecycle import CLOSED, OrderStatus
from bloomwire.errors import BloomwireError
from bloomwire.runtime.log import get_logger
from bloomwire.runtime.mqtt import Message
from bloomwire.services.provisioner.minting import (
    DEFAULT_MINT_ATTEMPTS,
    DEFAULT_MINT_BATCH,
    DEFAULT_MINT_BUDGET_S,
    MintQueue,
    Wanted,
)
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
#: ``dead_letter(message, reason)``: a status message whose order could not get its access.
DeadLetter = Callable[[Message, str], None]


@dataclass(frozen=True, slots=True)
class ProvisionerConfig:
    """Tuning of the provisioner."""

    grace_s: float = DEFAULT_GRACE_S
    max_devices: int = DEFAULT_MAX_DEVICES
    reconcile_s: float = DEFAULT_RECONCILE_S
    #: False: never read the store (no reconciliation, customer ids by the default rule).
    use_store: bool = True
    #: Orders per control message at most, and the broker time one message may take.
    mint_batch: int = DEFAULT_MINT_BATCH
    mint_budget_s: float = DEFAULT_MINT_BUDGET_S
    mint_attempts: int = DEFAULT_MINT_ATTEMPTS


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
        dead_letter: DeadLetter | None = None,
    ) -> None:
        self.config = config
        self.dead_letter = dead_letter
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
        self.queue = MintQueue(config.mint_batch, config.mint_budget_s, config.mint_attempts)
        self.wake = asyncio.Event()
        self.minter: asyncio.Task[None] | None = None
        self.batches = 0
        self.given_up = 0

    async def load(self) -> None:
        """Read every order role and its logins back from the plugin."""
        self.index = await self.accounts.order_accesses()
        self.by_customer = {a.customer: role for role, a in self.index.items()}

    # --- edge-triggered: canonical statuses, device requests ------------------------------------

    async def on_status(
        self, shop: str, order: str, status: OrderStatus, at: datetime, source: Message | None = None
    ) -> None:
        """An order's canonical status: queue its access while open, date the revocation once closed."""
        role = role_of(shop, order)
        async with self.lock:
            if status in CLOSED:
                if role in self.index:
                    self.schedule(role, at.timestamp() + self.config.grace_s)
                elif (waiting := self.queue.get(role)) is not None:
                    waiting.closed_at = at.timestamp()
            elif role not in self.index:
                self.want(Wanted(shop, order, source=source))

    def want(self, wanted: Wanted) -> None:
        """Queue an order for its access (the mint loop sends it in the next batch)."""
        if self.queue.add(role_of(wanted.shop, wanted.order), wanted):
            self.wake.set()

    async def enrol(self, customer: str, request: str) -> None:
        """A device of ``customer`` asks for a login of its own: answer on its inbox."""
        async with self.lock:
            role = self.by_customer.get(customer)
            access = self.index.get(role) if role else None
            if access is None:
                log.debug("device request of no open access", customer=customer)
                return  # revoked while the request was in flight
            # A closed order's link still works until its grace ends (a recipient often opens it
            # first after the delivery, for the photo and the rating): its devices go with it.
            if len(access.usernames) >= self.config.max_devices:
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

    def _granted(self, access: OrderAccess, username: str, password: str) -> None:
        """Index a new access and publish it, retained, for the shop."""
        self.index[access.role] = access
        self.by_customer[access.customer] = access.role
        data = ev.CustomerAccess(
            shop=access.shop,
            order=access.order,
            customer=access.customer,
            username=username,
            password=password,
            topics=[
                *(topics.order_topic(access.shop, access.order, ch) for ch in topics.CUSTOMER_CHANNELS),
                topics.customer_inbox_filter(access.customer),
            ],
            enrol_topic=topics.device_request_topic(access.customer),
            reply_topic=topics.device_reply_topic(access.customer),
            max_devices=self.config.max_devices,
            broker=self.endpoint,
        )
        event = ev.CustomerAccessGrantedEvent(source=SOURCE, data=data)
        self.publish(topics.access_topic(access.shop, access.order), ev.encode(event), True)
        self.minted += 1
        log.info("customer access minted", shop=access.shop, order=access.order, customer=access.customer)

    # --- the mint loop: queued orders, a batch per control message ------------------------------

    def start_minting(self) -> None:
        """Start the mint loop (on the running event loop)."""
        self.minter = asyncio.create_task(self.mint_loop(), name="provisioner-mint")

    async def stop_minting(self) -> None:
        """Stop the mint loop; what still waits is minted by the next start's reconciliation."""
        if self.minter is None:
            return
        self.minter.cancel()
        await asyncio.gather(self.minter, return_exceptions=True)
        self.minter = None

    async def mint_loop(self) -> None:
        """Mint what waits, a batch at a time, until cancelled (the service's shutdown)."""
        while True:
            await self.wake.wait()
            self.wake.clear()
            while len(self.queue):
                try:
                    ok = await self.mint_batch()
                except Exception:  # a bug must not end the loop: nothing would be minted again
                    log.exception("mint batch crashed; going on")
                    ok = False
                if not ok:
                    await asyncio.sleep(RETRY_S)  # the broker is busy or gone: let it be

    async def mint_batch(self) -> bool:
        """Mint the next batch; False if the control message itself failed (all tried again)."""
        batch = self.queue.take()
        await self._fill_customers(batch)
        async with self.lock:
            batch = [(role, w) for role, w in batch if role not in self.index]
            requests = [MintRequest(w.shop, w.order, w.customer) for _, w in batch]
            started = time.perf_counter()
            try:
                results = await self.accounts.mint_customers(requests)
            except BloomwireError as exc:
                log.warning("mint batch failed; retrying", orders=len(batch), error=str(exc))
                self._failed(batch, str(exc))
                return False
            self.queue.measured(len(batch), time.perf_counter() - started)
            self.batches += 1
            for (role, wanted), result in zip(batch, results, strict=True):
                self._minted(role, wanted, result)
        return True

    def _minted(self, role: str, wanted: Wanted, result: Minted) -> None:
        if result.access is None or result.login is None:
            log.warning("mint failed", order=wanted.order, error=result.error, attempts=wanted.attempts + 1)
            self._failed([(role, wanted)], result.error or "no access")
            return
        self._granted(result.access, result.login.username, result.login.password)
        if wanted.closed_at is not None:
            self.schedule(role, wanted.closed_at + self.config.grace_s)

    def _failed(self, batch: list[tuple[str, Wanted]], reason: str) -> None:
        """Queue each order again, or give it up after its tries."""
        for role, wanted in batch:
            if self.queue.retry(role, wanted):
                continue
            self.given_up += 1
            log.warning("customer access given up", order=wanted.order, reason=reason)
            if wanted.source is not None and self.dead_letter is not None:
                self.dead_letter(wanted.source, f"no customer access for order {wanted.order}: {reason}")

    async def _fill_customers(self, batch: list[tuple[str, Wanted]]) -> None:
        """The store's customer ids for the orders that came without one."""
        unknown = [w.order for _, w in batch if w.customer is None]
        if not unknown or self.orders is None:
            return
        try:
            found = await asyncio.to_thread(self.orders.customers_of, unknown)
        except SQLAlchemyError as exc:
            log.debug("store not readable", error=str(exc)[:200])
            return
        for _, wanted in batch:
            if wanted.customer is None:
                wanted.customer = found.get(wanted.order)

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

    async def reconcile(self) -> None:
        """Compare with the store: date the revocations of closed and unknown orders, queue the
        open orders without access for the mint loop."""
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
                if role_of(row.shop, row.id) not in self.index:
                    self.want(Wanted(row.shop, row.id, row.customer))

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
