"""What every client shares: credentials, connecting with clear errors, a message pump, waiters.

A client is one MQTT identity (rider ``R``, shop ``S``, customer ``c-O``) on one
:class:`~bloomwire.runtime.mqtt.Connection`. The broker uses the username as the client id, so two
connections with the same username take each other over: one login, one live connection. A shop's
or rider's device login (``S@LABEL``, ``--device``) is another login with the identity's rights.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from bloomwire.access.policy import device_username
from bloomwire.contract import events as ev
from bloomwire.contract.topics import check_id
from bloomwire.errors import BloomwireError, BrokerError, TopicError
from bloomwire.runtime.aio import cancel_and_wait
from bloomwire.runtime.broker import SECRETS_DIR, ensure_secret
from bloomwire.runtime.log import get_logger
from bloomwire.runtime.mqtt import Connection, Message
from bloomwire.runtime.settings import Settings

log = get_logger("bloomwire.app.clients")

#: Seconds a command waits for the backbone's answer (canonical echo, ack or refusal).
DEFAULT_ANSWER_TIMEOUT_S = 10.0
#: Seconds a client keeps trying to reach the broker before giving up.
DEFAULT_CONNECT_TIMEOUT_S = 20.0
#: After connecting, retained messages arrive in a burst; the burst is over after this quiet gap.
RETAINED_QUIET_S = 0.3


class ClientError(BloomwireError):
    """A client could not do what it was asked (the message says what and why)."""


DataT = TypeVar("DataT", bound=BaseModel)


class UsageError(ClientError):
    """Bad input from the person at the keyboard (exit code 2 at the command line)."""


class CredentialError(UsageError):
    """No password could be found for an identity."""


def check_name(value: str, what: str) -> str:
    """``value`` if it is a valid id, else :class:`UsageError` naming ``what``."""
    try:
        return check_id(value, what)
    except TopicError as exc:
        raise UsageError(str(exc)) from None


def build_data(model: type[DataT], **fields: Any) -> DataT:
    """``model`` validated from ``fields``; a bad field is a :class:`UsageError` naming it."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise UsageError(ev.describe_validation_error(exc)) from None


def parse_point(text: str, what: str = "position") -> tuple[float, float]:
    """``"52.52,13.40"`` -> ``(52.52, 13.40)``, or :class:`UsageError` saying what is wrong."""
    parts = [p.strip() for p in text.replace(";", ",").split(",")]
    if len(parts) != 2:
        raise UsageError(f"{what} {text!r} must be LAT,LON (e.g. 52.5200,13.4050)")
    try:
        lat, lon = float(parts[0]), float(parts[1])
    except ValueError:
        raise UsageError(f"{what} {text!r} must be two numbers LAT,LON") from None
    return check_point(lat, lon, what)


def check_point(lat: float, lon: float, what: str = "position") -> tuple[float, float]:
    """Validate WGS84 degrees, naming the bad coordinate."""
    if not math.isfinite(lat) or not -90 <= lat <= 90:
        raise UsageError(f"{what}: latitude {lat} is outside -90..90")
    if not math.isfinite(lon) or not -180 <= lon <= 180:
        raise UsageError(f"{what}: longitude {lon} is outside -180..180")
    return lat, lon


# --- credentials --------------------------------------------------------------------------------


def resolve_password(settings: Settings, username: str, password: str | None, what: str) -> str:
    """The password of ``username``: ``password``, else the environment, else the secrets folder.

    The environment (``BLOOMWIRE_BROKER_PASSWORD``) counts when ``BLOOMWIRE_BROKER_USERNAME`` is
    unset or names this identity. The secrets folder is ``DATA_DIR/secrets/USERNAME`` (written by
    :func:`bloomwire.runtime.broker.ensure_secret` when the account was provisioned).
    """
    if password:
        return password
    env = settings.broker_password
    if env is not None and settings.broker_username in (None, username):
        return env.get_secret_value()
    path = settings.data_dir / SECRETS_DIR / username
    if path.is_file():
        try:
            return ensure_secret(settings.data_dir, username)
        except BrokerError as exc:
            raise CredentialError(str(exc)) from None
    raise CredentialError(
        f"no password for {what} {username!r}: pass --password, set BLOOMWIRE_BROKER_PASSWORD, "
        f"or provision the account (its password file would be {path})"
    )


def login_name(identity: str, device: str | None, username: str | None = None) -> str:
    """The username to log in with: the device login ``IDENTITY@LABEL`` for ``--device``, else
    ``--username``, else the identity itself."""
    if device is not None and username is not None:
        raise UsageError("give --device or --username, not both")
    if device is None:
        return username or identity
    try:
        return device_username(identity, device)
    except TopicError as exc:
        raise UsageError(str(exc)) from None


