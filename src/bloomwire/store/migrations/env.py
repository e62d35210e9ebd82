"""Alembic environment: the URL comes from the caller's config (``bloomwire.store.db`` sets it)."""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

from bloomwire.store import models  # noqa: F401  (registers the tables on SQLModel.metadata)
from bloomwire.store.db import make_engine

config = context.config


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if not url:  # the store does not read settings (layers: docs/architecture.md)
        raise RuntimeError("no sqlalchemy.url: migrate with bloomwire.store.upgrade(url)")
    return url


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=SQLModel.metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(_url())
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=SQLModel.metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
