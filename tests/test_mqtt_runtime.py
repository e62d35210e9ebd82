"""The MQTT runtime (``bloomwire.runtime.mqtt``) against a real Mosquitto: nothing crossing MQTT is mocked.

Services run in the test's own event loop (``asyncio.run`` inside each test, the service as a task)
or, where a process must die, as a child ``python -c`` process killed with SIGKILL. Every check is
on what the broker actually delivered: handled messages, retained status, dead letters. Tests that
connect run twice: on paho's own client and on the tuned one (``tuned``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import BaseModel
from structlog.testing import LogCapture

from bloomwire.app import entry
from bloomwire.contract import topics
from bloomwire.errors import BrokerError
from bloomwire.runtime import mqtt, pahoclient
from bloomwire.runtime.mqtt import Message, Service
from bloomwire.runtime.settings import Settings

WAIT = 15.0  # generous: the machine is shared; nothing here asserts on timing


# --- helpers ----------------------------------------------------------------------------------


def unique(prefix: str = "rt") -> str:
    """A service name / topic level no other test (or earlier run) uses."""
    return f"{prefix}{secrets.token_hex(4)}"


async def eventually(cond: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Wait (without blocking the loop) until ``cond()`` holds, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.02)


class Recorder:
    """An async handler that keeps what it was given."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def __call__(self, msg: Message) -> None:
        self.messages.append(msg)

    def payloads(self) -> list[bytes]:
        return [m.payload for m in self.messages]


