"""Command-line faces of the clients: ``bloomwire rider …``, ``shop …``, ``track``, ``simulate``, ``demo``.

:func:`register` adds them to the main Typer app (``bloomwire.app.cli``). Exit codes: 0 done, 1 the
broker or backbone said no (or could not be reached), 2 bad input (unknown ids, a missing
credential, an invalid window or coordinates), 3 queued: no confirmation in time, the event stays in
the sender's outbox and is re-sent with the same id (do not send it again), 130 interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.live import Live

from bloomwire.app.bench.report import Report, record
from bloomwire.app.clients.access import CustomerAccess, customer_username
from bloomwire.app.clients.base import (
    Outcome,
    UsageError,
    check_name,
    check_point,
    login_name,
    parse_point,
    resolve_password,
    wait_event,
    wait_outcome,
)
from bloomwire.app.clients.outbox import LOCATION, Outbox
from bloomwire.app.clients.rider import (
    FixedPosition,
    Outgoing,
    RiderApp,
    RiderDevice,
    RoutePlayer,
    chat_event,
    confirm_event,
    incident_event,
    load_route,
    outbox_path,
    photo_event,
    random_ride,
    read_photo,
    reply_event,
    status_event,
)
from bloomwire.app.clients.sender import QueuedError, client_outbox_path
from bloomwire.app.clients.shop import (
    AmendDraft,
    OrderDraft,
    ShopTerminal,
    parse_instructions,
    parse_time,
    parse_window,
)
from bloomwire.app.clients.track import CustomerTracker
from bloomwire.app.demo import run_demo, run_simulate
from bloomwire.app.ratings import load_ratings, render_ratings
from bloomwire.app.simulate.plan import Rates
from bloomwire.contract import events as ev
from bloomwire.errors import BloomwireError
from bloomwire.runtime.settings import Settings
from bloomwire.services.web.links import tracking_link, web_url

T = TypeVar("T")

console = Console()
err = Console(stderr=True)

rider_app = typer.Typer(
    help="The rider's phone app: presence, positions, offers, status, incidents, chat (outbox on disk).",
    no_args_is_help=True,
)
shop_app = typer.Typer(
    help="The shop terminal: create, amend, watch, assign, cancel, chat, acknowledge.", no_args_is_help=True
)
order_app = typer.Typer(help="Orders of the shop.", no_args_is_help=True)
shop_app.add_typer(order_app, name="order")

# --- shared options -----------------------------------------------------------------------------

Password = Annotated[
    str | None,
    typer.Option(
        "--password",
        help="MQTT password (default: BLOOMWIRE_BROKER_PASSWORD, else DATA_DIR/secrets/<username>).",
        show_default=False,
    ),
]
Wait = Annotated[float, typer.Option("--wait", help="Seconds to wait for the backbone's answer.", min=0.1)]
RiderArg = Annotated[str, typer.Argument(help="The rider id.")]
OrderArg = Annotated[str, typer.Argument(help="The order id.")]
ShopOpt = Annotated[str, typer.Option("--shop", "-s", envvar="BLOOMWIRE_SHOP", help="The shop id.")]
Username = Annotated[
    str | None,
    typer.Option("--username", help="MQTT username, if not the id itself (one connection per username)."),
]
Device = Annotated[
    str | None,
    typer.Option(
        "--device",
        help=(
            "Log in as this device of the shop or rider (username ID@LABEL, made with "
            "`bloomwire accounts device add ID --label LABEL`): a session of its own, so it runs "
            "beside the identity's other terminals and apps instead of taking over theirs."
        ),
        show_default=False,
    ),
]
OutboxOpt = Annotated[
    Path | None,
    typer.Option(
        "--outbox",
        help="The rider's outbox file (default DATA_DIR/clients/riders/R/outbox.db; R@LABEL/ with --device).",
    ),
]


def _settings(ctx: typer.Context) -> Settings:
    settings = ctx.obj
    if not isinstance(settings, Settings):  # pragma: no cover - the root callback always sets it
        settings = Settings()
    return settings


def _fail(message: str, code: int) -> typer.Exit:
    err.print(f"[bold red]error:[/bold red] {message}")
    return typer.Exit(code)


def _retry_note(message: str) -> None:
    err.print(f"[yellow]{message}[/yellow]")


#: Exit code of a command whose event is queued in the outbox, not yet confirmed.
QUEUED_EXIT = 3
#: Seconds a shop command waits for the confirmation of commands an earlier run queued.
EARLIER_WAIT_S = 3.0


def _queued(exc: QueuedError) -> None:
    err.print(
        f"[yellow]{exc}[/yellow]; it stays in the outbox, the next start re-sends it: do not send it again"
    )


def _run(factory: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine with the clients' exit codes instead of tracebacks."""
    try:
        return asyncio.run(factory())  # type: ignore[arg-type]
    except QueuedError as exc:
        _queued(exc)
        raise typer.Exit(QUEUED_EXIT) from None
    except UsageError as exc:
        raise _fail(str(exc), 2) from None
    except BloomwireError as exc:
        raise _fail(str(exc), 1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _refusal_code(reason: str) -> int:
    """A refusal naming an unknown id is bad input (2); any other is the backbone saying no (1)."""
    return 2 if reason.startswith("unknown ") or "does not belong to shop" in reason else 1


def _report(outcome: Outcome, what: str) -> int:
    if outcome.stored:
        console.print(f"[green]{what}: stored[/green] ({outcome.event_id})")
        return 0
    err.print(f"[bold red]{what}: refused by the backbone:[/bold red] {outcome.reason}")
    return _refusal_code(outcome.reason)


async def _wait_until(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def _stop_on_signals(stop: asyncio.Event) -> Callable[[], None]:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)

    def undo() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)

    return undo


