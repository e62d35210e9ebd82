"""The simulated people: riders, shop staff and customers, each driving the REAL client code.

A :class:`SimRider` is a person on a bike or scooter holding a phone that runs
:class:`~bloomwire.app.clients.rider.RiderDevice`; a :class:`SimShop` is the person at
:class:`~bloomwire.app.clients.shop.ShopTerminal`; a :class:`SimCustomer` follows their order in
:class:`~bloomwire.app.clients.track.CustomerTracker`. They only meet in the physical world
(:class:`World`: the bouquet is handed over at the counter once it is ready, unless the order was
cancelled); everything else goes over MQTT.
"""

from __future__ import annotations

import asyncio
import random
import time
import zlib
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from bloomwire.app.clients.access import CustomerAccess, ProvisionedAccess
from bloomwire.app.clients.base import ClientError, wait_event
from bloomwire.app.clients.outbox import LOCATION, Entry, Outbox
from bloomwire.app.clients.rider import MAX_VEL_KMH, RiderDevice, needs_confirmation, sample_photo
from bloomwire.app.clients.shop import OrderDraft, ShopTerminal
from bloomwire.app.clients.track import CustomerTracker
from bloomwire.app.simulate import amends
from bloomwire.app.simulate.clock import SimClock
from bloomwire.app.simulate.metrics import Metrics
from bloomwire.app.simulate.plan import DayPlan, Fate, OrderPlan, RiderPlan, ShopSite
from bloomwire.contract import events as ev
from bloomwire.contract import geo
from bloomwire.contract.lifecycle import OUT_FOR_DELIVERY, TERMINAL, FailureReason, OrderStatus
from bloomwire.errors import BloomwireError
from bloomwire.runtime.aio import cancel_and_wait
from bloomwire.runtime.log import get_logger
from bloomwire.runtime.settings import Settings

log = get_logger("bloomwire.app.simulate")

S = OrderStatus
AssignMode = Literal["dispatch", "shop"]
TERMINAL_VALUES = frozenset(s.value for s in TERMINAL)
OUT_VALUES = frozenset(s.value for s in OUT_FOR_DELIVERY)
UNASSIGNED_VALUES = frozenset({S.CREATED.value, S.DECLINED.value})


@dataclass
class SimConfig:
    """How a run behaves in real time."""

    #: Real minutes the simulated day is squeezed into (deliveries may run a little over).
    minutes: float = 2.0
    #: Who assigns riders: the dispatch service, or the shop by hand (``assign`` command).
    assign: AssignMode = "shop"
    #: Real seconds between a rider's positions.
    position_interval_s: float = 0.5
    #: With dispatch: the shop assigns by hand when no rider took an order for this long (real s).
    shop_steps_in_s: float = 20.0
    #: Real seconds the shop waits for a rider to answer its manual offer before asking another.
    offer_patience_s: float = 8.0
    #: Extra real seconds allowed after ``minutes`` for the last deliveries.
    drain_grace_s: float = 30.0
    #: The simulated day starts at this local time of day.
    day_start: str = "10:00"
    #: Where the riders' outboxes live.
    outbox_dir: Path = field(default_factory=lambda: Path("var/sim/outboxes"))
    #: Seconds each client may take to connect.
    connect_timeout_s: float = 20.0
    #: The broker runs with access control: customers get their login from the provisioner.
    access_control: bool = False


@dataclass
class Job:
    """An order a rider accepted."""

    order: OrderPlan
    picked: bool = False


