"""The small MQTT runtime every Bloomwire process uses.

:class:`Connection` wraps one paho-mqtt client (MQTT 5, TCP_NODELAY, credentials, Last Will,
reconnect with backoff, subscriptions restored, optional manual acks) and hands messages to
asyncio. A connection that asks (``tuned=True``) gets :mod:`bloomwire.runtime.pahoclient`'s client
instead of paho's own, unless the installed paho was not checked for it (then a warning says so).
:class:`Service` declares a service in one place: its handlers, start-up and shutdown hooks, and
its state (what the start-up hook returns, typed: ``Service[MyState]``, read as ``service.state``).
A handler declared with ``model=`` gets its payload decoded once by the runtime
(``async def f(event: X, msg: Message) -> None``; a batch handler ``f(events, msgs)``); a payload
that does not decode is dead-lettered with the decode error and never reaches the handler. A
handler declared without one gets the raw :class:`Message` (``async def f(msg: Message) -> None``).
A handler that raises is logged with the topic and payload, the message is dead-lettered, and the
loop goes on. A batch handler (or a handler declared with ``retry``) that raises is retried with
capped backoff, nothing acknowledged: the service says ``degraded`` (with the reason) on its status
topic meanwhile, logs it once, raises an operator alert when it lasts, and says ``online`` again
once the handler succeeds. Signals and the garbage collector are the process's: its entry point
(:mod:`bloomwire.app.entry`) sets them, never this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, overload

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from pydantic import BaseModel
from typing_extensions import TypeVar

from bloomwire.contract import topics
from bloomwire.contract.events import Refusal, ServiceState, ServiceStatus, encode, now, payload_text
from bloomwire.errors import BloomwireError, BrokerError
from bloomwire.runtime.log import get_logger
from bloomwire.runtime.metrics import NO_ROUTE, ServiceMetrics
from bloomwire.runtime.pahoclient import TunedClient, expiry_properties, tuning_refusal
from bloomwire.runtime.settings import Settings

log = get_logger("bloomwire.runtime.mqtt")

DEFAULT_SESSION_EXPIRY_S = 7 * 24 * 3600
PAYLOAD_LOG_LIMIT = 200
ROUTE_CACHE_SIZE = 50_000
#: A dead letter's reason is cut to this many characters: an exception message may quote a huge
#: payload, and a dead letter over the broker's packet limit gets the service disconnected.
REASON_LIMIT = 1000
#: A dead letter carries the refused payload up to this many characters (the store keeps it).
DEAD_PAYLOAD_LIMIT = 16_384
EVENT_ID_LIMIT = 200
#: A failing batch is retried after this pause, doubled each time up to the cap.
RETRY_FIRST_S = 0.2
RETRY_CAP_S = 10.0
#: A degraded service raises an operator alert after this long (``Service(degraded_alert_s=)``).
DEGRADED_ALERT_S = 30.0
#: QoS 1/2 messages one connection keeps in flight (queued or sent, PUBACK not yet in), at most:
#: half the 16-bit packet-id space, so an id is never handed out again while its message still
#: waits (a reused id lost the older message without a word), and no more than the broker's
#: Receive Maximum. Past it a publish waits for acknowledgements (backpressure), then fails loudly.
MAX_INFLIGHT = 32_768
#: How long a publish waits for room in flight before it raises :class:`BrokerError`.
INFLIGHT_WAIT_S = 30.0
#: How a subscription is asked for: a QoS, or MQTT 5 subscription options.
Subscription = int | SubscribeOptions


def live_only(qos: int) -> SubscribeOptions:
    """Subscription options for topics that carry events, not state: retained messages are never
    sent on (re)subscription (Retain Handling 2), and live ones keep their retain flag
    (Retain As Published), so the receiver can refuse them."""
    return SubscribeOptions(
        qos=qos, retainAsPublished=True, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND
    )


@dataclass(frozen=True, slots=True)
class Message:
    """One received MQTT message."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    mid: int = 0
    received_at: float = field(default_factory=time.time)
    generation: int = 0

    def preview(self) -> str:
        """The payload shortened for a log line."""
        text = self.payload[:PAYLOAD_LOG_LIMIT].decode("utf-8", errors="replace")
        return text + ("…" if len(self.payload) > PAYLOAD_LOG_LIMIT else "")


Handler = Callable[[Message], Awaitable[None]]
BatchHandler = Callable[[Sequence[Message]], Awaitable[None]]
Hook = Callable[[], Awaitable[None]]

ModelT = TypeVar("ModelT")
PydanticT = TypeVar("PydanticT", bound=BaseModel)
#: What a service's start-up hook returns and its handlers read (``service.state``).
StateT = TypeVar("StateT", default=None)
#: ``handler(model, msg)``: the payload decoded by the runtime, and the message it came in.
TypedHandler = Callable[[ModelT, Message], Awaitable[None]]
#: ``handler(models, msgs)``: a run of decoded payloads and their messages, in the same order.
TypedBatchHandler = Callable[[Sequence[ModelT], Sequence[Message]], Awaitable[None]]
#: ``decode(payload)``: raises on a payload it refuses.
Decoder = Callable[[bytes], ModelT]
_Call = Callable[[Any, Message], Awaitable[None]]
_BatchCall = Callable[[Sequence[Any], Sequence[Message]], Awaitable[None]]


