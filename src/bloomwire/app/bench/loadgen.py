"""A lean MQTT 3.1.1 QoS 1 publisher for load generation (benchmarks only).

At 10,000 messages/s a paho publisher, or one ``mosquitto_pub -l`` per topic, took 40 % of one of
the machine's 2 cores: CPU the system under test then did not have. This one encodes PUBLISH
packets up front, writes each millisecond's worth with a single ``sendall`` and counts the
broker's PUBACKs in a thread, at a few microseconds per message. The product itself speaks MQTT
through paho (:mod:`bloomwire.runtime.mqtt`); this is a load generator, not a client.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

from bloomwire.errors import BrokerError

PUBACK_SIZE = 4  # MQTT 3.1.1: 0x40, remaining length 2, packet id


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(raw)) + raw


class LoadPublisher:
    """One MQTT connection that publishes pre-encoded QoS 1 messages as fast as it is told to."""

    def __init__(self, host: str, port: int, username: str, password: str, *, keepalive: int = 300) -> None:
        self.host, self.port = host, port
        self.username, self.password = username, password
        self.keepalive = keepalive
        self.sent = 0
        self.acked = 0
        self._sock: socket.socket | None = None
        self._mid = 0
        self._reader: threading.Thread | None = None

    def connect(self, timeout: float = 10.0) -> None:
        """Connect and log in (clean session); raises BrokerError if the broker says no."""
        sock = socket.create_connection((self.host, self.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        flags = 0x80 | 0x40 | 0x02  # username, password, clean session
        body = _string("MQTT") + bytes([4, flags]) + struct.pack("!H", self.keepalive)
        body += _string(self.username) + _string(self.username) + _string(self.password)
        sock.sendall(b"\x10" + _varint(len(body)) + body)
        connack = b""
        while len(connack) < 4:
            chunk = sock.recv(4 - len(connack))
            if not chunk:
                raise BrokerError("the broker closed the connection before CONNACK")
            connack += chunk
        if connack[0] != 0x20 or connack[3] != 0:
            raise BrokerError(f"the broker refused the load publisher {self.username!r} (code {connack[3]})")
        sock.settimeout(None)
        self._sock = sock
        self._reader = threading.Thread(target=self._read, name="load-pubacks", daemon=True)
        self._reader.start()

    def packet(self, topic: str, payload: bytes) -> bytes:
        """A QoS 1 PUBLISH with the next packet id."""
        self._mid = self._mid % 65535 + 1
        body = _string(topic) + struct.pack("!H", self._mid) + payload
        return b"\x32" + _varint(len(body)) + body

    def send(self, packets: bytes, count: int) -> None:
        """Write ``count`` encoded packets at once."""
        assert self._sock is not None, "connect() first"
        self._sock.sendall(packets)
        self.sent += count

    def _read(self) -> None:
        sock = self._sock  # close() sets self._sock to None while this thread may be reading
        assert sock is not None
        pending = 0
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            pending += len(data)
            self.acked += pending // PUBACK_SIZE
            pending %= PUBACK_SIZE
            time.sleep(0.002)  # let PUBACKs gather: one read for many, not one each

    def close(self, timeout: float = 30.0) -> None:
        """Wait until the broker acknowledged everything sent (or ``timeout``), then disconnect."""
        deadline = time.monotonic() + timeout
        while self.acked < self.sent and time.monotonic() < deadline:
            time.sleep(0.01)
        if self._sock is not None:
            try:
                self._sock.sendall(b"\xe0\x00")
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
            self._sock = None
        if self._reader is not None:
            self._reader.join(5)