class World:
    """The physical world the simulated people share: time, the counters of the shops, the plan."""

    def __init__(
        self,
        plan: DayPlan,
        clock: SimClock,
        metrics: Metrics,
        config: SimConfig,
        settings: Settings,
        provision: Callable[[str], str],
    ) -> None:
        self.plan = plan
        self.clock = clock
        self.metrics = metrics
        self.config = config
        self.settings = settings
        self.provision = provision
        self.orders = {o.id: o for o in plan.orders}
        self.cancelled: dict[str, asyncio.Event] = {o.id: asyncio.Event() for o in plan.orders}
        self.declined_once: set[str] = set()
        self.declined_by: dict[str, set[str]] = defaultdict(set)
        #: order -> rider the shop offered it to by hand and is waiting on.
        self.reservations: dict[str, str] = {}
        self.riders: dict[str, SimRider] = {}
        self.shops: dict[str, SimShop] = {}
        self.customers: list[SimCustomer] = []
        self.stopping = asyncio.Event()

    def note(self, text: str) -> None:
        """A line in the activity feed, stamped with the simulated time."""
        self.metrics.note(f"{self.clock.label()} {text}")

    async def handover(self, order: OrderPlan) -> bool:
        """Wait at the counter until the bouquet is ready; False if the order was cancelled."""
        cancelled = self.cancelled[order.id]
        if order.fate is Fate.CANCELLED:
            # Its bouquet is never handed over: the shop cancels the order first.
            await wait_event(cancelled, 30.0)
            return False
        left = self.clock.real_seconds(order.ready_min - self.clock.minutes())
        if left > 0:
            await wait_event(cancelled, left)
        return not cancelled.is_set()

    def pick_rider(self, order: OrderPlan, exclude: set[str]) -> str | None:
        """The nearest rider to the shop with a free slot (what a shop manager would choose)."""
        shop = self.plan.shop(order.shop)
        reserved: dict[str, int] = defaultdict(int)
        for rider_id in self.reservations.values():
            reserved[rider_id] += 1
        best: tuple[float, str] | None = None
        for rider in self.riders.values():
            if rider.id in exclude or not rider.app_up.is_set():
                continue
            if rider.load() + reserved[rider.id] >= rider.plan.capacity:
                continue
            d = geo.distance_m(rider.lat, rider.lon, shop.lat, shop.lon) + 1500 * rider.load()
            if best is None or d < best[0]:
                best = (d, rider.id)
        return best[1] if best else None


# --- riders ---------------------------------------------------------------------------------------

Hook = Callable[[float], Awaitable[None]]