# --- rider --------------------------------------------------------------------------------------


def _outbox_path(settings: Settings, rider: str, outbox: Path | None, device: str | None = None) -> Path:
    login_name(check_name(rider, "rider"), device)  # a bad label is a UsageError
    return outbox or outbox_path(settings, rider, device)


@rider_app.command("run")
def rider_run(
    ctx: typer.Context,
    rider: Annotated[str, typer.Argument(help="The rider id (also the MQTT username).")],
    password: Password = None,
    outbox: OutboxOpt = None,
    route: Annotated[
        Path | None, typer.Option(help="Ride along this route: GeoJSON, GPX or 'lat,lon' lines.")
    ] = None,
    at: Annotated[str | None, typer.Option(help="Stand still at LAT,LON.")] = None,
    simulate: Annotated[bool, typer.Option("--simulate", help="Ride a simulated route in Berlin.")] = False,
    speed: Annotated[float, typer.Option(help="km/h along --route / --simulate.")] = 18.0,
    interval: Annotated[float, typer.Option(help="Seconds between positions.", min=0.2)] = 5.0,
    offers: Annotated[str, typer.Option(help="Answer offers: ask, accept or decline.")] = "ask",
    seed: Annotated[int | None, typer.Option(help="Seed of the --simulate route.")] = None,
    device: Device = None,
) -> None:
    """Run the rider app: online until Ctrl-C; type commands (help) to report status and chat."""
    settings = _settings(ctx)

    async def main() -> None:
        if offers not in ("ask", "accept", "decline"):
            raise UsageError(f"--offers must be ask, accept or decline, not {offers!r}")
        if (route is not None) + (at is not None) + simulate > 1:
            raise UsageError("give only one of --route, --at and --simulate")
        source: Any = None
        if route is not None:
            source = RoutePlayer(load_route(route), speed)
        elif at is not None:
            source = FixedPosition(*parse_point(at, "--at"))
        elif simulate:
            source = random_ride((52.5200, 13.4050), seed, speed)
        username = login_name(rider, device)
        box = Outbox(_outbox_path(settings, rider, outbox, device))
        try:
            if not box.lock():
                raise UsageError(
                    f"{username}'s rider app already runs (pid {box.holder()}): one app per login"
                )
            pw = resolve_password(settings, username, password, "rider")
            phone = RiderDevice(settings, rider, pw, box, username=username)
            app = RiderApp(
                phone,
                console,
                source=source,
                interval=interval,
                offers=offers,  # type: ignore[arg-type]
                read_commands=True,
            )
            await phone.start(on_retry=_retry_note)
            try:
                await app.run()
            finally:
                await phone.stop()
                left = box.count(records_only=True)
                console.print(
                    f"rider {username} offline; "
                    + (f"{left} event(s) wait in the outbox for the next start" if left else "outbox empty")
                )
        finally:
            box.close()

    _run(main)


def _rider_once(
    settings: Settings,
    rider: str,
    password: str | None,
    device: str | None,
    outbox: Path | None,
    build: Callable[[], Outgoing] | None,
    wait: float,
) -> None:
    """Send one event (and whatever the outbox still holds), wait for the acks, report."""

    async def main() -> int:
        check_name(rider, "rider")
        username = login_name(rider, device)
        out = build() if build is not None else None
        box = Outbox(_outbox_path(settings, rider, outbox, device))
        try:
            if not box.lock():
                if out is None:
                    raise UsageError(
                        f"rider {rider}'s app runs (pid {box.holder()}) and sends its outbox itself"
                    )
                box.add(out.id, out.kind, out.topic, out.payload)
                console.print(
                    f"queued {out.kind} {out.id}; the running rider app (pid {box.holder()}) sends it"
                )
                return 0
            pw = resolve_password(settings, username, password, "rider")
            phone = RiderDevice(settings, rider, pw, box, presence=False, username=username)
            earlier = [e for e in box.pending() if e.kind != LOCATION]
            futures = {e.id: (f"earlier {e.kind}", phone.expect(e.id)) for e in earlier}
            if out is not None:
                futures[out.id] = (out.kind, phone.expect(out.id))
            await phone.start(on_retry=_retry_note)
            try:
                if out is not None:
                    phone.send(out)
                code = 0
                for event_id, (what, fut) in futures.items():
                    try:
                        outcome = await wait_outcome(fut, wait, f"{what} {event_id}")
                    except BloomwireError as exc:
                        err.print(f"[yellow]{exc}[/yellow]; it stays in the outbox")
                        code = max(code, 1)
                        continue
                    code = max(code, _report(outcome, what))
                if not futures:
                    console.print("outbox empty: nothing to send")
                return code
            finally:
                await phone.stop()
        finally:
            box.close()

    code = _run(main)
    if code:
        raise typer.Exit(code)


