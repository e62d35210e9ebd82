"""``bloomwire db upgrade`` and ``bloomwire history``: the commands that open the store.

Loaded on first use (:mod:`bloomwire.app.cli`), so services that never open the store (web,
provisioner) do not import SQLAlchemy and Alembic.
"""

from __future__ import annotations

from typing import Annotated

import typer

from bloomwire.app.history import load_history, render_history
from bloomwire.app.terminal import console, fail, make_settings
from bloomwire.errors import BloomwireError
from bloomwire.store import upgrade

db_app = typer.Typer(help="Manage the store's schema.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add ``db`` and ``history`` to the main Typer app."""
    app.add_typer(db_app, name="db")
    app.command()(history)


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Apply the store's migrations (services also do this at start)."""
    settings = make_settings(ctx)
    upgrade(settings.database_url)
    console.print(f"Store at {settings.database_url} is up to date.")


def history(ctx: typer.Context, order: Annotated[str, typer.Argument(help="The order id.")]) -> None:
    """Print an order's full timeline from the store: status, positions, chat, alerts."""
    settings = make_settings(ctx)
    try:
        found = load_history(settings.database_url, order)
    except BloomwireError as exc:
        raise fail(str(exc)) from None
    render_history(found, console)
