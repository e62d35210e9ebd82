"""The live view of a running simulation (a Rich Live panel, or progress lines without a TTY)."""

from __future__ import annotations

import asyncio
import contextlib

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from bloomwire.app.clients.views import STATUS_STYLE
from bloomwire.app.simulate.metrics import percentile
from bloomwire.app.simulate.runner import TERMINAL_VALUES, Simulation

ORDER_OF_STATUS = (
    "planned", "created", "assigned", "accepted", "declined", "picked_up", "en_route", "arrived",
    "delivered", "failed", "returned", "cancelled",
)  # fmt: skip


def _latency(sim: Simulation) -> str:
    values = sim.metrics.latencies_ms()
    p50 = percentile(values, 50)
    return f"{p50:.0f} ms" if p50 is not None else "–"


def render(sim: Simulation) -> RenderableType:
    """Progress of the day, orders per status, the live orders and the latest activity."""
    clock, plan = sim.clock, sim.plan
    started = sim.started_at is not None
    now = clock.label() if started else "starting"
    head = Text()
    head.append("Bloomwire simulated day ", style="bold")
    head.append(
        f"{clock.label(0)}–{clock.label(plan.day_minutes)} · now {now} · "
        f"{clock.speed / 60:.1f} simulated min per real s · riders up {sim.riders_up()}/{len(sim.riders)} · "
        f"assignment by {sim.config.assign}"
    )
    bar = Table.grid(padding=(0, 1))
    bar.add_row(
        ProgressBar(total=1.0, completed=sim.day_fraction(), width=60),
        Text(f"{sim.day_fraction():.0%} of the day"),
    )
    counts = sim.status_counts()
    summary = Text()
    for status in ORDER_OF_STATUS:
        if counts.get(status):
            summary.append(f"{status} {counts[status]}  ", style=STATUS_STYLE.get(status, ""))
    live = Table("order", "shop", "status", "rider", "promised", title="Live orders", expand=False)
    shown = 0
    for o in plan.orders:
        current = sim.status(o.id)
        if current is None or current in TERMINAL_VALUES:
            continue
        line = sim.world.shops[o.shop].terminal.view.orders.get(o.id)
        window = f"{clock.label(o.window_start_min)}–{clock.label(o.window_end_min)}"
        rider = (line.rider if line else None) or "–"
        live.add_row(o.id, o.shop, Text(current, style=STATUS_STYLE.get(current, "")), rider, window)
        shown += 1
        if shown >= 12:
            break
    m = sim.metrics
    stats = Text(
        f"events sent {len(m.events)} · stored {len(m.stored)} · refused {len(m.refused)} · "
        f"publish→canonical P50 {_latency(sim)} · "
        + " · ".join(f"{k} {v}" for k, v in sorted(m.counters.items()) if v),
        style="dim",
    )
    feed = Text("\n".join(m.feed) if m.feed else "…", style="dim")
    return Group(head, bar, summary, live, stats, feed)


def progress_line(sim: Simulation) -> str:
    """One line for logs and CI."""
    counts = sim.status_counts()
    done = sum(counts[s] for s in TERMINAL_VALUES)
    return (
        f"[{sim.clock.label() if sim.started_at else 'start'}] day {sim.day_fraction():4.0%} · "
        f"orders {done}/{len(sim.plan.orders)} finished ("
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        + f") · riders up {sim.riders_up()}/{len(sim.riders)} · events sent {len(sim.metrics.events)}, "
        f"stored {len(sim.metrics.stored)} · P50 {_latency(sim)}"
    )


async def watch(sim: Simulation, console: Console, *, live: bool, every_s: float = 10.0) -> None:
    """Show the run until cancelled: a live panel on a terminal, else a progress line every ``every_s``."""
    if live:
        with (
            Live(render(sim), console=console, refresh_per_second=4, transient=False) as panel,
            contextlib.suppress(asyncio.CancelledError),
        ):
            while not sim.finished:
                panel.update(render(sim))
                await asyncio.sleep(0.25)
        return
    with contextlib.suppress(asyncio.CancelledError):
        while not sim.finished:
            await asyncio.sleep(every_s)
            if not sim.finished:
                console.print(progress_line(sim), highlight=False, soft_wrap=True)