@rider_app.command("status")
def rider_status(
    ctx: typer.Context,
    rider: RiderArg,
    order: OrderArg,
    status: Annotated[
        str, typer.Argument(help="picked_up, en_route, arrived, delivered, returned, declined.")
    ],
    note: Annotated[str, typer.Option(help="A note for the shop.")] = "",
    code: Annotated[
        str | None, typer.Option(help="delivered: the handover code the customer reads out.")
    ] = None,
    password: Password = None,
    device: Device = None,
    outbox: OutboxOpt = None,
    wait: Wait = 10.0,
) -> None:
    """Report a status transition of an order the rider holds."""
    _rider_once(
        _settings(ctx),
        rider,
        password,
        device,
        outbox,
        lambda: status_event(rider, order, status, note=note, code=code),
        wait,
    )


@rider_app.command("photo")
def rider_photo(
    ctx: typer.Context,
    rider: RiderArg,
    order: OrderArg,
    file: Annotated[Path, typer.Argument(help="A JPEG or PNG of the delivery (at most 250 KiB).")],
    password: Password = None,
    device: Device = None,
    outbox: OutboxOpt = None,
    wait: Wait = 10.0,
) -> None:
    """Send the delivery photo of an order the rider holds (or has delivered)."""
    data = read_photo(file)
    _rider_once(
        _settings(ctx), rider, password, device, outbox, lambda: photo_event(rider, order, data), wait
    )


@rider_app.command("fail")
def rider_fail(
    ctx: typer.Context,
    rider: RiderArg,
    order: OrderArg,
    reason: Annotated[
        str, typer.Option(help="customer_unreachable, address_wrong, damaged, refused or other.")
    ],
    note: Annotated[str, typer.Option(help="What happened.")] = "",
    password: Password = None,
    device: Device = None,
    outbox: OutboxOpt = None,
    wait: Wait = 10.0,
) -> None:
    """Report a failed delivery, with its reason."""
    _rider_once(
        _settings(ctx),
        rider,
        password,
        device,
        outbox,
        lambda: status_event(rider, order, "failed", note=note, reason=reason),
        wait,
    )


@rider_app.command("incident")
def rider_incident(
    ctx: typer.Context,
    rider: RiderArg,
    order: OrderArg,
    reason: Annotated[str, typer.Option(help="e.g. flat_tyre, traffic, customer_unreachable.")],
    eta_min: Annotated[float | None, typer.Option(help="New ETA, minutes from now.", min=0)] = None,
    note: Annotated[str, typer.Option(help="A note for the shop and customer.")] = "",
    password: Password = None,
    device: Device = None,
    outbox: OutboxOpt = None,
    wait: Wait = 10.0,
) -> None:
    """Report an incident (not a status change), optionally with a new ETA."""

    def build() -> Outgoing:
        eta = ev.now() + timedelta(minutes=eta_min) if eta_min is not None else None
        return incident_event(rider, order, reason, eta=eta, note=note)

    _rider_once(_settings(ctx), rider, password, device, outbox, build, wait)


@rider_app.command("chat")
def rider_chat(
    ctx: typer.Context,
    rider: RiderArg,
    order: OrderArg,
    text: Annotated[str, typer.Argument(help="The chat line.")],
    password: Password = None,
    device: Device = None,
    outbox: OutboxOpt = None,
    wait: Wait = 10.0,
) -> None:
    """Send a chat line on an order (to the shop and the customer)."""
    _rider_once(_settings(ctx), rider, password, device, outbox, lambda: chat_event(rider, order, text), wait)


@rider_app.command("confirm")
def rider_confirm(
    ctx: typer.Context,
    rider: RiderArg,
    order: OrderArg,
    amendment: Annotated[str, typer.Argument(help="The amendment's id (shown with the change).")],
    note: Annotated[str, typer.Option(help="A word for the shop.")] = "",
    password: Password = None,
    device: Device = None,
    outbox: OutboxOpt = None,
    wait: Wait = 10.0,
) -> None:
    """Confirm a change to one of your orders (a new address or instructions): the shop sees it."""
    _rider_once(
        _settings(ctx),
        rider,
        password,
        device,
        outbox,
        lambda: confirm_event(rider, order, amendment, note),
        wait,
    )


@rider_app.command("reply")
def rider_reply(
    ctx: typer.Context,
    rider: RiderArg,
    offer: Annotated[str, typer.Argument(help="The offer id (shown by `rider run`).")],
    order: Annotated[str, typer.Option(help="The offer's order id.")],
    accept: Annotated[bool, typer.Option("--accept/--decline", help="Accept or decline.")] = True,
    reason: Annotated[str, typer.Option(help="Why (declines).")] = "",
    password: Password = None,
    device: Device = None,
    outbox: OutboxOpt = None,
    wait: Wait = 10.0,
) -> None:
    """Accept or decline an offer."""
    _rider_once(
        _settings(ctx),
        rider,
        password,
        device,
        outbox,
        lambda: reply_event(rider, offer, order, accept, reason),
        wait,
    )