class SimRider:
    """A rider on a bike or scooter with the rider app on their phone."""

    def __init__(self, world: World, plan: RiderPlan) -> None:
        self.world = world
        self.plan = plan
        self.id = plan.id
        self.lat, self.lon = plan.lat, plan.lon
        self.moving = False
        self.jobs: list[Job] = []
        self.pending_accepts: dict[str, OrderPlan] = {}
        self.lost_orders: set[str] = set()
        self.rng = random.Random(f"{world.plan.seed}:{plan.id}")
        self.device: RiderDevice | None = None
        self.app_up = asyncio.Event()
        self.wake = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.crashes = 0
        self.password = world.provision(plan.id)
        self.outbox_path = world.config.outbox_dir / f"{plan.id}.db"

    def load(self) -> int:
        """Orders the rider holds or has just accepted."""
        return len(self.jobs) + len(self.pending_accepts)

    # --- the phone ------------------------------------------------------------------------------

    def _new_device(self) -> RiderDevice:
        return RiderDevice(
            self.world.settings,
            self.id,
            self.password,
            Outbox(self.outbox_path),
            listener=self,
            observer=self.world.metrics,
        )

    async def start(self) -> None:
        """Switch the phone on."""
        self.outbox_path.parent.mkdir(parents=True, exist_ok=True)
        device = self._new_device()
        try:
            await device.start(self.world.config.connect_timeout_s)
        except BaseException:
            device.outbox.close()
            raise
        self.device = device
        self.app_up.set()

    def run(self) -> None:
        """Start riding (brain and position tasks)."""
        self.tasks = [
            asyncio.create_task(self._brain(), name=f"rider-{self.id}"),
            asyncio.create_task(self._positions(), name=f"positions-{self.id}"),
        ]

    async def stop(self) -> None:
        """End of shift: stop riding, switch the app off cleanly."""
        await cancel_and_wait(*self.tasks)
        self.tasks.clear()
        device, self.device = self.device, None
        self.app_up.clear()
        if device is not None:
            await device.stop()
            device.outbox.close()

    def _crash(self, down_min: float) -> None:
        """The app dies (no clean disconnect: the broker publishes the Last Will); the rider rides on."""
        device, self.device = self.device, None
        self.app_up.clear()
        if device is None:
            return
        self.crashes += 1
        self.world.metrics.counters["rider apps died"] += 1
        self.world.note(f"{self.id}'s phone died")
        self.tasks.append(
            asyncio.create_task(self._restart_after(device, down_min), name=f"restart-{self.id}")
        )

    async def _restart_after(self, dead: RiderDevice, down_min: float) -> None:
        try:
            await dead.crash()
        finally:
            dead.outbox.close()
        await self.world.clock.sleep(down_min, min_real=1.0, max_real=8.0)
        while not self.world.stopping.is_set():
            device = self._new_device()
            waiting = device.outbox.count(records_only=True)
            try:
                await device.start(self.world.config.connect_timeout_s)
            except BloomwireError as exc:
                device.outbox.close()
                log.warning("rider app could not reconnect; retrying", rider=self.id, error=str(exc))
                await asyncio.sleep(1.0)
                continue
            except BaseException:
                device.outbox.close()
                raise
            self.device = device
            self.app_up.set()
            self.world.note(f"{self.id}'s app is back; {waiting} unacked event(s) sent again")
            return

    async def _app(self) -> RiderDevice:
        """The running app (waits while the phone is dead)."""
        while True:
            await self.app_up.wait()
            if self.device is not None:
                return self.device
            await asyncio.sleep(0.05)

    # --- listener (called by the device) -------------------------------------------------------

    def offer(self, offer: ev.DispatchOfferedEvent) -> None:
        """An offer on the phone: answer it after a moment's thought."""
        self.tasks.append(asyncio.create_task(self._answer(offer)))

    def chat(self, chat: ev.OrderChatPostedEvent) -> None:
        """A chat line: the rider answers customers briefly."""
        if chat.data.author.startswith("customer:") and chat.data.order:
            self.tasks.append(asyncio.create_task(self._reply_chat(chat.data.order)))

    def amendment(self, amendment: ev.OrderAmendedEvent) -> None:
        """A change to one of its orders: the rider confirms a new door or new instructions."""
        if self.device is not None and needs_confirmation(amendment):
            self.device.confirm(amendment.data.order, amendment.id)

    def stored(self, entries: Sequence[Entry]) -> None:
        """Acks: an accepted offer is a job now."""
        for e in entries:
            order = self.pending_accepts.pop(e.id, None)
            if order is not None:
                self.jobs.append(Job(order))
                self.wake.set()

    def refused(self, entry: Entry | None, refusal: ev.Refusal) -> None:
        """A refusal: a lost offer or an order no longer ours."""
        if entry is None or entry.kind == LOCATION:
            return
        self.world.metrics.counters["rider events refused"] += 1
        self.pending_accepts.pop(entry.id, None)
        if entry.kind == "status":
            order = entry.topic.split("/")[3]
            self.lost_orders.add(order)
            self.jobs = [j for j in self.jobs if j.order.id != order or j.picked]
        log.info("rider event refused", rider=self.id, kind=entry.kind, reason=refusal.reason)

    async def _answer(self, offer: ev.DispatchOfferedEvent) -> None:
        await asyncio.sleep(self.rng.uniform(0.1, 0.4))
        device = self.device
        d = offer.data
        if device is None or d.deadline <= ev.now():
            return
        self.world.metrics.counters["offers received"] += 1
        order = self.world.orders.get(d.order)
        if order is None:
            device.reply(d.offer, False, order=d.order, reason="not an order I know of")
            return
        first_decline = order.decline_first and order.id not in self.world.declined_once
        if first_decline or self.load() >= self.plan.capacity:
            self.world.declined_once.add(order.id)
            self.world.declined_by[order.id].add(self.id)
            reason = "On my break for ten minutes" if first_decline else "Full, sorry"
            device.reply(d.offer, False, order=d.order, reason=reason)
            self.world.metrics.counters["offers declined"] += 1
            self.world.note(f"{self.id} declined {order.id} ({reason})")
            return
        event_id = device.reply(d.offer, True, order=d.order)
        self.pending_accepts[event_id] = order

    async def _reply_chat(self, order: str) -> None:
        await asyncio.sleep(self.rng.uniform(0.2, 0.6))
        device = self.device
        if device is not None and any(j.order.id == order for j in self.jobs):
            device.chat(order, "Got it, thanks — see you in a few minutes!")

    # --- moving -----------------------------------------------------------------------------------

    async def _positions(self) -> None:
        clock = self.world.clock
        while True:
            device = self.device
            if device is not None and self.app_up.is_set():
                # ``vel`` is the apparent speed on the real clock, the one the backbone's ETAs run
                # on (simulated speed x compression, capped at the payload model's limit).
                vel = min(self.plan.speed_kmh * clock.speed, MAX_VEL_KMH) if self.moving else 0.0
                batt = max(5, int(100 - clock.minutes() * 0.12))
                device.position(self.lat, self.lon, vel=vel, batt=batt)
            await asyncio.sleep(self.world.config.position_interval_s)

    async def _ride(self, lat: float, lon: float, hooks: Sequence[tuple[float, Hook]] = ()) -> None:
        """Ride to (lat, lon) at the rider's speed (road factor included); run hooks on the way."""
        clock = self.world.clock
        start = (self.lat, self.lon)
        road_m = geo.distance_m(start[0], start[1], lat, lon) * geo.DEFAULT_ROAD_FACTOR
        total_min = road_m / (self.plan.speed_kmh / 3.6) / 60.0
        todo = sorted(hooks, key=lambda h: h[0])
        done_min = 0.0
        self.moving = True
        try:
            while done_min < total_min:
                step_started = clock.minutes()
                await asyncio.sleep(0.1)
                done_min += clock.minutes() - step_started
                f = min(1.0, done_min / total_min) if total_min > 0 else 1.0
                self.lat = start[0] + (lat - start[0]) * f
                self.lon = start[1] + (lon - start[1]) * f
                while todo and todo[0][0] <= f:
                    _, hook = todo.pop(0)
                    await hook(max(0.0, total_min - done_min))
            for _, hook in todo:
                await hook(0.0)
        finally:
            self.moving = False
        self.lat, self.lon = lat, lon

    # --- the working day ------------------------------------------------------------------------

    async def _brain(self) -> None:
        while True:
            if not self.jobs:
                self.wake.clear()
                await wait_event(self.wake, 1.0)
                continue
            shop = self.world.plan.shop(self.jobs[0].order.shop)
            await self._ride(shop.lat, shop.lon)
            batch = await self._collect(shop)
            if batch:
                await self._deliver_batch(batch)

    async def _collect(self, shop: ShopSite) -> list[Job]:
        """At the counter: pick up every accepted order of this shop once it is ready."""
        batch: list[Job] = []
        while True:
            waiting = [j for j in self.jobs if j.order.shop == shop.id and not j.picked and j not in batch]
            if not waiting:
                break
            for job in waiting:
                ready = await self.world.handover(job.order)
                if not ready:
                    if job in self.jobs:
                        self.jobs.remove(job)
                    self.world.note(f"{self.id}: {job.order.id} was cancelled, nothing to pick up")
                    continue
                device = await self._app()
                items = len(job.order.items)
                device.status(job.order.id, S.PICKED_UP, note=f"{items} item(s) from {shop.name}")
                job.picked = True
                batch.append(job)
        if batch:
            await self.world.clock.sleep(self.rng.uniform(2, 4))
        return batch

    async def _deliver_batch(self, batch: list[Job]) -> None:
        returns: list[Job] = []
        remaining = list(batch)
        while remaining:
            job = min(remaining, key=lambda j: geo.distance_m(self.lat, self.lon, j.order.lat, j.order.lon))
            remaining.remove(job)
            if job.order.id not in self.lost_orders and await self._deliver(job.order):
                returns.append(job)
            if job in self.jobs:
                self.jobs.remove(job)
        for shop_id in dict.fromkeys(j.order.shop for j in returns):
            shop = self.world.plan.shop(shop_id)
            await self._ride(shop.lat, shop.lon)
            for job in (j for j in returns if j.order.shop == shop_id):
                device = await self._app()
                device.status(job.order.id, S.RETURNED, note=f"Flowers back at {shop.name}")

    async def _deliver(self, order: OrderPlan) -> bool:
        """Ride to the customer and hand over (or fail); True if the bouquet goes back."""
        clock, world = self.world.clock, self.world
        device = await self._app()
        km = geo.distance_m(self.lat, self.lon, order.lat, order.lon) * geo.DEFAULT_ROAD_FACTOR / 1000
        device.status(order.id, S.EN_ROUTE, note=f"{km:.1f} km to go")
        hooks: list[tuple[float, Hook]] = []
        if order.flat_tyre_delay_min is not None:
            delay = order.flat_tyre_delay_min

            async def flat_tyre(remaining_min: float) -> None:
                eta = clock.real_at(clock.minutes() + delay + remaining_min + 1)
                dev = await self._app()
                dev.incident(
                    order.id, "flat_tyre", eta=eta, note=f"Flat tyre, fixing it: about {delay:.0f} min"
                )
                world.metrics.counters["flat tyres"] += 1
                world.note(f"{self.id}: flat tyre on the way to {order.id} (+{delay:.0f} min)")
                await clock.sleep(delay)

            hooks.append((order.incident_at, flat_tyre))
        if order.app_dies_down_min is not None:
            down = order.app_dies_down_min

            async def app_dies(remaining_min: float) -> None:
                dev = self.device
                if dev is None:
                    return
                dev.chat(order.id, "Battery at 2 %, phone may die; still on my way.")
                self._crash(down)

            hooks.append((max(0.05, order.incident_at - 0.2), app_dies))
        await self._ride(order.lat, order.lon, hooks)
        device = await self._app()
        device.status(order.id, S.ARRIVED)
        first_name = order.customer.split()[0]
        if order.fate is Fate.UNREACHABLE:
            await clock.sleep(4)
            device = await self._app()
            device.chat(order.id, "I'm at the door: nobody answers, and I've called twice.")
            await clock.sleep(4)
            device = await self._app()
            device.status(
                order.id,
                S.FAILED,
                reason=FailureReason.CUSTOMER_UNREACHABLE,
                note="No answer at the door or on the phone",
            )
            world.note(f"{self.id}: {order.id} failed, customer unreachable")
            return True
        if order.fate is Fate.ADDRESS_WRONG:
            await clock.sleep(3)
            device = await self._app()
            device.chat(order.id, f"There is no {order.address} here; the house number does not exist.")
            device.status(order.id, S.FAILED, reason=FailureReason.ADDRESS_WRONG, note="Address not found")
            world.note(f"{self.id}: {order.id} failed, address wrong")
            return True
        await clock.sleep(self.rng.uniform(1, 3))
        device = await self._app()
        if zlib.crc32(order.id.encode()) % 2 == 0:  # every other delivery has a photo (issue 16)
            device.photo(order.id, sample_photo(order.id))
        device.status(order.id, S.DELIVERED, note=f"Handed to {first_name}")
        return False


