"""The project's Mosquitto for real: authentication, live users, persistence, limits (docs/design.md §5)."""

from __future__ import annotations

import base64
import os
import re
import shutil
import socket
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Broker, MqttTestClient, new_username

from bloomwire.errors import BrokerError, TopicError
from bloomwire.runtime import broker as b
from bloomwire.runtime.broker import (
    Mosquitto,
    ensure_secret,
    free_port,
    hash_password,
    verify_password,
    write_password_file,
)

HASH_RE = re.compile(r"^\$7\$101\$[A-Za-z0-9+/]{16}\$[A-Za-z0-9+/]{86}==$")

MakeUser = Callable[..., tuple[str, str]]
MakeClient = Callable[..., MqttTestClient]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- password hashes and secrets (no broker needed) -------------------------------------------


def test_hash_has_mosquitto_2_format() -> None:
    hashed = hash_password("s3cret")
    assert HASH_RE.match(hashed), hashed
    assert hashed != hash_password("s3cret")  # fresh salt each time
    assert verify_password("s3cret", hashed)
    assert not verify_password("s3cret!", hashed)


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd missing")
def test_hash_matches_mosquitto_passwd(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(path), "alice", "wonder land"], check=True)
    user, hashed = path.read_text().strip().split(":", 1)
    assert user == "alice"
    assert HASH_RE.match(hashed), hashed
    assert verify_password("wonder land", hashed)
    salt = hashed.split("$")[3]
    assert hash_password("wonder land", salt=base64.b64decode(salt)) == hashed


def test_password_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "passwd"
    write_password_file(path, {"bob": "b", "alice": "a"})
    assert _mode(path) == 0o600
    lines = path.read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["alice", "bob"]
    assert verify_password("a", lines[0].split(":", 1)[1])


@pytest.mark.parametrize("name", ["a:b", "a/b", "+", "", "x y"])
def test_password_file_refuses_bad_usernames(tmp_path: Path, name: str) -> None:
    with pytest.raises((TopicError, BrokerError)):
        write_password_file(tmp_path / "passwd", {name: "pw"})


def test_ensure_secret_creates_once(tmp_path: Path) -> None:
    first = ensure_secret(tmp_path, "persister")
    assert len(first) >= 32
    assert ensure_secret(tmp_path, "persister") == first
    assert ensure_secret(tmp_path, "dispatch") != first
    assert _mode(tmp_path / "secrets") == 0o700
    assert _mode(tmp_path / "secrets" / "persister") == 0o600
    with pytest.raises(TopicError):
        ensure_secret(tmp_path, "../etc")


def test_free_port_is_bindable_and_never_1883() -> None:
    port = free_port()
    assert port not in b.RESERVED_PORTS
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_find_mosquitto_explains_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(b.shutil, "which", lambda _name: None)
    monkeypatch.setattr(b, "_FALLBACK_PATHS", (Path("/nonexistent/mosquitto"),))
    with pytest.raises(BrokerError, match="make setup"):
        b.find_mosquitto()


def test_config_sets_username_as_clientid_on_every_listener() -> None:
    text = b.render_config(port=11111, ws_port=22222, data_dir="/d", password_file="/p", log_dest="stdout")
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    listeners = [i for i, line in enumerate(lines) if line.startswith("listener ")]
    assert [lines[i] for i in listeners] == ["listener 11111 127.0.0.1", "listener 22222 lo"]
    for start, end in zip(listeners, [*listeners[1:], len(lines)], strict=True):
        assert "use_username_as_clientid true" in lines[start:end]
    # above the first listener it would configure the default listener on port 1883
    assert "use_username_as_clientid true" not in lines[: listeners[0]]
    for setting in ("allow_anonymous false", "persistence true", "max_queued_messages 1000000"):
        assert setting in lines


# --- a running broker -------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["tcp", "websockets"])
def test_user_connects_and_pub_sub_works(
    mqtt_user: MakeUser, mqtt_client: MakeClient, transport: str
) -> None:
    name, password = mqtt_user()
    topic = f"test/{name}/hello"
    sub = mqtt_client(name, password, transport=transport)
    sub.subscribe(topic)
    pub_name, pub_password = mqtt_user()
    pub = mqtt_client(pub_name, pub_password, transport=transport)
    pub.publish(topic, b"bonjour", qos=1)
    (message,) = sub.expect(1)
    assert (message.topic, message.payload, message.qos) == (topic, b"bonjour", 1)
    props = sub.connack_properties
    assert props is not None
    assert props.MaximumPacketSize == 262144


@pytest.mark.parametrize("transport", ["tcp", "websockets"])
@pytest.mark.parametrize("credentials", ["anonymous", "wrong-password", "unknown-user"])
def test_refused_connections(
    mqtt_user: MakeUser, mqtt_client: MakeClient, transport: str, credentials: str
) -> None:
    name, password = mqtt_user()
    username, pw = {
        "anonymous": (None, None),
        "wrong-password": (name, password + "x"),
        "unknown-user": (new_username(), password),
    }[credentials]
    client = mqtt_client(username, pw, transport=transport, connect=False)
    rc = client.connect()
    assert rc.is_failure
    assert rc.value == 0x87, rc  # "Not authorized", for all three cases (2.0.11, MQTT v5)
    assert not client.paho.is_connected()


