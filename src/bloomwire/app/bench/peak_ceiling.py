"""Mosquitto's own QoS 1 ceiling, measured on the benchmark's broker in the same run: the anchor
of ``bench ingest`` and ``bench peak``.

Several ``mosquitto_pub -l`` (C clients, each with its own login: the broker takes the username
as the client id) publish numbered lines at once, each on its own topic, with
:data:`INFLIGHT` QoS 1 messages in flight (mosquitto_pub's default of 20 would measure the
publisher's round trips, not the broker); one ``mosquitto_sub`` takes them all and stamps each
arrival. Every line is checked to have arrived, run after run: a run counts only if all did, and
the median and spread of the runs are reported. No publisher is fed :data:`LINES_PER_PUBLISHER`
lines or more (``mosquitto_pub -l`` stops reading at 65,535 and drops the rest without a word).
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bloomwire.runtime.broker import ensure_secret
from bloomwire.runtime.settings import Settings

#: Lines one ``mosquitto_pub -l`` is fed at most (it reads 65,535 and drops the rest silently).
LINES_PER_PUBLISHER = 60_000
#: QoS 1 messages each publisher keeps in flight.
INFLIGHT = 1000
#: A message's size on the wire, roughly that of a rider's event.
PADDING = 300
TIMEOUT_S = 120.0
PROBE = b"probe"
#: The anchor the issue names: EMQX's open MQTT benchmark (2023), Mosquitto 2.0, QoS 1, 16 cores.
EMQX_MOSQUITTO_QOS1 = "37.3k msg/s (Mosquitto 2.0, QoS 1, 16 cores: EMQX open MQTT benchmark)"


@dataclass(frozen=True, slots=True)
class Publisher:
    """A publisher's login and the topic it publishes on (its role must allow it)."""

    user: str
    topic: str


@dataclass
class Ceiling:
    """The broker's QoS 1 messages/s, run by run, and how many of each run's arrived."""

    publishers: int
    #: Messages sent per run.
    messages: int
    rates: list[float] = field(default_factory=list)
    delivered: list[int] = field(default_factory=list)

    @property
    def complete(self) -> list[float]:
        """The rates of the runs in which every message arrived."""
        return [r for r, d in zip(self.rates, self.delivered, strict=True) if d == self.messages]

    @property
    def median(self) -> float:
        """Median messages/s of the complete runs (0 if none was)."""
        return statistics.median(self.complete) if self.complete else 0.0

    def as_dict(self) -> dict[str, Any]:
        """Plain numbers for JSON output (``sent``/``arrived``/``per_s``: the worst run's count and
        the median, as ``bench peak`` reports them)."""
        whole = self.complete
        return {
            "publishers": self.publishers,
            "messages_per_run": self.messages,
            "runs_per_s": [round(r) for r in self.rates],
            "delivered": self.delivered,
            "median_per_s": round(self.median),
            "spread_per_s": [round(min(whole)), round(max(whole))] if whole else None,
            "sent": self.messages,
            "arrived": min(self.delivered, default=0),
            "per_s": round(self.median),
        }


