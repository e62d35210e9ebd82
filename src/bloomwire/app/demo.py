"""``bloomwire demo`` (``make demo``) and ``bloomwire simulate``: a simulated day on the real stack.

The demo starts Mosquitto from ``broker/`` and every registered service
(:class:`bloomwire.app.supervisor.Stack`) on a FRESH SQLite store under ``DATA_DIR/demo`` (wiped at
start), plays a seeded, time-compressed day of Berlin deliveries through the real rider, shop and
customer clients, shows it live, and ends with a summary. The summary is the operator's: it reads
the store once at the end to check that every event the clients sent is there exactly once (or
was refused with a reason), which no client ever does.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Literal

import sqlalchemy as sa
from rich.console import Console
from rich.table import Table

from bloomwire.app.clients.base import UsageError, check_name, resolve_password
from bloomwire.app.simulate.agents import AssignMode, SimConfig
from bloomwire.app.simulate.metrics import percentile
from bloomwire.app.simulate.plan import DayPlan, Rates, outcome_of, plan_day, rename
from bloomwire.app.simulate.runner import SimResult, Simulation
from bloomwire.app.simulate.view import watch
from bloomwire.app.supervisor import ASSISTANT, NOTICES, SERVICES, WEB, Stack
from bloomwire.app.weblinks import announce_links, dashboard_line
from bloomwire.errors import BloomwireError
from bloomwire.runtime.aio import cancel_and_wait
from bloomwire.runtime.broker import ensure_secret
from bloomwire.runtime.settings import Settings
from bloomwire.services.alerts.config import load_rules
from bloomwire.store import make_engine
from bloomwire.store import models as m

AssignChoice = Literal["auto", "dispatch", "shop"]

DEFAULT_MINUTES = 2.0
DEFAULT_RIDERS = 6
DEFAULT_ORDERS = 24
DEFAULT_SHOPS = 3
DEFAULT_SEED = 7


def resolve_assign(choice: AssignChoice, services: Iterable[str]) -> AssignMode:
    """``auto``: the dispatch service if it is part of the stack, else the shops assign by hand."""
    if choice == "auto":
        return "dispatch" if "dispatch" in services else "shop"
    return choice


# --- the store check --------------------------------------------------------------------------------


@dataclass
class Told:
    """What customers were told or said (issue 16): notices by kind, ratings, the assistant's answers,
    each with one example from the store."""

    notices: Counter[str] = field(default_factory=Counter)
    languages: Counter[str] = field(default_factory=Counter)
    delay_example: str = ""
    ratings: list[int] = field(default_factory=list)
    rating_example: str = ""
    answers: int = 0
    answer_example: str = ""


def told_figures(conn: sa.Connection, orders: set[str]) -> Told:
    """Notices, ratings and assistant answers of ``orders``, read from the store."""
    told = Told()
    e, o, c = m.EVENTS.c, m.ORDERS.c, m.CHAT.c
    for oid, data in conn.execute(sa.select(e.order_id, e.data).where(e.type == "order.notified")):
        if oid in orders and isinstance(data, dict):
            told.notices[str(data.get("kind"))] += 1
            told.languages[str(data.get("language"))] += 1
            if data.get("kind") == "delayed" and not told.delay_example:
                told.delay_example = f"{oid}: {data.get('text', '')}"
    for oid, stars, comment in conn.execute(
        sa.select(o.id, o.rating, o.rating_comment).where(o.rating.is_not(None))
    ):
        if oid in orders:
            told.ratings.append(int(stars))
            told.rating_example = told.rating_example or f"{oid}: {stars}/5 “{comment}”"
    for oid, text in conn.execute(sa.select(c.order_id, c.text).where(c.author_role == "assistant")):
        if oid in orders:
            told.answers += 1
            if len(text) > len(told.answer_example):  # the longest says the most facts
                told.answer_example = f"{oid}: {text}"
    return told


@dataclass
class StoreFigures:
    """What the store says at the end of a run."""

    outcomes: dict[str, str] = field(default_factory=dict)
    delivered: int = 0
    on_time: int = 0
    #: Delivered orders with a delivery photo in the store (issue 16).
    photos: int = 0
    alerts_by_rule: Counter[str] = field(default_factory=Counter)
    sent: int = 0
    stored: int = 0
    refused: int = 0
    lost: list[str] = field(default_factory=list)
    duplicates: int = 0
    told: Told = field(default_factory=Told)


def _chunks(ids: list[str], size: int = 500) -> Iterable[list[str]]:
    for i in range(0, len(ids), size):
        yield ids[i : i + size]


def store_figures(database_url: str, sent_ids: Iterable[str], orders: Iterable[str]) -> StoreFigures:
    """Read the store (read-only) and check the sent events against it."""
    fig = StoreFigures()
    sent = list(dict.fromkeys(sent_ids))
    wanted = set(orders)
    engine = make_engine(database_url, readonly=True)
    try:
        with engine.connect() as conn:
            o = m.ORDERS
            rows = conn.execute(
                sa.select(o.c.id, o.c.status, o.c.failure_reason, o.c.delivered_at, o.c.window_end, o.c.photo)
            )
            for oid, status, reason, delivered_at, window_end, photo in rows:
                if oid not in wanted:
                    continue
                fig.outcomes[oid] = outcome_of(status, reason)
                if status == "delivered":
                    fig.delivered += 1
                    fig.photos += 1 if photo else 0
                    if delivered_at is not None and delivered_at <= window_end:
                        fig.on_time += 1
            a = m.ALERTS
            for rule, n in conn.execute(sa.select(a.c.rule, sa.func.count()).group_by(a.c.rule)):
                fig.alerts_by_rule[str(rule)] = int(n)
            stored: set[str] = set()
            refused: set[str] = set()
            for part in _chunks(sent):
                stored.update(
                    r[0] for r in conn.execute(sa.select(m.EVENTS.c.id).where(m.EVENTS.c.id.in_(part)))
                )
                d = m.DEAD_LETTERS
                refused.update(
                    r[0] for r in conn.execute(sa.select(d.c.event_id).where(d.c.event_id.in_(part)))
                )
            total, distinct = conn.execute(
                sa.select(sa.func.count(), sa.func.count(sa.distinct(m.EVENTS.c.id)))
            ).one()
            fig.told = told_figures(conn, wanted)
    finally:
        engine.dispose()
    fig.sent = len(sent)
    fig.stored = len(stored)
    fig.refused = len(refused - stored)
    fig.lost = [i for i in sent if i not in stored and i not in refused]
    fig.duplicates = int(total) - int(distinct)
    return fig


# --- summary ------------------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return f"{value:.0f} ms" if value is not None else "–"


def _duration(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:02.0f} s" if seconds >= 60 else f"{seconds:.0f} s"


def summary_table(
    result: SimResult, figures: StoreFigures | None, *, title: str, store_hint: str = ""
) -> Table:
    """The end-of-run summary: outcomes, punctuality, alerts, events vs store, latency."""
    table = Table(title=title, show_header=False, expand=False)
    table.add_column("what", style="bold")
    table.add_column("figure")
    rows = summary_rows(result, figures)
    if store_hint:
        rows.append(("store", store_hint))
    for what, figure in rows:
        table.add_row(what, figure)
    return table


def summary_rows(result: SimResult, figures: StoreFigures | None) -> list[Row]:
    """The summary's rows, as (what, figure)."""
    return [*_outcome_rows(result, figures), _events_row(result, figures), *_run_rows(result)]


