"""paho-mqtt's client tuned for thousands of messages per second.

Measured costs of paho 2.x at that rate, each removed here without changing what goes on the
wire: a ``recv`` per packet part and a ``send`` per packet (:class:`BufferedSocket`), a wake-up
of the network thread per queued packet (:meth:`TunedClient.corked`), and lookup tables rebuilt
for every packet's properties and reason code (:func:`share_property_tables`,
:func:`cache_reason_codes`). ``docs/performance.md`` has the figures.
"""

from __future__ import annotations

import contextlib
import ssl
import time
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode


def share_property_tables() -> bool:
    """Make paho's ``Properties()`` cheap by sharing its lookup tables (True if applied).

    paho rebuilds three lookup tables in every ``Properties.__init__`` (about 5 µs) and makes a
    Properties for every PUBLISH and PUBACK it decodes: a tenth of the network thread at
    thousands of messages per second. paho only ever reads those tables. Applied only while
    ``__init__`` sets exactly these attributes, so a paho release that changes them keeps its own.
    """
    if getattr(Properties.__init__, "_bloomwire_shared", False):
        return True
    probe = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if set(vars(probe)) != {"packetType", "types", "names", "properties"}:
        return False
    shared = {"types": probe.types, "names": probe.names, "properties": probe.properties}

    private = frozenset(shared) | {"packetType"}

    def init(self: Properties, packetType: int) -> None:  # noqa: N803 - paho's name
        self.__dict__.update(shared, packetType=packetType)

    def clear(self: Properties) -> None:
        # paho's clear() tries all 27 property names; only set properties are in __dict__.
        for name in [n for n in self.__dict__ if n not in private]:
            del self.__dict__[name]

    init._bloomwire_shared = True  # type: ignore[attr-defined]
    Properties.__init__ = init  # type: ignore[method-assign]
    Properties.clear = clear  # type: ignore[method-assign]
    return True


def cache_reason_codes() -> bool:
    """Make paho's ``ReasonCode()`` cheap: share its table, remember name → code (True if applied).

    Every ``ReasonCode.__init__`` copies a table of ~50 codes and scans it for the code's name;
    paho makes one for every PUBACK it decodes. Applied only while an instance holds exactly
    ``names``, ``packetType`` and ``value`` and the cached answers match paho's own.
    """
    if getattr(ReasonCode.__init__, "_bloomwire_cached", False):
        return True
    original = ReasonCode.__init__
    probe = ReasonCode(PacketTypes.PUBACK)
    if set(vars(probe)) != {"names", "packetType", "value"}:
        return False
    table = type(probe).names
    ids: dict[tuple[int, str], int] = {}
    disconnect = PacketTypes.DISCONNECT

    def init(self: ReasonCode, packetType: int, aName: str = "Success", identifier: int = -1) -> None:  # noqa: N803
        self.names = table
        self.packetType = packetType
        if identifier == -1:
            if packetType == disconnect and aName == "Success":
                aName = "Normal disconnection"  # noqa: N806 - paho's rule, paho's name
            value = ids.get((packetType, aName))
            if value is None:
                value = ids[(packetType, aName)] = self.getId(aName)  # KeyError as paho's
            self.value = value
        else:
            self.value = identifier
            self.getName()  # paho's check that the code exists for this packet type

    samples = [
        (PacketTypes.PUBACK, "Success"),
        (PacketTypes.PUBACK, "Not authorized"),
        (PacketTypes.CONNACK, "Success"),
        (PacketTypes.SUBACK, "Granted QoS 1"),
        (PacketTypes.DISCONNECT, "Success"),
    ]
    try:
        for packet_type, name in samples:
            theirs, ours = ReasonCode.__new__(ReasonCode), ReasonCode.__new__(ReasonCode)
            original(theirs, packet_type, name)
            init(ours, packet_type, name)
            if (theirs.value, theirs.getName()) != (ours.value, ours.getName()):
                return False
    except (KeyError, ValueError):  # paho's names changed: keep paho's constructor
        return False
    init._bloomwire_cached = True  # type: ignore[attr-defined]
    ReasonCode.__init__ = init  # type: ignore[method-assign]
    return True


