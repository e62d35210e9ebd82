"""Customer devices: trade the order's login for a login of this device's own.

``use_username_as_clientid`` is on for every listener (docs/design.md §5), so one username is one
MQTT session: two devices logged in with the same login would keep disconnecting each other.
The order's access therefore starts with ONE login, used only to enrol: a device connects with
it for a moment, asks on ``customers/C/devices``, gets its own login on
``customers/C/inbox/devices`` and from then on connects with that. Enrol once per device and
keep the result (the provisioner caps the logins per order).
"""

from __future__ import annotations

import contextlib
import json
import queue
import ssl
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from bloomwire.access.accounts import Credential
from bloomwire.access.policy import Kind
from bloomwire.contract import topics
from bloomwire.contract.events import DeviceLoginEvent, DeviceRequest, DeviceRequestEvent, encode
from bloomwire.errors import BrokerError, PayloadError


def enrol_device(
    host: str,
    port: int,
    username: str,
    password: str,
    customer: str,
    *,
    label: str = "",
    transport: str = "tcp",
    tls: bool = False,
    ca_file: Path | None = None,
    timeout: float = 10.0,
) -> Credential:
    """Log in with an order login, ask for a device login, return it (``BrokerError`` if refused)."""
    reply_topic = topics.device_reply_topic(customer)
    request = DeviceRequestEvent(source=f"{topics.CUSTOMERS}/{customer}", data=DeviceRequest(label=label))
    client = _client(username, password, transport=transport, tls=tls, ca_file=ca_file)
    replies = _Replies(client, customer, timeout)
    try:
        client.connect(host, port, keepalive=30, clean_start=True)
    except OSError as exc:
        raise BrokerError(f"cannot reach the broker at {host}:{port}: {exc}") from exc
    client.loop_start()
    try:
        rc = replies.wait("connack")
        if rc.is_failure:
            raise BrokerError(f"device enrolment for {customer!r}: login refused ({rc})")
        result, _mid = client.subscribe(reply_topic, qos=1)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS or any(r.is_failure for r in replies.wait("suback")):
            raise BrokerError(f"device enrolment for {customer!r}: may not read {reply_topic}")
        client.publish(topics.device_request_topic(customer), encode(request), qos=1)
        return replies.login(request.id)
    finally:
        with contextlib.suppress(Exception):
            client.disconnect()
        client.loop_stop()


def _client(username: str, password: str, *, transport: str, tls: bool, ca_file: Path | None) -> paho.Client:
    """A plain paho client for the one short enrolment session (``username`` is its client id)."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=username,
        protocol=MQTTProtocolVersion.MQTTv5,
        transport="websockets" if transport == "websockets" else "tcp",
        reconnect_on_failure=False,
    )
    client.username_pw_set(username, password)
    if tls:
        client.tls_set(ca_certs=str(ca_file) if ca_file else None, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    return client


def login_accepted(
    host: str,
    port: int,
    username: str,
    password: str,
    *,
    tls: bool,
    ca_file: Path | None,
    timeout: float = 10.0,
) -> bool:
    """Whether the broker accepts ``username``/``password`` (one short MQTT session; blocking).

    Only for an order's first login (the tracking link's): pages and shops never hold a session
    with it, so this connection kicks nobody (one username is one session, docs/design.md §5).
    """
    answers: queue.Queue[bool] = queue.Queue()
    client = _client(username, password, transport="tcp", tls=tls, ca_file=ca_file)

    def on_connect(_c: Any, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        answers.put(not rc.is_failure)

    def on_disconnect(_c: Any, _u: Any, _f: Any, _rc: Any, _p: Any) -> None:
        answers.put(False)

    client.on_connect, client.on_disconnect = on_connect, on_disconnect
    try:
        client.connect(host, port, keepalive=10, clean_start=True)
    except OSError:
        return False
    client.loop_start()
    try:
        return answers.get(timeout=timeout)
    except queue.Empty:
        return False
    finally:
        with contextlib.suppress(Exception):
            client.disconnect()
        client.loop_stop()


class _Replies:
    """What paho's callbacks report (connack, suback, messages, disconnect), waited for with one deadline."""

    def __init__(self, client: paho.Client, customer: str, timeout: float) -> None:
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.customer = customer
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        client.on_connect, client.on_subscribe = self._on_connect, self._on_subscribe
        client.on_message, client.on_disconnect = self._on_message, self._on_disconnect

    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        self.events.put(("connack", rc))

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, rcs: list[ReasonCode], _p: Any) -> None:
        self.events.put(("suback", rcs))

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        self.events.put(("message", bytes(msg.payload)))

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        self.events.put(("disconnect", rc))

    def wait(self, kind: str) -> Any:
        """The next ``kind`` event's value; ``BrokerError`` on a disconnect or at the deadline."""
        while True:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise BrokerError(
                    f"device enrolment for {self.customer!r}: no {kind} within {self.timeout:.0f} s"
                )
            try:
                got, value = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if got == "disconnect":
                raise BrokerError(f"device enrolment for {self.customer!r}: disconnected ({value})")
            if got == kind:
                return value

    def login(self, request: str) -> Credential:
        """The device login answering ``request``; ``BrokerError`` if the provisioner refused."""
        while True:
            payload = self.wait("message")
            try:
                answer = DeviceLoginEvent.model_validate(json.loads(payload))
            except (ValueError, PayloadError):
                continue
            if answer.data.request != request:
                continue  # another device's answer (every device of C reads this inbox)
            if answer.data.error or not answer.data.username or not answer.data.password:
                raise BrokerError(f"device enrolment for {self.customer!r} refused: {answer.data.error}")
            return Credential(answer.data.username, answer.data.password, Kind.CUSTOMER)