@rider_app.command("flush")
def rider_flush(
    ctx: typer.Context,
    rider: RiderArg,
    password: Password = None,
    device: Device = None,
    outbox: OutboxOpt = None,
    wait: Wait = 10.0,
) -> None:
    """Send whatever the outbox still holds and wait for the acks."""
    _rider_once(_settings(ctx), rider, password, device, outbox, None, wait)


@rider_app.command("outbox")
def rider_outbox(
    ctx: typer.Context,
    rider: RiderArg,
    device: Device = None,
    outbox: OutboxOpt = None,
) -> None:
    """List the events waiting for an ack, and the refused ones (no connection needed)."""
    try:
        box = Outbox(_outbox_path(_settings(ctx), rider, outbox, device))
    except UsageError as exc:
        raise _fail(str(exc), 2) from None
    try:
        pending = box.pending()
        for e in pending:
            console.print(f"waiting  {e.kind:9} {e.id}  sent {e.attempts}x  {e.topic}")
        for event_id, kind, reason in box.refusals()[:20]:
            console.print(f"refused  {kind:9} {event_id}  {reason}")
        console.print(f"{len(pending)} event(s) wait for an ack in {box.path}")
    finally:
        box.close()


# --- shop ---------------------------------------------------------------------------------------


def _shop(
    ctx: typer.Context,
    shop: str,
    password: str | None,
    username: str | None,
    device: str | None,
    action: Callable[[ShopTerminal], Awaitable[int]],
    *,
    need_orders: tuple[str, ...] = (),
) -> None:
    settings = _settings(ctx)

    async def main() -> int:
        check_name(shop, "shop")
        for order in need_orders:
            check_name(order, "order")
        name = login_name(shop, device, username)
        pw = resolve_password(settings, name, password, "shop")
        box = Outbox(client_outbox_path(settings, "shops", name))
        try:
            terminal = ShopTerminal(settings, shop, pw, username=name, outbox=box, persistent=True)
            return await _shop_session(terminal, shop, need_orders, action)
        finally:
            box.close()

    code = _run(main)
    if code:
        raise typer.Exit(code)


async def _shop_session(
    terminal: ShopTerminal,
    shop: str,
    need_orders: tuple[str, ...],
    action: Callable[[ShopTerminal], Awaitable[int]],
) -> int:
    """Connect (re-sending what the outbox holds), check the orders, run ``action``."""
    earlier = {e.id for e in terminal.outbox.pending()}
    await terminal.start(on_retry=_retry_note)
    try:
        if need_orders:
            await terminal.settle()
            for order in need_orders:
                if not await _wait_until(lambda o=order: terminal.knows_order(o), 1.0):  # type: ignore[misc]
                    raise UsageError(f"unknown order {order!r}: shop {shop!r} has no such order")
        return await action(terminal)
    finally:
        await _report_earlier(terminal, earlier)
        await terminal.stop()


async def _report_earlier(terminal: ShopTerminal, earlier: set[str]) -> None:
    """Give commands queued by an earlier run a moment to be confirmed; say which still wait."""
    if not earlier:
        return

    def left() -> set[str]:
        return earlier & {e.id for e in terminal.outbox.pending()}

    await _wait_until(lambda: not left(), EARLIER_WAIT_S)
    done = len(earlier) - len(left())
    if done:
        console.print(f"{done} command(s) queued earlier: confirmed")
    for event_id in sorted(left()):
        err.print(
            f"[yellow]command {event_id} queued earlier: still not confirmed, kept in the outbox[/yellow]"
        )


