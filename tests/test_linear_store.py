"""Bounded store growth, on SQLite and PostgreSQL: ``store prune`` thins old trail points to one a
minute per order (first and last kept), leaves recent ones, status events and chat untouched."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import typer
from typer.testing import CliRunner

from bloomwire.app.bench import scale
from bloomwire.app.store_commands import register
from bloomwire.runtime.settings import Settings
from bloomwire.store import open_store
from bloomwire.store.models import CHAT, EVENTS, TRAIL
from bloomwire.store.retention import make_incremental, prune, size, thin

NOW = datetime.now(UTC).replace(microsecond=0)
OLD = NOW - timedelta(days=40)
#: A fix every 5 s for 10 minutes: 120 points; thinned to one a minute (and the last), 10-12 stay.
FIXES = 120


def _trail(order: str, start: datetime) -> list[dict[str, Any]]:
    return [
        {
            "order_id": order,
            "rider": "r0",
            "lat": 52.5 + i * 1e-4,
            "lon": 13.4,
            "at": start + timedelta(seconds=5 * i),
        }
        for i in range(FIXES)
    ]


def _seed(url: str) -> None:
    scale.seed(url, 10, NOW)
    engine = open_store(url)
    try:
        with engine.begin() as conn:
            conn.execute(TRAIL.insert(), [*_trail("o0", OLD), *_trail("o1", OLD), *_trail("o2", NOW)])
            conn.execute(
                EVENTS.insert(),
                [
                    {
                        "id": f"ev-{i}",
                        "type": "order.status_changed",
                        "source": "riders/r0",
                        "topic": "riders/r0/orders/o0/status",
                        "shop": "s0",
                        "order_id": "o0",
                        "rider": "r0",
                        "time": OLD + timedelta(minutes=i),
                        "recorded_at": OLD + timedelta(minutes=i),
                        "data": json.loads('{"order": "o0", "status": "en_route"}'),
                    }
                    for i in range(5)
                ],
            )
            conn.execute(
                CHAT.insert(),
                [
                    {
                        "order_id": "o0",
                        "at": OLD + timedelta(seconds=i),
                        "id": f"chat-{i}",
                        "shop": "s0",
                        "author_role": "rider",
                        "author": "rider:r0",
                        "text": "on my way",
                    }
                    for i in range(3)
                ],
            )
    finally:
        engine.dispose()


def _points(engine: sa.Engine, order: str) -> list[datetime]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(TRAIL.c.at).where(TRAIL.c.order_id == order).order_by(TRAIL.c.at))
        return [r[0] if r[0].tzinfo else r[0].replace(tzinfo=UTC) for r in rows]


def test_thinning_keeps_first_last_and_one_per_bucket() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    points = [(i, "a", t0 + timedelta(seconds=20 * i)) for i in range(10)]  # 0..180 s
    points += [(100, "b", t0), (101, "b", t0 + timedelta(seconds=1))]
    doomed = set(thin(points, 60))
    assert {p[0] for p in points} - doomed == {0, 3, 6, 9, 100, 101}


def test_store_prune_thins_old_trails_and_keeps_the_rest(database_url: str) -> None:
    _seed(database_url)
    engine = open_store(database_url)
    try:
        old_o0 = _points(engine, "o0")
        with engine.connect() as conn:
            events = conn.execute(sa.select(sa.func.count()).select_from(EVENTS)).scalar()
        result = prune(engine, NOW - timedelta(days=30), 60.0)
        assert result.examined == 2 * FIXES
        kept = _points(engine, "o0")
        assert kept[0] == old_o0[0] and kept[-1] == old_o0[-1]  # the trail's ends stay
        assert 10 <= len(kept) <= 12  # 10 or 11 minutes touched, one each, and the last point
        minutes = [int(t.timestamp() // 60) for t in kept[1:-1]]
        assert len(minutes) == len(set(minutes))  # at most one a minute in between
        assert result.pruned == 2 * (FIXES - len(kept))
        assert len(_points(engine, "o2")) == FIXES  # recent: untouched
        with engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(EVENTS)).scalar() == events
            assert conn.execute(sa.select(sa.func.count()).select_from(CHAT)).scalar() == 3
        assert result.after.trail_points == result.before.trail_points - result.pruned
        assert result.after.bytes > 0 and result.after.bytes_per_row > 0
        # Again: nothing more to thin.
        assert prune(engine, NOW - timedelta(days=30), 60.0).pruned == 0
    finally:
        engine.dispose()


def test_sqlite_gives_space_back_in_incremental_mode(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    scale.seed(url, 10, NOW)
    engine = open_store(url)
    try:
        make_incremental(engine)
        with engine.begin() as conn:
            conn.execute(TRAIL.insert(), [row for o in range(50) for row in _trail(f"x{o}", OLD)])
        before = size(engine)
        result = prune(engine, NOW - timedelta(days=30), 60.0)
        assert result.pruned > 4000
        assert result.vacuumed_pages > 0
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA freelist_count").scalar() == 0
        assert result.after.bytes < before.bytes
    finally:
        engine.dispose()


def test_the_store_prune_command_reports(database_url: str, tmp_path: Path) -> None:
    _seed(database_url)
    settings = Settings(database_url=database_url, data_dir=tmp_path, position_retention_days=30)
    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, ["store", "prune"], obj=settings)
    assert result.exit_code == 0, result.output
    assert f"{2 * FIXES} examined" in result.output and "bytes per stored row" in result.output