# --- shops ----------------------------------------------------------------------------------------


class SimShop:
    """The person at a shop's terminal: takes orders, assigns (if asked to), cancels, chats."""

    def __init__(self, world: World, site: ShopSite) -> None:
        self.world = world
        self.site = site
        self.orders = [o for o in world.plan.orders if o.shop == site.id]
        self.terminal = ShopTerminal(
            world.settings,
            site.id,
            world.provision(site.id),
            observer=world.metrics,
            # With access control the provisioner issues each customer's login; without it the
            # simulator provisions the account itself.
            access=None if world.config.access_control else ProvisionedAccess(world.provision),
            access_wait_s=10.0,
            on_message=self._on_message,
        )
        self.rng = random.Random(f"{world.plan.seed}:{site.id}")
        self.tasks: list[asyncio.Task[None]] = []
        self.created: set[str] = set()
        self.creating_done = asyncio.Event()
        self._last_assign: dict[str, float] = {}
        self._unassigned_since: dict[str, tuple[str, float]] = {}
        self.manual_assignments = 0
        self._plans = {o.id: o for o in self.orders}
        self._scenes = amends.scenes(world.plan.orders)
        self._amended: set[str] = set()

    async def start(self) -> None:
        """Open the terminal."""
        await self.terminal.start(self.world.config.connect_timeout_s)

    def run(self) -> None:
        """Start taking orders (and assigning them)."""
        self.tasks = [
            asyncio.create_task(self._take_orders(), name=f"shop-{self.site.id}"),
            asyncio.create_task(self._assign_loop(), name=f"assign-{self.site.id}"),
        ]

    async def stop(self) -> None:
        """Close the terminal."""
        await cancel_and_wait(*self.tasks)
        self.tasks.clear()
        await self.terminal.stop()

    def status(self, order: str) -> str | None:
        """The order's status as the terminal shows it."""
        line = self.terminal.view.orders.get(order)
        return line.status if line is not None else None

    async def _take_orders(self) -> None:
        clock = self.world.clock
        try:
            for o in self.orders:
                await clock.until(o.created_min)
                draft = OrderDraft(
                    customer_name=o.customer,
                    lat=o.lat,
                    lon=o.lon,
                    window=ev.Window(
                        start=clock.real_at(o.window_start_min), end=clock.real_at(o.window_end_min)
                    ),
                    phone=o.phone,
                    address=o.address,
                    items=o.items,
                    note=o.note,
                    order=o.id,
                    pickup=(self.site.lat, self.site.lon),
                    language=o.language,
                )
                try:
                    created = await self.terminal.create_order(draft, timeout=15)
                except ClientError as exc:
                    self.world.note(f"{self.site.id}: {o.id} not confirmed: {exc}")
                    continue
                if not created.outcome.stored:
                    self.world.note(f"{self.site.id}: {o.id} refused: {created.outcome.reason}")
                    continue
                self.created.add(o.id)
                window = f"{clock.label(o.window_start_min)}–{clock.label(o.window_end_min)}"
                self.world.note(f"{self.site.id} took {o.id} for {o.customer}, promised {window}")
                if o.fate is Fate.CANCELLED:
                    self.tasks.append(asyncio.create_task(self._cancel_later(o)))
                self._maybe_amend(o, None)
                if o.customer_chat is not None and created.access is not None:
                    customer = SimCustomer(self.world, o, created.access)
                    self.world.customers.append(customer)
                    self.tasks.append(asyncio.create_task(customer.run(), name=f"customer-{o.id}"))
        finally:
            self.creating_done.set()

    def _on_message(self, topic: str, message: object) -> None:
        """The shop's feed: someone at the counter acknowledges each new alert of the shop; a
        status may be the moment a customer's change comes in."""
        if isinstance(message, ev.OrderStatusChangedEvent) and message.data.order in self._plans:
            self._maybe_amend(self._plans[message.data.order], message.data.status)
        if isinstance(message, ev.AlertRaisedEvent) and topic.endswith("/alerts") and "/orders/" not in topic:
            self.world.metrics.counters["alerts raised"] += 1
            self.world.note(f"{self.site.id} alert {message.data.rule.value}: {message.data.message}")
            self.tasks.append(asyncio.create_task(self._acknowledge(message.data.alert)))

    def _maybe_amend(self, order: OrderPlan, status: OrderStatus | None) -> None:
        """Change ``order`` now if this is its scene's moment (once)."""
        scene = self._scenes.get(order.id)
        if scene is None or amends.TRIGGER[scene] != status or order.id in self._amended:
            return
        self._amended.add(order.id)
        self.tasks.append(asyncio.create_task(self._amend(order, scene), name=f"amend-{order.id}"))

    async def _amend(self, order: OrderPlan, scene: amends.Scene) -> None:
        await asyncio.sleep(0.3)  # the phone call; no draw from the shop's random stream
        try:
            outcome = await self.terminal.amend(amends.draft_for(scene, order, self.world.clock), timeout=10)
        except ClientError as exc:
            self.world.note(f"{self.site.id}: changing {order.id} not confirmed: {exc}")
            return
        if outcome.stored:
            self.world.metrics.counters["orders amended"] += 1
            self.world.note(f"{self.site.id} changed {order.id} at the customer's request: {scene.value}")
        else:
            self.world.note(f"{self.site.id}: changing {order.id} refused: {outcome.reason}")

    async def _acknowledge(self, alert: str) -> None:
        await asyncio.sleep(self.rng.uniform(0.3, 1.0))
        line = self.terminal.view.alerts.get(alert)
        if line is None or line.status != "open":
            return  # resolved (or acknowledged) meanwhile
        try:
            outcome = await self.terminal.ack_alert(alert, by=f"staff at {self.site.name}", timeout=10)
        except ClientError:
            return
        if outcome.stored:
            self.world.metrics.counters["alerts acknowledged"] += 1

    async def _cancel_later(self, order: OrderPlan) -> None:
        await self.world.clock.sleep(order.cancel_after_min or 3.0)
        try:
            await self.terminal.chat(order.id, "The customer called to cancel; sorry for the trouble.")
            outcome = await self.terminal.cancel(order.id, reason="customer called to cancel")
            if not outcome.stored:
                self.world.note(f"{self.site.id}: cancelling {order.id} refused: {outcome.reason}")
        except ClientError as exc:
            self.world.note(f"{self.site.id}: cancelling {order.id} not confirmed: {exc}")
        self.world.cancelled[order.id].set()
        self.world.reservations.pop(order.id, None)
        self.world.note(f"{self.site.id} cancelled {order.id}")

    async def _assign_loop(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            for o in self.orders:
                if self._should_assign(o, now):
                    self._assign_now(o, now)

    def _should_assign(self, o: OrderPlan, now: float) -> bool:
        """Whether the shop steps in for ``o`` now: it waits unassigned (past dispatch's turn) or
        its offer has gone unanswered too long."""
        config = self.world.config
        status = self.status(o.id)
        if status is None or self.world.cancelled[o.id].is_set() or o.fate is Fate.CANCELLED:
            return False
        if status not in (S.ASSIGNED.value, *UNASSIGNED_VALUES):
            self.world.reservations.pop(o.id, None)
            self._unassigned_since.pop(o.id, None)
            return False
        seen = self._unassigned_since.get(o.id)
        if seen is None or seen[0] != status:
            seen = self._unassigned_since[o.id] = (status, now)
        if now - self._last_assign.get(o.id, 0.0) < 2.0:
            return False  # our last assignment's echo is still on its way
        waited = now - seen[1]
        if status in UNASSIGNED_VALUES:
            return not (config.assign == "dispatch" and waited < config.shop_steps_in_s)
        # An offer is out: give the rider (or dispatch) time.
        return waited >= config.offer_patience_s and not (
            config.assign == "dispatch" and o.id not in self.world.reservations
        )

    def _assign_now(self, o: OrderPlan, now: float) -> None:
        line = self.terminal.view.orders[o.id]
        exclude = set(self.world.declined_by[o.id]) | ({line.rider} if line.rider else set())
        rider = self.world.pick_rider(o, exclude)
        if rider is None:
            return
        self._last_assign[o.id] = now
        self.world.reservations[o.id] = rider
        self.tasks.append(asyncio.create_task(self._assign(o, rider)))

    async def _assign(self, order: OrderPlan, rider: str) -> None:
        try:
            outcome = await self.terminal.assign(order.id, rider, note="assigned by the shop", timeout=10)
        except ClientError:
            self.world.reservations.pop(order.id, None)
            return
        if outcome.stored:
            self.manual_assignments += 1
            self.world.metrics.counters["manual assignments"] += 1
        else:
            self.world.reservations.pop(order.id, None)
            log.info("assignment refused", order=order.id, rider=rider, reason=outcome.reason)


# --- customers ------------------------------------------------------------------------------------


class SimCustomer:
    """A customer who opens the tracker and chats once the flowers are on their way."""

    def __init__(self, world: World, order: OrderPlan, access: CustomerAccess) -> None:
        self.world = world
        self.order = order
        self.access = access
        self.tracker: CustomerTracker | None = None
        self.foreign = 0

    async def run(self) -> None:
        """Follow the order until it is closed (or the day ends)."""
        world, o, access = self.world, self.order, self.access
        if access.password is None:
            world.note(f"customer of {o.id}: no login was issued, cannot follow the order")
            return
        tracker = CustomerTracker(
            world.settings,
            o.shop,
            o.id,
            access.password,
            username=access.username,
            customer=access.customer,
            destination=(o.lat, o.lon),
            observer=world.metrics,
        )
        try:
            await tracker.start(world.config.connect_timeout_s)
        except BloomwireError as exc:
            world.note(f"customer of {o.id} could not connect: {exc}")
            return
        self.tracker = tracker
        try:
            await self._until(tracker, OUT_VALUES | TERMINAL_VALUES)
            if tracker.view.status in OUT_VALUES and o.customer_chat:
                await world.clock.sleep(1, max_real=0.5)
                try:
                    await tracker.chat(o.customer_chat, timeout=10)
                    world.note(f"customer of {o.id}: “{o.customer_chat}”")
                except ClientError as exc:
                    world.note(f"customer of {o.id}: chat not confirmed: {exc}")
            await self._until(tracker, TERMINAL_VALUES)
            if tracker.view.status == OrderStatus.DELIVERED.value and o.customer_chat:
                await self._rate(tracker)
        finally:
            self.foreign = tracker.view.foreign
            world.metrics.counters["foreign messages seen by customers"] += tracker.view.foreign
            await tracker.stop()

    async def _rate(self, tracker: CustomerTracker) -> None:
        """A customer who chatted rates the delivery too: late ones a little less."""
        o, world = self.order, self.world
        stars = 4 if o.flat_tyre_delay_min is not None else 5
        comment = "Lovely flowers, thank you!" if stars == 5 else "A bit late, but lovely flowers."
        try:
            await tracker.rate(stars, comment, timeout=10)
            world.note(f"customer of {o.id} rated it {stars}/5")
        except ClientError as exc:
            world.note(f"customer of {o.id}: rating not confirmed: {exc}")

    @staticmethod
    async def _until(tracker: CustomerTracker, statuses: frozenset[str]) -> None:
        """Wait until the tracker shows one of ``statuses``."""
        while tracker.view.status not in statuses:
            tracker.changed.clear()
            await wait_event(tracker.changed, 1.0)