def test_add_user_reloads_password_file(broker: Broker, mqtt_user: MakeUser, mqtt_client: MakeClient) -> None:
    old_name, old_password = mqtt_user()
    old = mqtt_client(old_name, old_password)
    name = new_username("late")
    early = mqtt_client(name, "pw-late", connect=False)
    assert early.connect().is_failure
    broker.add_user(name, "pw-late")
    late = mqtt_client(name, "pw-late")
    assert late.paho.is_connected()
    assert old.paho.is_connected()  # reloading does not drop connected clients
    assert not old.disconnects


def test_username_is_the_client_id(mqtt_user: MakeUser, mqtt_client: MakeClient) -> None:
    """Another user cannot pick a service's client id to resume its session and read its queue."""
    victim, victim_pw = mqtt_user(prefix="svc")
    intruder, intruder_pw = mqtt_user(prefix="intruder")
    topic = f"test/{victim}/queue"
    session = {"clean_start": False, "session_expiry": 300}
    owner = mqtt_client(victim, victim_pw, client_id="anything", **session)
    owner.subscribe(topic)
    owner.disconnect()
    pub_name, pub_pw = mqtt_user()
    mqtt_client(pub_name, pub_pw).publish(topic, b"secret order", qos=1)

    thief = mqtt_client(intruder, intruder_pw, client_id=victim, **session)
    assert not thief.session_present
    thief.expect_none()

    back = mqtt_client(victim, victim_pw, client_id="something-else", **session)
    assert back.session_present
    assert [m.payload for m in back.expect(1)] == [b"secret order"]


def test_queue_holds_more_than_the_default_1000(mqtt_user: MakeUser, mqtt_client: MakeClient) -> None:
    """Mosquitto's default max_queued_messages (1000) would drop most of these."""
    name, password = mqtt_user(prefix="offline")
    topic = f"test/{name}/backlog"
    session = {"clean_start": False, "session_expiry": 300}
    sub = mqtt_client(name, password, **session)
    sub.subscribe(topic)
    sub.disconnect()
    pub_name, pub_pw = mqtt_user()
    pub = mqtt_client(pub_name, pub_pw)
    count = 2500
    infos = [pub.paho.publish(topic, str(i).encode(), qos=1) for i in range(count)]
    for info in infos:
        info.wait_for_publish(5)
    back = mqtt_client(name, password, **session)
    assert back.session_present
    payloads = [int(m.payload) for m in back.expect(count, timeout=10)]
    assert sorted(payloads) == list(range(count))


def test_queued_message_survives_restart(
    fresh_broker: Broker, mqtt_user: MakeUser, mqtt_client: MakeClient
) -> None:
    name, password = mqtt_user(prefix="persister", broker=fresh_broker)
    pub_name, pub_pw = mqtt_user(broker=fresh_broker)
    session = {"clean_start": False, "session_expiry": 3600, "broker": fresh_broker}
    sub = mqtt_client(name, password, **session)
    sub.subscribe("riders/+/location", qos=1)
    sub.disconnect()
    pub = mqtt_client(pub_name, pub_pw, broker=fresh_broker)
    pub.publish("riders/r7/location", b'{"lat": 48.85}', qos=1)
    pub.publish("riders/r8/location", b'{"lat": 45.76}', qos=1)
    pub.disconnect()
    port, ws_port = fresh_broker.port, fresh_broker.ws_port

    fresh_broker.restart()

    if isinstance(fresh_broker, Mosquitto):
        assert (fresh_broker.port, fresh_broker.ws_port) == (port, ws_port)
    back = mqtt_client(name, password, **session)
    assert back.session_present
    got = {(m.topic, m.payload) for m in back.expect(2)}
    assert got == {
        ("riders/r7/location", b'{"lat": 48.85}'),
        ("riders/r8/location", b'{"lat": 45.76}'),
    }


# --- the launcher itself ----------------------------------------------------------------------


def test_start_failure_reports_the_log(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        broker = Mosquitto(tmp_path, port=port, ws_port=free_port())
        with pytest.raises(BrokerError, match="in use"):
            broker.start()
    assert broker.pid is None


def test_stop_kill_restart(tmp_path: Path) -> None:
    with Mosquitto(tmp_path, users={"alice": "pw"}) as broker:
        pid = broker.pid
        assert pid is not None
        assert broker.port not in b.RESERVED_PORTS
        assert (tmp_path / "mosquitto.conf").exists()
        assert _mode(broker.password_path) == 0o600
        broker.kill()
        assert broker.pid is None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        broker.start()
        assert broker.pid not in (None, pid)
        assert broker.users == {"alice": "pw"}
    assert broker.pid is None
    assert "running" in broker.log_path.read_text()
