"""paho-mqtt's client tuned for thousands of messages per second, for the connections that ask.

Measured costs of paho 2.x at that rate, each removed here without changing what goes on the
wire: a ``recv`` per packet part and a ``send`` per packet (:class:`BufferedSocket`), a ``select``
round and a full decode into an ``MQTTMessage`` per received message
(:attr:`TunedClient.on_raw_message`), a decoded ``ReasonCode`` and ``Properties`` per PUBACK
(shared instances instead), a wake-up of the network thread per queued packet
(:meth:`TunedClient.corked`). ``docs/performance.md`` has the figures.

:class:`TunedClient` overrides private paths of paho's ``Client``: it is checked against the paho
releases in :data:`CHECKED_PAHO_VERSIONS` only, and :func:`tuning_refusal` says why not on any
other. Nothing here changes paho for other clients of the process.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt import MQTTException
from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

#: The paho-mqtt releases whose private names and layouts :class:`TunedClient` was checked
#: against (``tests/test_pahoclient.py``); pyproject.toml pins the same. 2.1.0 differs (no
#: ``_last_bytes_received``: its keepalive would not see the packets read here).
CHECKED_PAHO_VERSIONS = frozenset({"2.2.0"})


def tuning_refusal(version: str | None = None) -> str | None:
    """Why :class:`TunedClient` must not run on this paho (``version``: the installed one), or None."""
    if version is None:
        try:
            version = importlib.metadata.version("paho-mqtt")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
    if version not in CHECKED_PAHO_VERSIONS:
        checked = ", ".join(sorted(CHECKED_PAHO_VERSIONS))
        return f"paho-mqtt {version} is installed; the tuned client was checked against {checked} only"
    if not _lean_messages():
        return f"paho-mqtt {version}'s message classes are not the ones the tuned client fills"
    return None


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """The MQTT variable byte integer at ``pos`` and the position after it.

    IndexError when ``buf`` ends inside it, ValueError when it runs past four bytes.
    """
    value, shift = 0, 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 127) << shift
        if not byte & 128:
            return value, pos
        shift += 7
        if shift > 21:
            raise ValueError("an MQTT variable byte integer has at most four bytes")


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

    def next_packet(self) -> tuple[int, bytes] | None:
        """The next whole MQTT packet already in the buffer, as (fixed-header byte, body), or None.

        None also for a malformed remaining length: paho's own reader then reports it.
        """
        buf, start = self._in, self._in_pos
        try:
            length, i = read_varint(buf, start + 1)
        except (IndexError, ValueError):
            return None
        if len(buf) - i < length:
            return None
        self._in_pos = i + length
        return buf[start], buf[i : i + length]

    def fill(self) -> bool:
        """Read a chunk if the buffer is empty; True if it holds bytes now.

        Never raises: would-block, errors and the end of the stream are left to paho's next read,
        which meets them again and reports them its own way.
        """
        if self._in_pos < len(self._in):
            return True
        if self._error is not None:
            return False
        try:
            data = self.sock.recv(65536)
        except OSError:  # BlockingIOError and the SSL want-read/write errors are OSErrors too
            return False
        if not data:
            return False
        self._in, self._in_pos = data, 0
        return True

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


class _PackedProperties(Properties):
    """Properties packed once, for a value many messages share (never changed after)."""

    __slots__ = ("_packed",)
    _packed: bytes

    def pack(self) -> bytes:
        return self._packed


@functools.lru_cache(maxsize=64)
def expiry_properties(seconds: int) -> Properties:
    """PUBLISH properties with a Message Expiry Interval, built and packed once per value.

    paho packs a message's properties when it sends it (about 6 µs, twice with our size check):
    a cost per position at every rider's ping rate. The object is shared: do not change it.
    """
    props = _PackedProperties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.MessageExpiryInterval = seconds
    object.__setattr__(props, "_packed", Properties.pack(props))  # type: ignore[no-untyped-call]
    return props


class _Info(paho.MQTTMessageInfo):
    """paho's message info without a ``Condition`` of its own (its client's, notified to all).

    paho makes a ``Condition`` (and its lock) for every QoS 1 message, though hardly any is ever
    waited for; waiters here share their client's and re-check their own message when woken.
    """

    __slots__ = ()

    def __init__(self, mid: int, condition: threading.Condition) -> None:
        self.mid = mid
        self._published = False
        self._condition = condition
        self.rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        self._iterpos = 0

    def _set_as_published(self) -> None:
        with self._condition:
            self._published = True
            self._condition.notify_all()


def _lean_messages() -> bool:
    """Whether paho's message classes hold exactly the slots :meth:`TunedClient.publish` sets."""
    message_slots = {
        *("_topic", "dup", "info", "mid", "payload"),
        *("properties", "qos", "retain", "state", "timestamp"),
    }
    info_slots = {"_condition", "_iterpos", "_published", "mid", "rc"}
    return (
        set(getattr(paho.MQTTMessage, "__slots__", ())) == message_slots
        and set(getattr(paho.MQTTMessageInfo, "__slots__", ())) == info_slots
    )


