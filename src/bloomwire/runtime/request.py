"""Awaitable request/response over one :class:`~bloomwire.runtime.mqtt.Connection`.

Some peers answer on one fixed topic and name the request inside the answer's payload rather
than with MQTT 5's Correlation Data: Mosquitto's dynamic-security plugin answers every admin on
``$CONTROL/dynamic-security/v1/response``, each answer carrying the ``correlationData`` of its
command. :class:`Requests` diverts that topic away from the connection's message queue (see
:meth:`Connection.divert <bloomwire.runtime.mqtt.Connection.divert>`), so a service handler that
awaits an answer never waits behind itself, and resolves the caller whose key the answer names.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from bloomwire.errors import BrokerError
from bloomwire.runtime.mqtt import Connection, Message

DEFAULT_TIMEOUT_S = 30.0
#: While waiting, the connection is looked at this often: an answer sent while it was down is
#: lost (answers are QoS 0), so a caller is told at once rather than at its deadline.
CHECK_S = 0.1

KeyOf = Callable[[bytes], str | None]


class Requests:
    """Publish a request, await the answer on ``response_topic`` whose ``key_of`` is its key.

    Create it on a running connection (in a service's start-up hook); it subscribes to
    ``response_topic`` at QoS 0 on this connection and after every reconnection. ``key_of``
    runs in paho's network thread: it must be quick, and it returns None for an answer that
    names no request (such answers, and answers nobody waits for, are dropped).
    """

    def __init__(
        self,
        conn: Connection,
        response_topic: str,
        key_of: KeyOf,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.conn = conn
        self.response_topic = response_topic
        self.key_of = key_of
        self.timeout = timeout
        self.loop = asyncio.get_running_loop()
        self.answered = 0
        self.unclaimed = 0
        self._pending: dict[str, asyncio.Future[bytes]] = {}
        conn.divert(response_topic, self._on_answer)

    def waiting(self) -> int:
        """How many requests wait for their answer."""
        return len(self._pending)

    async def request(
        self, topic: str, payload: bytes | str, key: str, *, timeout: float | None = None
    ) -> bytes:
        """Publish ``payload`` on ``topic`` (QoS 1) and return the payload of its answer.

        Raises :class:`~bloomwire.errors.BrokerError` if the connection is not up within
        ``timeout``, if it drops while waiting (the request may or may not have been applied),
        or if no answer comes within ``timeout``.
        """
        if key in self._pending:
            raise ValueError(f"a request with key {key!r} is already waiting")
        limit = self.timeout if timeout is None else timeout
        deadline = self.loop.time() + limit
        conn = self.conn
        while not conn.connected.is_set():
            if self.loop.time() >= deadline:
                raise BrokerError(f"not connected to the broker ({conn.last_error or 'no answer'})")
            await asyncio.sleep(CHECK_S)
        generation = conn.generation
        answer: asyncio.Future[bytes] = self.loop.create_future()
        self._pending[key] = answer
        try:
            conn.publish(topic, payload, qos=1)
            while not answer.done():
                left = deadline - self.loop.time()
                if left <= 0:
                    raise BrokerError(f"no answer on {self.response_topic} within {limit:.0f} s")
                await asyncio.wait({answer}, timeout=min(left, CHECK_S))
                if not answer.done() and (not conn.connected.is_set() or conn.generation != generation):
                    raise BrokerError(
                        f"lost the broker connection while waiting for an answer on {self.response_topic}; "
                        "the request may or may not have been applied"
                    )
            return answer.result()
        finally:
            self._pending.pop(key, None)

    def _on_answer(self, msg: Message) -> None:  # paho's network thread: never raise
        try:
            key = self.key_of(msg.payload)
        except Exception:
            key = None
        answer = self._pending.get(key) if key is not None else None
        if answer is None:
            self.unclaimed += 1
            return
        # Counted before the waiter is woken: whoever it wakes sees the count include its answer.
        self.answered += 1
        try:
            self.loop.call_soon_threadsafe(_resolve, answer, msg.payload)
        except RuntimeError:  # the loop is closed: nobody waits any more
            self.answered -= 1


def _resolve(answer: asyncio.Future[bytes], payload: bytes) -> None:
    if not answer.done():
        answer.set_result(payload)


__all__ = ["DEFAULT_TIMEOUT_S", "KeyOf", "Requests"]
