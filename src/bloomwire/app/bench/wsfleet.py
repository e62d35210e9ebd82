"""``bloomwire bench web --connections N``: N customer connections through the web service's ``/mqtt``.

A broker and the web service of their own (password-file mode, one login per connection), then N
MQTT 3.1.1 connections over websockets from this one process (the ``websockets`` package, MQTT
packets written and parsed here: no browser, no paho), each subscribed to a topic of its own at
QoS 0 (as positions reach customers). A lean publisher (a process of its own, on the broker's TCP
port) sends every connection one message per 5 s, spread evenly, each carrying its send time.
Reported: how many connections held, messages delivered against expected, publish → received
latency (and the seconds in which any message took over 100 ms: a stall of the whole machine
shows there), the broker's and the web service's CPU over the publishing window, their resident
memory per connection, the load side's own CPU (when it nears a core, the latency is the fleet's)
and the load average. The open-files limit is raised to the hard one first (inherited by the
broker and the web service); the output says when it is too low for the web service's two
descriptors per page.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import multiprocessing
import os
import resource
import statistics
import struct
import tempfile
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

from rich.console import Console
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException
from websockets.typing import Subprotocol

from bloomwire.app.bench import temporary_settings
from bloomwire.app.bench.loadgen import LoadPublisher
from bloomwire.app.bench.peak_procs import cpu_s
from bloomwire.app.bench.report import Report
from bloomwire.app.supervisor import WEB, Stack, service_settings
from bloomwire.runtime.settings import Settings
from bloomwire.services.web.service import page_capacity, raise_open_files

PUBLISHER = "bench-ws-pub"
#: Each connection's message period (a customer's position every 5 s).
PERIOD_S = 5.0
#: Websocket handshakes and MQTT logins in flight at once while the fleet connects.
RAMP_CONCURRENCY = 64
#: Keepalive told to the broker: longer than the run, so the fleet sends nothing but acks.
KEEPALIVE_S = 1800
TICK_S = 0.01
#: A message later than this counts its second as a late one.
LATE_MS = 100.0


def _string(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("!H", len(raw)) + raw


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect_packet(user: str, password: str) -> bytes:
    """MQTT 3.1.1 CONNECT, clean session, username and password."""
    body = _string("MQTT") + bytes([4, 0x80 | 0x40 | 0x02]) + struct.pack("!H", KEEPALIVE_S)
    body += _string(user) + _string(user) + _string(password)
    return b"\x10" + _varint(len(body)) + body


def subscribe_packet(topic: str, qos: int) -> bytes:
    """SUBSCRIBE to one filter (packet id 1)."""
    body = struct.pack("!H", 1) + _string(topic) + bytes([qos])
    return b"\x82" + _varint(len(body)) + body


def split_packets(buf: bytearray) -> list[tuple[int, bytes]]:
    """Whole packets (first byte, body) taken off the front of ``buf``; a partial one stays."""
    out: list[tuple[int, bytes]] = []
    while len(buf) >= 2:
        length, mult, i = 0, 1, 1
        while True:
            if i >= len(buf):
                return out
            byte = buf[i]
            length += (byte & 0x7F) * mult
            mult *= 128
            i += 1
            if not byte & 0x80:
                break
        if len(buf) < i + length:
            return out
        out.append((buf[0], bytes(buf[i : i + length])))
        del buf[: i + length]
    return out


@dataclass
class Fleet:
    """What the fleet received."""

    latencies_ms: list[float] = field(default_factory=list)
    received: int = 0
    dropped: int = 0
    buffers: dict[int, bytearray] = field(default_factory=dict)
    #: Acks being written (held so the loop does not drop the tasks).
    sending: set[asyncio.Task[None]] = field(default_factory=set)
    holders: set[asyncio.Task[None]] = field(default_factory=set)
    #: Seconds (wall clock) in which a message arrived more than LATE_MS late.
    late_seconds: set[int] = field(default_factory=set)
    #: Set once ``target`` messages have been received.
    target: int = 0
    all_in: asyncio.Event = field(default_factory=asyncio.Event)

    def on_bytes(self, ws: ClientConnection, key: int, data: bytes) -> None:
        """Take the packets out of one websocket frame; acknowledge QoS 1 publishes."""
        buf = self.buffers.setdefault(key, bytearray())
        buf += data
        now = time.time()
        acks = []
        for first, body in split_packets(buf):
            if first >> 4 != 3:
                continue
            qos = (first >> 1) & 3
            n = struct.unpack_from("!H", body)[0]
            start = 2 + n + (2 if qos else 0)
            if qos:
                acks.append(b"\x40\x02" + body[2 + n : start])
            self.received += 1
            latency = (now - float(body[start:])) * 1000
            self.latencies_ms.append(latency)
            if latency > LATE_MS:
                self.late_seconds.add(int(now))
        if self.target and self.received >= self.target:
            self.all_in.set()
        if acks:
            task = asyncio.get_running_loop().create_task(ws.send(b"".join(acks)))
            self.sending.add(task)
            task.add_done_callback(self.sending.discard)


async def _login(ws: ClientConnection, user: str, password: str, topic: str, qos: int) -> None:
    await ws.send(connect_packet(user, password))
    await ws.send(subscribe_packet(topic, qos))
    buf = bytearray()
    seen: set[int] = set()
    while not {0x20, 0x90} <= seen:
        frame = await asyncio.wait_for(ws.recv(), 30)
        buf += frame if isinstance(frame, bytes) else frame.encode()
        for first, body in split_packets(buf):
            if first == 0x20 and body[1] != 0:
                raise ConnectionError(f"broker refused {user}: code {body[1]}")
            seen.add(first)


async def _hold(ws: ClientConnection, key: int, fleet: Fleet) -> None:
    try:
        async for frame in ws:
            if isinstance(frame, bytes):
                fleet.on_bytes(ws, key, frame)
    except WebSocketException:
        pass
    fleet.dropped += 1


async def _open_one(
    uri: str, i: int, settings: Settings, fleet: Fleet, gate: asyncio.Semaphore, qos: int
) -> ClientConnection | None:
    user = f"c{i}"
    creds = service_settings(settings, user)
    password = creds.broker_password.get_secret_value() if creds.broker_password else ""
    async with gate:
        try:
            ws = await connect(
                uri, subprotocols=[Subprotocol("mqtt")], ping_interval=None, compression=None, open_timeout=60
            )
            await _login(ws, user, password, f"bench/ws/{i}", qos)
        except (OSError, TimeoutError, WebSocketException, ConnectionError):
            return None
    task = asyncio.get_running_loop().create_task(_hold(ws, i, fleet))
    fleet.holders.add(task)
    return ws


def publish(settings: Settings, n: int, seconds: float, started: EventType) -> None:
    """Each connection's message every PERIOD_S, spread evenly over the period, for ``seconds``
    (run in a process of its own: in the fleet's, it would wait for the GIL behind the fleet)."""
    creds = service_settings(settings, PUBLISHER)
    password = creds.broker_password.get_secret_value() if creds.broker_password else ""
    pub = LoadPublisher(settings.broker_host, settings.broker_port, PUBLISHER, password)
    pub.connect()
    started.set()
    total = int(n * seconds / PERIOD_S)
    start, k = time.perf_counter(), 0
    while k < total:
        due = min(total, int((time.perf_counter() - start) / PERIOD_S * n) + 1)
        if due > k:
            stamp = f"{time.time():.6f}".encode()
            pub.send(b"".join(pub.packet(f"bench/ws/{j % n}", stamp) for j in range(k, due)), due - k)
            k = due
        time.sleep(TICK_S)
    pub.close()


def _child_cpu_s() -> float:
    """CPU seconds of the children waited for so far (the publisher, once joined)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _rss_mb(pid: int | None) -> float:
    if pid is None:
        return 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Figures:
    """One fleet run's figures."""

    asked: int
    qos: int = 0
    held: int = 0
    connect_s: float = 0.0
    seconds: float = 0.0
    expected: int = 0
    delivered: int = 0
    dropped: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    #: Seconds of the window in which some message took more than LATE_MS.
    late_seconds: int = 0
    broker_core: float = 0.0
    web_core: float = 0.0
    broker_kb_per_conn: float = 0.0
    web_kb_per_conn: float = 0.0
    #: This process (the fleet's websockets) and the publisher's: the load side, not the system.
    fleet_core: float = 0.0
    publisher_core: float = 0.0
    #: The open-files limit (raised to the hard one) and the pages the web service can bridge under it.
    open_files: int = 0
    web_max_pages: int = 0
    load_average: float = 0.0


async def _run(live: Settings, pids: dict[str, int | None], figures: Figures, seconds: float) -> None:
    uri = f"ws://{live.web_host}:{live.web_port}/mqtt"
    fleet, gate = Fleet(), asyncio.Semaphore(RAMP_CONCURRENCY)
    rss0 = {k: _rss_mb(p) for k, p in pids.items()}
    t0 = time.perf_counter()
    opened = await asyncio.gather(
        *(_open_one(uri, i, live, fleet, gate, figures.qos) for i in range(figures.asked))
    )
    figures.connect_s = time.perf_counter() - t0
    socks = [ws for ws in opened if ws is not None]
    figures.held = len(socks)
    rss1 = {k: _rss_mb(p) for k, p in pids.items()}
    per = max(figures.held, 1)
    figures.broker_kb_per_conn = (rss1["broker"] - rss0["broker"]) * 1024 / per
    figures.web_kb_per_conn = (rss1["web"] - rss0["web"]) * 1024 / per
    # The fleet's own full collections over 10k connections' objects would show up as latency.
    gc.collect()
    gc.freeze()
    own = os.getpid()
    spawn = multiprocessing.get_context("spawn")
    started = spawn.Event()
    child = spawn.Process(target=publish, args=(live, figures.asked, seconds, started))
    children0 = _child_cpu_s()
    child.start()
    await asyncio.to_thread(started.wait, 60)
    # The window starts with the first publish, not with the publisher's imports.
    cpu0 = {k: cpu_s(p) if p else None for k, p in pids.items()}
    me0 = cpu_s(own) or 0.0
    t1 = time.perf_counter()
    await asyncio.to_thread(child.join)
    figures.publisher_core = (_child_cpu_s() - children0) / seconds
    expected = int(figures.asked * seconds / PERIOD_S)
    # Wait for what the connections held can receive (the others' messages never come).
    fleet.target = expected * figures.held // figures.asked
    if fleet.received >= fleet.target:
        fleet.all_in.set()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(fleet.all_in.wait(), 10)  # the last second's messages are on their way
    figures.seconds = time.perf_counter() - t1
    cpu1 = {k: cpu_s(p) if p else None for k, p in pids.items()}
    figures.broker_core = ((cpu1["broker"] or 0) - (cpu0["broker"] or 0)) / figures.seconds
    figures.web_core = ((cpu1["web"] or 0) - (cpu0["web"] or 0)) / figures.seconds
    figures.fleet_core = ((cpu_s(own) or 0.0) - me0) / figures.seconds
    # Connections that failed to open were still published to: they count as not delivered.
    figures.expected, figures.delivered, figures.dropped = expected, fleet.received, fleet.dropped
    figures.late_seconds = len(fleet.late_seconds)
    figures.load_average = os.getloadavg()[0]
    lat = sorted(fleet.latencies_ms)
    if lat:
        figures.p50_ms = statistics.median(lat)
        figures.p99_ms = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        figures.max_ms = lat[-1]
    for ws in socks:
        with contextlib.suppress(WebSocketException, OSError):
            await ws.close()
    await asyncio.gather(*fleet.holders, return_exceptions=True)


def run(settings: Settings, connections: int, seconds: float) -> Figures:
    """Start a broker and the web service, hold the fleet, measure."""
    figures = Figures(asked=connections)
    figures.open_files = raise_open_files()
    figures.web_max_pages = page_capacity(figures.open_files)
    users = (PUBLISHER, *(f"c{i}" for i in range(connections)))
    with tempfile.TemporaryDirectory(prefix="bloomwire-bench-ws-") as tmp:
        own = temporary_settings(settings, Path(tmp), web_listen_port=0)
        stack = Stack(own, services=(WEB,), extra_users=users)
        try:
            live = stack.start()
            web = stack.children.get(WEB)
            pids = {"broker": stack.broker.pid if stack.broker else None, "web": web.pid if web else None}
            asyncio.run(_run(live, pids, figures, seconds))
        finally:
            stack.stop()
    return figures


def report(runs: list[Figures]) -> Report:
    """One row per fleet size."""
    out = Report(
        "customer connections through the web service's /mqtt (one message per connection per 5 s)",
        (
            "connections",
            "held",
            "connected in s",
            "delivered / expected",
            "latency P50 / P99 / max ms",
            f"seconds with a message > {LATE_MS:.0f} ms",
            "broker CPU (cores)",
            "web CPU (cores)",
            "RSS per connection KB (broker / web)",
            "load side CPU (fleet / publisher)",
            "load average",
        ),
    )
    for f in runs:
        out.add(
            f.asked,
            f.held,
            f"{f.connect_s:.1f}",
            f"{f.delivered} / {f.expected}",
            f"{f.p50_ms:.1f} / {f.p99_ms:.1f} / {f.max_ms:.0f}",
            f"{f.late_seconds} of {f.seconds:.0f}",
            f"{f.broker_core:.3f}",
            f"{f.web_core:.3f}",
            f"{f.broker_kb_per_conn:.1f} / {f.web_kb_per_conn:.1f}",
            f"{f.fleet_core:.2f} / {f.publisher_core:.2f}",
            f"{f.load_average:.2f}",
        )
    return out


def main(settings: Settings, console: Console, *, connections: list[int], seconds: float) -> list[Report]:
    """Run each fleet size in turn; print the table and its JSON."""
    runs = []
    for n in connections:
        console.print(f"[dim]{n} websocket connections through /mqtt for {seconds:.0f} s ...[/dim]")
        runs.append(run(settings, n, seconds))
        if runs[-1].web_max_pages < n:
            console.print(
                f"[yellow]open files: the hard limit {runs[-1].open_files} lets the web service bridge "
                f"at most {runs[-1].web_max_pages} pages (two descriptors each), not {n}; raise it "
                "(`ulimit -Hn`, LimitNOFILE=) to hold them all[/yellow]"
            )
    table = report(runs)
    console.print(table.rich())
    console.print_json(json.dumps([asdict(f) for f in runs]))
    return [table]
