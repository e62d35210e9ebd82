"""Bounded store growth: old trail points thinned in small batches, and what the store weighs.

Positions reach the store only as trail points (one per 50 m or 30 s of an order out for
delivery, see the persister). Older than the retention, each order's trail keeps one point per
``keep_every_s`` plus its first and last point: the route stays drawable, the rows stop growing
with every fix. Status, chat, alerts, offers and dead letters are never touched. Deletes run in
batches of their own short transactions, so the persister's commits go on in between.

:func:`start_nightly` runs the same prune every night from the persister (the only writer), in a
worker thread on an engine of its own, pausing between batches: ingestion never waits for more
than one batch's delete.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from sqlalchemy import Engine

from bloomwire.store.db import make_engine
from bloomwire.store.models import CHAT, EVENTS, TRAIL

log = structlog.stdlib.get_logger("bloomwire.retention")

#: Rows per delete transaction: small enough that a writer waits milliseconds, not seconds.
BATCH = 2_000
#: Free pages SQLite gives back per incremental-vacuum step.
VACUUM_PAGES = 10_000
#: The nightly prune (UTC): before the first shops open in Europe, after the last deliveries.
NIGHTLY_HOUR_UTC = 2
NIGHTLY_MINUTE_UTC = 17
#: Nightly: rows per delete and the pause after each, so the persister's commits come first.
NIGHTLY_BATCH = 500
NIGHTLY_PAUSE_S = 0.05


@dataclass(frozen=True, slots=True)
class StoreSize:
    """What the store holds and weighs."""

    bytes: int
    events: int
    trail_points: int
    chat_lines: int

    @property
    def bytes_per_row(self) -> float:
        """Store bytes per stored event, trail point or chat line (indexes and history included)."""
        rows = self.events + self.trail_points + self.chat_lines
        return self.bytes / rows if rows else 0.0


@dataclass(frozen=True, slots=True)
class PruneResult:
    """What one prune did."""

    examined: int
    pruned: int
    before: StoreSize
    after: StoreSize
    vacuumed_pages: int


def thin(points: Iterable[tuple[int, str, datetime]], keep_every_s: float) -> Iterator[int]:
    """Ids to delete from ``points`` (id, order, time), sorted by order then time: per order, the
    first point, the first of each ``keep_every_s`` bucket and the last point are kept."""
    order: str | None = None
    kept_bucket = 0
    candidate: int | None = None  # the latest point not kept yet: kept if it turns out last
    for point_id, order_id, at in points:
        bucket = int(at.timestamp() // keep_every_s)
        if order_id != order:
            order, kept_bucket, candidate = order_id, bucket, None
            continue  # an order's first point
        if candidate is not None:
            yield candidate
            candidate = None
        if bucket != kept_bucket:
            kept_bucket = bucket
        else:
            candidate = point_id


def size(engine: Engine) -> StoreSize:
    """The store's bytes (database file, or PostgreSQL database) and row counts."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            pages = conn.exec_driver_sql("PRAGMA page_count").scalar() or 0
            page = conn.exec_driver_sql("PRAGMA page_size").scalar() or 0
            free = conn.exec_driver_sql("PRAGMA freelist_count").scalar() or 0
            total = (pages - free) * page
        else:
            total = conn.exec_driver_sql("SELECT pg_database_size(current_database())").scalar() or 0

        def count(table: sa.Table) -> int:
            return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar() or 0)

        return StoreSize(int(total), count(EVENTS), count(TRAIL), count(CHAT))


def _doomed(engine: Engine, before: datetime, keep_every_s: float) -> tuple[int, list[int]]:
    query = (
        sa.select(TRAIL.c.id, TRAIL.c.order_id, TRAIL.c.at)
        .where(TRAIL.c.at < before)
        .order_by(TRAIL.c.order_id, TRAIL.c.at, TRAIL.c.id)
    )
    examined = 0

    def rows() -> Iterator[tuple[int, str, datetime]]:
        nonlocal examined
        with engine.connect() as conn:
            for r in conn.execution_options(yield_per=BATCH).execute(query):
                examined += 1
                yield r[0], r[1], r[2]

    doomed = list(thin(rows(), keep_every_s))
    return examined, doomed


