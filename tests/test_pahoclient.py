"""The tuned paho client (``bloomwire.runtime.pahoclient``): its parts, and that it stays confined.

The tuned client overrides private paths of paho's ``Client``, so these tests pin what it relies
on: the paho release it was checked against, packets byte for byte equal to paho's own, and no
change to paho for any other client of the process. Its traffic through a real broker is tested
in ``tests/test_mqtt_runtime.py`` (every connecting test runs plain and tuned).
"""

from __future__ import annotations

import inspect
import socket
import threading
import tomllib
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from structlog.testing import LogCapture

from bloomwire.runtime import mqtt, pahoclient
from bloomwire.runtime.settings import Settings

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def tuned_client(*, manual_ack: bool = False) -> pahoclient.TunedClient:
    v5 = MQTTProtocolVersion.MQTTv5
    return pahoclient.TunedClient(CallbackAPIVersion.VERSION2, protocol=v5, manual_ack=manual_ack)


@pytest.fixture
def captured_logs(monkeypatch: pytest.MonkeyPatch) -> list[MutableMapping[str, Any]]:
    """What ``bloomwire.runtime.mqtt`` logs, as structlog event dicts (independent of global config)."""
    capture = LogCapture()
    monkeypatch.setattr(mqtt, "log", structlog.wrap_logger(None, processors=[capture]))
    return capture.entries


# --- the version check and the choice ---------------------------------------------------------


def test_paho_is_pinned_to_the_releases_the_tuned_client_was_checked_against() -> None:
    dependencies = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["dependencies"]
    pins = [d for d in dependencies if d.replace(" ", "").startswith("paho-mqtt")]
    assert len(pins) == 1 and "==" in pins[0], f"paho must be pinned exactly, not {pins}"
    pinned = pins[0].split("==")[1].strip()
    assert pinned in pahoclient.CHECKED_PAHO_VERSIONS
    assert pahoclient.tuning_refusal() is None, "the installed paho is not the pinned one"


def test_any_other_paho_release_is_refused_saying_why() -> None:
    for version in ("2.1.0", "2.2.1", "3.0.0", "unknown"):
        refusal = pahoclient.tuning_refusal(version)
        assert refusal is not None and f"paho-mqtt {version} is installed" in refusal
        assert "2.2.0" in refusal
    assert pahoclient.tuning_refusal("2.2.0") is None


def test_a_refused_tuning_falls_back_to_plain_paho_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, captured_logs: list[MutableMapping[str, Any]]
) -> None:
    monkeypatch.setattr(pahoclient, "CHECKED_PAHO_VERSIONS", frozenset({"0.0.0"}))
    with pytest.raises(RuntimeError, match=r"checked against 0\.0\.0 only"):
        tuned_client()
    conn = mqtt.Connection(Settings(), "svc", tuned=True)
    assert conn.tuned is False
    assert type(conn.client) is paho.Client
    warnings = [e for e in captured_logs if e["log_level"] == "warning"]
    assert len(warnings) == 1
    assert warnings[0]["event"] == "paho tuning refused; using plain paho"
    assert "checked against 0.0.0 only" in warnings[0]["reason"]


def test_only_connections_that_ask_get_the_tuned_client(
    captured_logs: list[MutableMapping[str, Any]],
) -> None:
    plain = mqtt.Connection(Settings(), "plain")
    assert (plain.tuned, type(plain.client)) == (False, paho.Client)
    tuned = mqtt.Connection(Settings(), "tuned", tuned=True)
    assert (tuned.tuned, type(tuned.client)) == (True, pahoclient.TunedClient)
    assert mqtt.Service("svc").tuned is False, "a service is plain unless it asks"
    assert not captured_logs, "nothing to warn about on the pinned paho"


def test_the_tuned_client_changes_nothing_of_paho_for_other_clients() -> None:
    client = tuned_client()
    client._plain_puback(b"\x00\x01")  # the PUBACK path runs; nothing was sent, nothing to do
    for cls in (paho.Client, paho.MQTTMessage, paho.MQTTMessageInfo, Properties, ReasonCode):
        for name, member in vars(cls).items():
            function = getattr(member, "__func__", member)
            if inspect.isfunction(function):
                assert not function.__module__.startswith("bloomwire"), f"{cls.__name__}.{name} replaced"
    a, b = Properties(PacketTypes.PUBLISH), Properties(PacketTypes.PUBLISH)
    assert a.names is not b.names, "paho's own Properties: tables built per instance, as paho does"
    assert set(vars(ReasonCode(PacketTypes.PUBACK))) == {"names", "packetType", "value"}


# --- the shared PUBACK reason codes ---------------------------------------------------------


