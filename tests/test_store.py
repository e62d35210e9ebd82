"""The store's schema: Alembic migrations against the models, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlmodel import SQLModel

from bloomwire.store import make_engine, upgrade
from bloomwire.store.bulk import BulkInsert, KeyLookup
from bloomwire.store.db import alembic_config
from bloomwire.store.models import CHAT, DEAD_LETTERS, EVENTS

pytestmark = pytest.mark.timeout(120)

LINE = {
    "id": "e-1",
    "order_id": "o1",
    "shop": "s1",
    "author_role": "rider",
    "author": "r1",
    "text": "at the door",
    "at": datetime(2026, 2, 14, 9, 30, tzinfo=UTC),
}


def test_migrated_schema_is_what_the_models_declare(database_url: str) -> None:
    upgrade(database_url)
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    finally:
        engine.dispose()
    assert diff == [], "a model changed without a migration (or the other way round)"


def test_chat_lines_survive_the_move_to_order_keys_and_back(database_url: str) -> None:
    cfg = alembic_config(database_url)
    command.upgrade(cfg, "0001")
    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(CHAT.insert(), [LINE, {**LINE, "id": "e-2", "text": "rang twice"}])
        command.upgrade(cfg, "head")
        with engine.connect() as conn:
            rows = conn.execute(sa.select(CHAT).order_by(CHAT.c.id)).mappings().all()
            key = sa.inspect(conn).get_pk_constraint("chat_lines")["constrained_columns"]
        assert [r["text"] for r in rows] == ["at the door", "rang twice"]
        assert rows[0]["at"] == LINE["at"]
        command.downgrade(cfg, "0001")
        with engine.connect() as conn:
            back = conn.execute(sa.select(CHAT.c.id, CHAT.c.text).order_by(CHAT.c.id)).all()
        assert [tuple(r) for r in back] == [("e-1", "at the door"), ("e-2", "rang twice")]
    finally:
        engine.dispose()
    assert key == ["order_id", "at", "id"]


def test_bulk_insert_stores_what_a_core_insert_stores(database_url: str) -> None:
    upgrade(database_url)
    engine = make_engine(database_url)
    at = datetime(2026, 2, 14, 9, 30, 1, 5, tzinfo=UTC)
    row = {
        "id": "e-core",
        "type": "order.chat_posted",
        "source": "riders/r1",
        "topic": "riders/r1/orders/o1/chat",
        "shop": None,
        "order_id": "o1",
        "rider": "r1",
        "time": at,
        "recorded_at": at,
        "data": {"order": "o1", "text": "ünïcode ✓", "n": [1, 2.5, None]},
    }
    try:
        with engine.begin() as conn:
            conn.execute(EVENTS.insert(), [row])
            BulkInsert(EVENTS, engine.dialect).execute(conn, [{**row, "id": "e-bulk"}])
            BulkInsert(EVENTS, engine.dialect, serialized=["data"]).execute(
                conn, [{**row, "id": "e-text", "data": json.dumps(row["data"])}]
            )
        with engine.connect() as conn:
            got = {r["id"]: dict(r) for r in conn.execute(sa.select(EVENTS)).mappings()}
    finally:
        engine.dispose()
    core, bulk, text = got.pop("e-core"), got.pop("e-bulk"), got.pop("e-text")
    assert core["seq"] < bulk["seq"] < text["seq"]
    for r in (core, bulk, text):
        r.pop("id"), r.pop("seq")
    assert bulk == core
    assert text == core, "JSON text handed in as such is stored as the same JSON"
    assert bulk["time"] == at and bulk["data"] == row["data"]


def test_key_lookup_finds_exactly_the_stored_keys_across_chunks(database_url: str) -> None:
    upgrade(database_url)
    engine = make_engine(database_url)
    at = datetime(2026, 2, 14, 9, 30, tzinfo=UTC)
    stored = [f"e-{k}" for k in range(0, 20, 2)]
    lookup = KeyLookup(DEAD_LETTERS.c.event_id, engine.dialect, chunk=3)
    asked = [f"e-{k}" for k in range(20)] + ["e-4", "e-unknown", "it's %s ; -- ?"]
    try:
        with engine.begin() as conn:
            conn.execute(
                DEAD_LETTERS.insert(),
                [
                    {"received_at": at, "topic": "t", "event_id": e, "reason": "r", "payload": ""}
                    for e in stored
                ],
            )
        with engine.connect() as conn:
            found = lookup.existing(conn, asked)
            assert lookup.existing(conn, []) == set()
            again = lookup.existing(conn, list(reversed(asked)))
    finally:
        engine.dispose()
    assert found == set(stored), "every chunk is asked, the odd-sized last one too"
    assert again == found
