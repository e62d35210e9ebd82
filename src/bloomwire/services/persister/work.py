"""The unit of work of one batch: every change recorded as it is made, written in one transaction.

Handlers change rows only through :meth:`UnitOfWork.add` and :meth:`UnitOfWork.change`, so the
rows to insert and to update are known without a separate ``touch``; they add the rows to insert
(events, chat, trail, dead letters) and the messages to publish after the commit. A handler ends
normally (stored), or raises :class:`RefusedError` or :class:`IgnoredError`.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Connection
from sqlalchemy.engine import Dialect

from bloomwire.contract import events as ev
from bloomwire.contract import topics
from bloomwire.contract.topics import Identity, InboundTopic
from bloomwire.errors import BloomwireError
from bloomwire.runtime.log import get_logger
from bloomwire.services.persister.messages import Inbound, Outbound
from bloomwire.services.persister.tables import CachedTable, Keyed
from bloomwire.store import models as m
from bloomwire.store.bulk import BulkInsert, Memo

log = get_logger("bloomwire.persister")

DEAD_PAYLOAD_LIMIT = 65_536
#: How the persister signs its refusals on ``services/deadletter`` (it stores them itself).
SERVICE_NAME = "persister"

R = TypeVar("R", bound=Keyed)
Record = dict[str, Any]


class IgnoredError(BloomwireError):
    """A message that changes nothing (a repeated retained presence): acknowledged, not stored."""


class RefusedError(BloomwireError):
    """A message the persister will not take: dead-lettered, its sender told ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def storable(text: str) -> str:
    """``text`` without NUL characters (PostgreSQL text cannot hold them; a refusal must store)."""
    return text.replace("\x00", "\\u0000") if "\x00" in text else text


def derived_id(*parts: str) -> str:
    """A stable id made from ``parts``: a redelivered event derives the same one."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "/".join(parts)))


class Inserts:
    """The insert statements of the append-only tables, compiled once per dialect."""

    def __init__(self, dialect: Dialect) -> None:
        # An event's data is written as pydantic serialises it: one pass instead of two.
        self.events = BulkInsert(m.EVENTS, dialect, serialized=("data",))
        self.chat = BulkInsert(m.CHAT, dialect)
        self.trail = BulkInsert(m.TRAIL, dialect)
        self.dead = BulkInsert(m.DEAD_LETTERS, dialect)


class UnitOfWork:
    """What one batch changes and says, until it is committed."""

    def __init__(self, now: datetime) -> None:
        self.now = now
        self.events: list[Record] = []
        self.chat: list[Record] = []
        self.trail: list[Record] = []
        self.dead: list[Record] = []
        #: Messages to publish after the commit, in order (snapshots and acks come after them).
        self.canonical: list[Outbound] = []
        #: sender (``riders/R``, ``customers/C``) -> the ids to acknowledge to it
        self.acks: dict[str, list[str]] = defaultdict(list)
        #: orders whose retained state is sent after the commit
        self.states: dict[str, None] = {}
        #: rider -> shops to tell besides those of its current orders (one it just stopped carrying for)
        self.rider_states: dict[str, set[str]] = defaultdict(set)
        #: event id -> content digest of the events this batch stores
        self.seen: dict[str, int] = {}
        #: event id -> what to store for it when that says more than was sent (an amendment's
        #: old values); the sent event is still what a re-sent copy is compared with
        self.recorded: dict[str, Any] = {}
        self._new: dict[CachedTable[Any], set[str]] = defaultdict(set)
        self._dirty: dict[CachedTable[Any], set[str]] = defaultdict(set)

    # --- rows -------------------------------------------------------------------------------------

    def add(self, table: CachedTable[R], row: R) -> R:
        """A new row: held by ``table`` now, inserted on commit."""
        self._new[table].add(row.id)
        return table.put(row)

    def change(self, table: CachedTable[R], row: R, **values: Any) -> None:
        """Set columns of ``row``, updated on commit (a new row is inserted with them)."""
        for name, value in values.items():
            setattr(row, name, value)
        key = row.id
        if key not in self._new[table]:
            self._dirty[table].add(key)
        table.recent.add(key)

    def is_new(self, table: CachedTable[Any], key: str) -> bool:
        """Whether this batch added the row of ``key``."""
        return key in self._new[table]

    def flush(self, conn: Connection, tables: Sequence[CachedTable[Any]], inserts: Inserts) -> None:
        """Write everything (inside the caller's transaction)."""
        memo: Memo = {}  # times converted once for the whole transaction
        inserts.events.execute(conn, self.events, memo)
        for table in tables:
            table.insert(conn, self._new.get(table, ()))
            table.update(conn, self._dirty.get(table, ()))
        inserts.chat.execute(conn, self.chat, memo)
        inserts.trail.execute(conn, self.trail, memo)
        inserts.dead.execute(conn, self.dead, memo)

    def rolled_back(self) -> None:
        """The commit failed: drop the rows it would have written (re-read on demand)."""
        for changed in (self._new, self._dirty):
            for table, keys in changed.items():
                table.forget(keys)
            changed.clear()

    # --- what is said -----------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, **options: Any) -> None:
        """Publish after the commit."""
        self.canonical.append(Outbound(topic, payload, **options))

    def ack(self, where: InboundTopic, event_id: str) -> None:
        """Acknowledge ``event_id`` to its sender after the commit (services need none)."""
        if where.identity in (Identity.RIDER, Identity.CUSTOMER, Identity.SHOP):
            self.acks[where.source].append(event_id)

    def refuse(self, msg: Inbound, where: InboundTopic | None, event_id: str | None, reason: str) -> None:
        """Dead-letter ``msg`` and tell ``services/deadletter`` and its sender why."""
        text = ev.payload_text(msg.payload, DEAD_PAYLOAD_LIMIT)
        self.dead.append(
            {
                "received_at": self.now,
                "topic": storable(msg.topic[:1024]),
                "event_id": storable(event_id) if event_id else None,
                "sender": where.source if where else None,
                "reason": storable(reason),
                "payload": storable(text),
            }
        )
        refusal = ev.encode(
            ev.Refusal(id=event_id, topic=msg.topic[:1024], reason=reason, at=self.now, service=SERVICE_NAME)
        )
        self.canonical.append(Outbound(topics.DEADLETTER, refusal))
        error_topic = where.error_topic() if where else None
        if error_topic:
            self.canonical.append(Outbound(error_topic, refusal))
        log.info("refused", topic=msg.topic[:200], id=event_id, reason=reason)