def publishers_for(messages: int, publishers: int, available: int) -> int:
    """Publishers needed so none is fed more than :data:`LINES_PER_PUBLISHER` lines."""
    needed = max(publishers, -(-messages // LINES_PER_PUBLISHER))
    if needed > available:
        raise ValueError(f"{messages} messages need {needed} publishers (at most {available})")
    return needed


def measure(
    settings: Settings,
    publishers: Sequence[Publisher],
    subscriber: str,
    sub_filter: str,
    *,
    messages: int,
    runs: int = 3,
    parallel: int = 4,
) -> Ceiling | None:
    """The ceiling over ``runs`` runs of ``messages`` each, from ``parallel`` (or more, see
    :func:`publishers_for`) of ``publishers`` into ``subscriber`` on ``sub_filter``; None without
    the Mosquitto command-line clients."""
    if not shutil.which("mosquitto_pub") or not shutil.which("mosquitto_sub") or not publishers:
        return None
    n = publishers_for(messages, min(parallel, len(publishers)), len(publishers))
    ceiling = Ceiling(n, messages)
    with tempfile.TemporaryDirectory(prefix="bloomwire-ceiling-") as tmp:
        for run in range(runs):
            _run(settings, ceiling, publishers[:n], (subscriber, sub_filter), Path(tmp), run)
    return ceiling


def _args(settings: Settings, user: str) -> list[str]:
    password = ensure_secret(settings.data_dir, user)
    port = str(settings.broker_port)
    return ["-h", settings.broker_host, "-p", port, "-u", user, "-P", password, "-q", "1"]


def _feeds(pubs: Sequence[Publisher], messages: int, tmp: Path, run: int) -> tuple[list[Path], set[bytes]]:
    """One input file per publisher, numbered lines; every line the subscriber must print."""
    share = [messages // len(pubs)] * len(pubs)
    share[0] += messages - sum(share)
    feeds, expected = [], set()
    for i, (pub, k) in enumerate(zip(pubs, share, strict=True)):
        lines = [f"{run}:{pub.user}:{j}:".encode().ljust(PADDING, b"x") for j in range(k)]
        expected.update(lines)
        feed = tmp / f"feed-{run}-{i}.txt"
        feed.write_bytes(b"\n".join(lines) + b"\n")
        feeds.append(feed)
    return feeds, expected


def _run(
    settings: Settings,
    ceiling: Ceiling,
    pubs: Sequence[Publisher],
    sub: tuple[str, str],
    tmp: Path,
    run: int,
) -> None:
    """One run: every publisher at once, the subscriber stamping each arrival, each line checked."""
    feeds, expected = _feeds(pubs, ceiling.messages, tmp, run)
    out = tmp / f"sub-{run}.txt"
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            ["mosquitto_sub", *_args(settings, sub[0]), "-t", sub[1], "-F", "%U %p"], stdout=sink
        )
    try:
        _subscribed(settings, pubs[0], out)
        start = time.time()
        procs = []
        for pub, feed in zip(pubs, feeds, strict=True):
            with feed.open("rb") as source:
                args = [
                    "mosquitto_pub",
                    *_args(settings, pub.user),
                    "-t",
                    pub.topic,
                    "-l",
                    "-M",
                    str(INFLIGHT),
                ]
                procs.append(subprocess.Popen(args, stdin=source))
        _until_lines(out, len(expected), time.monotonic() + TIMEOUT_S)
        for p in procs:
            p.wait(TIMEOUT_S)
    finally:
        proc.terminate()
        proc.wait()
    stamps = [float(s) for s, payload in _lines(out) if payload in expected]
    arrived = len(set(payload for _, payload in _lines(out)) & expected)
    ceiling.delivered.append(arrived)
    ceiling.rates.append(arrived / (max(stamps) - start) if stamps and max(stamps) > start else 0.0)


def _lines(out: Path) -> list[tuple[bytes, bytes]]:
    """(arrival stamp, payload) of every line the subscriber printed."""
    pairs = []
    for line in out.read_bytes().splitlines():
        stamp, _, payload = line.partition(b" ")
        pairs.append((stamp, payload))
    return pairs


def _until_lines(out: Path, count: int, deadline: float) -> None:
    """Wait until the subscriber printed ``count`` more lines (the probes' aside) or the deadline:
    only the bytes written since the last look are read (reading it all would take the broker's CPU)."""
    seen, read = 0, 0
    with out.open("rb") as fh:
        while seen < count and time.monotonic() < deadline:
            time.sleep(0.05)
            fh.seek(read)
            new = fh.read()
            read += len(new)
            seen += new.count(b"\n") - new.count(b" " + PROBE + b"\n")


def _subscribed(settings: Settings, pub: Publisher, out: Path) -> None:
    """Publish a probe until the subscriber prints it (then it is surely subscribed)."""
    deadline = time.monotonic() + 30
    while b" " + PROBE not in out.read_bytes():
        if time.monotonic() > deadline:
            raise TimeoutError("mosquitto_sub never got the ceiling's probe")
        subprocess.run(
            ["mosquitto_pub", *_args(settings, pub.user), "-t", pub.topic, "-m", PROBE.decode()],
            check=True,
            timeout=10,
        )
        time.sleep(0.2)
