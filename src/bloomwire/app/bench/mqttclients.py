"""``bloomwire bench mqtt-clients``: paho (plain and tuned) and an mqtt5 prototype on one pipeline.

Starts a private Mosquitto. For each run, a child process (:mod:`bloomwire.app.bench.pipeline`,
or :mod:`bloomwire.app.bench.mqtt5link` for the prototype) connects on a persistent session of
its own, and :class:`~bloomwire.app.bench.loadgen.LoadPublisher` publishes ``events`` QoS 1
events to it; the child persists (nothing, or a constant cost per batch), republishes each at
QoS 1 and acks the batch, and reports the CPU time of its whole process and the wall time from
its first event to its last republish acknowledged. Clients take turns, round after round (the
order rotated each round), so that every client meets the same host load.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import queue
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from rich.console import Console

from bloomwire.app.bench.loadgen import LoadPublisher
from bloomwire.app.bench.pipeline import topics_of
from bloomwire.app.bench.report import Report
from bloomwire.errors import BloomwireError
from bloomwire.runtime.broker import Mosquitto

#: The clients compared, and the child process that runs the pipeline on each.
CLIENT_COMMANDS: dict[str, list[str]] = {
    "tuned": [sys.executable, "-m", "bloomwire.app.bench.pipeline", "--client", "tuned"],
    "paho": [sys.executable, "-m", "bloomwire.app.bench.pipeline", "--client", "plain"],
    "mqtt5": [sys.executable, "-m", "bloomwire.app.bench.mqtt5link"],
}
LOAD_USER = "load"
#: Input topics per run: ``bench/USER/in/0`` … (one subscription ``bench/USER/in/+``).
TOPICS = 50
#: At ``rate=0`` the load goes out this many events per write.
BURST = 500
TICK_S = 0.002
READY_TIMEOUT_S = 30.0
RUN_TIMEOUT_S = 300.0


@dataclass
class Run:
    """One client's figures in one round."""

    client: str
    round: int
    events: int
    batches: int
    cpu_s: float
    wall_s: float

    @property
    def us_per_event(self) -> float:
        """CPU of the client process per event, µs."""
        return self.cpu_s / self.events * 1e6

    @property
    def per_s(self) -> float:
        """Events through the pipeline per second."""
        return self.events / self.wall_s if self.wall_s > 0 else 0.0


def payload(k: int) -> bytes:
    """A ~300-byte JSON event, like a rider's chat line."""
    text = f"bench line {k} " + "x" * 200
    return json.dumps({"id": f"ev-{k:012d}", "type": "order.chat_posted", "seq": k, "text": text}).encode()


class Child:
    """A pipeline child process; its stdout lines read by a thread, its stderr kept in a file."""

    def __init__(self, command: Sequence[str], log: IO[bytes]) -> None:
        self.proc = subprocess.Popen(
            list(command), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode(errors="replace").strip())

    def line(self, timeout: float, what: str) -> str:
        """The next line, or BloomwireError naming ``what`` if none comes in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                return self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    break
        raise BloomwireError(f"the pipeline child gave no {what} (exit code {self.proc.poll()})")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def publish_load(pub: LoadPublisher, user: str, events: int, rate: int) -> None:
    """Publish ``events`` events to ``user``'s pipeline at ``rate``/s (0: bursts of :data:`BURST`)."""
    in_filter = topics_of(user)[0]
    packets = [pub.packet(in_filter.replace("+", str(k % TOPICS)), payload(k)) for k in range(events)]
    sent, start = 0, time.perf_counter()
    while sent < events:
        elapsed = time.perf_counter() - start
        due = min(events, int(elapsed * rate) + 1) if rate else min(events, sent + BURST)
        if due <= sent:
            time.sleep(TICK_S - elapsed % TICK_S)
            continue
        pub.send(b"".join(packets[sent:due]), due - sent)
        sent = due


@dataclass
class Setup:
    """What every run shares."""

    broker: Mosquitto
    log_dir: Path
    events: int
    rate: int
    persist_us: float
    max_batch: int


def run_one(setup: Setup, client: str, command: Sequence[str], user: str, round_: int) -> Run:
    """One run of ``client`` (child ``command``) as broker user ``user``."""
    broker = setup.broker
    args = [
        *("--host", broker.host, "--port", str(broker.port)),
        f"--user={user}",
        f"--password={broker.users[user]}",  # with "=": a password may start with "-"
        *("--events", str(setup.events), "--persist-us", str(setup.persist_us)),
        *("--max-batch", str(setup.max_batch)),
    ]
    with (setup.log_dir / f"{user}.log").open("wb") as log:
        child = Child([*command, *args], log)
        try:
            if (ready := child.line(READY_TIMEOUT_S, "'ready'")) != "ready":
                raise BloomwireError(f"the pipeline child said {ready!r} instead of 'ready'")
            pub = LoadPublisher(broker.host, broker.port, LOAD_USER, broker.users[LOAD_USER])
            pub.connect()
            try:
                publish_load(pub, user, setup.events, setup.rate)
                done = json.loads(child.line(RUN_TIMEOUT_S, "figures"))
            finally:
                pub.close()
            child.proc.wait(30)
        finally:
            child.close()
    if child.proc.returncode:
        raise BloomwireError(f"the {client} pipeline exited with {child.proc.returncode}; see {log.name}")
    return Run(client, round_, done["events"], done["batches"], done["cpu_s"], done["wall_s"])


