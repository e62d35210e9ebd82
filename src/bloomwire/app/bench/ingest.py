"""``bloomwire bench ingest``: rider events through a real broker into the persister, measured.

Starts its own Mosquitto and persister (a child process, as in production) in a temporary data
dir, sets up one accepted order per simulated rider through the real MQTT path, then publishes
rider chat events (each stored in ``events`` and ``chat_lines``, republished canonically and acked
to the rider) at a set rate, through :class:`~bloomwire.app.bench.loadgen.LoadPublisher` so that the
load generator takes next to no CPU from the persister. Reports persisted events/s,
publish→committed (the device ack) and publish→canonical latencies, lost and duplicated counts
checked against the store, the persister's CPU per event, and the broker's own QoS 1 ceiling on
the same broker (:mod:`.peak_ceiling`: several ``mosquitto_pub -l`` at once into one
``mosquitto_sub`` that checks every message, repeated).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from rich.console import Console

from bloomwire.app.bench import peak_ceiling, private_stack
from bloomwire.app.bench.loadgen import LoadPublisher
from bloomwire.app.bench.peak_ceiling import Ceiling, Publisher
from bloomwire.app.bench.peak_procs import cpu_s
from bloomwire.app.bench.report import Report
from bloomwire.app.supervisor import service_settings
from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.runtime.mqtt import Connection
from bloomwire.runtime.settings import Settings
from bloomwire.store import make_engine

BENCH_USER = "bench"
#: The load publisher writes everything due once per tick.
TICK_S = 0.002
#: One account per connection: the broker uses the username as client id, so two connections
#: sharing a username would take each other's session over.
BENCH_USERS = ("bench", "bench-watch", "bench-watch-acks")


@dataclass
class Figures:
    """What one run measured."""

    events: int
    rate: int
    seconds: float = 0.0
    persisted_per_s: float = 0.0
    committed_ms: list[float] = field(default_factory=list)
    canonical_ms: list[float] = field(default_factory=list)
    stored: int = 0
    lost: int = 0
    duplicated: int = 0
    ceiling: Ceiling | None = None
    publish_s: float = 0.0
    #: The persister process's CPU (all threads) from the first publish to the last arrival, per
    #: event: what the hot path costs, less moved by the host's load than events/s.
    persister_cpu_us: float | None = None
    load_average: tuple[float, float] = (0.0, 0.0)

    @property
    def ceiling_per_s(self) -> float:
        """The broker's median QoS 1 ceiling of the same run (0 when not measured)."""
        return self.ceiling.median if self.ceiling else 0.0

    def pct(self, values: list[float], q: float) -> float:
        """The q-th percentile of ``values`` (ms)."""
        if not values:
            return float("nan")
        return (
            statistics.quantiles(values, n=1000, method="inclusive")[int(q * 10) - 1]
            if len(values) > 1
            else values[0]
        )

    def as_dict(self) -> dict[str, Any]:
        """Figures as plain numbers (for JSON output)."""
        return {
            "events": self.events,
            "rate": self.rate,
            "seconds": round(self.seconds, 3),
            "publish_seconds": round(self.publish_s, 3),
            "persister_cpu_us_per_event": None
            if self.persister_cpu_us is None
            else round(self.persister_cpu_us, 1),
            "load_average_before_after": list(self.load_average),
            "persisted_per_s": round(self.persisted_per_s),
            "committed_p50_ms": round(self.pct(self.committed_ms, 50), 2),
            "committed_p99_ms": round(self.pct(self.committed_ms, 99), 2),
            "canonical_p50_ms": round(self.pct(self.canonical_ms, 50), 2),
            "canonical_p99_ms": round(self.pct(self.canonical_ms, 99), 2),
            "stored": self.stored,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "ceiling_per_s": round(self.ceiling_per_s),
            "ceiling": self.ceiling.as_dict() if self.ceiling else None,
            "ratio_to_ceiling": round(self.persisted_per_s / self.ceiling_per_s, 3)
            if self.ceiling_per_s
            else None,
        }