@order_app.command("create")
def shop_order_create(
    ctx: typer.Context,
    shop: ShopOpt,
    name: Annotated[str, typer.Option("--name", help="Customer name.")],
    window: Annotated[
        str, typer.Option(help="Promised window: HH:MM-HH:MM (today) or START/END (ISO 8601).")
    ],
    at: Annotated[str | None, typer.Option("--at", help="Delivery position LAT,LON.")] = None,
    lat: Annotated[float | None, typer.Option(help="Delivery latitude (or use --at).")] = None,
    lon: Annotated[float | None, typer.Option(help="Delivery longitude (or use --at).")] = None,
    phone: Annotated[str, typer.Option(help="Customer phone.")] = "",
    address: Annotated[str, typer.Option(help="Delivery address.")] = "",
    item: Annotated[list[str] | None, typer.Option("--item", help="An item (repeat the option).")] = None,
    note: Annotated[str, typer.Option(help="A note for the rider.")] = "",
    order_id: Annotated[str | None, typer.Option("--order-id", help="Choose the order id.")] = None,
    pickup: Annotated[str | None, typer.Option(help="Pickup position LAT,LON (the shop).")] = None,
    language: Annotated[
        ev.Language | None, typer.Option(help="The customer's language (default: the shop's).")
    ] = None,
    require_code: Annotated[
        bool,
        typer.Option(
            "--require-code",
            help="The rider must enter the customer's handover code to report the order delivered "
            "(the customer's tracking page shows the code).",
        ),
    ] = False,
    access_wait: Annotated[
        float,
        typer.Option(help="Seconds to wait for the provisioner's customer access (access control).", min=0),
    ] = 2.0,
    password: Password = None,
    username: Username = None,
    device: Device = None,
    wait: Wait = 10.0,
) -> None:
    """Create an order; prints its id and the customer's tracking access once the backbone has it."""
    try:
        if at is not None:
            dest = parse_point(at, "--at")
        elif lat is not None and lon is not None:
            dest = check_point(lat, lon, "delivery position")
        else:
            raise UsageError("give the delivery position: --at LAT,LON (or --lat and --lon)")
        draft = OrderDraft(
            customer_name=name,
            lat=dest[0],
            lon=dest[1],
            window=parse_window(window),
            phone=phone,
            address=address,
            items=item or [],
            note=note,
            order=order_id,
            pickup=parse_point(pickup, "--pickup") if pickup else None,
            language=language,
            require_code=require_code,
        )
    except UsageError as exc:
        raise _fail(str(exc), 2) from None

    async def action(terminal: ShopTerminal) -> int:
        terminal.access_wait_s = access_wait
        created = await terminal.create_order(draft, timeout=wait)
        if not created.outcome.stored:
            err.print(f"[bold red]order {created.order} refused:[/bold red] {created.outcome.reason}")
            return _refusal_code(created.outcome.reason)
        console.print(f"[green]order {created.order} created[/green] for {name}")
        if created.access is not None:
            console.print(created.access.describe())
            _print_tracking_link(_settings(ctx), created.access)
        return 0

    _shop(ctx, shop, password, username, device, action)


@order_app.command("amend")
def shop_order_amend(
    ctx: typer.Context,
    order: OrderArg,
    shop: ShopOpt,
    window_start: Annotated[
        str | None,
        typer.Option("--window-start", help="New start of the promised window: HH:MM (today) or ISO 8601."),
    ] = None,
    window_end: Annotated[
        str | None,
        typer.Option("--window-end", help="New end of the promised window: HH:MM (today) or ISO 8601."),
    ] = None,
    address: Annotated[
        str | None, typer.Option(help="New delivery address (until the rider has arrived).")
    ] = None,
    at: Annotated[
        str | None, typer.Option("--at", help="New delivery position LAT,LON (with --address).")
    ] = None,
    item: Annotated[
        list[str] | None, typer.Option("--item", help="The items, all of them (repeat; until picked up).")
    ] = None,
    note: Annotated[str | None, typer.Option(help="New note for the rider.")] = None,
    phone: Annotated[str | None, typer.Option(help="New customer phone.")] = None,
    alternate_contact: Annotated[
        str | None, typer.Option("--alternate-contact", help="Another person or number to try.")
    ] = None,
    instructions: Annotated[
        str | None,
        typer.Option(
            help="How to hand it over: call_first, leave_at_door, hand_to_reception, none, or free text."
        ),
    ] = None,
    customer_asked: Annotated[
        bool, typer.Option("--customer-asked", help="The customer asked for it (shown as 'at your request').")
    ] = False,
    reason: Annotated[str, typer.Option(help="Why, in a few words (the customer and rider see it).")] = "",
    password: Password = None,
    username: Username = None,
    device: Device = None,
    wait: Wait = 10.0,
) -> None:
    """Change an order after it is placed: only what you give changes.

    The window, instructions, note and contacts can change until delivered.

    The address and position: until the rider has arrived. The items: until picked up.

    Nothing changes after a final state; a refused change names the rule it breaks.

    The rider holding the order is told, and confirms a new address or new instructions.
    """
    try:
        draft = AmendDraft(
            order=check_name(order, "order"),
            window_start=parse_time(window_start, "--window-start") if window_start else None,
            window_end=parse_time(window_end, "--window-end") if window_end else None,
            address=address,
            position=parse_point(at, "--at") if at else None,
            items=item,
            note=note,
            phone=phone,
            alternate_contact=alternate_contact,
            instructions=parse_instructions(instructions) if instructions is not None else None,
            asked_by="customer" if customer_asked else "shop",
            reason=reason,
        )
        draft.build(shop)  # refuse bad input before connecting
    except UsageError as exc:
        raise _fail(str(exc), 2) from None

    async def action(terminal: ShopTerminal) -> int:
        return _report(await terminal.amend(draft, timeout=wait), f"amending {order}")

    _shop(ctx, shop, password, username, device, action, need_orders=(order,))


def _print_tracking_link(settings: Settings, access: CustomerAccess) -> None:
    """The customer's tracking link, when the order has a login and the web service an address."""
    if access.password is None:
        return
    base = web_url(settings)
    if base is None:
        console.print("tracking link: start the web service (`bloomwire up`) or set BLOOMWIRE_PUBLIC_URL")
        return
    link = tracking_link(base, access.shop, access.order, access.customer, access.username, access.password)
    console.print(f"tracking link (send it to the customer; it carries their login): {link}", soft_wrap=True)