#: Whether this paho release took :func:`share_property_tables` and :func:`cache_reason_codes`.
PROPERTIES_SHARED = share_property_tables()
REASON_CODES_CACHED = cache_reason_codes()


class BufferedSocket:
    """paho's socket, read in 64 KiB chunks and written once per round of packets.

    paho reads every packet with three or more ``recv`` calls and writes every packet with its
    own ``send``: at thousands of messages per second those syscalls, each releasing and taking
    back the GIL, cost more than the packets themselves. paho's loop already asks a socket for
    ``pending()`` bytes (an SSL socket has them) and skips ``select`` while there are some.
    """

    __slots__ = ("_error", "_in", "_in_pos", "_out", "sock")

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self._in = b""
        self._in_pos = 0
        self._out = bytearray()
        self._error: OSError | None = None

    def recv(self, n: int) -> bytes:
        if self._in_pos >= len(self._in):
            if self._error is not None:
                raise self._error
            self._in = self.sock.recv(65536)  # BlockingIOError/SSLWantReadError go to paho
            self._in_pos = 0
        chunk = self._in[self._in_pos : self._in_pos + n]
        self._in_pos += len(chunk)
        return chunk

    def pending(self) -> int:
        inner = self.sock.pending() if hasattr(self.sock, "pending") else 0
        return len(self._in) - self._in_pos + inner

    def send(self, data: bytes | bytearray) -> int:
        if self._error is not None:
            raise self._error
        self._out += data
        return len(data)

    def wants_flush(self) -> bool:
        return bool(self._out)

    def flush(self) -> None:
        """Send what the kernel takes now; the rest waits for the socket to be writable."""
        try:
            while self._out:
                sent = self.sock.send(self._out)
                del self._out[:sent]
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            pass
        except OSError as exc:
            self._error = exc  # reported to paho by the next recv or send
            raise

    def close(self) -> None:
        # paho closes right after writing DISCONNECT: give it a moment to leave.
        with contextlib.suppress(OSError, ValueError):
            deadline = time.monotonic() + 1.0
            while self._out and time.monotonic() < deadline:
                self.flush()
                if self._out:
                    time.sleep(0.005)
        self.sock.close()

    def __getattr__(self, name: str) -> Any:  # fileno, setblocking, setsockopt, …
        return getattr(self.sock, name)


class TunedClient(paho.Client):
    """paho's client on a :class:`BufferedSocket`, with :meth:`corked` rounds of packets."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._corked = 0
        self._wake = False

    @contextlib.contextmanager
    def corked(self) -> Iterator[None]:
        """Queue packets without waking the network thread for each; wake it once at the end.

        Every queued packet otherwise writes a byte to paho's wake-up socket pair, and the network
        thread runs a whole select round for it: a batch of N publishes would cost N rounds.
        """
        self._corked += 1
        try:
            yield
        finally:
            self._corked -= 1
            if not self._corked and self._wake:
                self._wake = False
                wake = self._sockpairW
                if wake is not None:
                    with contextlib.suppress(OSError):
                        wake.send(b"0")

    def _packet_queue(
        self,
        command: int,
        packet: bytes | bytearray,
        mid: int,
        qos: int,
        info: paho.MQTTMessageInfo | None = None,
    ) -> MQTTErrorCode:
        if not self._corked or self._thread is None:
            return super()._packet_queue(command, packet, mid, qos, info)
        self._out_packet.append(
            {
                "command": command,
                "mid": mid,
                "qos": qos,
                "pos": 0,
                "to_process": len(packet),
                "packet": packet,
                "info": info,
            }
        )
        self._wake = True
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _create_socket(self) -> Any:
        return BufferedSocket(super()._create_socket())

    def want_write(self) -> bool:
        sock = self._sock
        return super().want_write() or (isinstance(sock, BufferedSocket) and sock.wants_flush())

    def _packet_write(self) -> MQTTErrorCode:
        rc = super()._packet_write()
        sock = self._sock
        if isinstance(sock, BufferedSocket):
            try:
                sock.flush()
            except OSError:
                return MQTTErrorCode.MQTT_ERR_CONN_LOST
        return rc