async def _setup_orders(settings: Settings, riders: int) -> list[tuple[str, str]]:
    """One accepted order per rider, created through the real MQTT path."""
    conn = Connection(service_settings(settings, BENCH_USER), BENCH_USER, tuned=True)
    conn.subscribe(topics.all_orders_filter(topics.OrderChannel.STATE), qos=1)
    conn.start()
    await conn.wait_connected()
    now = ev.now()
    pairs = [(f"r{i}", f"o{i}") for i in range(riders)]
    window = ev.Window(start=now, end=now + timedelta(hours=2))
    for rider, order in pairs:
        conn.publish(topics.rider_presence(rider), b"online", retain=True)
        created = ev.OrderCreateEvent(
            source="shops/bench",
            data=ev.OrderCreated(
                order=order, customer=ev.Customer(name="Bench", lat=52.52, lon=13.40), window=window
            ),
        )
        conn.publish(topics.shop_command("bench", topics.Command.CREATE_ORDER), ev.encode(created))
        offer = ev.DispatchOfferedEvent(
            source="services/bench",
            data=ev.DispatchOffer(
                offer=f"of-{order}", order=order, rider=rider, deadline=now + timedelta(minutes=10)
            ),
        )
        conn.publish(topics.service_events("bench"), ev.encode(offer))
        reply = ev.DispatchReplyEvent(
            source=f"riders/{rider}",
            data=ev.DispatchReply(offer=f"of-{order}", order=order, accept=True),
        )
        conn.publish(topics.rider_replies(rider), ev.encode(reply))
    accepted: set[str] = set()
    deadline = time.monotonic() + 30
    while len(accepted) < riders and time.monotonic() < deadline:
        await conn.wait_message(0.2)
        for msg in conn.drain(1000):
            state = json.loads(msg.payload)
            if state.get("status") == "accepted":
                accepted.add(state["order"])
    await conn.stop()
    if len(accepted) < riders:
        raise RuntimeError(f"only {len(accepted)}/{riders} bench orders reached 'accepted'")
    return pairs


def _sub_args(settings: Settings, user: str) -> list[str]:
    creds = service_settings(settings, user)
    password = creds.broker_password.get_secret_value() if creds.broker_password else ""
    return [
        "-h",
        settings.broker_host,
        "-p",
        str(settings.broker_port),
        "-u",
        user,
        "-P",
        password,
        "-q",
        "1",
    ]


def _watch(settings: Settings, user: str, topic_filter: str, out: Path) -> subprocess.Popen[bytes]:
    """A mosquitto_sub stamping each message with its arrival time (ns), so measuring costs
    the benchmark no Python CPU (on 2 cores a Python watcher became the bottleneck)."""
    stdbuf = ["stdbuf", "-oL"] if shutil.which("stdbuf") else []
    with out.open("wb") as fh:
        return subprocess.Popen(
            [
                *stdbuf,
                "mosquitto_sub",
                *_sub_args(settings, user),
                "-t",
                topic_filter,
                "-F",
                "%U %p",
            ],
            stdout=fh,
        )


def _persister_pid() -> int | None:
    """The pid of this process's child ``bloomwire service run persister`` (the private stack's)."""
    me = os.getpid()
    for task in Path(f"/proc/{me}/task").glob("*/children"):
        for pid in task.read_text().split():
            with contextlib.suppress(OSError):
                if b"persister" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                    return int(pid)
    return None


def _read_stamps(path: Path) -> list[tuple[float, Any]]:
    stamps = []
    for line in path.read_bytes().splitlines():
        stamp, _, payload = line.partition(b" ")
        try:
            stamps.append((float(stamp), json.loads(payload)))
        except ValueError:
            continue
    return stamps


