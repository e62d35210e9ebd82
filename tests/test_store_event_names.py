"""Migration 0004: the stored event types renamed to past-tense facts, on SQLite and PostgreSQL.

(rename-events: keep -- this file spells the old names on purpose: they are what 0003 stored.)
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from alembic import command

from bloomwire.store import make_engine
from bloomwire.store.db import alembic_config
from bloomwire.store.models import EVENTS

pytestmark = pytest.mark.timeout(120)

AT = datetime(2026, 2, 14, 9, 30, tzinfo=UTC)


def test_stored_event_types_take_the_past_tense_names_and_back(database_url: str) -> None:
    cfg = alembic_config(database_url)
    command.upgrade(cfg, "0003")
    event = {"source": "riders/r1", "topic": "t", "time": AT, "recorded_at": AT, "data": {}}
    old = [
        "order.status",
        "order.chat",
        "dispatch.offer",
        "dispatch.reply",
        "order.created",
        "order.status_x",
    ]
    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(EVENTS.insert(), [{**event, "id": f"e-{i}", "type": t} for i, t in enumerate(old)])
        command.upgrade(cfg, "0004")
        with engine.connect() as conn:
            after = conn.execute(sa.select(EVENTS.c.type).order_by(EVENTS.c.id)).scalars().all()
        command.downgrade(cfg, "0003")
        with engine.connect() as conn:
            back = conn.execute(sa.select(EVENTS.c.type).order_by(EVENTS.c.id)).scalars().all()
    finally:
        engine.dispose()
    assert after == [
        "order.status_changed",
        "order.chat_posted",
        "dispatch.offered",
        "dispatch.replied",
        "order.created",
        "order.status_x",
    ]
    assert back == old
