"""``bloomwire db upgrade``, ``store prune`` and ``history``: the commands that open the store.

Loaded on first use (:mod:`bloomwire.app.cli`), so services that never open the store (web,
provisioner) do not import SQLAlchemy and Alembic.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer

from bloomwire.app.history import load_history, render_history
from bloomwire.app.terminal import console, fail, make_settings
from bloomwire.errors import BloomwireError
from bloomwire.store import open_store, upgrade
from bloomwire.store.retention import make_incremental, prune

db_app = typer.Typer(help="Manage the store's schema.", no_args_is_help=True)
store_app = typer.Typer(help="Keep the store's growth bounded.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add ``db`` and ``history`` to the main Typer app."""
    app.add_typer(db_app, name="db")
    app.add_typer(store_app, name="store")
    app.command()(history)


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Apply the store's migrations (services also do this at start)."""
    settings = make_settings(ctx)
    upgrade(settings.database_url)
    console.print(f"Store at {settings.database_url} is up to date.")


@store_app.command("prune")
def store_prune(
    ctx: typer.Context,
    days: Annotated[
        float | None, typer.Option(help="Thin trail points older than this (default: the settings').")
    ] = None,
    vacuum: Annotated[
        bool, typer.Option(help="SQLite: switch to incremental auto-vacuum first (a full VACUUM, once).")
    ] = False,
) -> None:
    """Thin old trail points (one a minute per order, first and last kept); status, chat, alerts and
    dead letters stay. Small batches: safe while the persister runs."""
    settings = make_settings(ctx)
    keep = days if days is not None else settings.position_retention_days
    engine = open_store(settings.database_url, sqlite_busy_timeout_s=settings.sqlite_busy_timeout_s)
    try:
        if vacuum:
            make_incremental(engine)
        before = datetime.now(UTC) - timedelta(days=keep)
        result = prune(engine, before, settings.position_keep_every_s)
    finally:
        engine.dispose()
    a, b = result.before, result.after
    console.print(
        f"trail points older than {keep:g} days: {result.examined} examined, {result.pruned} pruned; "
        f"store {a.bytes} -> {b.bytes} bytes, {a.bytes_per_row:.0f} -> {b.bytes_per_row:.0f} bytes per "
        f"stored row ({b.events} events, {b.trail_points} trail points, {b.chat_lines} chat lines); "
        f"{result.vacuumed_pages} pages given back"
    )


def history(ctx: typer.Context, order: Annotated[str, typer.Argument(help="The order id.")]) -> None:
    """Print an order's full timeline from the store: status, positions, chat, alerts."""
    settings = make_settings(ctx)
    try:
        found = load_history(settings.database_url, order)
    except BloomwireError as exc:
        raise fail(str(exc)) from None
    render_history(found, console)