@contextlib.asynccontextmanager
async def running(service: Service, settings: Settings) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``service`` as a task of this loop until the block ends, then stop it cleanly."""
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(settings, stop=stop))
    try:
        await eventually(lambda: service.ready.is_set() or task.done(), f"service {service.name} ready")
        if task.done():
            task.result()  # re-raise why it ended
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT)


async def next_matching(client: Any, pred: Callable[[Any], bool], what: str, timeout: float = WAIT) -> Any:
    """The next message ``client`` receives that satisfies ``pred`` (others are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        try:
            msg = await asyncio.to_thread(client.messages.get, True, min(left, 0.5))
        except queue.Empty:
            continue
        if pred(msg):
            return msg


async def expect_status(client: Any, name: str, payload: bytes) -> Any:
    """Wait until ``client`` sees ``services/NAME/status`` with ``payload``."""
    status = topics.service_status(name)
    return await next_matching(
        client, lambda m: m.topic == status and m.payload == payload, f"{status} = {payload!r}"
    )


async def expect_deadletter(client: Any, topic: str) -> dict[str, Any]:
    """The next dead letter about ``topic``, decoded."""
    msg = await next_matching(
        client,
        lambda m: m.topic == topics.DEADLETTER and json.loads(m.payload).get("topic") == topic,
        f"a dead letter about {topic}",
    )
    refusal: dict[str, Any] = json.loads(msg.payload)
    return refusal


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


@pytest.fixture(params=[False, True], ids=["plain", "tuned"])
def tuned(request: pytest.FixtureRequest) -> bool:
    """Each connecting test on paho's own client, then on the tuned one (``Connection(tuned=…)``)."""
    wanted: bool = request.param
    if wanted:
        assert pahoclient.tuning_refusal() is None, "the pinned paho must take the tuning"
    return wanted


@pytest.fixture
def watcher(mqtt_client: Callable[..., Any], mqtt_user: Callable[..., tuple[str, str]]) -> Callable[..., Any]:
    """Factory: a connected test client of its own user, subscribed to ``filters``."""

    def make(*filters: str, broker: Any = None) -> Any:
        user, password = mqtt_user(prefix="watch", broker=broker)
        client = mqtt_client(user, password, broker=broker)
        for f in filters:
            client.subscribe(f, qos=1)
        return client

    return make


@pytest.fixture
def captured_logs(monkeypatch: pytest.MonkeyPatch) -> list[MutableMapping[str, Any]]:
    """What ``bloomwire.runtime.mqtt`` logs, as structlog event dicts (independent of global config)."""
    capture = LogCapture()
    monkeypatch.setattr(mqtt, "log", structlog.wrap_logger(None, processors=[capture]))
    return capture.entries


# --- child processes --------------------------------------------------------------------------

# A service in a process of its own: ``mode name filter``. It prints "ready" once running and
# "got TOPIC PAYLOAD" for every message; in "block" mode its (batch) handler never returns, so
# nothing it received is ever acknowledged.
CHILD = """
import asyncio, sys
from bloomwire.runtime.mqtt import Service
from bloomwire.runtime.settings import Settings

mode, name, topic_filter, tuned = sys.argv[1:5]
service = Service(name, persistent=True, session_expiry_s=300, tuned=tuned == "tuned")

def say(*parts):
    print(*parts, flush=True)

if mode == "block":
    @service.handle_batch(topic_filter)
    async def handle(batch):
        for m in batch:
            say("got", m.topic, m.payload.decode())
        await asyncio.Event().wait()
else:
    @service.handle(topic_filter)
    async def handle(m):
        say("got", m.topic, m.payload.decode())

@service.on_startup
async def ready():
    say("ready")

asyncio.run(service.run(Settings()))
"""


class Child:
    """A child service process whose stdout lines are read by a thread."""

    def __init__(self, args: Sequence[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode(errors="replace").rstrip("\n"))

    async def expect(self, wanted: str, timeout: float = WAIT) -> None:
        """Wait for the line ``wanted`` (earlier lines are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or (self.proc.poll() is not None and self.lines.empty()):
                tail = self.log_path.read_text(errors="replace")[-2000:]
                pytest.fail(f"child never printed {wanted!r} (exit {self.proc.poll()}); stderr:\n{tail}")
            try:
                line = await asyncio.to_thread(self.lines.get, True, min(left, 0.5))
            except queue.Empty:
                continue
            if line == wanted:
                return

    def kill(self) -> None:
        """SIGKILL: no clean disconnect, no shutdown hooks, no acks."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def close(self) -> None:
        self.kill()
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


@pytest.fixture
def child_service(tmp_path: Path, tuned: bool) -> Iterator[Callable[..., Child]]:
    """Factory: ``child_service(settings, mode, name, topic_filter)`` (plain or tuned, as the test
    is); all killed at teardown."""
    children: list[Child] = []

    def start(settings: Settings, mode: str, name: str, topic_filter: str) -> Child:
        assert settings.broker_password is not None
        env = {
            **os.environ,
            **settings.to_env(),
            "BLOOMWIRE_BROKER_PASSWORD": settings.broker_password.get_secret_value(),
        }
        args = [mode, name, topic_filter, "tuned" if tuned else "plain"]
        child = Child(args, env, tmp_path / f"child-{len(children)}.log")
        children.append(child)
        return child

    yield start
    for child in children:
        child.close()


# --- publish / subscribe ----------------------------------------------------------------------


def test_async_handler_receives_and_publishes(make_settings: Any, watcher: Any, tuned: bool) -> None:
    name = unique()
    inbound, outbound = f"test/{name}/in/a", f"test/{name}/out"
    service = Service(name, tuned=tuned)
    seen: list[Message] = []

    @service.handle(f"test/{name}/in/+")
    async def echo(msg: Message) -> None:
        seen.append(msg)
        await asyncio.sleep(0)  # really async
        service.publish(outbound, b"echo:" + msg.payload, qos=1)

    out = watcher(outbound, topics.service_status(name))

    async def body() -> None:
        async with running(service, make_settings()):
            await expect_status(out, name, b"online")
            out.publish(inbound, b"hello", qos=1)
            got = await next_matching(out, lambda m: m.topic == outbound, "the echo")
            assert got.payload == b"echo:hello"
        assert [(m.topic, m.payload, m.qos) for m in seen] == [(inbound, b"hello", 1)]
        assert service.handled == 1
        assert service.failed == 0

    run(body())


def test_status_is_retained_online_while_running_and_offline_after_clean_stop(
    make_settings: Any, watcher: Any, tuned: bool
) -> None:
    name = unique()
    service = Service(name, tuned=tuned)
    service.handle(f"test/{name}")(Recorder())
    status = topics.service_status(name)

    async def body() -> None:
        async with running(service, make_settings()):
            late = watcher(status)  # subscribes after the fact: sees the retained value
            msg = await next_matching(late, lambda m: m.topic == status, status)
            assert (msg.payload, msg.retain) == (b"online", True)
        after = watcher(status)
        msg = await next_matching(after, lambda m: m.topic == status, status)
        assert (msg.payload, msg.retain) == (b"offline", True)

    run(body())


def test_last_will_says_offline_when_the_process_is_killed(
    make_settings: Any, watcher: Any, child_service: Any
) -> None:
    name = unique()
    status = topics.service_status(name)
    watch = watcher(status)

    async def body() -> None:
        child = child_service(make_settings(), "echo", name, f"test/{name}")
        await child.expect("ready")
        await expect_status(watch, name, b"online")
        child.kill()
        await expect_status(watch, name, b"offline")
        late = watcher(status)
        msg = await next_matching(late, lambda m: m.topic == status, status)
        assert (msg.payload, msg.retain) == (b"offline", True)

    run(body())


# --- reconnect --------------------------------------------------------------------------------


def test_reconnects_after_broker_restart_and_restores_subscriptions(
    fresh_broker: Any, make_settings: Any, watcher: Any, tuned: bool
) -> None:
    name = unique()
    topic = f"test/{name}/in"
    service = Service(name, tuned=tuned)  # clean session: only the runtime brings the subscription back
    got = Recorder()
    service.handle(topic)(got)
    settings = make_settings(broker=fresh_broker)

    async def body() -> None:
        async with running(service, settings):
            before = watcher(topics.service_status(name), broker=fresh_broker)
            await expect_status(before, name, b"online")
            before.publish(topic, b"before", qos=1)
            await eventually(lambda: got.payloads() == [b"before"], "the message before the restart")
            before.close()
            generation = service.conn.generation

            await asyncio.to_thread(fresh_broker.restart)
            await eventually(
                lambda: service.conn.generation > generation and service.conn.connected.is_set(),
                "the service to reconnect",
            )
            # No one re-subscribes but the runtime: keep publishing until one gets through.
            after = watcher(broker=fresh_broker)
            deadline = time.monotonic() + WAIT
            sent: list[bytes] = []
            while not any(p in sent for p in got.payloads()):
                assert time.monotonic() < deadline, "no message handled after the broker restart"
                sent.append(f"after-{len(sent)}".encode())
                after.publish(topic, sent[-1], qos=1)
                await asyncio.sleep(0.3)
            assert got.payloads()[0] == b"before"
            assert set(got.payloads()[1:]) <= set(sent)
        assert service.failed == 0

    run(body())


# --- failures and bad input -------------------------------------------------------------------


def test_failing_handler_is_dead_lettered_logged_and_the_next_message_handled(
    make_settings: Any, watcher: Any, captured_logs: list[MutableMapping[str, Any]], tuned: bool
) -> None:
    name = unique()
    topic = f"test/{name}/in"
    service = Service(name, tuned=tuned)
    handled: list[bytes] = []

    @service.handle(topic)
    async def fragile(msg: Message) -> None:
        if b"boom" in msg.payload:
            raise ValueError("cannot take this one")
        handled.append(msg.payload)

    dl = watcher(topics.DEADLETTER, topics.service_status(name))
    bad = json.dumps({"id": "ev-boom-1", "type": "test", "data": "boom"}).encode()

    async def body() -> None:
        async with running(service, make_settings()):
            await expect_status(dl, name, b"online")
            dl.publish(topic, bad, qos=1)
            dl.publish(topic, b"fine", qos=1)
            refusal = await expect_deadletter(dl, topic)
            await eventually(lambda: handled == [b"fine"], "the message after the failing one")
        assert refusal["id"] == "ev-boom-1"
        assert refusal["topic"] == topic
        assert refusal["reason"] == "ValueError: cannot take this one"
        assert (refusal["service"], refusal["payload"]) == (name, bad.decode()), "who refused what"
        datetime.fromisoformat(refusal["at"].replace("Z", "+00:00"))
        assert (service.handled, service.failed) == (1, 1)
        failures = [e for e in captured_logs if e["event"] == "handler failed"]
        assert len(failures) == 1
        assert failures[0]["topic"] == topic
        assert "boom" in failures[0]["payload"]

    run(body())


def test_bad_input_never_escapes_the_runtime(make_settings: Any, watcher: Any, tuned: bool) -> None:
    name = unique()
    topic = f"test/{name}/in"
    service = Service(name, tuned=tuned)
    handled: list[bytes] = []
    binary = bytes(range(256)) * 4
    huge = b"\xff" + b"x" * 250_000  # within the broker's 256 KiB packet limit, far over the app's

    @service.handle(topic)
    async def strict(msg: Message) -> None:
        handled.append(msg.payload)
        text = msg.payload.decode("utf-8")  # binary payloads raise here
        if len(msg.payload) > 65_536:
            raise ValueError(f"payload too long: {msg.payload!r}")  # a reason as long as the payload
        json.loads(text)

    dl = watcher(topics.DEADLETTER, topics.service_status(name))

    async def body() -> None:
        async with running(service, make_settings()):
            await expect_status(dl, name, b"online")
            generation = service.conn.generation
            dl.publish(topic, binary, qos=1)
            binary_refusal = await expect_deadletter(dl, topic)
            dl.publish(topic, huge, qos=1)
            huge_refusal = await expect_deadletter(dl, topic)
            dl.publish(topic, b'{"ok": true}', qos=1)
            await eventually(lambda: len(handled) == 3, "the good message after the bad ones")
            assert service.conn.generation == generation, "the service lost its connection"
        assert handled == [binary, huge, b'{"ok": true}']
        assert binary_refusal["reason"].startswith("UnicodeDecodeError")
        assert huge_refusal["reason"].startswith("UnicodeDecodeError")
        assert (service.handled, service.failed) == (1, 2)

    run(body())


def test_long_error_reason_is_cut_so_the_dead_letter_still_goes_through(
    make_settings: Any, watcher: Any, tuned: bool
) -> None:
    name = unique()
    topic = f"test/{name}/in"
    service = Service(name, tuned=tuned)
    handled: list[bytes] = []
    huge = b"\x01" * 100_000  # its repr is 400 kB: a dead letter quoting it would be over the limit

    @service.handle(topic)
    async def strict(msg: Message) -> None:
        if len(msg.payload) > 65_536:
            raise ValueError(f"payload too long: {msg.payload!r}")
        handled.append(msg.payload)

    dl = watcher(topics.DEADLETTER, topics.service_status(name))

    async def body() -> None:
        async with running(service, make_settings()):
            await expect_status(dl, name, b"online")
            generation = service.conn.generation
            dl.publish(topic, huge, qos=1)
            refusal = await expect_deadletter(dl, topic)
            dl.publish(topic, b"next", qos=1)
            await eventually(lambda: handled == [b"next"], "the message after the huge one")
            assert service.conn.generation == generation, "the service lost its connection"
        assert refusal["reason"].startswith("ValueError: payload too long: b'\\x01\\x01")
        assert len(refusal["reason"]) <= mqtt.REASON_LIMIT

    run(body())


def test_oversized_publish_is_refused_before_the_broker_kicks_the_client(
    make_settings: Any, watcher: Any, tuned: bool
) -> None:
    name = unique()
    topic, out = f"test/{name}/in", f"test/{name}/out"
    service = Service(name, tuned=tuned)

    @service.handle(topic)
    async def amplify(msg: Message) -> None:
        service.publish(out, msg.payload * 100_000, qos=1)

    dl = watcher(topics.DEADLETTER, topics.service_status(name), out)

    async def body() -> None:
        async with running(service, make_settings()):
            await expect_status(dl, name, b"online")
            generation = service.conn.generation
            dl.publish(topic, b"abc", qos=1)
            refusal = await expect_deadletter(dl, topic)
            assert refusal["reason"].startswith("BrokerError")
            assert "packet" in refusal["reason"]
            dl.publish(topic, b"z", qos=1)
            got = await next_matching(dl, lambda m: m.topic == out, "the small publish")
            assert got.payload == b"z" * 100_000
            assert service.conn.generation == generation, "the broker disconnected the service"

    run(body())


# --- batch handlers ---------------------------------------------------------------------------


# --- typed handlers, state, the entry point ---------------------------------------------------


class Reading(BaseModel):
    """A payload model for the typed-handler tests."""

    id: str
    value: int


@dataclass
class Counted:
    """A start-up state: one object the handlers read as ``service.state``."""

    label: str
    seen: list[int] = field(default_factory=list)


def test_typed_handler_gets_the_decoded_model_and_an_undecodable_payload_is_dead_lettered(
    make_settings: Any, watcher: Any, captured_logs: list[MutableMapping[str, Any]], tuned: bool
) -> None:
    name = unique()
    topic = f"test/{name}/in"
    service: Service[Counted] = Service(name, tuned=tuned)
    calls: list[tuple[Reading, str]] = []

    @service.on_startup
    async def start() -> Counted:
        return Counted(label="warm")

    @service.handle(topic, model=Reading)
    async def on_reading(reading: Reading, msg: Message) -> None:
        calls.append((reading, msg.topic))
        service.state.seen.append(reading.value)

    dl = watcher(topics.DEADLETTER, topics.service_status(name))
    bad = json.dumps({"id": "ev-bad-1", "value": "not a number"}).encode()

    async def body() -> None:
        async with running(service, make_settings()):
            await expect_status(dl, name, b"online")
            assert service.state.label == "warm"
            dl.publish(topic, bad, qos=1)
            dl.publish(topic, b"{not json", qos=1)
            dl.publish(topic, json.dumps({"id": "ev-ok", "value": 7}).encode(), qos=1)
            refusals = [await expect_deadletter(dl, topic), await expect_deadletter(dl, topic)]
            await eventually(lambda: len(calls) == 1, "the good reading")
            state = service.state
        assert calls == [(Reading(id="ev-ok", value=7), topic)]
        assert state.seen == [7], "the handler reached the start-up state"
        assert refusals[0]["id"] == "ev-bad-1"
        assert refusals[0]["reason"].startswith("undecodable payload: ValidationError:")
        assert "value" in refusals[0]["reason"], "the decode error names the field"
        assert refusals[1]["reason"].startswith("undecodable payload: ValidationError:")
        assert (refusals[1]["service"], refusals[1]["payload"]) == (name, "{not json")
        assert (service.handled, service.failed, service.refused) == (1, 0, 2)
        assert [e["topic"] for e in captured_logs if e["event"] == "payload refused"] == [topic, topic]
        assert not service.has_state
        with pytest.raises(BrokerError, match="not running"):
            _ = service.state

    run(body())


def test_typed_batch_handler_gets_models_and_messages_in_step_without_the_undecodable(
    make_settings: Any, watcher: Any, tuned: bool
) -> None:
    name = unique()
    service = Service(name, persistent=True, session_expiry_s=60, tuned=tuned, linger_s=0.3)
    batches: list[list[tuple[int, bytes]]] = []
    fail_once = [True]

    def decode(payload: bytes) -> int:
        return int(payload)

    @service.handle_batch(f"test/{name}/a", f"test/{name}/b", model=decode)
    async def store(values: Sequence[int], msgs: Sequence[Message]) -> None:
        if fail_once[0]:  # retried with the same decoded values: decoded once, before the first try
            fail_once[0] = False
            raise RuntimeError("store unavailable")
        batches.append([(v, m.payload) for v, m in zip(values, msgs, strict=True)])

    client = watcher(topics.DEADLETTER, topics.service_status(name))

    async def body() -> None:
        async with running(service, make_settings()):
            await expect_status(client, name, b"online")
            for topic, payload in [("a", b"1"), ("b", b"two"), ("a", b"3")]:
                client.publish(f"test/{name}/{topic}", payload, qos=1)
            refusal = await expect_deadletter(client, f"test/{name}/b")
            await eventually(lambda: sum(map(len, batches)) == 2, "the decodable ones")
        assert [pair for b in batches for pair in b] == [(1, b"1"), (3, b"3")]
        assert refusal["reason"].startswith("undecodable payload: ValueError: invalid literal")
        assert (service.refused, service.failed) == (1, 1)

    run(body())


def test_retried_typed_handler_is_never_retried_for_an_undecodable_payload(
    make_settings: Any, watcher: Any, tuned: bool
) -> None:
    name = unique()
    topic = f"test/{name}/in"
    service = Service(name, tuned=tuned)
    got: list[int] = []

    @service.handle(topic, model=Reading, retry=True)
    async def keep(reading: Reading, msg: Message) -> None:
        got.append(reading.value)

    client = watcher(topics.DEADLETTER, topics.service_status(name))

    async def body() -> None:
        async with running(service, make_settings()):
            await expect_status(client, name, b"online")
            client.publish(topic, b"[]", qos=1)
            client.publish(topic, json.dumps({"id": "x", "value": 2}).encode(), qos=1)
            await expect_deadletter(client, topic)
            await eventually(lambda: got == [2], "the message after the undecodable one")
        assert (service.refused, service.failed, service.health.since) == (1, 0, None), "never degraded"

    run(body())


def test_the_library_leaves_signals_and_the_collector_alone(make_settings: Any) -> None:
    name = unique()
    service = Service(name)
    service.handle(f"test/{name}")(Recorder())
    frozen = gc.get_freeze_count()

    async def body() -> None:
        with pytest.raises(TypeError, match="entry point"):
            await service.run(make_settings(), install_signals=True)  # type: ignore[arg-type]
        handler = signal.getsignal(signal.SIGTERM)
        async with running(service, make_settings()):
            assert signal.getsignal(signal.SIGTERM) is handler
        assert gc.get_freeze_count() == frozen

    run(body())


def test_the_entry_point_stops_on_sigterm_and_settles_the_heap_once_ready(make_settings: Any) -> None:
    name = unique()
    service = Service(name)
    service.handle(f"test/{name}")(Recorder())

    async def body() -> None:
        task = asyncio.create_task(entry.run_service(service, make_settings()))
        await eventually(lambda: service.ready.is_set() or task.done(), "the service ready")
        await eventually(lambda: gc.get_freeze_count() > 0, "the heap frozen")
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(task, WAIT)
        assert not service.ready.is_set()

    try:
        run(body())
    finally:
        gc.unfreeze()


def test_batch_handler_failure_is_retried_then_delivered(
    make_settings: Any, watcher: Any, tuned: bool
) -> None:
    name = unique()
    service = Service(name, tuned=tuned)
    batches: list[list[bytes]] = []
    fail_once = [True]

    @service.handle_batch(f"test/{name}/a", f"test/{name}/b")
    async def store(batch: Sequence[Message]) -> None:
        if fail_once[0]:
            fail_once[0] = False
            raise RuntimeError("store unavailable")
        batches.append([m.payload for m in batch])

    client = watcher(topics.service_status(name))

    async def body() -> None:
        async with running(service, make_settings()):
            await expect_status(client, name, b"online")
            client.publish(f"test/{name}/a", b"1", qos=1)
            await eventually(lambda: sum(map(len, batches)) == 1, "the retried batch")
            client.publish(f"test/{name}/b", b"2", qos=1)
            await eventually(lambda: sum(map(len, batches)) == 2, "the next batch")
        assert [p for b in batches for p in b] == [b"1", b"2"]
        assert service.failed == 1

    run(body())


def test_thousands_of_messages_and_a_large_one_cross_buffered_reads_and_corked_writes_intact(
    make_settings: Any, watcher: Any, tuned: bool
) -> None:
    name = unique()
    inbound, outbound = f"test/{name}/in", f"test/{name}/out"
    service = Service(name, persistent=True, session_expiry_s=60, tuned=tuned)
    received: list[bytes] = []

    @service.handle_batch(inbound)
    async def echo(batch: Sequence[Message]) -> None:
        received.extend(m.payload for m in batch)
        with service.corked():  # one wake-up of the network thread for the whole batch
            for m in batch:
                service.publish(outbound, m.payload, qos=1)

    client = watcher(outbound, topics.service_status(name))
    large = bytes(range(256)) * 800  # 200 KiB: spans several 64 KiB reads
    sent = [f"small {k}".encode() for k in range(1500)] + [large] + [b"after the large one"]

    async def body() -> None:
        async with running(service, make_settings()):
            await expect_status(client, name, b"online")
            # The guard that a tuned paho still reads and writes through the buffered socket.
            assert service.conn.tuned is tuned
            assert isinstance(service.conn.client.socket(), pahoclient.BufferedSocket) is tuned
            infos = [client.paho.publish(inbound, p, qos=1) for p in sent]
            echoed: list[bytes] = []
            while len(echoed) < len(sent):
                m = await next_matching(client, lambda m: m.topic == outbound, f"echo {len(echoed)}")
                echoed.append(m.payload)
            assert echoed == sent, "echoes out of order or altered"
            assert all(i.is_published() for i in infos)
        assert received == sent

    run(body())


def test_received_messages_keep_topic_payload_qos_and_retain_whatever_their_properties(
    make_settings: Any, watcher: Any, tuned: bool
) -> None:

    name = unique()
    settings = make_settings()
    assert settings.broker_username is not None
    conn = mqtt.Connection(settings, settings.broker_username, tuned=tuned)
    publisher = watcher()
    publisher.paho.publish(f"test/{name}/kept", b"retained", qos=1, retain=True).wait_for_publish(WAIT)
    props = Properties(PacketTypes.PUBLISH)
    props.MessageExpiryInterval = 60
    props.UserProperty = [("k", "v" * 300)]  # properties longer than one length byte
    props.ContentType = "text/plain"
    sent = [  # (topic level, payload, qos, properties)
        ("q0", b"plain", 0, None),
        ("q1-props", b"", 1, props),
        ("q1-long/\u00e9", b"\x00\xff" * 300, 1, None),
        ("q2", b"exactly once", 2, props),
    ]

    async def body() -> None:
        conn.subscribe(f"test/{name}/#", qos=2)
        conn.start()
        try:
            await conn.wait_connected(WAIT)
            got: dict[str, Message] = {}

            async def receive(count: int) -> None:
                deadline = time.monotonic() + WAIT
                while len(got) < count:
                    assert time.monotonic() < deadline, f"only {sorted(got)} arrived"
                    if await conn.wait_message(0.3):
                        got.update((m.topic, m) for m in conn.drain(10))

            await receive(1)
            kept = got[f"test/{name}/kept"]
            assert (kept.payload, kept.qos, kept.retain) == (b"retained", 1, True)
            for level, payload, qos, p in sent:
                publisher.paho.publish(f"test/{name}/{level}", payload, qos=qos, properties=p)
            await receive(1 + len(sent))
            for level, payload, qos, _ in sent:
                m = got[f"test/{name}/{level}"]
                assert (m.payload, m.qos, m.retain) == (payload, qos, False), level
            assert all(m.mid for m in got.values() if m.qos), "QoS 1/2 messages keep their packet id"

            info = conn.publish(f"test/{name}/out", b"x", qos=1)
            refused = conn.publish("$SYS/bloomwire-test", b"x", qos=1)  # the broker denies $SYS writes
            await asyncio.to_thread(refused.wait_for_publish, WAIT)
            assert info.is_published() and refused.is_published()
            assert conn.refused_publishes == 1, "a PUBACK carrying 0x87 is still reported"
        finally:
            await conn.stop()

    run(body())


def test_a_linger_window_gathers_messages_into_one_batch(
    make_settings: Any, watcher: Any, tuned: bool
) -> None:
    name = unique()
    topic = f"test/{name}/in"
    service = Service(name, linger_s=2.0, tuned=tuned)  # wide: a slow machine still gets all three in
    batches: list[list[bytes]] = []

    @service.handle_batch(topic)
    async def gather(batch: Sequence[Message]) -> None:
        batches.append([m.payload for m in batch])

    client = watcher(topics.service_status(name))

    async def body() -> None:
        async with running(service, make_settings()):
            await expect_status(client, name, b"online")
            for k in range(3):
                client.publish(topic, str(k).encode(), qos=1)
                await asyncio.sleep(0.05)  # apart, yet within the window of the first
            await eventually(lambda: sum(map(len, batches)) == 3, "the three messages")
        assert batches == [[b"0", b"1", b"2"]], "one batch, not one per message"

    run(body())


def test_stop_is_honoured_while_a_batch_handler_keeps_failing(
    make_settings: Any, watcher: Any, tuned: bool
) -> None:
    name = unique()
    service = Service(name, tuned=tuned)
    calls: list[int] = []

    @service.handle_batch(f"test/{name}/a")
    async def broken(batch: Sequence[Message]) -> None:
        calls.append(len(batch))
        raise RuntimeError("store down for good")

    client = watcher(topics.service_status(name))

    async def body() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(service.run(make_settings(), stop=stop))
        await expect_status(client, name, b"online")
        client.publish(f"test/{name}/a", b"1", qos=1)
        await eventually(lambda: len(calls) >= 2, "the batch to be retried")
        stop.set()
        await asyncio.wait_for(task, WAIT)  # raises TimeoutError if stop is ignored
        await expect_status(client, name, b"offline")

    run(body())


# --- persistent sessions and manual acks ------------------------------------------------------


def test_persistent_service_receives_what_was_published_while_it_was_stopped(
    make_settings: Any, watcher: Any, tuned: bool
) -> None:
    name = unique()
    kept, dropped = f"test/{name}/kept", f"test/{name}/dropped"
    settings = make_settings()
    client = watcher(topics.DEADLETTER, topics.service_status(name))

    async def body() -> None:
        first = Service(name, persistent=True, session_expiry_s=300, tuned=tuned)
        first.handle(kept)(Recorder())
        first.handle(dropped)(Recorder())  # this route is gone in the next version
        async with running(first, settings):
            await expect_status(client, name, b"online")
        await expect_status(client, name, b"offline")

        client.publish(kept, b"while-down-1", qos=1)
        client.publish(dropped, b"no-route", qos=1)
        client.publish(kept, b"while-down-2", qos=1)

        second = Service(name, persistent=True, session_expiry_s=300, tuned=tuned)
        got = Recorder()
        second.handle(kept)(got)
        async with running(second, settings):
            refusal = await expect_deadletter(client, dropped)
            await eventually(lambda: len(got.messages) == 2, "the messages queued while stopped")
        assert got.payloads() == [b"while-down-1", b"while-down-2"]
        assert all(m.qos == 1 for m in got.messages)
        assert refusal["reason"] == f"LookupError: no handler for topic {dropped!r}"
        assert (second.handled, second.failed) == (2, 1)

    run(body())


def test_message_not_finished_when_the_process_died_is_redelivered(
    make_settings: Any, watcher: Any, child_service: Any
) -> None:
    name = unique()
    topic = f"test/{name}/in"
    settings = make_settings()  # the same user, hence client id and session, for both processes
    client = watcher(topics.service_status(name))

    async def body() -> None:
        blocked = child_service(settings, "block", name, topic)
        await blocked.expect("ready")
        await expect_status(client, name, b"online")
        client.publish(topic, b"precious", qos=1)
        await blocked.expect(f"got {topic} precious")
        blocked.kill()  # mid-handler: the message was never acknowledged
        await expect_status(client, name, b"offline")

        again = child_service(settings, "echo", name, topic)
        await again.expect(f"got {topic} precious")
        client.publish(topic, b"next", qos=1)
        await again.expect(f"got {topic} next")

    run(body())


def test_service_not_running_has_no_connection() -> None:
    service = Service(unique())
    with pytest.raises(BrokerError, match="not running"):
        service.publish("test/x", b"x")


def test_connection_survives_a_failing_on_connect_hook_and_subscribes_later(
    make_settings: Any, watcher: Any, tuned: bool
) -> None:
    name = unique()
    settings = make_settings()
    assert settings.broker_username is not None
    conn = mqtt.Connection(settings, settings.broker_username, tuned=tuned)
    calls: list[int] = []

    def broken_hook() -> None:
        calls.append(1)
        raise RuntimeError("hook bug")

    conn.on_connect(broken_hook)
    publisher = watcher()

    async def body() -> None:
        conn.start()
        try:
            await conn.wait_connected(WAIT)
            conn.subscribe(f"test/{name}/late", qos=1)  # after connecting: sent at once
            received: list[Message] = []
            deadline = time.monotonic() + WAIT
            while not received:  # no SUBACK hook here: publish until the subscription is live
                assert time.monotonic() < deadline, "the network thread died or never subscribed"
                publisher.publish(f"test/{name}/late", b"\x00\xff", qos=1)
                if await conn.wait_message(0.3):
                    received = conn.drain(10)
            assert received[0].payload == b"\x00\xff"
            assert received[0].preview() == "\x00\ufffd"
            assert calls == [1]
        finally:
            await conn.stop()

    run(body())