def _publish(
    settings: Settings, figures: Figures, pairs: list[tuple[str, str]]
) -> tuple[dict[str, float], float]:
    """Publish the events at the set rate; their send times and the wall-clock start."""
    creds = service_settings(settings, BENCH_USER)
    password = creds.broker_password.get_secret_value() if creds.broker_password else ""
    pub = LoadPublisher(settings.broker_host, settings.broker_port, BENCH_USER, password)
    pub.connect()
    packets: list[tuple[str, bytes]] = []
    for k in range(figures.events):
        rider, order = pairs[k % len(pairs)]
        e = ev.OrderChatPostedEvent(
            source=f"riders/{rider}", data=ev.OrderChat(order=order, text=f"bench line {k}")
        )
        packets.append((e.id, pub.packet(topics.rider_order_chat(rider, order), ev.encode(e))))
    sent_at: dict[str, float] = {}
    n, k = len(packets), 0
    start = time.perf_counter()
    wall0 = time.time()
    while k < n:
        elapsed = time.perf_counter() - start
        # Everything due by now goes in one write; at --rate 0, 500 at a time.
        due = min(n, int(elapsed * figures.rate) + 1) if figures.rate else min(n, k + 500)
        if due <= k:
            # Wake on the next tick, not for each event: a write (and a broker read) per event
            # at 5,000/s costs the machine CPU the system under test then does not have.
            time.sleep(TICK_S - elapsed % TICK_S)
            continue
        stamp = wall0 + (time.perf_counter() - start)
        chunk = packets[k:due]
        for eid, _ in chunk:
            sent_at[eid] = stamp
        pub.send(b"".join(p for _, p in chunk), len(chunk))
        k = due
    figures.publish_s = time.perf_counter() - start
    pub.close()
    return sent_at, wall0


async def _run(settings: Settings, figures: Figures, pairs: list[tuple[str, str]], tmp: Path) -> None:
    chat_file, ack_file = tmp / "canonical.txt", tmp / "acks.txt"
    watchers = [
        _watch(settings, "bench-watch", topics.all_orders_filter(topics.OrderChannel.CHAT), chat_file),
        _watch(settings, "bench-watch-acks", f"{topics.RIDERS}/+/inbox/acks", ack_file),
    ]
    await asyncio.sleep(0.5)  # let the watchers subscribe
    persister = _persister_pid()
    cpu0 = cpu_s(persister) if persister else None
    load0 = os.getloadavg()[0]
    sent_at, wall0 = await asyncio.to_thread(_publish, settings, figures, pairs)
    deadline = time.monotonic() + 120
    seen, read = 0, 0
    with chat_file.open("rb") as fh:
        while time.monotonic() < deadline and seen < figures.events:
            await asyncio.sleep(0.5)
            fh.seek(read)
            new = fh.read()
            read += len(new)  # count only what was written since the last look
            seen += new.count(b"\n")
    cpu1 = cpu_s(persister) if persister else None
    if cpu0 is not None and cpu1 is not None:
        figures.persister_cpu_us = (cpu1 - cpu0) / figures.events * 1e6
    figures.load_average = (round(load0, 2), round(os.getloadavg()[0], 2))
    await asyncio.sleep(1.0)  # the last acks trail the last canonical events
    for w in watchers:
        w.terminate()
        w.wait()
    canonical: dict[str, float] = {}
    for t, payload in _read_stamps(chat_file):
        if payload["id"] in canonical:
            figures.duplicated += 1
        canonical.setdefault(payload["id"], t)
    acked: dict[str, float] = {}
    for t, payload in _read_stamps(ack_file):
        for i in payload["ids"]:
            acked.setdefault(i, t)
    last = max([*acked.values(), *canonical.values()], default=time.time())
    figures.seconds = last - wall0
    figures.persisted_per_s = len(acked) / figures.seconds if figures.seconds > 0 else 0
    figures.committed_ms = [(acked[i] - s) * 1000 for i, s in sent_at.items() if i in acked]
    figures.canonical_ms = [(canonical[i] - s) * 1000 for i, s in sent_at.items() if i in canonical]
    engine = make_engine(settings.database_url, readonly=True)
    with engine.connect() as conn:
        stored = conn.execute(
            sa.text("SELECT COUNT(*), COUNT(DISTINCT id) FROM events WHERE type = 'order.chat_posted'")
        ).one()
    engine.dispose()
    figures.stored = int(stored[0])
    figures.duplicated += int(stored[0]) - int(stored[1])
    figures.lost = figures.events - int(stored[1])