def test_puback_reason_codes_and_properties_are_shared_within_one_client_only() -> None:
    one, other = tuned_client(), tuned_client()
    for code, name, failure in [
        (0, "Success", False),
        (0x10, "No matching subscribers", False),
        (0x87, "Not authorized", True),
    ]:
        reason = one._puback_reason(code)
        assert reason is not None and reason is one._puback_reason(code), "built once per client"
        assert reason is not other._puback_reason(code), "never shared with another client"
        assert (reason.value, reason.getName(), reason.is_failure) == (code, name, failure)
        assert reason == ReasonCode(PacketTypes.PUBACK, identifier=code)
    assert one._puback_reason(0x03) is None, "a code paho refuses is left to paho's decoder"


def test_a_puback_without_properties_reaches_on_publish_with_its_reason_code() -> None:
    client = tuned_client()
    seen: list[tuple[int, int, Any]] = []
    client.on_publish = lambda _c, _u, mid, reason, props: seen.append((mid, reason.value, props))
    infos = {}
    for mid in (1, 2, 3):
        info = paho.MQTTMessageInfo(mid)
        message = paho.MQTTMessage(mid, b"t")
        message.qos, message.info = 1, info
        client._out_messages[mid] = message
        client._inflight_messages += 1
        infos[mid] = info
    assert client._plain_puback(b"\x00\x01") == 0  # success: remaining length 2
    assert client._plain_puback(b"\x00\x02\x10") == 0  # no matching subscribers, no properties
    assert client._plain_puback(b"\x00\x03\x87\x00") == 0  # not authorized, empty properties
    assert client._plain_puback(b"\x00\x03\x87\x03\x1f\x00\x00") is None, "properties: paho's"
    assert [(mid, code) for mid, code, _ in seen] == [(1, 0), (2, 0x10), (3, 0x87)]
    assert all(props.pack() == b"\x00" for _, _, props in seen)
    assert all(i.is_published() for i in infos.values())
    assert (client._out_messages, client._inflight_messages) == ({}, 0)


# --- the buffered socket under paho -----------------------------------------------------------


