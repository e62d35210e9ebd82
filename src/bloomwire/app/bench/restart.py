"""``bloomwire bench restart``: how long a service killed under ``bloomwire up`` is away.

Starts an access-controlled stack of its own (as ``up`` does, in a temporary directory), then
``kill -9``s each service ``kills`` times in a row, each time waiting until it says ``online``
again, and prints: seconds until the supervisor started a new process, and until that process
said ``online`` on its status topic (after its Last Will's ``offline``). Later kills within a
minute include the supervisor's growing delay (0.25 s, 0.5 s, 1 s, ...).

With ``orders``, the store is first seeded as ``bench scale`` seeds it (N open orders, half out
for delivery, N/5 open alerts, as much delivered history) and only the persister is run and
killed: the restart at the worst moment, when its start-up reads the whole open state.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console

from bloomwire.app.bench import scale, temporary_settings
from bloomwire.app.bench.report import Report
from bloomwire.app.supervisor import Stack, service_settings
from bloomwire.contract import topics
from bloomwire.contract.events import ServiceState, parse_service_status
from bloomwire.errors import BrokerError
from bloomwire.runtime.mqtt import Connection
from bloomwire.runtime.settings import Settings

OPERATOR = "operator"


async def _away(stack: Stack, name: str, timeout: float = 60.0) -> tuple[float, float]:
    """Kill ``name``; seconds until a new process runs, and until it says online again."""
    conn = Connection(service_settings(stack.settings, OPERATOR), OPERATOR)
    conn.subscribe(topics.service_status(name), qos=1)
    conn.start()
    try:
        await conn.wait_connected(10)
        await asyncio.sleep(0.2)
        conn.drain(100)  # the retained "online"
        victim = stack.children[name].pid
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        restarted = offline = None
        while time.monotonic() - killed < timeout:
            if restarted is None and stack.children[name].pid != victim:
                restarted = time.monotonic() - killed
            await conn.wait_message(0.01)
            for msg in conn.drain(100):
                state = parse_service_status(msg.payload).state
                if state is ServiceState.OFFLINE:
                    offline = True
                elif offline and state is ServiceState.ONLINE and restarted is not None:
                    return restarted, time.monotonic() - killed
        raise BrokerError(f"{name} not online again within {timeout:.0f} s of kill -9")
    finally:
        await conn.stop(announce_offline=False)


def _stack(settings: Settings, root: Path, orders: int) -> Stack:
    url = f"sqlite:///{root / 'bench.db'}"
    own = temporary_settings(settings, root, database_url=url)
    if not orders:
        return Stack(own, access=True, shops=["s1"], riders=["r1"])
    scale.seed(url, orders, datetime.now(UTC).replace(microsecond=0))
    return Stack(own, services=("persister",), access=True, shops=["s1"], riders=["r1"])


def main(settings: Settings, *, kills: int, console: Console, orders: int = 0) -> list[Report]:
    """Measure, print and return the table (``orders``: seed that many open orders first)."""
    seeded = f", {orders:,} open orders and {orders // 5:,} open alerts seeded" if orders else ""
    report = Report(
        f"kill -9 under a supervised stack, {kills} kills per service{seeded}",
        ("service", "kill", "new process after (s)", "online again after (s)"),
    )
    away: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bloomwire-bench-restart-") as tmp:
        if orders:
            console.print(f"[dim]seeding {orders:,} open orders ...[/dim]")
        stack = _stack(settings, Path(tmp), orders)
        stack.start(timeout=60 + orders / 1_000)  # the first start reads the seeded store too
        try:
            for name in stack.services:
                if orders and name != "persister":
                    continue
                for n in range(1, kills + 1):
                    restarted, online = asyncio.run(_away(stack, name, timeout=60 + orders / 1_000))
                    away.append(online)
                    report.add(name, n, f"{restarted:.2f}", f"{online:.2f}")
        finally:
            stack.stop()
    report.add("all", len(away), "", f"median {statistics.median(away):.2f}, max {max(away):.2f}")
    console.print(report.rich())
    return [report]
