"""A prototype MQTT 5 client on the ``mqtt5`` codec under asyncio (``bloomwire bench mqtt-clients``).

``mqtt5`` (PyPI; Rust, no I/O: the direction aiomqtt 3 takes) reads and writes packets; this
module is the small asyncio protocol around it that a service would need: connect with a
persistent session, subscribe, receive QoS 0/1 publishes with manual acks, publish QoS 1 within
the broker's Receive Maximum, ping. No reconnect, no QoS 2, no TLS, no Will: it is measured
against paho in :mod:`bloomwire.app.bench.pipeline`'s pipeline, not used by the runtime.
Run as ``python -m bloomwire.app.bench.mqtt5link`` with the pipeline's arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import sys
from collections import deque
from collections.abc import Sequence

import mqtt5

from bloomwire.app.bench import pipeline
from bloomwire.errors import BrokerError
from bloomwire.runtime import log

KEEPALIVE_S = 60


class Mqtt5Link(asyncio.Protocol):
    """One MQTT 5 connection: packets by ``mqtt5``, bytes by an asyncio transport.

    Outgoing packets gather in a buffer that :meth:`flush` writes at once (one ``send`` per
    batch, as the tuned paho client does).
    """

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._in = bytearray()
        self._out: list[bytes] = []
        self._inbox: deque[mqtt5.PublishPacket] = deque()
        self._to_ack: list[int] = []
        self._arrived = asyncio.Event()
        self._answers: dict[type, asyncio.Future[mqtt5.Packet]] = {}
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._next_id = 0
        self._inflight: set[int] = set()
        self._held: deque[tuple[str, bytes]] = deque()
        self._empty = asyncio.Event()
        self._empty.set()
        self.receive_max = 65535
        self.max_packet_size: int | None = None
        self.refused = 0
        self._ping: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        buf = self._in
        buf += data
        pos = 0
        view = memoryview(buf)
        try:
            while pos < len(buf):
                try:
                    packet, size = mqtt5.read(view[pos:])
                except IndexError:  # "not enough bytes": the rest of the packet is on its way
                    break
                pos += size
                self._handle(packet)
        except ValueError as exc:  # malformed: nothing sensible to do but hang up
            self._fail(BrokerError(f"malformed packet from the broker: {exc}"))
        finally:
            view.release()
        del buf[:pos]
        self.flush()  # acks and held publishes released by what was read

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or BrokerError("the broker closed the connection"))

    def _fail(self, exc: Exception) -> None:
        if not self._closed.done():
            self._closed.set_exception(exc)
        for waiting in self._answers.values():
            if not waiting.done():
                waiting.set_exception(exc)
        self._arrived.set()
        self._empty.set()
        if self._transport is not None:
            self._transport.close()

    # --- packets in ------------------------------------------------------------------------

    def _handle(self, packet: mqtt5.Packet) -> None:
        if isinstance(packet, mqtt5.PublishPacket):
            self._on_publish(packet)
        elif isinstance(packet, mqtt5.PubAckPacket):
            self._on_puback(packet)
        elif isinstance(packet, mqtt5.DisconnectPacket):
            self._fail(BrokerError(f"the broker disconnected us: {packet.reason_code.name}"))
        elif not isinstance(packet, mqtt5.PingRespPacket):
            answer = self._answers.pop(type(packet), None)
            if answer is not None and not answer.done():
                answer.set_result(packet)

    def _on_publish(self, packet: mqtt5.PublishPacket) -> None:
        if packet.qos == mqtt5.QoS.EXACTLY_ONCE:
            self._fail(BrokerError("QoS 2 is not supported by this prototype"))
            return
        self._inbox.append(packet)
        self._arrived.set()

    def _on_puback(self, packet: mqtt5.PubAckPacket) -> None:
        self._inflight.discard(packet.packet_id)
        if packet.reason_code.value >= 0x80:
            self.refused += 1
        while self._held and len(self._inflight) < self.receive_max:
            self._send_publish(*self._held.popleft())
        if not self._inflight:
            self._empty.set()

    # --- the client ------------------------------------------------------------------------

    async def _ask(self, packet: bytes, answer: type) -> mqtt5.Packet:
        waiting: asyncio.Future[mqtt5.Packet] = asyncio.get_running_loop().create_future()
        self._answers[answer] = waiting
        self._out.append(packet)
        self.flush()
        return await asyncio.wait_for(waiting, 10)

    async def connect(self, user: str, password: str, *, session_expiry_s: int) -> None:
        """CONNECT on a persistent session; raises :class:`BrokerError` if refused."""
        connect = mqtt5.ConnectPacket(
            user,
            username=user,
            password=password.encode(),
            clean_start=False,
            keep_alive=KEEPALIVE_S,
            session_expiry_interval=session_expiry_s,
        )
        connack = await self._ask(connect.write(), mqtt5.ConnAckPacket)
        assert isinstance(connack, mqtt5.ConnAckPacket)
        if connack.reason_code != mqtt5.ConnAckReasonCode.SUCCESS:
            raise BrokerError(f"the broker refused {user!r}: {connack.reason_code.name}")
        self.receive_max = connack.receive_max
        self.max_packet_size = connack.max_packet_size
        keepalive = connack.server_keep_alive or KEEPALIVE_S
        self._schedule_ping(keepalive / 2)

    def _schedule_ping(self, every: float) -> None:
        def ping() -> None:
            self._out.append(mqtt5.PingReqPacket().write())
            self.flush()
            self._schedule_ping(every)

        self._ping = asyncio.get_running_loop().call_later(every, ping)

    async def subscribe(self, pattern: str) -> None:
        """SUBSCRIBE at QoS 1 and wait for the SUBACK."""
        topic_filter = mqtt5.TopicFilter(pattern, max_qos=mqtt5.QoS.AT_LEAST_ONCE)
        suback = await self._ask(
            mqtt5.SubscribePacket(self._packet_id(), [topic_filter]).write(), mqtt5.SubAckPacket
        )
        assert isinstance(suback, mqtt5.SubAckPacket)
        if any(code.value >= 0x80 for code in suback.reason_codes):
            raise BrokerError(f"subscription to {pattern!r} refused: {suback.reason_codes}")

    def _packet_id(self) -> int:
        while True:
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self._inflight:
                return self._next_id

    def publish(self, topic: str, payload: bytes) -> None:
        """Queue a QoS 1 publish (held while the broker's Receive Maximum is reached)."""
        if len(self._inflight) >= self.receive_max:
            self._held.append((topic, payload))
        else:
            self._send_publish(topic, payload)

    def _send_publish(self, topic: str, payload: bytes) -> None:
        mid = self._packet_id()
        packet = mqtt5.PublishPacket(topic, payload, qos=mqtt5.QoS.AT_LEAST_ONCE, packet_id=mid).write()
        if self.max_packet_size is not None and len(packet) > self.max_packet_size:
            raise BrokerError(f"a {len(packet)}-byte publish is over the broker's maximum packet size")
        self._inflight.add(mid)
        self._empty.clear()
        self._out.append(packet)

    def flush(self) -> None:
        """Write every queued packet in one go."""
        if self._out and self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"".join(self._out))
        self._out.clear()

    async def disconnect(self) -> None:
        """DISCONNECT (normal: the session stays); the broker closes the connection once it has
        read everything before it (closing first could drop acks it had not read yet)."""
        if self._ping is not None:
            self._ping.cancel()
        self._out.append(mqtt5.DisconnectPacket().write())
        self.flush()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self._closed), 5)
        if self._transport is not None:
            self._transport.close()

    # --- pipeline.Link ---------------------------------------------------------------------

    async def next_batch(self, limit: int) -> Sequence[bytes]:
        while not self._inbox:
            if self._closed.done():
                self._closed.result()  # raises why it closed
            self._arrived.clear()
            await self._arrived.wait()
        inbox, batch = self._inbox, list[bytes]()
        while inbox and len(batch) < limit:
            packet = inbox.popleft()
            if packet.qos.value:
                self._to_ack.append(packet.packet_id or 0)
            batch.append(packet.payload)
        return batch

    def republish(self, topic: str, payloads: Sequence[bytes]) -> None:
        for payload in payloads:
            self.publish(topic, payload)

    def ack(self) -> None:
        self._out += [mqtt5.PubAckPacket(mid).write() for mid in self._to_ack]
        self._to_ack.clear()
        self.flush()

    async def drained(self) -> None:
        while self._inflight or self._held:  # held ones wait for in-flight ones: never held alone
            self._empty.clear()
            await self._empty.wait()
            if self._closed.done():
                self._closed.result()


async def mqtt5_main(args: argparse.Namespace) -> None:
    """The pipeline on :class:`Mqtt5Link`."""
    in_filter, probe_topic, out_topic = pipeline.topics_of(args.user)
    loop = asyncio.get_running_loop()
    _, link = await loop.create_connection(Mqtt5Link, args.host, args.port)
    try:
        await link.connect(args.user, args.password, session_expiry_s=pipeline.SESSION_EXPIRY_S)
        await link.subscribe(in_filter)
        link.publish(probe_topic, pipeline.PROBE)
        link.flush()
        await pipeline.prepare(link, pipeline.PROBE)
        figures = await pipeline.run(
            link,
            events=args.events,
            out_topic=out_topic,
            persist_us=args.persist_us,
            max_batch=args.max_batch,
        )
    finally:
        await link.disconnect()
    pipeline.report(figures)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m bloomwire.app.bench.mqtt5link …`` (the pipeline's arguments, no ``--client``)."""
    log.configure("WARNING")  # to stderr: stdout carries "ready" and the figures
    asyncio.run(mqtt5_main(pipeline.arguments(argv, client_choice=False)))


if __name__ == "__main__":
    main(sys.argv[1:])
