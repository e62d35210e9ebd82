"""The client side of ``bloomwire bench mqtt-clients``: a bare persist-and-republish pipeline.

Run as a child process, one per measured run, so that its CPU time is its own. It receives
QoS 1 publishes on a persistent session with manual acks, "persists" each batch (nothing, or a
constant busy cost standing in for a commit), republishes every event at QoS 1, then acks the
batch: the persister's shape without the store. It prints ``ready`` once its subscription is
live, and one JSON line of figures once it has received ``--events`` events and the broker has
acknowledged every republish. The MQTT client is :class:`Link`: the runtime's
:class:`~bloomwire.runtime.mqtt.Connection` on paho (plain or tuned) here, the mqtt5 prototype in
:mod:`bloomwire.app.bench.mqtt5link`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

from paho.mqtt.client import MQTTMessageInfo
from pydantic import SecretStr

from bloomwire.errors import BrokerError
from bloomwire.runtime import log
from bloomwire.runtime.mqtt import Connection, Message
from bloomwire.runtime.settings import Settings

#: Published to the input topic once subscribed; its arrival proves the subscription is live.
PROBE = b"probe"
SESSION_EXPIRY_S = 300
DRAIN_TIMEOUT_S = 120.0


class Link(Protocol):
    """What the pipeline needs of an MQTT client."""

    async def next_batch(self, limit: int) -> Sequence[bytes]:
        """The payloads of up to ``limit`` received messages (waits for at least one)."""

    def republish(self, topic: str, payloads: Sequence[bytes]) -> None:
        """Queue one QoS 1 publish per payload, sent together."""

    def ack(self) -> None:
        """Acknowledge every message handed out by :meth:`next_batch` so far."""

    async def drained(self) -> None:
        """Wait until the broker acknowledged every republish."""


@dataclass
class Figures:
    """What the pipeline measured, from its first event to its last republish acknowledged."""

    events: int
    batches: int
    cpu_s: float
    wall_s: float


def persist(batch: Sequence[bytes], cost_us: float) -> None:
    """Stand-in for a commit: a busy wait of ``cost_us`` per batch (CPU, as a commit mostly is)."""
    if cost_us > 0:
        end = time.perf_counter() + cost_us / 1e6
        while time.perf_counter() < end:
            pass


async def run(link: Link, *, events: int, out_topic: str, persist_us: float, max_batch: int) -> Figures:
    """Receive ``events`` events, persist, republish and ack them batch by batch; measure."""
    received = batches = 0
    cpu0 = wall0 = 0.0
    while received < events:
        batch = await link.next_batch(max_batch)
        if not batches:
            cpu0, wall0 = time.process_time(), time.perf_counter()
        persist(batch, persist_us)
        link.republish(out_topic, batch)
        link.ack()
        received += len(batch)
        batches += 1
    await link.drained()
    return Figures(received, batches, time.process_time() - cpu0, time.perf_counter() - wall0)


async def prepare(link: Link, probe: bytes) -> None:
    """Wait for the probe, ack it, freeze start-up objects (as ``Service.run`` does), say ready."""
    while True:
        batch = await link.next_batch(1)
        link.ack()
        if batch and batch[0] == probe:
            break
    gc.collect()
    gc.freeze()
    print("ready", flush=True)


def report(figures: Figures) -> None:
    """The child's last line: its figures as JSON."""
    print(json.dumps(asdict(figures)), flush=True)


def arguments(argv: Sequence[str] | None, *, client_choice: bool) -> argparse.Namespace:
    """The child's command line (the parent, ``bench/mqttclients.py``, builds it)."""
    parser = argparse.ArgumentParser(description=__doc__)
    if client_choice:
        parser.add_argument("--client", choices=("plain", "tuned"), required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--persist-us", type=float, default=0.0)
    parser.add_argument("--max-batch", type=int, default=2000)
    return parser.parse_args(argv)


def topics_of(user: str) -> tuple[str, str, str]:
    """(subscription filter, probe topic, output topic) of the pipeline run as ``user``."""
    return f"bench/{user}/in/+", f"bench/{user}/in/probe", f"bench/{user}/out"


class PahoLink:
    """:class:`Link` on the runtime's :class:`Connection` (paho, plain or tuned), as services use it."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._handed: list[Message] = []
        self._last: MQTTMessageInfo | None = None

    async def next_batch(self, limit: int) -> Sequence[bytes]:
        conn = self.conn
        while not await conn.wait_message(1.0):
            pass
        batch = conn.drain(limit)
        self._handed += batch
        return [m.payload for m in batch]

    def republish(self, topic: str, payloads: Sequence[bytes]) -> None:
        conn = self.conn
        with conn.corked():
            for payload in payloads:
                self._last = conn.publish(topic, payload, qos=1)

    def ack(self) -> None:
        self.conn.ack_all(self._handed)
        self._handed = []

    async def drained(self) -> None:
        # The broker acknowledges one connection's QoS 1 publishes in order: the last one is enough.
        last = self._last
        if last is not None:
            await asyncio.to_thread(last.wait_for_publish, DRAIN_TIMEOUT_S)
            if not last.is_published():
                raise BrokerError(f"republished events not acknowledged in {DRAIN_TIMEOUT_S} s")


async def paho_main(args: argparse.Namespace) -> None:
    """The pipeline on paho through ``runtime.mqtt.Connection``."""
    in_filter, probe_topic, out_topic = topics_of(args.user)
    settings = Settings(
        broker_host=args.host,
        broker_port=args.port,
        broker_username=args.user,
        broker_password=SecretStr(args.password),
    )
    conn = Connection(
        settings,
        args.user,
        persistent=True,
        session_expiry_s=SESSION_EXPIRY_S,
        manual_ack=True,
        tuned=args.client == "tuned",
    )
    conn.subscribe(in_filter, qos=1)
    conn.start()
    try:
        await conn.wait_connected()
        conn.publish(probe_topic, PROBE, qos=1)
        link = PahoLink(conn)
        await prepare(link, PROBE)
        figures = await run(
            link,
            events=args.events,
            out_topic=out_topic,
            persist_us=args.persist_us,
            max_batch=args.max_batch,
        )
    finally:
        await conn.stop()
    report(figures)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m bloomwire.app.bench.pipeline --client plain|tuned …``"""
    log.configure("WARNING")  # to stderr: stdout carries "ready" and the figures
    asyncio.run(paho_main(arguments(argv, client_choice=True)))


if __name__ == "__main__":
    main(sys.argv[1:])
