"""Shared pytest harness: a real Mosquitto broker, MQTT test clients, settings and store URLs.

Fixtures
--------
``broker``         session-wide broker; add users with ``broker.add_user`` or ``mqtt_user``.
``fresh_broker``   a broker of the test's own, for tests that stop, kill or restart it.
``mqtt_user``      factory: ``mqtt_user(name=None, *, prefix="user", broker=None) -> (name, pw)``.
``mqtt_client``    factory: a connected :class:`MqttTestClient`, disconnected at teardown.
``make_settings``  factory: :class:`bloomwire.runtime.settings.Settings` for a broker user.
``database_url``   parametrised over ``sqlite`` and ``postgresql`` (one fresh database each).

Without a ``mosquitto`` binary the brokers run in Docker (testcontainers) when an engine is
reachable; otherwise broker tests are skipped with the reason.
"""

from __future__ import annotations

import contextlib
import os
import queue
import secrets
import shutil
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from psycopg import sql

from bloomwire.errors import BrokerError
from bloomwire.runtime.broker import Mosquitto, find_mosquitto, render_config, write_password_file
from bloomwire.runtime.settings import Settings

POSTGRES_ADMIN_URL = os.environ.get(
    "BLOOMWIRE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REQUIRE_POSTGRES = os.environ.get("BLOOMWIRE_REQUIRE_POSTGRES") == "1"
MQTT_TIMEOUT = 5.0

# Other test runs share this machine: every port a stack listens on (broker, websockets, web,
# metrics) is a free one, chosen at its first start and recorded in its data dir as usual. The
# defaults (18830, 19001, ...) are for people, not for tests. Children inherit these.
for _port_setting in ("BROKER_LISTEN_PORT", "BROKER_LISTEN_WS_PORT", "WEB_LISTEN_PORT", "METRICS_PORT"):
    os.environ.setdefault(f"BLOOMWIRE_{_port_setting}", "0")


# --- brokers ----------------------------------------------------------------------------------


class Broker(Protocol):
    """What tests may rely on, whether the broker is a local process or a container."""

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def ws_port(self) -> int: ...
    @property
    def users(self) -> Mapping[str, str]: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def kill(self) -> None: ...
    def restart(self) -> None: ...
    def add_user(self, name: str, password: str) -> None: ...


class ContainerMosquitto:
    """Fallback when no mosquitto binary exists: eclipse-mosquitto:2.0 in Docker, same config.

    Host ports are assigned by Docker and may change across :meth:`restart`; read them again.
    """

    IMAGE = "eclipse-mosquitto:2.0"

    def __init__(self, data_dir: Path, users: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self._users = dict(users or {})
        self._container: Any = None

    @property
    def host(self) -> str:
        return str(self._container.get_container_host_ip())

    @property
    def port(self) -> int:
        return int(self._container.get_exposed_port(1883))

    @property
    def ws_port(self) -> int:
        return int(self._container.get_exposed_port(9001))

    @property
    def users(self) -> dict[str, str]:
        return dict(self._users)

    def start(self) -> None:
        # testcontainers is optional: only a machine without a mosquitto binary needs it.
        from testcontainers.core.container import DockerContainer  # noqa: PLC0415
        from testcontainers.core.wait_strategies import LogMessageWaitStrategy  # noqa: PLC0415

        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Mounted outside /mosquitto, which the image's entrypoint chowns; runs as root so it
        # can read the host's 0600 password file.
        conf = render_config(
            port=1883,
            ws_port=9001,
            data_dir="/bloomwire",
            password_file="/bloomwire/mosquitto.passwd",
            log_dest="stdout",
            bind_address="0.0.0.0",
            ws_interface="0.0.0.0",
            run_user="root",
        )
        (self.data_dir / "mosquitto.conf").write_text(conf, encoding="utf-8")
        write_password_file(self.data_dir / "mosquitto.passwd", self._users)
        container = (
            DockerContainer(self.IMAGE)
            .with_exposed_ports(1883, 9001)
            .with_volume_mapping(str(self.data_dir), "/bloomwire", "rw")
            .with_command(["/usr/sbin/mosquitto", "-c", "/bloomwire/mosquitto.conf"])
            .waiting_for(LogMessageWaitStrategy(r"mosquitto version \S+ running"))
        )
        self._container = container.start()

    def stop(self) -> None:
        if self._container is not None:
            self._container.get_wrapped_container().stop(timeout=10)  # SIGTERM: saves the db
            self._container.stop()
            self._container = None

    def kill(self) -> None:
        if self._container is not None:
            self._container.stop(force=True)
            self._container = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def add_user(self, name: str, password: str) -> None:
        self._users[name] = password
        write_password_file(self.data_dir / "mosquitto.passwd", self._users)
        wrapped = self._container.get_wrapped_container()
        before = wrapped.logs().count(b"Reloading config.")
        wrapped.kill(signal="SIGHUP")
        deadline = time.monotonic() + MQTT_TIMEOUT
        while wrapped.logs().count(b"Reloading config.") <= before:
            if time.monotonic() > deadline:
                raise BrokerError("containerised mosquitto did not reload its password file")
            time.sleep(0.05)


def _docker_engine_error() -> str | None:
    """None if a Docker engine answers ``docker info``, else why not."""
    docker = shutil.which("docker")
    if docker is None:
        return "no docker command"
    try:
        done = subprocess.run(
            [docker, "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return lines[-1] if lines else f"docker info exited with {done.returncode}"
    return None


def new_broker(data_dir: Path) -> Broker:
    """A started broker in ``data_dir``: local mosquitto, else Docker, else skip the test."""
    try:
        find_mosquitto()
    except BrokerError as missing:
        reason = _docker_engine_error()
        if reason is not None:
            pytest.skip(f"{missing}; no Docker engine either ({reason})")
        container = ContainerMosquitto(data_dir)
        container.start()
        return container
    local = Mosquitto(data_dir)
    local.start()
    return local


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One broker for the whole session. Never stop or restart it: use ``fresh_broker``."""
    started = new_broker(tmp_path_factory.mktemp("broker"))
    yield started
    started.stop()


@pytest.fixture
def fresh_broker(tmp_path: Path) -> Iterator[Broker]:
    """A broker of this test's own, free to stop, kill and restart."""
    started = new_broker(tmp_path / "broker")
    yield started
    started.stop()


def new_username(prefix: str = "user") -> str:
    """A unique username, so tests never share a (persistent) MQTT session."""
    return f"{prefix}-{secrets.token_hex(4)}"


@pytest.fixture
def mqtt_user(request: pytest.FixtureRequest) -> Callable[..., tuple[str, str]]:
    """Factory adding a user to a broker (default: the session ``broker``).

    ``mqtt_user()`` makes a new random user; ``mqtt_user("persister-x")`` a named one (its
    existing password if the broker already knows it). Returns ``(username, password)``.
    """

    def make(
        name: str | None = None, *, prefix: str = "user", broker: Broker | None = None
    ) -> tuple[str, str]:
        target: Broker = broker if broker is not None else request.getfixturevalue("broker")
        username = name or new_username(prefix)
        known = target.users.get(username)
        if known is not None:
            return username, str(known)
        password = secrets.token_urlsafe(12)
        target.add_user(username, password)
        return username, password

    return make


# --- MQTT test client -------------------------------------------------------------------------


class MqttTestClient:
    """A paho-mqtt 2.x MQTT v5 client for tests: blocking helpers, received messages queued.

    It never reconnects by itself (``reconnect_on_failure=False``): tests decide when.
    """

    def __init__(
        self,
        broker: Broker,
        username: str | None,
        password: str | None,
        *,
        client_id: str = "",
        transport: str = "tcp",
        clean_start: bool = True,
        session_expiry: int = 0,
        keepalive: int = 30,
    ) -> None:
        self.broker = broker
        self.transport = transport
        self.clean_start = clean_start
        self.session_expiry = session_expiry
        self.keepalive = keepalive
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connack: ReasonCode | None = None
        self.connack_properties: Properties | None = None
        self.session_present = False
        self.disconnects: list[ReasonCode] = []
        self._connected = threading.Event()
        self._suback = threading.Event()
        self.paho = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
            transport="websockets" if transport == "websockets" else "tcp",
            reconnect_on_failure=False,
        )
        if username is not None:
            self.paho.username_pw_set(username, password)
        self.paho.on_connect = self._on_connect
        self.paho.on_disconnect = self._on_disconnect
        self.paho.on_message = self._on_message
        self.paho.on_subscribe = self._on_subscribe

    # paho callbacks: never raise here (an exception kills paho's network thread, DESIGN §5)
    def _on_connect(self, _c: Any, _u: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        self.connack, self.connack_properties = rc, props
        self.session_present = bool(getattr(flags, "session_present", False))
        self._connected.set()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        self.disconnects.append(rc)
        self._connected.set()  # wake a waiting connect() when the broker just hangs up

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        self.messages.put(message)

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, _rcs: Any, _p: Any) -> None:
        self._suback.set()

    @property
    def port(self) -> int:
        return self.broker.ws_port if self.transport == "websockets" else self.broker.port

    def connect(self, timeout: float = MQTT_TIMEOUT) -> ReasonCode:
        """Connect and wait for CONNACK (or a hang-up); return the reason code."""
        self._connected.clear()
        self.connack = None
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.session_expiry
        self.paho.connect(
            self.broker.host,
            self.port,
            keepalive=self.keepalive,
            clean_start=self.clean_start,
            properties=props,
        )
        self.paho.loop_start()
        if not self._connected.wait(timeout):
            self.close()
            raise TimeoutError(f"no CONNACK from {self.broker.host}:{self.port} in {timeout} s")
        if self.connack is None or self.connack.is_failure:
            self.paho.loop_stop()  # paho closes the socket; without retries the thread ends
        if self.connack is None:  # hung up without CONNACK
            return ReasonCode(PacketTypes.CONNACK, "Unspecified error")
        return self.connack

    def subscribe(self, topic: str, qos: int = 1, timeout: float = MQTT_TIMEOUT) -> None:
        """Subscribe and wait for SUBACK."""
        self._suback.clear()
        result, _mid = self.paho.subscribe(topic, qos)
        assert result == MQTTErrorCode.MQTT_ERR_SUCCESS, result
        assert self._suback.wait(timeout), f"no SUBACK for {topic}"

    def publish(
        self, topic: str, payload: bytes | str, qos: int = 1, *, retain: bool = False
    ) -> mqtt.MQTTMessageInfo:
        """Publish and wait until it is sent (QoS 0) or acknowledged (QoS 1/2)."""
        info = self.paho.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(MQTT_TIMEOUT)
        return info

    def expect(self, count: int, timeout: float = MQTT_TIMEOUT) -> list[mqtt.MQTTMessage]:
        """The next ``count`` messages; fails the test if they do not arrive in time."""
        got: list[mqtt.MQTTMessage] = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            try:
                got.append(self.messages.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                pytest.fail(f"received {len(got)} of {count} messages within {timeout} s")
        return got

    def expect_none(self, wait: float = 0.3) -> None:
        """Fails the test if a message arrives within ``wait`` seconds."""
        try:
            message = self.messages.get(timeout=wait)
        except queue.Empty:
            return
        pytest.fail(f"unexpected message on {message.topic}: {message.payload!r}")

    def disconnect(self) -> None:
        """Disconnect cleanly (a persistent session is kept) and stop the network thread."""
        if self.paho.is_connected():
            self.paho.disconnect()
        self.paho.loop_stop()
        # paho closes its wake-up socket pair only in Client.__del__; the bound callbacks make a
        # cycle that the garbage collector may finalize sockets-first (a ResourceWarning).
        self.paho.on_connect = self.paho.on_disconnect = self.paho.on_message = None
        self.paho.on_subscribe = None

    close = disconnect


@pytest.fixture
def mqtt_client(request: pytest.FixtureRequest) -> Iterator[Callable[..., MqttTestClient]]:
    """Factory: ``mqtt_client(username, password, *, broker=None, connect=True, **options)``.

    Options are those of :class:`MqttTestClient`. With ``connect=True`` the connection must
    succeed. Every client is disconnected at teardown.
    """
    made: list[MqttTestClient] = []

    def make(
        username: str | None,
        password: str | None,
        *,
        broker: Broker | None = None,
        connect: bool = True,
        **options: Any,
    ) -> MqttTestClient:
        target: Broker = broker if broker is not None else request.getfixturevalue("broker")
        client = MqttTestClient(target, username, password, **options)
        made.append(client)
        if connect:
            rc = client.connect()
            assert not rc.is_failure, f"{username} could not connect: {rc}"
        return client

    yield make
    for client in made:
        client.close()


# --- settings ---------------------------------------------------------------------------------


def settings_for(
    broker: Broker,
    username: str,
    password: str | None = None,
    *,
    data_dir: Path,
    database_url: str = "",
    **overrides: Any,
) -> Settings:
    """Settings of a process connecting to ``broker`` as ``username`` (password looked up)."""
    if password is None:
        password = str(broker.users[username])
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "broker_host": broker.host,
        "broker_port": broker.port,
        "broker_ws_port": broker.ws_port,
        "broker_username": username,
        "broker_password": password,
        "database_url": database_url,
        **overrides,
    }
    return Settings(**values)


@pytest.fixture
def make_settings(
    request: pytest.FixtureRequest, tmp_path: Path, mqtt_user: Callable[..., tuple[str, str]]
) -> Callable[..., Settings]:
    """Factory: ``make_settings(username=None, *, database_url="", broker=None, **overrides)``.

    Creates the user on the broker if needed (a random one when ``username`` is None). Data
    lives in ``tmp_path/"data"``; an empty ``database_url`` means SQLite there.
    """

    def make(
        username: str | None = None,
        *,
        database_url: str = "",
        broker: Broker | None = None,
        **overrides: Any,
    ) -> Settings:
        target: Broker = broker if broker is not None else request.getfixturevalue("broker")
        name, password = mqtt_user(username, broker=target)
        overrides.setdefault("data_dir", tmp_path / "data")
        return settings_for(target, name, password, database_url=database_url, **overrides)

    return make


# --- store URLs -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    """The PostgreSQL maintenance URL, once checked reachable (skip or fail otherwise)."""
    try:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        message = f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL}: {exc}".strip()
        if REQUIRE_POSTGRES:
            pytest.fail(f"{message} (BLOOMWIRE_REQUIRE_POSTGRES=1)", pytrace=False)
        pytest.skip(message)
    return POSTGRES_ADMIN_URL


@pytest.fixture(params=["sqlite", "postgresql"], ids=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A store URL on an empty database: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    with postgres_database(request.getfixturevalue("postgres_admin_url")) as url:
        yield url


@contextlib.contextmanager
def postgres_database(admin_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database of the test's own (its store URL), dropped afterwards."""
    name = f"bloomwire_test_{secrets.token_hex(6)}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=3) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    parts = urllib.parse.urlsplit(admin_url)
    try:
        yield urllib.parse.urlunsplit(parts._replace(scheme="postgresql+psycopg", path=f"/{name}"))
    finally:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=3) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