class Connection:
    """One MQTT 5 connection, its paho network thread, and a queue of received messages."""

    def __init__(
        self,
        settings: Settings,
        client_id: str,
        *,
        status_topic: str | None = None,
        will_payload: bytes = b"offline",
        online_payload: bytes = b"online",
        persistent: bool = False,
        session_expiry_s: int = DEFAULT_SESSION_EXPIRY_S,
        manual_ack: bool = False,
        keepalive: int = 15,
        tuned: bool = False,
    ) -> None:
        self.settings = settings
        self.client_id = client_id
        self.status_topic = status_topic
        self.online_payload = online_payload
        #: Say ``online`` on every (re)connection; a Service turns this on once it is started.
        self.announce_online = True
        self.refused_publishes = 0
        #: QoS 0 publishes paho could not send (no connection): gone, and counted here.
        self.unsent_publishes = 0
        #: Bound on QoS 1/2 messages in flight (lowered to the broker's Receive Maximum).
        self.max_inflight = MAX_INFLIGHT
        self._room = threading.Condition()
        #: Publishers waiting for room in flight: a PUBACK notifies only when there are some.
        self._room_waiters = 0
        self.persistent = persistent
        self.session_expiry_s = session_expiry_s
        self.manual_ack = manual_ack
        self.keepalive = keepalive
        self.subscriptions: dict[str, Subscription] = {}
        self.generation = 0
        self.connected = threading.Event()
        self.last_error: str | None = None
        #: The broker's Maximum Packet Size (from CONNACK); larger publishes are refused here.
        self.max_packet_size: int | None = None
        self._subscribe_lock = threading.Lock()
        self._inbox: deque[Message] = deque()
        self._wakeup: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting = False
        self._on_connect_hooks: list[Callable[[], None]] = []
        self._diverts: list[tuple[str, Callable[[Message], None]]] = []

        refusal = tuning_refusal() if tuned else None
        if refusal is not None:
            log.warning("paho tuning refused; using plain paho", client_id=client_id, reason=refusal)
        #: Whether this connection runs on :class:`TunedClient` (asked for, and not refused).
        self.tuned = tuned and refusal is None
        client = (TunedClient if self.tuned else paho.Client)(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            manual_ack=manual_ack,
        )
        if settings.broker_username:
            password = settings.broker_password.get_secret_value() if settings.broker_password else None
            client.username_pw_set(settings.broker_username, password)
        if settings.broker_tls:
            client.tls_set(
                ca_certs=str(settings.broker_ca_file) if settings.broker_ca_file else None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        if status_topic:
            client.will_set(status_topic, will_payload, qos=1, retain=True)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        # 0 = no client-side window: paho re-scans every in-flight message on each PUBACK when a
        # window is set (quadratic at thousands per second). Our own batches bound what is in flight.
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        if isinstance(client, TunedClient):
            client.on_raw_message = self._on_raw_message
        client.on_publish = self._on_publish
        client.on_socket_open = self._on_socket_open
        self.client = client

    # --- paho callbacks (network thread) ---------------------------------------------------

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # Small QoS 1 packets would otherwise wait on Nagle's algorithm for the peer's ACK.
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            self.last_error = f"broker refused the connection: {reason}"
            log.warning("connect refused", client_id=self.client_id, reason=str(reason))
            return
        self.generation += 1
        self.last_error = None
        self.max_packet_size = getattr(properties, "MaximumPacketSize", None)
        receive_max = getattr(properties, "ReceiveMaximum", None)
        self.max_inflight = min(MAX_INFLIGHT, receive_max) if receive_max else MAX_INFLIGHT
        # Never raise here either: an exception in a paho callback kills the network thread.
        try:
            with self._subscribe_lock:  # subscribe() must not slip in between the two
                # Subscribe BEFORE saying online: the broker handles one client's packets in
                # order, so whoever sees "online" knows the subscriptions are in place.
                for topic_filter, how in list(self.subscriptions.items()):
                    _subscribe(client, topic_filter, how)
                self.connected.set()
            if self.status_topic and self.announce_online:
                client.publish(self.status_topic, self.online_payload, qos=1, retain=True)
        except Exception:  # pragma: no cover - defensive
            log.exception("restoring subscriptions failed", client_id=self.client_id)
        for hook in self._on_connect_hooks:
            try:
                hook()
            except Exception:
                log.exception("on-connect hook failed", client_id=self.client_id)
        log.debug("connected", client_id=self.client_id, session_present=flags.session_present)

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self.connected.clear()
        if reason.value != 0:
            self.last_error = f"disconnected: {reason}"
            log.warning("disconnected; reconnecting", client_id=self.client_id, reason=str(reason))

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, properties: Properties | None
    ) -> None:
        # MQTT 5 answers a publish outside the sender's ACL with a normal PUBACK carrying 0x87:
        # without this, such a message would vanish without a trace.
        if reason.is_failure:
            self.refused_publishes += 1
            log.warning("broker refused a publish", client_id=self.client_id, mid=mid, reason=str(reason))
        if self._room_waiters:  # read unlocked: a missed notify costs a waiter one 50 ms poll
            with self._room:
                self._room.notify_all()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        # Every message of a plain client; QoS 2 only on a tuned one (QoS 0/1: _on_raw_message).
        try:
            topic = msg.topic
        except UnicodeDecodeError as exc:  # the broker should refuse these; keep the message anyway
            topic = bytes(exc.object).decode("utf-8", errors="replace")
        self._enqueue(topic, bytes(msg.payload), msg.qos, msg.retain, msg.mid)

    def _on_raw_message(self, topic: bytes, payload: bytes, qos: int, retain: bool, mid: int) -> None:
        try:
            text = topic.decode("utf-8")
        except UnicodeDecodeError:  # the broker should refuse these; keep the message anyway
            text = topic.decode("utf-8", errors="replace")
        self._enqueue(text, payload, qos, retain, mid)

    def _enqueue(self, topic: str, payload: bytes, qos: int, retain: bool, mid: int) -> None:
        # Never raise here: an exception in a paho callback kills its network thread silently.
        try:
            msg = Message(topic, payload, qos, retain, mid, time.time(), self.generation)
            if self._diverts and self._divert(msg):
                return
            self._inbox.append(msg)
            if self._waiting and self._loop is not None and self._wakeup is not None:
                self._waiting = False
                self._loop.call_soon_threadsafe(self._wakeup.set)
        except Exception:  # pragma: no cover - defensive
            log.exception("dropping message in network thread", mid=mid)

    def _divert(self, msg: Message) -> bool:
        """Hand ``msg`` to the callback of the first diverted filter it matches; False if none."""
        for topic_filter, callback in self._diverts:
            if topics.matches(topic_filter, msg.topic):
                try:
                    callback(msg)
                except Exception:
                    log.exception("diverted message callback failed", client_id=self.client_id)
                if msg.qos and self.manual_ack:
                    self.client.ack(msg.mid, msg.qos)
                return True
        return False

    # --- public API --------------------------------------------------------------------------

    def on_connect(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` in the network thread after every (re)connection."""
        self._on_connect_hooks.append(hook)

    def divert(self, topic_filter: str, callback: Callable[[Message], None], qos: int = 0) -> None:
        """Subscribe to ``topic_filter`` and hand its messages to ``callback`` in the network
        thread, never to the queue :meth:`drain` empties.

        For answers someone awaits (:mod:`bloomwire.runtime.request`): queued, an answer would
        wait behind the very handler awaiting it. ``callback`` must be quick; it may not block.
        """
        self._diverts.append((topic_filter, callback))
        self.subscribe(topic_filter, qos)

    def start(self) -> None:
        """Connect in the background; paho retries with backoff until the broker answers."""
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.session_expiry_s if self.persistent else 0
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self.client.connect_async(
            self.settings.broker_host,
            self.settings.broker_port,
            keepalive=self.keepalive,
            clean_start=not self.persistent,
            properties=props,
        )
        self.client.loop_start()

    async def wait_connected(self, timeout: float = 10.0) -> None:
        """Wait until connected, or raise :class:`BrokerError` saying what went wrong."""
        deadline = time.monotonic() + timeout
        while not self.connected.is_set():
            if time.monotonic() > deadline:
                where = f"{self.settings.broker_host}:{self.settings.broker_port}"
                why = self.last_error or "no answer"
                raise BrokerError(
                    f"could not connect to the MQTT broker at {where} as "
                    f"{self.settings.broker_username!r}: {why}"
                )
            await asyncio.sleep(0.02)

    def subscribe(self, topic_filter: str, qos: Subscription = 1) -> None:
        """Subscribe now (if connected) and after every reconnection (``qos`` may be options)."""
        with self._subscribe_lock:
            self.subscriptions[topic_filter] = qos
            if self.connected.is_set():
                _subscribe(self.client, topic_filter, qos)

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 1,
        retain: bool = False,
        expiry_s: int | None = None,
    ) -> paho.MQTTMessageInfo:
        """Queue a publish (thread-safe, non-blocking); paho re-sends QoS 1 after a reconnect.

        Raises :class:`BrokerError` for a message over the broker's Maximum Packet Size: sent, it
        would get this connection closed, and re-sent after every reconnect, closed again. A QoS
        1/2 publish waits while :attr:`max_inflight` messages await their acknowledgement, and
        raises if none comes within :data:`INFLIGHT_WAIT_S`, or if paho would not take it.
        """
        props = None if expiry_s is None else self._expiry_properties(max(1, int(expiry_s)))
        limit = self.max_packet_size
        if limit is not None:
            size = _publish_packet_size(topic, payload, qos, props)
            if size > limit:
                raise BrokerError(
                    f"publish to {topic[:100]!r} would be a {size}-byte packet, over the broker's "
                    f"maximum packet size of {limit} bytes"
                )
        if qos > 0:
            self._wait_for_room(topic)
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        self._check_taken(info, topic, qos)
        return info

    def in_flight(self) -> int:
        """QoS 1/2 messages paho holds until the broker acknowledges them."""
        return len(self.client._out_messages)

    def _wait_for_room(self, topic: str) -> None:
        """Block until fewer than :attr:`max_inflight` messages are in flight (not on paho's own
        thread: it is the one that reads the acknowledgements)."""
        if self.in_flight() < self.max_inflight or threading.current_thread() is self.client._thread:
            return
        if isinstance(self.client, TunedClient):
            self.client.wake()  # a corked batch's packets: out now, so their PUBACKs can come
        deadline = time.monotonic() + INFLIGHT_WAIT_S
        with self._room:
            self._room_waiters += 1
            try:
                while self.in_flight() >= self.max_inflight:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise BrokerError(
                            f"publish to {topic[:100]!r}: {self.in_flight()} messages unacknowledged "
                            f"for {INFLIGHT_WAIT_S:.0f} s (at most {self.max_inflight} in flight)"
                        )
                    self._room.wait(min(left, 0.05))
            finally:
                self._room_waiters -= 1

    def _check_taken(self, info: paho.MQTTMessageInfo, topic: str, qos: int) -> None:
        """Raise if paho did not take the publish; a QoS 0 one without a connection is counted."""
        rc = info.rc
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            return
        if rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            if qos > 0:
                return  # kept by paho, sent again once reconnected
            self.unsent_publishes += 1  # QoS 0 is at most once: not sent, but not unseen either
            log.debug("qos 0 publish not sent: no connection", client_id=self.client_id, topic=topic[:100])
            return
        raise BrokerError(f"publish to {topic[:100]!r} not taken: {paho.error_string(rc)}")

    def _expiry_properties(self, seconds: int) -> Properties:
        if isinstance(self.client, TunedClient):
            return expiry_properties(seconds)  # packed once, shared: only the tuned client's
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.MessageExpiryInterval = seconds
        return props

    def corked(self) -> contextlib.AbstractContextManager[None]:
        """Publishes and acks inside go out in one round of the network thread (tuned only)."""
        if isinstance(self.client, TunedClient):
            return self.client.corked()
        return contextlib.nullcontext()

    def ack(self, message: Message) -> None:
        """Acknowledge a QoS 1/2 message to the broker (manual-ack connections only)."""
        self.ack_all((message,))

    def ack_all(self, messages: Sequence[Message]) -> None:
        """Acknowledge ``messages`` received on the current connection (manual-ack connections
        only; an earlier connection's messages come again): one write for the QoS 1 ones."""
        if not self.manual_ack:
            return
        generation = self.generation
        mine = [m for m in messages if m.qos and m.generation == generation]
        client = self.client
        with self.corked():
            if isinstance(client, TunedClient):
                client.ack_many([m.mid for m in mine if m.qos == 1])
                mine = [m for m in mine if m.qos == 2]
            for m in mine:
                client.ack(m.mid, m.qos)

    def queued(self) -> int:
        """How many received messages wait to be drained."""
        return len(self._inbox)

    def oldest_received_at(self) -> float | None:
        """When the oldest waiting message arrived (``time.time()``), or None."""
        inbox = self._inbox
        return inbox[0].received_at if inbox else None

    def drain(self, limit: int) -> list[Message]:
        """Take up to ``limit`` queued messages without waiting."""
        out: list[Message] = []
        inbox = self._inbox
        while inbox and len(out) < limit:
            out.append(inbox.popleft())
        return out

    async def wait_message(self, timeout: float | None = None) -> bool:
        """Wait until a message is queued; False on timeout."""
        if self._inbox:
            return True
        assert self._wakeup is not None, "start() first"
        self._wakeup.clear()
        self._waiting = True
        if self._inbox:  # raced with the network thread
            self._waiting = False
            return True
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout)
        except TimeoutError:
            return False
        finally:
            self._waiting = False
        return True

    async def stop(self, *, announce_offline: bool = True) -> None:
        """Say ``offline`` (a clean disconnect sends no Will), disconnect and stop the thread."""
        if self.status_topic and announce_offline and self.connected.is_set():
            info = self.publish(self.status_topic, b"offline", qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                await asyncio.to_thread(info.wait_for_publish, 2.0)
        with contextlib.suppress(Exception):
            self.client.disconnect()
        await asyncio.to_thread(self.client.loop_stop)
        self._release_client()

    def _release_client(self) -> None:
        # paho closes its wake-up socket pair only in Client.__del__. Our callbacks make a cycle
        # (client -> bound method -> self -> client) that only the garbage collector frees, in an
        # order that may finalize those sockets first (a ResourceWarning): without the cycle the
        # client goes, sockets closed, with this connection.
        client = self.client
        client.on_connect = client.on_disconnect = client.on_message = None
        client.on_publish = client.on_socket_open = None
        if isinstance(client, TunedClient):
            client.on_raw_message = None


def _subscribe(client: paho.Client, topic_filter: str, how: Subscription) -> None:
    if isinstance(how, SubscribeOptions):
        client.subscribe(topic_filter, options=how)
    else:
        client.subscribe(topic_filter, how)


def first_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` (our own errors: the message alone): a reason short
    enough for a status or a log line."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    if isinstance(exc, BloomwireError) and line:
        return _shorten(line, limit)
    return _shorten(f"{type(exc).__name__}: {line}".rstrip(": "), limit)


def _varint_size(n: int) -> int:
    size = 1
    while n >= 128:
        n //= 128
        size += 1
    return size


def _publish_packet_size(topic: str, payload: bytes | str, qos: int, props: Properties | None) -> int:
    """Size on the wire of an MQTT 5 PUBLISH packet."""
    body = payload.encode("utf-8") if isinstance(payload, str) else payload
    props_size = len(props.pack()) if props is not None else 1  # type: ignore[no-untyped-call]
    remaining = 2 + len(topic.encode("utf-8")) + (2 if qos else 0) + props_size + len(body)
    return 1 + _varint_size(remaining) + remaining


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def event_id_of(payload: bytes) -> str | None:
    """The ``id`` of a JSON object payload, if it has a non-empty string one; never raises."""
    if payload.lstrip()[:1] != b"{":
        return None
    try:
        obj = json.loads(payload)
    except Exception:  # not UTF-8, not JSON, nested too deep...
        return None
    value = obj.get("id") if isinstance(obj, dict) else None
    return _shorten(value, EVENT_ID_LIMIT) if isinstance(value, str) and value else None


@dataclass
class _Route:
    topic_filter: str
    qos: int
    #: ``call(model, msg)`` for one message (model: the decoded payload, or the message itself).
    call: _Call | None = None
    #: ``call_batch(models, msgs)`` for a run of messages; one object per declaration.
    call_batch: _BatchCall | None = None
    #: Decodes the payload before the call; None: the handler takes the raw message.
    decode: Callable[[bytes], Any] | None = None
    #: A single handler that raises is retried like a batch (never dead-lettered and acked).
    retry: bool = False
    #: Subscribed with :func:`live_only` options (no retained messages sent on subscription).
    live: bool = False

    def subscription(self) -> Subscription:
        return live_only(self.qos) if self.live else self.qos


def _decoder(model: type[BaseModel] | Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """A pydantic model's JSON validator, or the decode callable as given."""
    if isinstance(model, type) and issubclass(model, BaseModel):
        return model.model_validate_json
    return model


def _raw(fn: Handler) -> _Call:
    async def call(_: Any, msg: Message) -> None:
        await fn(msg)

    return call


def _raw_batch(fn: BatchHandler) -> _BatchCall:
    async def call(_: Sequence[Any], msgs: Sequence[Message]) -> None:
        await fn(msgs)

    return call


@dataclass
class _Health:
    """Whether a service can do its job: ``degraded`` while a batch keeps failing."""

    since: float | None = None
    reason: str = ""
    alerted: bool = False


class Service(Generic[StateT]):
    """A named service: declare its handlers and hooks, then :meth:`run` it.

    ``Service[S]``: a start-up hook returns the service's state, an ``S`` its handlers read as
    :attr:`state` while it runs. ``persistent`` services keep their broker session (clean_start
    false, session expiry) and acknowledge each message only after its handler returned, so
    nothing is lost while they are down or when they crash mid-message.
    """

    def __init__(
        self,
        name: str,
        *,
        persistent: bool = False,
        session_expiry_s: int = DEFAULT_SESSION_EXPIRY_S,
        max_batch: int = 500,
        linger_s: float = 0.0,
        metrics: ServiceMetrics | None = None,
        tuned: bool = False,
        degraded_alert_s: float = DEGRADED_ALERT_S,
    ) -> None:
        self.name = topics.check_id(name, "service")
        #: Degraded this long, the service raises an operator alert (log error + status reason).
        self.degraded_alert_s = degraded_alert_s
        self.health = _Health()
        #: Told what is received, handled, failed and dead-lettered (None: nothing is counted).
        self.metrics = metrics
        self.persistent = persistent
        self.session_expiry_s = session_expiry_s
        self.max_batch = max_batch
        self.linger_s = linger_s
        self.tuned = tuned
        self.routes: list[_Route] = []
        self._routes_by_topic: dict[str, _Route | None] = {}
        self.startup: list[Callable[[], Awaitable[StateT | None]]] = []
        self.shutdown: list[Hook] = []
        self.connection: Connection | None = None
        self.ready = asyncio.Event()
        self.handled = 0
        self.failed = 0
        #: Messages whose payload did not decode (dead-lettered, never handed to a handler).
        self.refused = 0
        self._state: tuple[StateT] | tuple[()] = ()

    # --- declaration -------------------------------------------------------------------------

    @overload
    def handle(
        self, topic_filter: str, qos: int = 1, *, retry: bool = False, model: None = None
    ) -> Callable[[Handler], Handler]: ...

    @overload
    def handle(
        self, topic_filter: str, qos: int = 1, *, retry: bool = False, model: Decoder[ModelT]
    ) -> Callable[[TypedHandler[ModelT]], TypedHandler[ModelT]]: ...

    @overload
    def handle(
        self, topic_filter: str, qos: int = 1, *, retry: bool = False, model: type[PydanticT]
    ) -> Callable[[TypedHandler[PydanticT]], TypedHandler[PydanticT]]: ...

    def handle(
        self,
        topic_filter: str,
        qos: int = 1,
        *,
        retry: bool = False,
        model: type[BaseModel] | Decoder[Any] | None = None,
    ) -> Callable[[Any], Any]:
        """Decorator: a handler for every message matching ``topic_filter``.

        With ``model`` (a pydantic model, or a callable decoding the payload bytes) the handler is
        ``handler(decoded, msg)``; a payload that does not decode is dead-lettered with the decode
        error and acknowledged. Without, it is ``handler(msg)``. A handler that raises gets its
        message dead-lettered and acknowledged; with ``retry`` it is retried instead, like a batch
        (for messages that must not be lost: the store's refusals).
        """
        decode = _decoder(model)

        def register(fn: Any) -> Any:
            call = fn if decode is not None else _raw(fn)
            self.routes.append(_Route(topic_filter, qos, call=call, decode=decode, retry=retry))
            return fn

        return register

    @overload
    def handle_batch(
        self, *filters: str, qos: int = 1, live: bool = False, model: None = None
    ) -> Callable[[BatchHandler], BatchHandler]: ...

    @overload
    def handle_batch(
        self, *filters: str, qos: int = 1, live: bool = False, model: Decoder[ModelT]
    ) -> Callable[[TypedBatchHandler[ModelT]], TypedBatchHandler[ModelT]]: ...

    @overload
    def handle_batch(
        self, *filters: str, qos: int = 1, live: bool = False, model: type[PydanticT]
    ) -> Callable[[TypedBatchHandler[PydanticT]], TypedBatchHandler[PydanticT]]: ...

    def handle_batch(
        self,
        *filters: str,
        qos: int = 1,
        live: bool = False,
        model: type[BaseModel] | Decoder[Any] | None = None,
    ) -> Callable[[Any], Any]:
        """Decorator: a handler for runs of consecutive messages matching ``filters``.

        With ``model`` it is ``handler(decoded, msgs)`` (same order, same length): each payload is
        decoded once, before the first attempt, and one that does not decode is dead-lettered and
        acknowledged on its own. Without, it is ``handler(msgs)`` and must deal with each bad
        message itself. If it raises, the whole batch is retried (it was not acknowledged) after a
        pause, the service ``degraded`` meanwhile. ``live``: subscribed with :func:`live_only`
        (retained messages not replayed, retain flag kept).
        """
        decode = _decoder(model)

        def register(fn: Any) -> Any:
            call = fn if decode is not None else _raw_batch(fn)
            for f in filters:
                self.routes.append(_Route(f, qos, call_batch=call, decode=decode, live=live))
            return fn

        return register

    def on_startup(
        self, fn: Callable[[], Awaitable[StateT | None]]
    ) -> Callable[[], Awaitable[StateT | None]]:
        """Decorator: run ``fn`` after connecting, before handling messages. What it returns (if
        not None) becomes :attr:`state` until the service has stopped."""
        self.startup.append(fn)
        return fn

    def on_shutdown(self, fn: Hook) -> Hook:
        """Decorator: run ``fn`` when stopping, before disconnecting (:attr:`state` still set)."""
        self.shutdown.append(fn)
        return fn

    @property
    def state(self) -> StateT:
        """What the start-up hook returned; raises :class:`BrokerError` before or after."""
        if not self._state:
            raise BrokerError(f"service {self.name} has no state: it is not running")
        return self._state[0]

    @property
    def has_state(self) -> bool:
        """Whether :attr:`state` is set (a shutdown hook after a failed start-up: not)."""
        return bool(self._state)

    # --- runtime -----------------------------------------------------------------------------

    @property
    def conn(self) -> Connection:
        """The live connection (only while running)."""
        if self.connection is None:
            raise BrokerError(f"service {self.name} is not running")
        return self.connection

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 1,
        retain: bool = False,
        expiry_s: int | None = None,
    ) -> None:
        """Publish through the service's connection."""
        self.conn.publish(topic, payload, qos=qos, retain=retain, expiry_s=expiry_s)

    def corked(self) -> contextlib.AbstractContextManager[None]:
        """Publishes inside go out in one round of the network thread."""
        return self.conn.corked()

    def dead_letter(self, msg: Message, reason: str, event_id: str | None = None) -> None:
        """Tell ``services/deadletter`` that ``msg`` was refused and why (reason cut to
        :data:`REASON_LIMIT` characters; ``event_id`` defaults to the payload's JSON ``id``)."""
        if event_id is None:
            event_id = event_id_of(msg.payload)
        refusal = Refusal(
            id=event_id,
            topic=msg.topic,
            reason=_shorten(reason, REASON_LIMIT),
            service=self.name,
            payload=payload_text(msg.payload, DEAD_PAYLOAD_LIMIT),
        )
        self.publish(topics.DEADLETTER, encode(refusal), qos=1)
        if self.metrics is not None:
            self.metrics.dead_lettered(self._route_name(msg.topic))

    def _route(self, topic: str) -> _Route | None:
        if topic in self._routes_by_topic:
            return self._routes_by_topic[topic]
        found = next((r for r in self.routes if topics.matches(r.topic_filter, topic)), None)
        if len(self._routes_by_topic) >= ROUTE_CACHE_SIZE:
            self._routes_by_topic.clear()
        self._routes_by_topic[topic] = found
        return found

    # --- metrics (only when a ServiceMetrics was given) ----------------------------------------

    def _route_name(self, topic: str) -> str:
        route = self._route(topic)
        return route.topic_filter if route is not None else NO_ROUTE

    def _routes_of(self, msgs: Sequence[Message]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for m in msgs:
            name = self._route_name(m.topic)
            counts[name] = counts.get(name, 0) + 1
        return counts

    def _watch(self, conn: Connection) -> None:
        if self.metrics is not None:
            ready = self.ready
            self.metrics.watch(
                queued=conn.queued,
                oldest=conn.oldest_received_at,
                ready=lambda: ready.is_set() and conn.connected.is_set(),
            )
            conn.on_connect(self.metrics.connected)

    def _observe(self, msgs: Sequence[Message], started: float) -> None:
        if self.metrics is not None:
            self.metrics.handled(self._routes_of(msgs), time.perf_counter() - started)

    def _observe_failure(self, msg: Message) -> None:
        if self.metrics is not None:
            self.metrics.failed(self._route_name(msg.topic))

    async def run(
        self,
        settings: Settings,
        *,
        stop: asyncio.Event | None = None,
        install_signals: Literal[False] = False,
    ) -> None:
        """Connect, run start-up hooks, handle messages until ``stop`` is set.

        Signals are the process's entry point's (:mod:`bloomwire.app.entry`): ``install_signals``
        is accepted (False only) for callers written before they moved there.
        """
        if install_signals:
            raise TypeError("Service.run installs no signal handlers: the entry point does")
        stop = stop or asyncio.Event()
        conn = Connection(
            settings,
            client_id=settings.broker_username or self.name,
            status_topic=topics.service_status(self.name),
            persistent=self.persistent,
            session_expiry_s=self.session_expiry_s,
            manual_ack=self.persistent,
            tuned=self.tuned,
        )
        conn.announce_online = False
        self.connection = conn
        self._watch(conn)
        for route in self.routes:
            conn.subscriptions[route.topic_filter] = route.subscription()
        conn.start()
        try:
            await self._wait_connected(conn, stop)
            if stop.is_set():  # stopped before the broker ever answered
                return
            await self._start()
            # "online" means ready: subscribed AND started (e.g. the store migrated).
            conn.announce_online = True
            conn.publish(
                conn.status_topic or topics.service_status(self.name), conn.online_payload, retain=True
            )
            self.ready.set()
            log.info("service running", service=self.name)
            await self._consume(conn, stop)
        finally:
            for hook in self.shutdown:
                try:
                    await hook()
                except Exception:
                    log.exception("shutdown hook failed", service=self.name)
            await conn.stop()
            self._state = ()
            self.connection = None
            self.ready.clear()
            if self.metrics is not None:
                self.metrics.stopped()
            log.info("service stopped", service=self.name, handled=self.handled, failed=self.failed)

    async def _start(self) -> None:
        """Run the start-up hooks; the last one that returns something sets :attr:`state`."""
        for hook in self.startup:
            state = await hook()
            if state is not None:
                self._state = (state,)

    async def _wait_connected(self, conn: Connection, stop: asyncio.Event) -> None:
        warned = False
        started = time.monotonic()
        while not conn.connected.is_set() and not stop.is_set():
            if not warned and time.monotonic() - started > 5:
                log.warning(
                    "still waiting for the broker",
                    service=self.name,
                    broker=f"{conn.settings.broker_host}:{conn.settings.broker_port}",
                    error=conn.last_error,
                )
                warned = True
            await asyncio.sleep(0.02)

    async def _consume(self, conn: Connection, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if not await conn.wait_message(timeout=0.2):
                continue
            if self.linger_s:
                await self._linger(conn)
            pending = conn.drain(self.max_batch)
            if self.metrics is not None:
                self.metrics.received(self._routes_of(pending))
            while pending and not stop.is_set():
                pending = await self._dispatch(conn, pending, stop)

    async def _linger(self, conn: Connection) -> None:
        """Let a batch fill until its first message is ``linger_s`` old (or the batch is full)."""
        oldest = conn.oldest_received_at()
        if oldest is None or conn.queued() >= self.max_batch:
            return
        wait = oldest + self.linger_s - time.time()
        if wait > 0:
            await asyncio.sleep(wait)

    async def _dispatch(self, conn: Connection, pending: list[Message], stop: asyncio.Event) -> list[Message]:
        """Handle the head of ``pending``; return what is left ([] if stopped first)."""
        first = pending[0]
        route = self._route(first.topic)
        if route is None or route.call_batch is None:
            return pending[1:] if await self._handle_one(conn, route, first, stop) else []
        call = route.call_batch
        n = 1
        while n < len(pending):
            nxt = self._route(pending[n].topic)
            if nxt is None or nxt.call_batch is not call:
                break
            n += 1
        batch = pending[:n]
        models: list[Any] = batch
        if route.decode is not None:
            models, batch = self._decode_all(conn, route.decode, batch)
        if batch and not await self._until_handled(conn, lambda b: call(models, b), batch, stop):
            return []
        return pending[n:]

    def _decode_all(
        self, conn: Connection, decode: Callable[[bytes], Any], batch: list[Message]
    ) -> tuple[list[Any], list[Message]]:
        """The decoded payloads of ``batch`` and their messages; the rest dead-lettered, acked."""
        models: list[Any] = []
        kept: list[Message] = []
        refused: list[Message] = []
        for msg in batch:
            try:
                models.append(decode(msg.payload))
            except Exception as exc:
                self._refuse(msg, exc)
                refused.append(msg)
            else:
                kept.append(msg)
        conn.ack_all(refused)
        return models, kept

    def _refuse(self, msg: Message, exc: Exception) -> None:
        """Dead-letter ``msg``, whose payload did not decode (never reaches a handler)."""
        self.refused += 1
        reason = f"undecodable payload: {type(exc).__name__}: {exc}"
        # One line, but whole: a validation error names the field only after its first line.
        brief = _shorten(" ".join(reason.split()), 300)
        log.warning("payload refused", service=self.name, topic=msg.topic[:200], reason=brief)
        with contextlib.suppress(Exception):
            self.dead_letter(msg, reason)

    async def _until_handled(
        self, conn: Connection, handler: BatchHandler, batch: list[Message], stop: asyncio.Event
    ) -> bool:
        """Call ``handler(batch)`` until it returns, then acknowledge the batch; False if stopped first.

        While it fails the service is degraded: nothing more is read (the broker holds the rest,
        bounded by its in-flight window), the pause doubles up to :data:`RETRY_CAP_S`.
        """
        delay = RETRY_FIRST_S
        while True:
            started = time.perf_counter()
            try:
                await handler(batch)
                break
            except Exception as exc:
                self.failed += 1
                self._observe_failure(batch[0])
                self._degraded(conn, exc, len(batch))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                if stop.is_set():  # not acknowledged: a persistent session gets it again
                    log.warning("stopping with an unhandled batch", service=self.name, size=len(batch))
                    return False
                delay = min(delay * 2, RETRY_CAP_S)
        conn.ack_all(batch)
        self.handled += len(batch)
        self._observe(batch, started)
        self._recovered(conn)
        return True

    # --- health: online / degraded on the status topic --------------------------------------------

    def _degraded(self, conn: Connection, exc: Exception, size: int) -> None:
        """A batch failed: say so once (log and status), and raise the alert once it lasts."""
        health = self.health
        if health.since is None:
            health.since = time.monotonic()
            health.reason = first_line(exc)
            log.warning("degraded; retrying", service=self.name, size=size, reason=health.reason)
            self._announce(conn, ServiceState.DEGRADED, health.reason)
            return
        log.debug("retry failed", service=self.name, size=size, reason=first_line(exc))
        lasted = time.monotonic() - health.since
        if not health.alerted and lasted >= self.degraded_alert_s:
            health.alerted = True
            reason = f"ALERT: degraded for over {self.degraded_alert_s:.3g} s: {health.reason}"
            log.error("alert raised", service=self.name, degraded_s=round(lasted, 1), reason=health.reason)
            self._announce(conn, ServiceState.DEGRADED, reason)

    def _recovered(self, conn: Connection) -> None:
        health = self.health
        if health.since is None:
            return
        lasted = time.monotonic() - health.since
        if health.alerted:
            log.info("alert resolved", service=self.name)
        log.info("recovered", service=self.name, degraded_s=round(lasted, 1), reason=health.reason)
        self.health = _Health()
        self._announce(conn, ServiceState.ONLINE, "")

    def _announce(self, conn: Connection, state: ServiceState, reason: str) -> None:
        """Publish the retained status; a reconnection repeats it (never a stale ``online``)."""
        if state is ServiceState.ONLINE:
            payload = b"online"
        else:
            payload = ServiceStatus(state=state, reason=reason, since=now()).model_dump_json().encode()
        conn.online_payload = payload
        with contextlib.suppress(Exception):  # disconnected: the reconnection says it
            conn.publish(conn.status_topic or topics.service_status(self.name), payload, retain=True)

    async def _handle_one(
        self, conn: Connection, route: _Route | None, msg: Message, stop: asyncio.Event
    ) -> bool:
        """Decode and handle ``msg`` (acknowledged after); False if stopped before it was handled."""
        model: Any = msg
        if route is not None and route.decode is not None:
            try:
                model = route.decode(msg.payload)
            except Exception as exc:
                self._refuse(msg, exc)
                conn.ack(msg)
                return True
        if route is not None and route.call is not None and route.retry:
            call = route.call
            return await self._until_handled(conn, lambda b: call(model, b[0]), [msg], stop)
        started = time.perf_counter()
        try:
            if route is None or route.call is None:
                raise LookupError(f"no handler for topic {msg.topic!r}")
            await route.call(model, msg)
            self.handled += 1
            self._observe((msg,), started)
        except Exception as exc:
            self.failed += 1
            self._observe_failure(msg)
            log.exception("handler failed", service=self.name, topic=msg.topic, payload=msg.preview())
            with contextlib.suppress(Exception):
                self.dead_letter(msg, f"{type(exc).__name__}: {exc}")
        finally:
            conn.ack(msg)
        return True


def check_rc(info: paho.MQTTMessageInfo) -> None:
    """Raise :class:`BrokerError` if paho could not queue a publish."""
    if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
        raise BrokerError(f"publish failed: {paho.error_string(info.rc)}")