@shop_app.command("watch")
def shop_watch(
    ctx: typer.Context,
    shop: ShopOpt,
    once: Annotated[bool, typer.Option("--once", help="Print one snapshot and exit.")] = False,
    password: Password = None,
    username: Username = None,
    device: Device = None,
) -> None:
    """Every order of the shop, live: status, rider, ETA vs promise, last update, alerts."""

    async def action(terminal: ShopTerminal) -> int:
        await terminal.settle()
        if once:
            console.print(terminal.view.render())
            return 0
        stop = asyncio.Event()
        undo = _stop_on_signals(stop)
        try:
            if console.is_terminal:
                with Live(terminal.view.render(), console=console, refresh_per_second=2) as live:
                    while not stop.is_set():
                        live.update(terminal.view.render())
                        await wait_event(stop, 0.5)
            else:
                console.print(terminal.view.render())
                shown = len(terminal.view.feed)
                seen = list(terminal.view.feed)
                while not stop.is_set():
                    await wait_event(stop, 0.5)
                    feed = list(terminal.view.feed)
                    new = [line for line in feed if line not in seen]
                    for line in new:
                        console.print(line, highlight=False)
                    seen = feed
                    shown += len(new)
        finally:
            undo()
        return 0

    _shop(ctx, shop, password, username, device, action)


@shop_app.command("chat")
def shop_chat(
    ctx: typer.Context,
    order: OrderArg,
    text: Annotated[str, typer.Argument(help="The chat line.")],
    shop: ShopOpt,
    password: Password = None,
    username: Username = None,
    device: Device = None,
    wait: Wait = 10.0,
) -> None:
    """Send a chat line on an order (to its rider and customer)."""

    async def action(terminal: ShopTerminal) -> int:
        return _report(await terminal.chat(order, text, timeout=wait), f"chat on {order}")

    _shop(ctx, shop, password, username, device, action, need_orders=(order,))


@shop_app.command("assign")
def shop_assign(
    ctx: typer.Context,
    order: OrderArg,
    rider: RiderArg,
    shop: ShopOpt,
    note: Annotated[str, typer.Option(help="A note for the rider.")] = "",
    password: Password = None,
    username: Username = None,
    device: Device = None,
    wait: Wait = 10.0,
) -> None:
    """Assign (or reassign) an order to a rider; the rider gets an offer to accept."""
    try:
        check_name(rider, "rider")
    except UsageError as exc:
        raise _fail(str(exc), 2) from None

    async def action(terminal: ShopTerminal) -> int:
        outcome = await terminal.assign(order, rider, note=note, timeout=wait)
        return _report(outcome, f"{order} offered to {rider}")

    _shop(ctx, shop, password, username, device, action, need_orders=(order,))


@shop_app.command("cancel")
def shop_cancel(
    ctx: typer.Context,
    order: OrderArg,
    shop: ShopOpt,
    reason: Annotated[str, typer.Option(help="Why.")] = "",
    password: Password = None,
    username: Username = None,
    device: Device = None,
    wait: Wait = 10.0,
) -> None:
    """Cancel an order (before it is picked up)."""

    async def action(terminal: ShopTerminal) -> int:
        return _report(await terminal.cancel(order, reason=reason, timeout=wait), f"cancelling {order}")

    _shop(ctx, shop, password, username, device, action, need_orders=(order,))


@shop_app.command("ack")
def shop_ack(
    ctx: typer.Context,
    alert: Annotated[str, typer.Argument(help="The alert id (shown by `shop watch`).")],
    shop: ShopOpt,
    by: Annotated[str, typer.Option(help="Who is on it.")] = "",
    password: Password = None,
    username: Username = None,
    device: Device = None,
    wait: Wait = 10.0,
) -> None:
    """Acknowledge an alert: someone is on it."""

    async def action(terminal: ShopTerminal) -> int:
        return _report(await terminal.ack_alert(alert, by=by, timeout=wait), f"acknowledging {alert}")

    _shop(ctx, shop, password, username, device, action)


@shop_app.command("ratings")
def shop_ratings(ctx: typer.Context, shop: ShopOpt) -> None:
    """Customers' ratings of the shop's delivered orders: each one, per rider and per day.

    Read from the store, like `bloomwire history`.
    """
    try:
        found = load_ratings(_settings(ctx).database_url, shop)
    except BloomwireError as exc:
        raise _fail(str(exc), 1) from None
    render_ratings(found, console)


# --- customer -----------------------------------------------------------------------------------


def track(
    ctx: typer.Context,
    order: OrderArg,
    shop: ShopOpt,
    at: Annotated[
        str | None,
        typer.Option("--at", help="Your position LAT,LON for the distance (default: the delivery address)."),
    ] = None,
    chat: Annotated[str | None, typer.Option("--chat", help="Send this chat line, then follow.")] = None,
    once: Annotated[bool, typer.Option("--once", help="Print the order once and exit.")] = False,
    password: Password = None,
    username: Annotated[
        str | None, typer.Option("--username", help="Your login (default: the customer id).")
    ] = None,
    customer: Annotated[
        str | None,
        typer.Option("--customer", help="The customer id C of customers/C/… (default: c-<order>)."),
    ] = None,
    wait: Wait = 10.0,
) -> None:
    """Follow one order as its customer: timeline, ETA, the rider's distance, chat."""
    settings = _settings(ctx)

    async def main() -> int:
        check_name(shop, "shop")
        check_name(order, "order")
        destination = parse_point(at, "--at") if at else None
        cid = check_name(customer, "customer") if customer else customer_username(order)
        name = username or cid
        pw = resolve_password(settings, name, password, "customer")
        box = Outbox(client_outbox_path(settings, "customers", name))
        try:
            tracker = CustomerTracker(
                settings, shop, order, pw, username=name, customer=cid, destination=destination, outbox=box
            )
            return await _track_session(tracker, order, shop, chat, once, wait)
        finally:
            box.close()

    code = _run(main)
    if code:
        raise typer.Exit(code)