def run_all(
    commands: Mapping[str, Sequence[str]],
    *,
    events: int,
    runs: int,
    rate: int = 0,
    persist_us: float = 0.0,
    max_batch: int = 2000,
    console: Console | None = None,
) -> list[Run]:
    """Every client ``runs`` times, interleaved, on one private broker; the runs in order."""
    clients = list(commands)
    users = {LOAD_USER: secrets.token_urlsafe(16)}
    users |= {f"pipe-{c}-{r}": secrets.token_urlsafe(16) for r in range(runs) for c in clients}
    results: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="bloomwire-bench-mqtt-clients-") as tmp:
        broker = Mosquitto(Path(tmp) / "broker", users=users)
        setup = Setup(broker, Path(tmp), events, rate, persist_us, max_batch)
        with broker:
            for r in range(runs):
                order = clients[r % len(clients) :] + clients[: r % len(clients)]
                for client in order:
                    run = run_one(setup, client, commands[client], f"pipe-{client}-{r}", r)
                    results.append(run)
                    if console is not None:
                        console.print(
                            f"  round {r + 1} {client}: {run.us_per_event:.1f} µs/event, "
                            f"{run.per_s:,.0f} events/s, {run.events / run.batches:.0f} events/batch"
                        )
    return results


def _spread(values: Sequence[float], fmt: str) -> str:
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"


def summary(runs: Sequence[Run], reference: str = "tuned") -> Report:
    """Median (min-max) per client, and each client's median CPU against ``reference``'s."""
    out = Report(
        "MQTT clients on a bare persist-and-republish pipeline",
        ("client", "CPU µs/event", "events/s", "CPU vs " + reference, "events/batch", "runs"),
    )
    by_client: dict[str, list[Run]] = {}
    for run in runs:
        by_client.setdefault(run.client, []).append(run)
    ref = by_client.get(reference)
    ref_cpu = statistics.median(r.us_per_event for r in ref) if ref else None
    for client, mine in by_client.items():
        cpu = [r.us_per_event for r in mine]
        ratio = f"{statistics.median(cpu) / ref_cpu:.2f}×" if ref_cpu else "–"
        batch = statistics.mean(r.events / r.batches for r in mine)
        out.add(
            client,
            _spread(cpu, ".1f"),
            _spread([r.per_s for r in mine], ",.0f"),
            ratio,
            f"{batch:.0f}",
            len(mine),
        )
    return out


def setup_report(*, events: int, rate: int, persist_us: float, load: tuple[float, float]) -> Report:
    """What the runs had in common, and the host's load before and after."""
    out = Report("Set-up of the runs")
    out.add("events per run (QoS 1 in, QoS 1 republished)", events)
    out.add("load rate (events/s)", rate or "max (bursts of 500)")
    out.add("persist cost per batch (µs, busy)", persist_us)
    out.add("paho-mqtt / mqtt5", f"{_version('paho-mqtt')} / {_version('mqtt5')}")
    out.add("load average (1 min) before / after", f"{load[0]:.2f} / {load[1]:.2f}")
    return out


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def main(
    *,
    clients: Sequence[str],
    events: int,
    runs: int,
    rate: int,
    persist_us: float,
    console: Console,
) -> list[Report]:
    """Run the comparison, print its tables; return them (for ``--record``)."""
    unknown = [c for c in clients if c not in CLIENT_COMMANDS]
    if unknown:
        raise BloomwireError(f"unknown client(s) {unknown}: choose from {', '.join(CLIENT_COMMANDS)}")
    if "mqtt5" in clients and _version("mqtt5") == "not installed":
        raise BloomwireError("the mqtt5 client needs the mqtt5 package: pip install 'bloomwire[bench]'")
    console.print(f"bench mqtt-clients: {runs} × {', '.join(clients)}, {events} events each …")
    before = os.getloadavg()[0]
    results = run_all(
        {c: CLIENT_COMMANDS[c] for c in clients},
        events=events,
        runs=runs,
        rate=rate,
        persist_us=persist_us,
        console=console,
    )
    tables = [
        summary(results),
        setup_report(events=events, rate=rate, persist_us=persist_us, load=(before, os.getloadavg()[0])),
    ]
    for table in tables:
        console.print(table.rich())
    return tables