def client_settings(settings: Settings, username: str, password: str) -> Settings:
    """Settings that connect as ``username``; refuses a broker port of 0 (nothing to connect to)."""
    if not settings.external_broker:
        raise UsageError(
            "no broker to connect to: set BLOOMWIRE_BROKER_PORT (and _HOST) to the broker that "
            "`bloomwire up` or `bloomwire broker run` printed"
        )
    return settings.as_identity(username, password)


# --- observing ----------------------------------------------------------------------------------


class Observer(Protocol):
    """Told about the events a client sends and what became of them (metrics, the demo view)."""

    def sent(self, event_id: str, kind: str, at: float) -> None:
        """An event of record (not a position) was published for the first time."""

    def settled(self, event_id: str, stored: bool, reason: str = "") -> None:
        """The backbone committed (``stored``) or refused the event."""

    def canonical(self, event_id: str, at: float) -> None:
        """The canonical echo of an event arrived."""


class NullObserver:
    """Observes nothing."""

    def sent(self, event_id: str, kind: str, at: float) -> None:
        """Ignore."""

    def settled(self, event_id: str, stored: bool, reason: str = "") -> None:
        """Ignore."""

    def canonical(self, event_id: str, at: float) -> None:
        """Ignore."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the backbone did with one event: stored (committed) or refused, and why."""

    event_id: str
    stored: bool
    reason: str = ""


class Waiters:
    """Futures keyed by event id, resolved when the backbone answers about that event.

    An answer that arrives before anyone waits for it is remembered (the last
    :data:`REMEMBERED` of them), so waiting after publishing is never too late.
    """

    REMEMBERED = 2000

    def __init__(self) -> None:
        self._futures: dict[str, asyncio.Future[Outcome]] = {}
        self._answered: OrderedDict[str, Outcome] = OrderedDict()

    def expect(self, event_id: str) -> asyncio.Future[Outcome]:
        """A future for ``event_id`` (the same one if already expected; done if already answered)."""
        fut = self._futures.get(event_id)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            answered = self._answered.pop(event_id, None)
            if answered is not None:
                fut.set_result(answered)
                return fut
            self._futures[event_id] = fut
        return fut

    def resolve(self, event_id: str | None, stored: bool, reason: str = "") -> bool:
        """Resolve the waiter of ``event_id``; True if someone was waiting."""
        if event_id is None:
            return False
        outcome = Outcome(event_id, stored, reason)
        fut = self._futures.pop(event_id, None)
        if fut is None or fut.done():
            self._answered[event_id] = outcome
            while len(self._answered) > self.REMEMBERED:
                self._answered.popitem(last=False)
            return False
        fut.set_result(outcome)
        return True

    def pending(self) -> list[str]:
        """Ids still waited for."""
        return [k for k, f in self._futures.items() if not f.done()]

    def cancel_all(self) -> None:
        """Cancel every waiter (the client is stopping)."""
        for fut in self._futures.values():
            if not fut.done():
                fut.cancel()
        self._futures.clear()


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until ``event`` is set, at most ``timeout`` seconds; True if it was set.

    Unlike ``asyncio.wait_for`` on Python 3.11, this never swallows a cancellation that races
    with the event being set (which would leave a cancelled loop running forever).
    """
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait({waiter}, timeout=timeout)
    finally:
        if not waiter.done():
            waiter.cancel()
    return bool(done)


async def wait_outcome(fut: asyncio.Future[Outcome], timeout: float, what: str) -> Outcome:
    """Wait for a backbone answer, or :class:`ClientError` saying nothing came back in time."""
    if not fut.done():
        await asyncio.wait({fut}, timeout=timeout)
    if not fut.done():
        raise ClientError(
            f"no answer from the backbone about {what} within {timeout:.0f} s (is the persister "
            "running?); the event keeps its id, so sending it again cannot duplicate it"
        )
    return fut.result()


# --- connecting ---------------------------------------------------------------------------------


def broker_reachable(host: str, port: int, timeout: float = 0.5) -> str | None:
    """None if something accepts TCP connections at host:port, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