async def _track_session(
    tracker: CustomerTracker, order: str, shop: str, chat: str | None, once: bool, wait: float
) -> int:
    """Connect (re-sending what the outbox holds), send ``chat``, then follow the order."""
    await tracker.start(on_retry=_retry_note)
    try:
        if not await _wait_until(lambda: tracker.view.state is not None, 2.0):
            raise UsageError(
                f"unknown order {order!r} of shop {shop!r}: nothing was published about it "
                "(check the order id and --shop)"
            )
        code = 0
        if chat:
            code = await _send_chat(tracker, chat, wait)
        if once:
            console.print(tracker.view.render())
            return code
        stop = asyncio.Event()
        undo = _stop_on_signals(stop)
        typed = _read_lines(lambda line: _chat_line(tracker, line, wait))
        try:
            if console.is_terminal:
                console.print("type a line and Enter to chat with the shop and rider; Ctrl-C stops")
                with Live(tracker.view.render(), console=console, refresh_per_second=2) as live:
                    while not stop.is_set():
                        live.update(tracker.view.render())
                        await wait_event(stop, 0.5)
            else:
                console.print(tracker.view.render())
                shown = len(tracker.view.timeline) + len(tracker.view.chat)
                while not stop.is_set():
                    await wait_event(stop, 0.5)
                    now = len(tracker.view.timeline) + len(tracker.view.chat)
                    if now != shown:
                        shown = now
                        console.print(tracker.view.render())
        finally:
            typed()
            undo()
        return code
    finally:
        await tracker.stop()


def _read_lines(on_line: Callable[[str], None]) -> Callable[[], None]:
    """Call ``on_line`` for each line typed on stdin (if it can be watched); return an undo."""
    loop = asyncio.get_running_loop()
    buffer = bytearray()
    try:
        fd = sys.stdin.fileno()
    except (OSError, ValueError, AttributeError):
        return lambda: None

    def readable() -> None:
        try:
            data = os.read(fd, 4096)
        except OSError:
            data = b""
        if not data:
            with contextlib.suppress(Exception):
                loop.remove_reader(fd)
            return
        buffer.extend(data)
        while b"\n" in buffer:
            line, _, rest = bytes(buffer).partition(b"\n")
            buffer[:] = rest
            text = line.decode("utf-8", errors="replace").strip()
            if text:
                on_line(text)

    try:
        loop.add_reader(fd, readable)
    except (OSError, ValueError, NotImplementedError, PermissionError):
        return lambda: None

    def undo() -> None:
        with contextlib.suppress(Exception):
            loop.remove_reader(fd)

    return undo


async def _send_chat(tracker: CustomerTracker, text: str, wait: float) -> int:
    """Send a chat line; report it stored, refused, queued (kept and re-sent) or not sent."""
    try:
        return _report(await tracker.chat(text, timeout=wait), "chat line")
    except QueuedError as exc:
        _queued(exc)
        return QUEUED_EXIT
    except UsageError as exc:  # refused before anything was kept or sent (e.g. too long)
        err.print(f"[red]chat line not sent:[/red] {exc}")
        return 2


def _chat_line(tracker: CustomerTracker, text: str, wait: float) -> None:
    async def send() -> None:
        await _send_chat(tracker, text, wait)

    task = asyncio.get_running_loop().create_task(send())
    _sending.add(task)
    task.add_done_callback(_sending.discard)


#: Chat lines on their way (a reference keeps each task alive until it is done).
_sending: set[asyncio.Task[None]] = set()


# --- simulator and demo -------------------------------------------------------------------------

Minutes = Annotated[float, typer.Option(help="Real minutes the simulated day takes (about).")]
Riders = Annotated[int, typer.Option(help="Riders on shift.")]
Orders = Annotated[int, typer.Option(help="Orders over the day.")]
Shops = Annotated[int, typer.Option(help="Shops (1-6, real Berlin districts).")]
Seed = Annotated[int, typer.Option(help="Seed: the same seed gives the same order outcomes.")]
Assign = Annotated[
    str, typer.Option(help="Who assigns riders: auto (dispatch service if registered), dispatch or shop.")
]


def _assign(value: str) -> Any:
    if value not in ("auto", "dispatch", "shop"):
        raise _fail(f"--assign must be auto, dispatch or shop, not {value!r}", 2)
    return value