def _vacuum(engine: Engine) -> int:
    """SQLite in incremental auto-vacuum mode: give free pages back to the file system."""
    if engine.dialect.name != "sqlite":
        return 0  # PostgreSQL: autovacuum reuses the space without a long lock
    with engine.connect() as conn:
        if conn.exec_driver_sql("PRAGMA auto_vacuum").scalar() != 2:  # 2 = INCREMENTAL
            return 0
        free = int(conn.exec_driver_sql("PRAGMA freelist_count").scalar() or 0)
        # Through the driver's cursor: the pragma frees pages as its result is read to the end.
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        cursor.execute(f"PRAGMA incremental_vacuum({VACUUM_PAGES})")
        cursor.fetchall()
        cursor.close()
        conn.commit()
        return free - int(conn.exec_driver_sql("PRAGMA freelist_count").scalar() or 0)


def make_incremental(engine: Engine) -> None:
    """Switch a SQLite store to incremental auto-vacuum (a full VACUUM, once: a long lock)."""
    if engine.dialect.name != "sqlite":
        return
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA auto_vacuum=INCREMENTAL")
        conn.commit()
        conn.exec_driver_sql("VACUUM")


def prune(
    engine: Engine, before: datetime, keep_every_s: float, *, batch: int = BATCH, pause_s: float = 0.0
) -> PruneResult:
    """Thin trail points older than ``before`` in batches of ``batch`` rows, ``pause_s`` apart;
    report sizes."""
    first = size(engine)
    examined, doomed = _doomed(engine, before, keep_every_s)
    for lo in range(0, len(doomed), batch):
        if lo and pause_s:
            time.sleep(pause_s)  # a worker thread: the writer takes the lock meanwhile
        with engine.begin() as conn:  # one short transaction per batch
            conn.execute(sa.delete(TRAIL).where(TRAIL.c.id.in_(doomed[lo : lo + batch])))
    vacuumed = 0
    while step := _vacuum(engine):
        vacuumed += step
    return PruneResult(examined, len(doomed), first, size(engine), vacuumed)


@dataclass(frozen=True, slots=True)
class Retention:
    """What the nightly prune keeps: the store, the days at full detail, one point per bucket after."""

    database_url: str
    days: float
    keep_every_s: float
    sqlite_busy_timeout_s: float = 30.0


def prune_now(policy: Retention, now: datetime) -> PruneResult:
    """One nightly prune (blocking: run it in a thread), on an engine of its own."""
    engine = make_engine(policy.database_url, sqlite_busy_timeout_s=policy.sqlite_busy_timeout_s)
    try:
        return prune(
            engine,
            now - timedelta(days=policy.days),
            policy.keep_every_s,
            batch=NIGHTLY_BATCH,
            pause_s=NIGHTLY_PAUSE_S,
        )
    finally:
        engine.dispose()


async def prune_nightly(policy: Retention) -> PruneResult | None:
    """The scheduled job: prune off the event loop, log what it did; a failure is logged, and the
    next night tries again (the store may be down: nothing is lost by waiting)."""
    try:
        result = await asyncio.to_thread(prune_now, policy, datetime.now(UTC))
    except Exception as exc:
        log.warning("nightly prune failed", error=str(exc).splitlines()[0][:300] if str(exc) else repr(exc))
        return None
    log.info(
        "nightly prune",
        examined=result.examined,
        pruned=result.pruned,
        bytes_before=result.before.bytes,
        bytes_after=result.after.bytes,
        vacuumed_pages=result.vacuumed_pages,
    )
    return result


def start_nightly(policy: Retention) -> AsyncIOScheduler:
    """Schedule :func:`prune_nightly` every night on the running loop; the caller shuts it down."""
    scheduler = AsyncIOScheduler(timezone=UTC)
    scheduler.add_job(
        prune_nightly,
        CronTrigger(hour=NIGHTLY_HOUR_UTC, minute=NIGHTLY_MINUTE_UTC, timezone=UTC),
        args=[policy],
        id="nightly-prune",
        max_instances=1,
        coalesce=True,
        misfire_grace_time=3600,
    )
    scheduler.start()
    return scheduler
