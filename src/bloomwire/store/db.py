"""Engines for the store and the migrations that shape it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

MIGRATIONS = Path(__file__).with_name("migrations")


def _normalise(url: str) -> str:
    # "postgresql://" would pick psycopg2, which we do not ship; psycopg 3 is the driver.
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def make_engine(
    url: str, *, sqlite_synchronous: str = "FULL", readonly: bool = False, sqlite_busy_timeout_s: float = 30.0
) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and the chosen ``synchronous``."""
    url = _normalise(url)
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    busy_ms = int(sqlite_busy_timeout_s * 1000)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": sqlite_busy_timeout_s})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={sqlite_synchronous}")
        cur.execute(f"PRAGMA busy_timeout={busy_ms}")
        cur.execute("PRAGMA foreign_keys=ON")
        # 64 MiB of page cache (default 2 MiB): the event-id indexes take random inserts, and a
        # page read back from disk on every insert slows each commit.
        cur.execute("PRAGMA cache_size=-65536")
        if readonly:
            cur.execute("PRAGMA query_only=ON")
        cur.close()

    return engine


def probe(engine: Engine) -> str | None:
    """Whether the database answers a fresh connection's ``SELECT 1`` (no pooled connection, which
    may be stale): None if it does, else the error's first line."""
    dialect = engine.dialect
    try:
        cargs, cparams = dialect.create_connect_args(engine.url)
        conn = dialect.connect(*cargs, **cparams)
        try:
            cur = conn.cursor()
            cur.execute("SELECT 1")
            cur.fetchall()
        finally:
            conn.close()
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return None


def alembic_config(url: str) -> Config:
    """An Alembic config pointing at the packaged migrations and at ``url``."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", _normalise(url).replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` (idempotent; run at every service start)."""
    command.upgrade(alembic_config(url), revision)


def open_store(
    url: str, *, sqlite_synchronous: str = "FULL", readonly: bool = False, sqlite_busy_timeout_s: float = 30.0
) -> Engine:
    """Migrate the store to the newest schema and return an engine on it."""
    upgrade(url)
    return make_engine(
        url,
        sqlite_synchronous=sqlite_synchronous,
        readonly=readonly,
        sqlite_busy_timeout_s=sqlite_busy_timeout_s,
    )