async def connect(
    conn: Connection,
    *,
    what: str,
    timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
    on_retry: Callable[[str], None] | None = None,
) -> None:
    """Start ``conn`` and wait until it is connected, with clear errors instead of tracebacks.

    A broker that is down is retried (paho backs off) and ``on_retry`` is told why, every few
    seconds, until ``timeout``. A broker that refuses the credentials is not retried.
    """
    settings = conn.settings
    where = f"{settings.broker_host}:{settings.broker_port}"
    # Connection.last_error is overwritten by the hang-up that follows a refused CONNACK; keep the
    # refusal itself, seen in paho's network thread.
    refused: list[str] = []
    on_connect = conn.client.on_connect

    def spy(client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if getattr(reason, "is_failure", False):
            refused.append(str(reason))
        if on_connect is not None:
            on_connect(client, userdata, flags, reason, properties)  # type: ignore[call-arg]

    conn.client.on_connect = spy
    conn.start()
    started = time.monotonic()
    next_note = started + 1.0
    try:
        while not conn.connected.is_set():
            error = conn.last_error or ""
            if refused:
                reason = refused[0]
                raise BrokerError(
                    f"the broker at {where} refused {what} {settings.broker_username!r}: {reason}. "
                    "Check the password, and that the account exists on this broker."
                )
            now = time.monotonic()
            if now - started > timeout:
                why = await asyncio.to_thread(broker_reachable, settings.broker_host, settings.broker_port)
                raise BrokerError(
                    f"could not reach the MQTT broker at {where} within {timeout:.0f} s "
                    f"({why or error or 'no answer'}); is it running? `bloomwire up` prints its port "
                    "(BLOOMWIRE_BROKER_PORT)"
                )
            if now >= next_note and on_retry is not None:
                why = await asyncio.to_thread(broker_reachable, settings.broker_host, settings.broker_port)
                if why is not None:
                    on_retry(f"broker at {where} is not reachable ({why}); retrying …")
                next_note = now + 3.0
            await asyncio.sleep(0.05)
    except BaseException:
        with contextlib.suppress(Exception):
            await conn.stop(announce_offline=False)
        release(conn)
        raise


def release(conn: Connection) -> None:
    """Close the wake-up socket pair paho keeps after ``loop_stop`` now, not at garbage collection.

    Connection and paho client reference each other, so they are freed by the cycle collector,
    which may finalise the sockets before paho's own ``__del__`` closes them: a ResourceWarning.
    """
    with contextlib.suppress(Exception):
        conn.client._reset_sockets()


class Client:
    """One identity on one connection, with a task handing each message to :meth:`handle`."""

    what = "client"

    def __init__(
        self,
        settings: Settings,
        username: str,
        password: str,
        *,
        status_topic: str | None = None,
        persistent: bool = False,
        session_expiry_s: int = 24 * 3600,
    ) -> None:
        self.username = username
        self.settings = client_settings(settings, username, password)
        self.conn = Connection(
            self.settings,
            username,
            status_topic=status_topic,
            persistent=persistent,
            session_expiry_s=session_expiry_s,
        )
        self._pump: asyncio.Task[None] | None = None
        self._stopped = False
        #: Set after every batch of handled messages (clear it, then wait on it).
        self.changed = asyncio.Event()
        self.last_message_at: float = 0.0

    def subscribe(self, filters: Iterable[str]) -> None:
        """Subscribe (now or at the next connection) to each filter, QoS 1."""
        for f in filters:
            self.conn.subscribe(f, qos=1)

    async def start(
        self, timeout: float = DEFAULT_CONNECT_TIMEOUT_S, on_retry: Callable[[str], None] | None = None
    ) -> None:
        """Connect and start handing messages to :meth:`handle`."""
        await connect(self.conn, what=self.what, timeout=timeout, on_retry=on_retry)
        self._pump = asyncio.create_task(self._run_pump(), name=f"pump-{self.username}")

    async def settle(self, quiet: float = RETAINED_QUIET_S, limit: float = 3.0) -> None:
        """Wait until the burst of retained messages after subscribing is over."""
        started = time.monotonic()
        self.last_message_at = time.monotonic()
        while True:
            now = time.monotonic()
            left = quiet - (now - self.last_message_at)
            if left <= 0 or now - started >= limit:
                return
            await asyncio.sleep(min(left, limit - (now - started)) + 0.01)

    async def _run_pump(self) -> None:
        conn = self.conn
        # The flag, not only the cancellation, ends the loop: Connection.wait_message uses
        # asyncio.wait_for, which on Python 3.11 can swallow a cancellation.
        while not self._stopped:
            await conn.wait_message(timeout=0.5)
            for msg in conn.drain(500):
                self.last_message_at = time.monotonic()
                try:
                    self.handle(msg)
                except Exception:  # one bad message must not stop the client
                    log.exception("client could not handle a message", topic=msg.topic, client=self.username)
            self.changed.set()

    def handle(self, msg: Message) -> None:
        """Handle one received message (override)."""

    async def stop(self, *, announce_offline: bool = True) -> None:
        """Stop the pump and disconnect cleanly (a status topic says ``offline``)."""
        if self._stopped:
            return
        self._stopped = True
        await cancel_and_wait(self._pump)
        try:
            await self.conn.stop(announce_offline=announce_offline)
        finally:
            release(self.conn)

    async def crash(self) -> None:
        """Vanish like a phone whose app died: no DISCONNECT, so the broker sends the Last Will."""
        if self._stopped:
            return
        self._stopped = True
        await cancel_and_wait(self._pump)
        await asyncio.to_thread(self.conn.client.loop_stop)
        # Closing the socket without a DISCONNECT packet is what a killed app looks like.
        release(self.conn)
        self.conn.connected.clear()


def utc(ts: float) -> datetime:
    """Epoch seconds -> aware UTC datetime."""
    return datetime.fromtimestamp(ts, UTC)