Row = tuple[str, str]


def _outcome_rows(result: SimResult, figures: StoreFigures | None) -> list[Row]:
    """Orders by outcome, punctuality, outcomes as planned, alerts by rule."""
    plan = result.plan
    outcomes = figures.outcomes if figures is not None else {k: v for k, v in result.outcomes.items() if v}
    rows = [_orders_row(len(plan.orders), Counter(outcomes.values()))]
    if figures is not None:
        share = f"{figures.on_time / figures.delivered:.0%}" if figures.delivered else "–"
        rows.append(
            (
                "on time",
                f"{figures.on_time}/{figures.delivered} delivered orders ({share}) "
                "by the end of their promised window",
            )
        )
    same = sum(1 for o, want in plan.outcomes().items() if outcomes.get(o) == want)
    rows.append(("as planned", f"{same}/{len(plan.orders)} orders ended as seed {plan.seed} planned"))
    if figures is not None:
        alerts = ", ".join(f"{k} {v}" for k, v in sorted(figures.alerts_by_rule.items())) or "none raised"
        rows.append(("alerts by rule", alerts))
        rows.append(
            ("photos", f"{figures.photos}/{figures.delivered} delivered orders with a delivery photo")
        )
        rows.extend(_told_rows(figures.told))
    return rows


def _told_rows(told: Told) -> list[Row]:
    """Notices by kind and a delay notice, ratings and one, the assistant's answers and one."""
    kinds = " · ".join(f"{k} {v}" for k, v in sorted(told.notices.items())) or "none"
    if told.languages:
        kinds += " (" + ", ".join(f"{k} {v}" for k, v in sorted(told.languages.items())) + ")"
    rows = [("notices", kinds + (f"; e.g. {told.delay_example}" if told.delay_example else ""))]
    if told.ratings:
        average = sum(told.ratings) / len(told.ratings)
        rows.append(("ratings", f"{len(told.ratings)}, average {average:.1f}; e.g. {told.rating_example}"))
    else:
        rows.append(("ratings", "none"))
    answer = f"; e.g. {told.answer_example}" if told.answer_example else ""
    rows.append(("assistant", f"{told.answers} answers{answer}"))
    return rows