#: Logins of the ceiling's publishers (one each: the username is the client id).
CEILING_PUBLISHERS = 8
CEILING_SUBSCRIBER = "bench-ceiling-sub"


def ceiling_users() -> tuple[str, ...]:
    """The broker accounts of the ceiling's clients."""
    return (CEILING_SUBSCRIBER, *(f"bench-ceiling-pub-{i}" for i in range(CEILING_PUBLISHERS)))


def measure_ceiling(
    settings: Settings, *, messages: int = 200_000, publishers: int = 4, runs: int = 3
) -> Ceiling | None:
    """The broker's QoS 1 ceiling on the bench's broker (:mod:`.peak_ceiling`), ``runs`` times."""
    pubs = [Publisher(f"bench-ceiling-pub-{i}", f"bench/ceiling/{i}") for i in range(CEILING_PUBLISHERS)]
    subscriber = (CEILING_SUBSCRIBER, "bench/ceiling/+")
    return peak_ceiling.measure(
        settings, pubs, *subscriber, messages=messages, runs=runs, parallel=publishers
    )


def run(
    settings: Settings, *, events: int, rate: int, riders: int, ceiling: bool, ceiling_runs: int = 3
) -> Figures:
    """Run the whole benchmark on a private broker and store; return the figures."""
    figures = Figures(events=events, rate=rate)
    with private_stack(settings, (*BENCH_USERS, *ceiling_users()), name="ingest") as (live, tmp):
        pairs = asyncio.run(_setup_orders(live, riders))
        asyncio.run(_run(live, figures, pairs, tmp))
        if ceiling:
            figures.ceiling = measure_ceiling(live, runs=ceiling_runs)
    return figures


def report(figures: Figures) -> Report:
    """The figures as a table."""
    d = figures.as_dict()
    out = Report("Bloomwire ingest benchmark")
    out.add("events published", d["events"])
    out.add("target rate (ev/s)", d["rate"] or "max")
    out.add("persisted (ev/s)", d["persisted_per_s"])
    out.add("publish→committed P50 / P99 (ms)", f"{d['committed_p50_ms']} / {d['committed_p99_ms']}")
    out.add("publish→canonical P50 / P99 (ms)", f"{d['canonical_p50_ms']} / {d['canonical_p99_ms']}")
    out.add("stored / lost / duplicated", f"{d['stored']} / {d['lost']} / {d['duplicated']}")
    cpu = d["persister_cpu_us_per_event"]
    out.add("persister CPU per event (µs, all its threads)", "not measured" if cpu is None else cpu)
    out.add("load average (1 min) before / after", " / ".join(str(x) for x in figures.load_average))
    c = figures.ceiling
    if c is not None and c.rates:
        runs = ", ".join(f"{r:,.0f}" for r in c.rates)
        out.add(
            f"broker QoS 1 ceiling (msg/s), same run: {c.publishers} mosquitto_pub -l → 1 mosquitto_sub",
            f"median {c.median:,.0f} (runs {runs})",
        )
        out.add("ceiling messages delivered per run", " · ".join(f"{d}/{c.messages}" for d in c.delivered))
        out.add("ratio persisted / ceiling", d["ratio_to_ceiling"])
    return out


def main(
    settings: Settings,
    *,
    events: int,
    rate: int,
    riders: int,
    ceiling: bool,
    console: Console,
    ceiling_runs: int = 3,
) -> list[Report]:
    """Run, print a table of the figures and their JSON; return the table."""
    console.print(f"bench ingest: {events} rider chat events at {rate or 'max'} ev/s from {riders} riders …")
    figures = run(
        settings, events=events, rate=rate, riders=riders, ceiling=ceiling, ceiling_runs=ceiling_runs
    )
    table = report(figures)
    console.print(table.rich())
    console.print_json(json.dumps(figures.as_dict()))
    return [table]
