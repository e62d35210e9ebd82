"""The nightly prune: scheduled by the persister, thinning in small paused batches while a writer
keeps committing, and a failure logged, not raised."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import structlog
from structlog.testing import LogCapture

from bloomwire.store import open_store, retention
from bloomwire.store.models import TRAIL

NOW = datetime.now(UTC).replace(microsecond=0)
OLD = NOW - timedelta(days=40)
ORDERS = 40
FIXES = 120  # a fix every 5 s for 10 minutes: thinned to one a minute, first and last kept


def _trail(order: str, start: datetime) -> list[dict[str, Any]]:
    return [
        {"order_id": order, "rider": "r0", "lat": 52.5, "lon": 13.4, "at": start + timedelta(seconds=5 * i)}
        for i in range(FIXES)
    ]


def _count(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(TRAIL)).scalar() or 0)


def test_the_job_is_scheduled_every_night_and_stops_with_the_service(tmp_path: Path) -> None:
    policy = retention.Retention(f"sqlite:///{tmp_path / 'store.db'}", 30.0, 60.0)

    async def scheduled() -> datetime:
        scheduler = retention.start_nightly(policy)
        try:
            job = scheduler.get_job("nightly-prune")
            assert job is not None and job.args == (policy,)
            return job.next_run_time  # type: ignore[no-any-return]
        finally:
            scheduler.shutdown(wait=False)

    at = asyncio.run(scheduled())
    assert (at.hour, at.minute) == (retention.NIGHTLY_HOUR_UTC, retention.NIGHTLY_MINUTE_UTC)
    assert timedelta(0) < at - datetime.now(UTC) <= timedelta(days=1)


def test_nightly_prune_thins_in_small_batches_while_a_writer_commits(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    engine = open_store(url)
    try:
        with engine.begin() as conn:
            conn.execute(TRAIL.insert(), [p for o in range(ORDERS) for p in _trail(f"o{o}", OLD)])
        before = _count(engine)
        stop = threading.Event()
        waits: list[float] = []

        def writer() -> None:  # the persister's commits, one fresh point at a time
            while not stop.is_set():
                started = time.perf_counter()
                with engine.begin() as conn:
                    conn.execute(TRAIL.insert(), _trail("live", NOW)[:1])
                waits.append(time.perf_counter() - started)
                time.sleep(0.005)

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            result = asyncio.run(retention.prune_nightly(retention.Retention(url, 30.0, 60.0)))
        finally:
            stop.set()
            thread.join()
        assert result is not None
        assert result.examined == ORDERS * FIXES
        batches = -(-result.pruned // retention.NIGHTLY_BATCH)
        assert batches >= 5  # small batches, paused between: the writer got the lock in between
        assert len(waits) > batches and max(waits) < 1.0
        assert _count(engine) == before - result.pruned + len(waits)
    finally:
        engine.dispose()


def test_a_failed_night_is_logged_and_the_next_one_tries_again(tmp_path: Path, monkeypatch: Any) -> None:
    capture = LogCapture()
    monkeypatch.setattr(retention, "log", structlog.wrap_logger(None, processors=[capture]))
    missing = retention.Retention(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir.db'}", 30.0, 60.0)
    assert asyncio.run(retention.prune_nightly(missing)) is None
    assert [e["event"] for e in capture.entries] == ["nightly prune failed"]
    assert capture.entries[0]["log_level"] == "warning"