def simulate(
    ctx: typer.Context,
    minutes: Minutes = 2.0,
    riders: Riders = 6,
    orders: Orders = 24,
    shops: Shops = 3,
    seed: Seed = 7,
    assign: Assign = "auto",
    tag: Annotated[
        str | None, typer.Option(help="Prefix of the order ids (default: s<HHMMSS>- so runs never clash).")
    ] = None,
    flat_tyre: Annotated[float, typer.Option(help="Share of orders with a flat tyre on the way.")] = 0.10,
    app_dies: Annotated[
        float, typer.Option(help="Share of orders whose rider's app dies on the way.")
    ] = 0.08,
    decline: Annotated[float, typer.Option(help="Share of orders whose first offer is declined.")] = 0.15,
    unreachable: Annotated[float, typer.Option(help="Share of orders whose customer is unreachable.")] = 0.06,
    address_wrong: Annotated[float, typer.Option(help="Share of orders with a wrong address.")] = 0.03,
    cancel: Annotated[float, typer.Option(help="Share of orders the shop cancels.")] = 0.05,
    access: Annotated[
        bool,
        typer.Option(
            "--access/--no-access",
            help="The broker runs with access control (customer logins from the provisioner), as "
            "`bloomwire up` does by default; without a broker port: start one like that.",
        ),
    ] = True,
    shop_id: Annotated[
        list[str] | None,
        typer.Option("--shop-id", help="Name the shops (repeat; e.g. s1 s2 s3 as `bloomwire up` makes)."),
    ] = None,
    rider_id: Annotated[
        list[str] | None,
        typer.Option("--rider-id", help="Name the riders (repeat; e.g. r1 … r10 as `bloomwire up` makes)."),
    ] = None,
) -> None:
    """A seeded, time-compressed day of Berlin deliveries through the real clients.

    Uses the broker in BLOOMWIRE_BROKER_HOST/PORT (its identities must exist there), or, without
    a port, starts its own broker and services on the data dir's store.
    """
    try:
        rates = Rates(
            cancel=cancel,
            unreachable=unreachable,
            address_wrong=address_wrong,
            flat_tyre=flat_tyre,
            app_dies=app_dies,
            decline=decline,
        )
    except ValueError as exc:
        raise _fail(str(exc), 2) from None
    choice = _assign(assign)
    try:
        code = run_simulate(
            _settings(ctx),
            console,
            minutes=minutes,
            riders=riders,
            orders=orders,
            shops=shops,
            seed=seed,
            assign=choice,
            rates=rates,
            tag=tag,
            access=access,
            shop_ids=shop_id or (),
            rider_ids=rider_id or (),
        )
    except UsageError as exc:
        raise _fail(str(exc), 2) from None
    except BloomwireError as exc:
        raise _fail(str(exc), 1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    if code:
        raise typer.Exit(code)


def demo(
    ctx: typer.Context,
    minutes: Minutes = 2.0,
    riders: Riders = 6,
    orders: Orders = 24,
    shops: Shops = 3,
    seed: Seed = 7,
    assign: Assign = "auto",
    access: Annotated[
        bool,
        typer.Option(
            "--access/--no-access",
            help="Access control on the broker (each identity only its own topics; customer logins "
            "from the provisioner), or a plain password file.",
        ),
    ] = True,
    keep_up: Annotated[
        bool,
        typer.Option(
            "--keep-up/--no-keep-up",
            help="After the day and its summary, keep the stack and its web pages up until Ctrl-C.",
        ),
    ] = False,
    record_key: Annotated[
        str | None,
        typer.Option(
            "--record",
            metavar="KEY",
            help="Also write the summary into the `<!-- measured:KEY -->` block of README.md and "
            "docs/*.md (with the command, date and commit).",
        ),
    ] = None,
) -> None:
    """The main job: broker, services and a simulated Berlin shop day on a fresh SQLite store.

    Shows the day live (progress lines without a terminal) and ends with a summary checked
    against the store; leaves nothing running.
    """
    choice = _assign(assign)
    try:
        code = run_demo(
            _settings(ctx),
            console,
            minutes=minutes,
            riders=riders,
            orders=orders,
            shops=shops,
            seed=seed,
            assign=choice,
            access=access,
            keep_up=keep_up,
            summary=_recorder(record_key) if record_key else None,
        )
    except UsageError as exc:
        raise _fail(str(exc), 2) from None
    except BloomwireError as exc:
        raise _fail(str(exc), 1) from None
    except KeyboardInterrupt:
        err.print("interrupted; services and broker stopped")
        raise typer.Exit(130) from None
    if code:
        raise typer.Exit(code)


def _recorder(key: str) -> Callable[[str, list[tuple[str, str]]], None]:
    """Write a demo's summary into the docs' ``key`` block."""

    def write(title: str, rows: list[tuple[str, str]]) -> None:
        report = Report(title)
        for what, figure in rows:
            report.add(what, figure)
        for path in record(key, [report]):
            console.print(f"recorded in {path}")

    return write


def register(app: typer.Typer) -> None:
    """Add the client commands to the main app."""
    app.add_typer(rider_app, name="rider")
    app.add_typer(shop_app, name="shop")
    app.command("track")(track)
    app.command("simulate")(simulate)
    app.command("demo")(demo)