def _orders_row(total: int, counts: Counter[str]) -> Row:
    failed = {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("failed:")}
    finished = sum(v for k, v in counts.items() if k in ("delivered", "cancelled") or k.startswith("failed:"))
    failed_detail = f" ({', '.join(f'{k} {v}' for k, v in sorted(failed.items()))})" if failed else ""
    return (
        "orders",
        f"{total}: delivered {counts.get('delivered', 0)} · failed {sum(failed.values())}"
        f"{failed_detail} · cancelled {counts.get('cancelled', 0)} · still open {total - finished}",
    )


def _events_row(result: SimResult, figures: StoreFigures | None) -> Row:
    """Events sent against the store (or, without it, against the acks)."""
    if figures is None:
        m_ = result.metrics
        return "events", f"sent {len(m_.events)} · acknowledged {len(m_.stored)} · refused {len(m_.refused)}"
    return (
        "events",
        f"sent {figures.sent} · stored {figures.stored} · refused {figures.refused} (in dead letters, "
        f"with the reason) · LOST {len(figures.lost)} · stored twice {figures.duplicates} "
        "(checked against the store)",
    )


def _run_rows(result: SimResult) -> list[Row]:
    """Latency, what happened, simulated time, privacy breaches."""
    lat = result.metrics.latencies_ms()
    c = result.metrics.counters
    incidents = ", ".join(f"{k} {v}" for k, v in sorted(c.items()) if v and "foreign" not in k) or "none"
    rows = [
        (
            "latency",
            f"publish→canonical P50 {_ms(percentile(lat, 50))} · P99 {_ms(percentile(lat, 99))} "
            f"(n={len(lat)})",
        ),
        ("happened", incidents),
        (
            "time",
            f"{result.sim_minutes / 60:.1f} h of a {result.plan.day_minutes / 60:.0f} h day simulated in "
            f"{_duration(result.real_s)} real ({result.speed / 60:.1f} simulated min per s)",
        ),
    ]
    if result.foreign_messages:
        rows.append(
            ("PRIVACY", f"customers received {result.foreign_messages} message(s) about other orders")
        )
    return rows


# --- running ------------------------------------------------------------------------------------------


