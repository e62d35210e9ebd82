"""Request/response over one connection (``bloomwire.runtime.request``) against a real Mosquitto.

A responder connection plays the peer that answers on one fixed topic and names the request
in the payload (as Mosquitto's dynamic-security plugin does): ``{"key": ..., "answer": ...}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from bloomwire.errors import BrokerError
from bloomwire.runtime.mqtt import Connection, Message, Service
from bloomwire.runtime.request import Requests
from bloomwire.runtime.settings import Settings

WAIT = 15.0


def unique(prefix: str = "rq") -> str:
    return f"{prefix}{secrets.token_hex(4)}"


def key_of(payload: bytes) -> str | None:
    obj = json.loads(payload)
    return str(obj["key"]) if isinstance(obj, dict) and "key" in obj else None


async def eventually(cond: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def connected(settings: Settings, client_id: str) -> AsyncIterator[Connection]:
    conn = Connection(settings, client_id)
    conn.start()
    try:
        await conn.wait_connected(WAIT)
        yield conn
    finally:
        await conn.stop()


@contextlib.asynccontextmanager
async def responder(
    settings: Settings, requests_topic: str, answers_topic: str, *, reverse: int = 1
) -> AsyncIterator[list[bytes]]:
    """Answers each request ``{"key": k, "q": x}`` with ``{"key": k, "answer": x * 2}``; with
    ``reverse`` > 1 it waits for that many requests and answers them last first."""
    seen: list[bytes] = []
    async with connected(settings, settings.broker_username or "responder") as conn:
        conn.subscribe(requests_topic, qos=1)
        await asyncio.sleep(0.2)  # the SUBACK: the broker handles the client's packets in order

        async def serve() -> None:
            held: list[dict[str, Any]] = []
            while True:
                await conn.wait_message(0.2)
                for msg in conn.drain(100):
                    seen.append(msg.payload)
                    held.append(json.loads(msg.payload))
                if len(held) >= reverse:
                    for req in reversed(held):
                        answer = {"key": req["key"], "answer": req["q"] * 2}
                        conn.publish(answers_topic, json.dumps(answer), qos=0)
                    held.clear()

        task = asyncio.create_task(serve())
        try:
            yield seen
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def test_concurrent_requests_each_get_their_own_answer(make_settings: Callable[..., Settings]) -> None:
    base = unique()
    req_topic, ans_topic = f"test/{base}/req", f"test/{base}/ans"

    async def body() -> None:
        async with (
            responder(make_settings(), req_topic, ans_topic, reverse=3),
            connected(make_settings(), unique("caller")) as conn,
        ):
            requests = Requests(conn, ans_topic, key_of, timeout=WAIT)
            await eventually(lambda: ans_topic in conn.subscriptions, "the answer subscription")
            results = await asyncio.gather(
                *(
                    requests.request(req_topic, json.dumps({"key": k, "q": q}), k)
                    for k, q in (("a", 1), ("b", 2), ("c", 3))
                )
            )
            assert [json.loads(r)["answer"] for r in results] == [2, 4, 6]
            assert requests.answered == 3 and requests.waiting() == 0
            assert conn.queued() == 0  # answers never reach the message queue

    asyncio.run(body())


def test_a_handler_awaiting_an_answer_does_not_wait_behind_itself(
    make_settings: Callable[..., Settings],
) -> None:
    """A Service handler that awaits an answer on its own connection: the answer is diverted, so
    the handler gets it although the service handles one message at a time."""
    base = unique()
    req_topic, ans_topic, inbound = f"test/{base}/req", f"test/{base}/ans", f"test/{base}/in"
    service = Service(unique("svc"))
    answers: list[int] = []
    everything: list[Message] = []  # answers handed to a handler
    state: dict[str, Requests] = {}

    @service.handle(inbound)
    async def on_inbound(msg: Message) -> None:
        key = msg.payload.decode()
        reply = await state["requests"].request(req_topic, json.dumps({"key": key, "q": 21}), key)
        answers.append(json.loads(reply)["answer"])

    @service.handle(ans_topic)  # subscribed as a route too: still never handed to a handler
    async def on_answer(msg: Message) -> None:
        everything.append(msg)

    @service.on_startup
    async def start() -> None:
        state["requests"] = Requests(service.conn, ans_topic, key_of, timeout=WAIT)

    async def body() -> None:
        stop = asyncio.Event()
        settings = make_settings()
        async with (
            responder(make_settings(), req_topic, ans_topic),
            connected(make_settings(), unique("sender")) as sender,
        ):
            task = asyncio.create_task(service.run(settings, stop=stop, install_signals=False))
            try:
                await eventually(lambda: service.ready.is_set() or task.done(), "the service")
                for key in ("one", "two"):
                    sender.publish(inbound, key, qos=1)
                await eventually(lambda: len(answers) == 2, "two answers")
            finally:
                stop.set()
                await asyncio.wait_for(task, WAIT)
        assert answers == [42, 42]
        assert everything == []
        assert service.failed == 0

    asyncio.run(body())


def test_no_answer_is_an_error_and_foreign_answers_are_dropped(
    make_settings: Callable[..., Settings],
) -> None:
    base = unique()
    req_topic, ans_topic = f"test/{base}/req", f"test/{base}/ans"

    async def body() -> None:
        async with (
            connected(make_settings(), unique("caller")) as conn,
            connected(make_settings(), unique("other")) as other,
        ):
            requests = Requests(conn, ans_topic, key_of)
            await asyncio.sleep(0.2)
            for junk in (b"not json", b'{"key": "somebody-else"}', b"[]"):
                other.publish(ans_topic, junk, qos=0)
            t0 = time.monotonic()
            with pytest.raises(BrokerError, match="no answer"):
                await requests.request(req_topic, b"{}", "mine", timeout=0.5)
            assert time.monotonic() - t0 < 5
            await eventually(lambda: requests.unclaimed == 3, "the three foreign answers")
            assert requests.answered == 0 and requests.waiting() == 0 and conn.queued() == 0
            with pytest.raises(ValueError, match="already waiting"):
                await asyncio.gather(
                    requests.request(req_topic, b"{}", "twice", timeout=0.3),
                    requests.request(req_topic, b"{}", "twice", timeout=0.3),
                )

    asyncio.run(body())


def test_a_lost_connection_fails_the_waiting_request_at_once(
    fresh_broker: Any, make_settings: Callable[..., Settings]
) -> None:
    base = unique()
    req_topic, ans_topic = f"test/{base}/req", f"test/{base}/ans"

    async def body() -> None:
        async with connected(make_settings(broker=fresh_broker), unique("caller")) as conn:
            requests = Requests(conn, ans_topic, key_of, timeout=60)
            waiting = asyncio.create_task(requests.request(req_topic, b"{}", "k"))
            await eventually(lambda: requests.waiting() == 1, "the request")
            t0 = time.monotonic()
            await asyncio.to_thread(fresh_broker.kill)
            with pytest.raises(BrokerError, match="lost the broker connection"):
                await waiting
            assert time.monotonic() - t0 < 10  # not the 60 s deadline

    asyncio.run(body())


def test_a_diverted_qos1_message_is_acknowledged_on_a_manual_ack_session(
    make_settings: Callable[..., Settings],
) -> None:
    """A persistent manual-ack connection acknowledges what it diverts itself (nobody else
    would): after a reconnection the broker re-sends the queued message nobody acknowledged,
    and not the diverted one."""
    base = unique()
    diverted, queued = f"test/{base}/diverted", f"test/{base}/queued"
    settings = make_settings()
    client_id = settings.broker_username or unique()

    def session() -> Connection:
        return Connection(settings, client_id, persistent=True, session_expiry_s=60, manual_ack=True)

    async def body() -> None:
        got: list[Message] = []
        first = session()
        first.divert(diverted, got.append, qos=1)
        first.subscribe(queued, qos=1)
        first.start()
        await first.wait_connected(WAIT)
        async with connected(make_settings(), unique("sender")) as sender:
            await asyncio.sleep(0.2)  # the SUBACKs
            sender.publish(diverted, b"d", qos=1)
            sender.publish(queued, b"q", qos=1)
            await eventually(lambda: len(got) == 1 and first.queued() == 1, "both messages")
        await first.stop()
        again: list[Message] = []
        second = session()
        second.divert(diverted, again.append, qos=1)
        second.subscribe(queued, qos=1)
        second.start()
        try:
            await second.wait_connected(WAIT)
            await eventually(lambda: second.queued() == 1, "the unacknowledged message again")
            assert [m.payload for m in second.drain(10)] == [b"q"]
            assert again == []
        finally:
            await second.stop()

    asyncio.run(body())