@pytest.fixture
def socket_pair() -> Iterator[tuple[Any, Any]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    yield a, b
    a.close()
    b.close()


def test_buffered_socket_hands_out_exactly_the_bytes_asked_for(socket_pair: tuple[Any, Any]) -> None:
    a, b = socket_pair
    buffered = pahoclient.BufferedSocket(a)
    with pytest.raises(BlockingIOError):
        buffered.recv(1)  # nothing there yet: paho sees "would block", as with a plain socket
    b.sendall(b"\x30\x05hello\x30\x02hi")
    assert buffered.recv(1) == b"\x30"
    assert buffered.pending() == 10, "the rest waits in the buffer, so paho skips select"
    assert buffered.recv(1) == b"\x05"
    assert buffered.recv(5) == b"hello"
    assert buffered.recv(100) == b"\x30\x02hi", "never more than what was read"
    assert buffered.pending() == 0
    b.close()
    assert buffered.recv(1) == b"", "end of stream reaches paho as an empty read"


def test_buffered_socket_hands_out_whole_packets_and_leaves_partial_ones(
    socket_pair: tuple[Any, Any],
) -> None:
    a, b = socket_pair
    buffered = pahoclient.BufferedSocket(a)
    long_body = bytes(range(200))  # a two-byte remaining length
    b.sendall(b"\x40\x02\x00\x07" + b"\x30\xc8\x01" + long_body + b"\x30\x05hel")
    assert buffered.next_packet() is None, "nothing read yet: paho's reader fills the buffer"
    assert buffered.recv(1) == b"\x40"
    assert buffered.recv(3) == b"\x02\x00\x07"
    assert buffered.next_packet() == (0x30, long_body)
    assert buffered.next_packet() is None, "a partial packet stays for paho's reader"
    assert buffered.recv(100) == b"\x30\x05hel"
    b.sendall(b"\x40\x02\x00\x08" + b"\xe0\x80\x80\x80\x80\x01")  # a remaining length of 5 bytes
    assert buffered.recv(4) == b"\x40\x02\x00\x08"
    assert buffered.next_packet() is None, "paho's reader reports a malformed length, not this"
    assert buffered.pending() == 6


def test_buffered_socket_fill_reads_a_chunk_and_leaves_errors_to_paho(socket_pair: tuple[Any, Any]) -> None:
    a, b = socket_pair
    buffered = pahoclient.BufferedSocket(a)
    assert not buffered.fill(), "nothing to read: no exception, paho's own read sees would-block"
    b.sendall(b"\x30\x02hi\x30\x01")
    assert buffered.fill()
    assert buffered.next_packet() == (0x30, b"hi")
    assert buffered.fill(), "bytes still buffered: no read"
    assert buffered.next_packet() is None and buffered.recv(10) == b"\x30\x01"
    b.close()
    assert not buffered.fill()
    assert buffered.recv(1) == b"", "the end of the stream still reaches paho"


def test_buffered_socket_keeps_what_the_kernel_would_not_take_and_sends_it_later(
    socket_pair: tuple[Any, Any],
) -> None:
    a, b = socket_pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    buffered = pahoclient.BufferedSocket(a)
    data = bytes(range(256)) * 4096  # 1 MiB: far more than the socket buffers hold
    assert buffered.send(data) == len(data)
    buffered.flush()
    assert buffered.wants_flush(), "the rest is kept, not dropped"
    got = bytearray()
    b.settimeout(5)
    while len(got) < len(data):
        got += b.recv(65536)
        buffered.flush()
    assert bytes(got) == data
    assert not buffered.wants_flush()


def test_buffered_socket_reports_a_dead_peer_on_the_next_read(socket_pair: tuple[Any, Any]) -> None:
    a, b = socket_pair
    buffered = pahoclient.BufferedSocket(a)
    b.close()
    buffered.send(b"x" * 100_000)
    with pytest.raises(OSError):
        buffered.flush()
    with pytest.raises(OSError):
        buffered.recv(1)
    with pytest.raises(OSError):
        buffered.send(b"more")


# --- the lean paths -----------------------------------------------------------------------------


def test_ack_many_queues_the_bytes_of_one_ack_each_in_one_write() -> None:
    one_by_one, many = tuned_client(manual_ack=True), tuned_client(manual_ack=True)
    mids = [1, 258, 65535]
    for mid in mids:
        one_by_one.ack(mid, 1)
    many.ack_many(mids)
    expected = b"".join(bytes(p["packet"]) for p in one_by_one._out_packet)
    assert expected == b"\x40\x02\x00\x01\x40\x02\x01\x02\x40\x02\xff\xff"
    assert [bytes(p["packet"]) for p in many._out_packet] == [expected]
    automatic = tuned_client(manual_ack=False)
    automatic.ack_many(mids)
    assert not automatic._out_packet, "paho acks by itself without manual_ack"


def test_lean_publish_queues_what_paho_queues_and_reports_publication(socket_pair: tuple[Any, Any]) -> None:
    props = Properties(PacketTypes.PUBLISH)
    props.MessageExpiryInterval = 60
    cases = [
        ("shops/s1/orders/o1/chat", b'{"x": 1}', False, None),
        ("shops/s1/orders/\u00f61/state", b"y" * 20_000, True, props),  # 3-byte remaining length
        ("t", b"", False, props),
    ]

    def queued(lean: bool) -> tuple[list[bytes], list[tuple[Any, ...]], list[Any]]:
        client = tuned_client()
        client.max_inflight_messages_set(0)  # as Connection does
        client._sock = pahoclient.BufferedSocket(socket_pair[0])
        client._thread = threading.current_thread()  # queue only: no network thread here
        publish = client.publish if lean else lambda *a, **kw: paho.Client.publish(client, *a, **kw)
        with client.corked():
            infos = [publish(t, p, qos=1, retain=r, properties=pr) for t, p, r, pr in cases]
        packets = [bytes(p["packet"]) for p in client._out_packet]
        kept = [
            (m.mid, m.topic, m.payload, m.qos, m.retain, m.dup, m.state, m.properties)
            for m in client._out_messages.values()
        ]
        for info in infos:  # the broker's PUBACKs
            client._plain_puback(info.mid.to_bytes(2, "big"))
        client._sock = None
        return packets, kept, infos

    ours, ours_kept, ours_infos = queued(lean=True)
    theirs, theirs_kept, theirs_infos = queued(lean=False)
    assert all(type(i) is not type(t) for i, t in zip(ours_infos, theirs_infos, strict=True)), "lean path"
    assert ours == theirs, "the same PUBLISH packets on the wire"
    assert ours_kept == theirs_kept, "the same messages kept for re-sending after a reconnect"
    assert all(i.is_published() and i.rc == 0 for i in ours_infos)
    waited = threading.Thread(target=ours_infos[0].wait_for_publish, args=(5,))
    waited.start()
    waited.join(6)
    assert not waited.is_alive(), "a published message does not keep its waiter"


def test_expiry_properties_are_packed_once_as_paho_packs_them() -> None:
    theirs = Properties(PacketTypes.PUBLISH)
    theirs.MessageExpiryInterval = 60
    ours = pahoclient.expiry_properties(60)
    assert ours.pack() == theirs.pack() == b"\x05\x02\x00\x00\x00\x3c"
    assert ours is pahoclient.expiry_properties(60), "one object per value"
    assert ours.MessageExpiryInterval == 60 and not vars(ours).keys() - {*vars(theirs)}
    assert pahoclient.expiry_properties(1).pack() != ours.pack()