async def _play(
    sim: Simulation, console: Console, *, live: bool, check: Callable[[], list[str]] | None
) -> SimResult:
    """Run the simulation with its view; the first Ctrl-C / SIGTERM ends it early (cleanly)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def interrupt() -> None:
        if stop.is_set():
            return
        stop.set()
        # A second Ctrl-C is not caught: it interrupts the clean-up too (children still stopped).
        with contextlib.suppress(Exception):
            loop.remove_signal_handler(signal.SIGINT)

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, interrupt)

    async def guard() -> None:
        while check is not None:
            await asyncio.sleep(1.0)
            dead = check()
            if dead:
                console.print(f"[bold red]service(s) exited: {', '.join(dead)}; stopping the run[/bold red]")
                stop.set()
                return

    viewer = asyncio.create_task(watch(sim, console, live=live))
    guard_task = asyncio.create_task(guard())
    try:
        return await sim.run(stop)
    finally:
        await cancel_and_wait(viewer, guard_task)
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)


async def _play_with_links(
    sim: Simulation, console: Console, settings: Settings, *, live: bool, check: Callable[[], list[str]]
) -> SimResult:
    """:func:`_play`, printing the first tracking links as the shops create orders."""
    announcer = asyncio.create_task(announce_links(settings, console))
    try:
        return await _play(sim, console, live=live, check=check)
    finally:
        await cancel_and_wait(announcer)


def _hold(check: Callable[[], list[str]]) -> None:
    """Wait for Ctrl-C / SIGTERM (or a service exiting)."""
    stop = threading.Event()
    old = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5) and not check():
            pass
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def scaled_alert_rules(speed: float) -> str:
    """Alert thresholds for a compressed day: the built-in ones in SIMULATED minutes.

    The alerts service counts real minutes; the simulated day runs ``speed`` times faster, so each
    threshold is divided by ``speed`` (with a floor of a few real seconds, above the jitter of
    positions and ticks). ``eta_slip`` is off: the ETA the persister computes comes from the
    reported speed, and ``vel`` cannot carry a compressed speed (the payload model caps it at
    400 km/h), so that ETA runs slower than the simulated day.
    """

    def real_min(sim_min: float, floor_s: float) -> float:
        return round(max(sim_min / speed, floor_s / 60.0), 4)

    return (
        "# Written by `bloomwire demo`: the built-in thresholds, in simulated minutes\n"
        f"# (the day runs {speed:.0f}x faster than the clock the alerts service reads).\n"
        "[defaults]\n"
        f"overdue_grace_min = {real_min(5, 3)}\n"
        f"stale_position_min = {real_min(5, 6)}\n"
        f"rider_offline_min = {real_min(2, 1)}\n"
        f"unassigned_min = {real_min(10, 3)}\n"
        f"escalate_after_min = {real_min(15, 6)}\n"
        f"followup_after_h = {round(max(2.0 / speed, 10 / 3600), 5)}\n"
        'disabled = ["eta_slip"]\n'
    )


def _alert_rules_file(root: Path, speed: float, console: Console) -> Path | None:
    """Write the scaled rules next to the store; None (the defaults) if the service rejects them."""
    path = root / "sim-alert-rules.toml"
    path.write_text(scaled_alert_rules(speed), encoding="utf-8")
    try:
        load_rules(path)
    except BloomwireError as exc:
        console.print(f"[yellow]alert thresholds stay the built-in ones: {exc}[/yellow]")
        return None
    return path


def _provisioner(data_dir: Path, known: set[str], add_user: Callable[[str], str]) -> Callable[[str], str]:
    """Passwords for simulated identities; accounts made at broker start are just read back."""
    lock = threading.Lock()

    def provision(name: str) -> str:
        if name in known:
            return ensure_secret(data_dir, name)
        with lock:
            password = add_user(name)
            known.add(name)
            return password

    return provision


def make_plan(
    seed: int, *, orders: int, riders: int, shops: int, rates: Rates | None = None, order_prefix: str = ""
) -> DayPlan:
    """The day plan, or a :class:`UsageError` naming the bad argument."""
    if orders < 1:
        raise UsageError(f"--orders must be at least 1, not {orders}")
    if riders < 1:
        raise UsageError(f"--riders must be at least 1, not {riders}")
    try:
        return plan_day(
            seed, orders=orders, riders=riders, shops=shops, rates=rates, order_prefix=order_prefix
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def run_demo(
    settings: Settings,
    console: Console,
    *,
    minutes: float = DEFAULT_MINUTES,
    riders: int = DEFAULT_RIDERS,
    orders: int = DEFAULT_ORDERS,
    shops: int = DEFAULT_SHOPS,
    seed: int = DEFAULT_SEED,
    assign: AssignChoice = "auto",
    rates: Rates | None = None,
    live: bool | None = None,
    access: bool = True,
    keep_up: bool = False,
    summary: Callable[[str, list[Row]], None] | None = None,
) -> int:
    """The whole demo; returns the exit code (0, or 1 if an event was lost or a service died).

    ``access``: the broker runs with access control (every identity only its own topics; each
    customer's login issued by the provisioner), as ``bloomwire up`` does by default.
    ``keep_up``: after the day and its summary, the stack (web pages included) stays up until
    Ctrl-C, for a person to look around. ``summary``: also given the summary's title and rows
    (``bloomwire demo --record`` writes them into the docs).
    """
    if not minutes > 0:
        raise UsageError(f"--minutes must be positive, not {minutes}")
    plan = make_plan(seed, orders=orders, riders=riders, shops=shops, rates=rates)
    root = settings.data_dir / "demo"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    demo_settings = settings.model_copy(
        update={
            "shop_names": {s.id: s.name for s in plan.shops} | settings.shop_names,
            "data_dir": root,
            "database_url": f"sqlite:///{(root / 'bloomwire.db').resolve()}",
            "broker_port": 0,
            "broker_ws_port": 0,
            # a fresh data dir every run: free ports, never the ones `up` keeps for var/
            "broker_listen_port": 0,
            "broker_listen_ws_port": 0,
            "web_listen_port": 0,
            "metrics_port": 0,
            "broker_username": None,
            "broker_password": None,
        }
    )
    services = (*SERVICES, ASSISTANT, NOTICES, WEB)
    mode = resolve_assign(assign, services)
    users = Simulation.users(plan, customers=not access)
    if "alerts" in services:
        rules = _alert_rules_file(root, Simulation.speed_for(plan, minutes), console)
        demo_settings = demo_settings.model_copy(update={"alerts_rules": rules})
    # As the alerts' eta_slip: the persister's ETAs do not follow the compressed day.
    demo_settings = demo_settings.model_copy(update={"notices_by_eta": False})
    if access:
        stack = Stack(
            demo_settings,
            services=services,
            access=True,
            shops=[s.id for s in plan.shops],
            riders=[r.id for r in plan.riders],
        )
    else:
        stack = Stack(demo_settings, services=services, extra_users=users)
    live = console.is_terminal if live is None else live
    console.print(
        f"[bold]Bloomwire demo[/bold]: seed {seed}, {orders} orders, {riders} riders, "
        f"{len(plan.shops)} shops in Berlin, ~{minutes:g} min; fresh store {demo_settings.database_url}"
    )
    started = time.monotonic()
    dead: list[str] = []
    result: SimResult | None = None
    try:
        live_settings = stack.start()
        console.print(
            f"broker mqtt://{live_settings.broker_host}:{live_settings.broker_port} "
            + ("with access control" if access else "without access control (password file)")
            + f" · services {', '.join(stack.children)} online · riders assigned by "
            + ("the dispatch service" if mode == "dispatch" else "the shops (no dispatch service)")
        )
        console.print(dashboard_line(live_settings, plan.shops[0].id, show_password=True), soft_wrap=True)
        config = SimConfig(minutes=minutes, assign=mode, outbox_dir=root / "outboxes", access_control=access)
        provision = _provisioner(root, set(users), stack.add_user)
        sim = Simulation(live_settings, plan, config, provision)
        result = asyncio.run(_play_with_links(sim, console, live_settings, live=live, check=stack.check))
        dead = stack.check()
        if keep_up and not result.stopped_early and not dead:
            console.print(
                "The day is over and the stack stays up (--keep-up): "
                + dashboard_line(live_settings, plan.shops[0].id, show_password=True)
                + ". Ctrl-C stops everything and prints the summary.",
                soft_wrap=True,
            )
            _hold(stack.check)
            dead = stack.check()
    finally:
        stack.stop()
    figures = store_figures(demo_settings.database_url, result.metrics.events, (o.id for o in plan.orders))
    hint = f"{root / 'bloomwire.db'}; e.g. `bloomwire --data-dir {root} history {plan.orders[0].id}`"
    title = f"Bloomwire demo summary (seed {seed}; {_duration(time.monotonic() - started)} wall time)"
    if result.stopped_early:
        title += " (interrupted)"
    console.print(summary_table(result, figures, title=title, store_hint=hint))
    if summary is not None:
        summary(title, summary_rows(result, figures))
    if figures.lost:
        console.print(
            f"[bold red]LOST events (sent, neither stored nor refused): {', '.join(figures.lost[:10])}"
        )
    if dead:
        console.print(f"[bold red]service(s) died during the run: {', '.join(dead)}; see {root / 'logs'}")
    console.print("Stopped cleanly: clients, services, broker.")
    if result.stopped_early:
        return 130
    return 1 if figures.lost or dead else 0


def run_simulate(
    settings: Settings,
    console: Console,
    *,
    minutes: float,
    riders: int,
    orders: int,
    shops: int,
    seed: int,
    assign: AssignChoice,
    rates: Rates | None = None,
    tag: str | None = None,
    live: bool | None = None,
    access: bool = True,
    shop_ids: Sequence[str] = (),
    rider_ids: Sequence[str] = (),
) -> int:
    """``bloomwire simulate``: against the broker in the settings, or a stack of its own.

    ``access``: the broker runs (or is started) with access control, so customers get their
    login from the provisioner. ``shop_ids``/``rider_ids`` name the day's shops and riders (e.g.
    the accounts ``bloomwire up`` made) and set how many there are.
    """
    if not minutes > 0:
        raise UsageError(f"--minutes must be positive, not {minutes}")
    for name in (*shop_ids, *rider_ids):
        check_name(name, "shop or rider id")
    prefix = tag if tag is not None else f"s{datetime.now():%H%M%S}-"
    plan = make_plan(
        seed,
        orders=orders,
        riders=len(rider_ids) or riders,
        shops=len(shop_ids) or shops,
        rates=rates,
        order_prefix=prefix,
    )
    try:
        plan = rename(plan, shop_ids, rider_ids)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    users = Simulation.users(plan, customers=not access)
    live = console.is_terminal if live is None else live
    outboxes = settings.data_dir / "clients" / "sim-outboxes"
    stack: Stack | None = None
    if settings.external_broker:
        missing = []
        for name in users:
            try:
                resolve_password(
                    settings.model_copy(update={"broker_password": None}), name, None, "identity"
                )
            except UsageError:
                missing.append(name)
        if missing:
            raise UsageError(
                f"the simulator connects as {len(users)} identities but has no password for "
                f"{', '.join(missing[:8])}{' …' if len(missing) > 8 else ''}: provision them on the "
                f"broker at {settings.broker_host}:{settings.broker_port} (passwords in "
                f"{settings.data_dir / 'secrets'}), or unset BLOOMWIRE_BROKER_PORT to let the simulator "
                "start its own broker and services"
            )
        mode = resolve_assign(assign, SERVICES)
        provision: Callable[[str], str] = partial(ensure_secret, settings.data_dir)
        live_settings = settings.model_copy(update={"broker_username": None, "broker_password": None})
    else:
        own = settings
        if "alerts" in SERVICES:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            rules = _alert_rules_file(settings.data_dir, Simulation.speed_for(plan, minutes), console)
            own = settings.model_copy(update={"alerts_rules": rules})
        if access:
            stack = Stack(
                own,
                services=tuple(SERVICES),
                access=True,
                shops=[s.id for s in plan.shops],
                riders=[r.id for r in plan.riders],
            )
        else:
            stack = Stack(own, services=tuple(SERVICES), extra_users=users)
        mode = resolve_assign(assign, stack.services)
    try:
        if stack is not None:
            live_settings = stack.start()
            provision = _provisioner(settings.data_dir, set(users), stack.add_user)
            console.print(
                f"broker mqtt://{live_settings.broker_host}:{live_settings.broker_port} · services "
                f"{', '.join(stack.children)} online"
            )
        config = SimConfig(minutes=minutes, assign=mode, outbox_dir=outboxes, access_control=access)
        sim = Simulation(live_settings, plan, config, provision)
        console.print(
            f"simulating seed {seed}: {orders} orders (ids {plan.orders[0].id}…), {riders} riders, "
            f"{len(plan.shops)} shops; assignment by {mode}"
        )
        result = asyncio.run(_play(sim, console, live=live, check=stack.check if stack else None))
    finally:
        if stack is not None:
            stack.stop()
    console.print(summary_table(result, None, title=f"Simulation summary (seed {seed}, as seen over MQTT)"))
    return 130 if result.stopped_early else 0