#: ``on_raw_message(topic, payload, qos, retain, mid)``: a received QoS 0/1 PUBLISH, undecoded.
RawMessageCallback = Callable[[bytes, bytes, int, bool, int], None]

_PUBLISH = 0x30
_PUBACK = 0x40
_PUBACK_HEAD = 0x40020000
_DISCONNECT = 0xE0


def _in_packet(command: int = 0, body: bytes = b"") -> dict[str, Any]:
    """paho's reader state: idle, or holding one whole packet."""
    return {
        "command": command,
        "have_remaining": 1 if command else 0,
        "remaining_count": [],
        "remaining_mult": 1,
        "remaining_length": len(body),
        "packet": bytearray(body),
        "to_process": 0,
        "pos": 0,
    }


class TunedClient(paho.Client):
    """paho's client on a :class:`BufferedSocket`, with :meth:`corked` rounds of packets.

    Every whole packet in the buffer is handled in one read round (paho runs a ``select`` round
    per packet). With :attr:`on_raw_message` set, a QoS 0/1 PUBLISH goes straight to it as
    bytes: no ``MQTTMessage``, no decoded properties, no topic-filter matching. Such a client
    takes no ``message_callback_add`` filters.

    Raises RuntimeError on a paho release it was not checked against (:func:`tuning_refusal`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # first: paho's __del__ needs what it sets up
        refusal = tuning_refusal()
        if refusal is not None:
            raise RuntimeError(refusal)
        self._corked = 0
        self._wake = False
        self.on_raw_message: RawMessageCallback | None = None
        # Shared by this client's lean paths only: paho's callbacks read them, never change them.
        self._info_condition = threading.Condition()
        self._puback_properties = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]
        self._puback_reasons: dict[int, ReasonCode] = {}

    def message_callback_add(self, sub: str, callback: Any) -> None:
        if self.on_raw_message is not None:
            raise ValueError("a client with on_raw_message takes no topic-filter callbacks")
        super().message_callback_add(sub, callback)

    def _packet_read(self) -> MQTTErrorCode:
        sock = self._sock
        if not isinstance(sock, BufferedSocket) or self._protocol != MQTTProtocolVersion.MQTTv5:
            return super()._packet_read()
        packet = None
        if not self._in_packet["command"]:
            packet = sock.next_packet()
            if packet is None and sock.fill():  # an empty buffer: read a chunk first
                packet = sock.next_packet()
        if packet is None:  # mid-packet, a partial one, or nothing to read: paho reads
            rc = super()._packet_read()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or self._in_packet["command"]:
                return rc
            packet = sock.next_packet()
        handled = False
        while packet is not None:
            handled = True
            command, body = packet
            raw = None
            if command == _PUBACK:
                raw = self._plain_puback(body)
            elif command & 0xF0 == _PUBLISH:
                raw = self._raw_publish(command, body)
            rc = self._handle_whole(command, body) if raw is None else raw
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or not self._reading(sock):
                return rc
            packet = sock.next_packet()
        if handled:
            with self._msgtime_mutex:
                self._last_bytes_received = paho.time_func()
        # One buffer per round: queued acks and publishes go out before the next read.
        return MQTTErrorCode.MQTT_ERR_AGAIN

    def _reading(self, sock: BufferedSocket) -> bool:
        """Still connected through ``sock`` (a handled DISCONNECT closes it)."""
        return self._sock is sock

    def _handle_whole(self, command: int, body: bytes) -> MQTTErrorCode:
        """paho's own handling of one whole packet, as its reader would have set it up."""
        self._in_packet = _in_packet(command, body)  # type: ignore[assignment]
        try:
            return self._packet_handle()
        except MQTTException:  # paho's MalformedPacket, as its own reader treats it
            return MQTTErrorCode.MQTT_ERR_PROTOCOL
        finally:
            self._in_packet = _in_packet()  # type: ignore[assignment]

    def _plain_puback(self, body: bytes) -> MQTTErrorCode | None:
        """A PUBACK without properties (any reason code), handled as paho handles it but with this
        client's shared ``ReasonCode`` and ``Properties``; None leaves any other PUBACK to paho."""
        size = len(body)
        if size < 2 or size > 4 or (size == 4 and body[3]):
            return None
        reason = self._puback_reason(body[2] if size > 2 else 0)
        if reason is None:
            return None
        mid = (body[0] << 8) | body[1]
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, reason, self._puback_properties)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _puback_reason(self, code: int) -> ReasonCode | None:
        """This client's one ``ReasonCode`` for PUBACK ``code``; None for a code paho refuses."""
        reason = self._puback_reasons.get(code)
        if reason is None:
            try:
                reason = ReasonCode(PacketTypes.PUBACK, identifier=code)
            except (KeyError, ValueError):  # paho's decoder reports it its own way
                return None
            self._puback_reasons[code] = reason
        return reason

    def _raw_publish(self, command: int, body: bytes) -> MQTTErrorCode | None:
        """Hand a QoS 0/1 PUBLISH to :attr:`on_raw_message`; None leaves the packet to paho."""
        callback = self.on_raw_message
        qos = (command >> 1) & 3
        if callback is None or qos == 2:
            return None
        try:
            size = (body[0] << 8) | body[1]
            if not size:  # a topic alias: paho's business
                return None
            pos = 2 + size
            topic = body[2:pos]
            mid = 0
            if qos:
                mid = (body[pos] << 8) | body[pos + 1]
                pos += 2
            props, pos = read_varint(body, pos)  # the properties themselves are not needed
            pos += props
        except (IndexError, ValueError):
            return None  # malformed: paho's decoder says so
        if pos > len(body) or len(topic) != size:
            return None
        with self._in_callback_mutex:
            try:
                callback(topic, body[pos:], qos, bool(command & 1), mid)
            except Exception as err:
                self._easy_log(paho.MQTT_LOG_ERR, "Caught exception in on_raw_message: %s", err)
                if not self.suppress_exceptions:
                    raise
        if qos == 1 and not self._manual_ack:
            return self._send_puback(mid)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

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

    def wake(self) -> None:
        """Wake the network thread now (a corked batch's packets go out without waiting)."""
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

    def publish(
        self,
        topic: str,
        payload: paho.PayloadType = None,
        qos: int = 0,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> paho.MQTTMessageInfo:
        """paho's ``publish``; a QoS 1 message of bytes on a live MQTT 5 connection takes a lean path
        to the same packet and the same bookkeeping (kept for re-sending after a reconnect)."""
        if (
            qos != 1
            or self._sock is None
            or self._protocol != MQTTProtocolVersion.MQTTv5
            or self._max_queued_messages
            or self._max_inflight_messages
            or not isinstance(payload, bytes)
        ):
            return super().publish(topic, payload, qos, retain, properties)
        topic_bytes = topic.encode()
        if b"+" in topic_bytes or b"#" in topic_bytes or len(topic_bytes) > 65535:
            return super().publish(topic, payload, qos, retain, properties)  # paho's own errors
        packed = b"\x00" if properties is None else properties.pack()  # type: ignore[no-untyped-call]
        remaining = 4 + len(topic_bytes) + len(packed) + len(payload)
        if remaining > 268435455:
            return super().publish(topic, payload, qos, retain, properties)
        mid = self._mid_generate()
        message = paho.MQTTMessage.__new__(paho.MQTTMessage)
        message.timestamp = paho.time_func()
        message.state = paho.mqtt_ms_wait_for_puback
        message.dup = False
        message.mid = mid
        message._topic = topic_bytes
        message.payload = payload
        message.qos = 1
        message.retain = retain
        message.properties = properties
        message.info = info = _Info(mid, self._info_condition)
        header = self._pack_remaining_length(bytearray((_PUBLISH | 2 | (1 if retain else 0),)), remaining)
        size, packet_id = len(topic_bytes).to_bytes(2, "big"), mid.to_bytes(2, "big")
        packet = b"".join((header, size, topic_bytes, packet_id, packed, payload))
        with self._out_message_mutex:
            if mid in self._out_messages:
                info.rc = MQTTErrorCode.MQTT_ERR_QUEUE_SIZE
                return info
            self._out_messages[mid] = message
            self._inflight_messages += 1
            info.rc = self._packet_queue(_PUBLISH, packet, mid, 1, info)
        return info

    def ack_many(self, mids: Sequence[int]) -> MQTTErrorCode:
        """Acknowledge QoS 1 messages (manual-ack clients): the bytes of one ``ack()`` each, queued
        as one write."""
        if not self._manual_ack or not mids:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        # PUBACK, remaining length 2, packet id: 0x40 0x02 MSB LSB, four bytes per message.
        packet = struct.pack(f"!{len(mids)}I", *[_PUBACK_HEAD | mid for mid in mids])
        return self._packet_queue(_PUBACK, packet, 0, 0)

    def _packet_write(self) -> MQTTErrorCode:
        sock = self._sock
        if isinstance(sock, BufferedSocket):
            # Into the buffer in one pass; paho's loop slices, wraps and updates every packet.
            queue = self._out_packet
            moved = False
            while queue:
                packet = queue[0]
                kind = packet["command"] & 0xF0
                if kind == _DISCONNECT or (kind == _PUBLISH and not packet["qos"]):
                    break  # paho's own: on_publish for QoS 0, the socket closed after DISCONNECT
                queue.popleft()
                try:
                    sock.send(packet["packet"][packet["pos"] :] if packet["pos"] else packet["packet"])
                except OSError:
                    queue.appendleft(packet)
                    return MQTTErrorCode.MQTT_ERR_CONN_LOST
                moved = True
            if moved:
                with self._msgtime_mutex:
                    self._last_msg_out = paho.time_func()
        rc = super()._packet_write()
        sock = self._sock
        if isinstance(sock, BufferedSocket):
            try:
                sock.flush()
            except OSError:
                return MQTTErrorCode.MQTT_ERR_CONN_LOST
        return rc
