"""The durable store: SQLModel tables, engine set-up and Alembic migrations."""

from bloomwire.store.db import make_engine, open_store, probe, upgrade

__all__ = ["make_engine", "open_store", "probe", "upgrade"]
