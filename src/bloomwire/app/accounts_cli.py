"""``bloomwire accounts``: the operator's view of broker accounts (access-controlled mode).

Talks to the running broker as ``admin`` over ``$CONTROL/dynamic-security/v1`` (the port comes
from BLOOMWIRE_BROKER_PORT, else from the broker ``bloomwire up`` runs for this data dir); with
no broker running it edits the plugin's JSON file instead, which the broker reads at its next
start. Passwords go to ``DATA_DIR/secrets/<name>`` (0600); they are printed only when asked.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from bloomwire.access import policy
from bloomwire.access.accounts import Accounts, Credential, open_accounts
from bloomwire.access.policy import Kind
from bloomwire.errors import BloomwireError
from bloomwire.runtime.settings import Settings

accounts_app = typer.Typer(
    help="Broker accounts: add shops, riders and services; list, remove, rotate passwords.",
    no_args_is_help=True,
)
console = Console()
err = Console(stderr=True)

Name = Annotated[str, typer.Argument(help="Its id: letters, digits and _ . : @ - (max 64).")]
Show = Annotated[bool, typer.Option("--show-password", help="Also print the password (else: its file).")]
Offline = Annotated[
    bool | None,
    typer.Option(
        "--offline/--live",
        help="Edit the plugin's file (broker stopped) / require a running broker. Default: live if one runs.",
    ),
]


def _settings(ctx: typer.Context) -> Settings:
    obj = ctx.obj
    return obj if isinstance(obj, Settings) else Settings()


def _fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/bold red] {message}")
    return typer.Exit(1)


def _report(what: str, cred: Credential, show: bool) -> None:
    where = f"password in {cred.secret_path} (owner-only)" if cred.secret_path else "password not kept"
    console.print(f"{what} {cred.kind.value} [bold]{cred.username}[/bold]: {where}")
    if show:
        console.print(f"password: {cred.password}", highlight=False, soft_wrap=True)


def _add(ctx: typer.Context, kind: Kind, name: str, show: bool, offline: bool | None) -> None:
    try:
        with open_accounts(_settings(ctx), offline=offline) as accounts:
            add = {
                Kind.SHOP: Accounts.add_shop,
                Kind.RIDER: Accounts.add_rider,
                Kind.SERVICE: Accounts.add_service,
            }
            cred = add[kind](accounts, name)
    except BloomwireError as exc:
        raise _fail(str(exc)) from None
    _report("added", cred, show)


@accounts_app.command("add-shop")
def add_shop(ctx: typer.Context, name: Name, show_password: Show = False, offline: Offline = None) -> None:
    """A shop terminal: writes shops/S/commands/#, reads shops/S/# (its orders' customer access too)."""
    _add(ctx, Kind.SHOP, name, show_password, offline)


@accounts_app.command("add-rider")
def add_rider(ctx: typer.Context, name: Name, show_password: Show = False, offline: Offline = None) -> None:
    """A rider: writes riders/R/# and owntracks/R/#, reads riders/R/inbox/#."""
    _add(ctx, Kind.RIDER, name, show_password, offline)


@accounts_app.command("add-service")
def add_service(ctx: typer.Context, name: Name, show_password: Show = False, offline: Offline = None) -> None:
    """A backbone service: writes services/N/events and its status, reads the canonical topics."""
    _add(ctx, Kind.SERVICE, name, show_password, offline)


@accounts_app.command("list")
def list_accounts(
    ctx: typer.Context,
    customers: Annotated[bool, typer.Option(help="List every customer device login too.")] = False,
    offline: Offline = None,
) -> None:
    """Every account and its roles (customer logins are counted unless --customers)."""
    try:
        with open_accounts(_settings(ctx), offline=offline) as accounts:
            rows = accounts.list()
    except BloomwireError as exc:
        raise _fail(str(exc)) from None
    table = Table("username", "kind", "roles", title="Broker accounts")
    hidden = 0
    for row in rows:
        if row.kind is Kind.CUSTOMER and not customers:
            hidden += 1
            continue
        table.add_row(row.username, row.kind.value if row.kind else "?", ", ".join(row.roles))
    console.print(table)
    if hidden:
        console.print(f"and {hidden} customer device logins (--customers to list them)")


@accounts_app.command("remove")
def remove(ctx: typer.Context, username: Name, offline: Offline = None) -> None:
    """Delete an account and its role; a connected client is disconnected at once."""
    try:
        with open_accounts(_settings(ctx), offline=offline) as accounts:
            info = accounts.remove(username)
    except BloomwireError as exc:
        raise _fail(str(exc)) from None
    console.print(f"removed {info.kind.value if info.kind else 'account'} {username}")


@accounts_app.command("rotate")
def rotate(ctx: typer.Context, username: Name, show_password: Show = False, offline: Offline = None) -> None:
    """A new password; the client is disconnected and must log in with the new one.

    A running service reads its password at start: restart it after rotating its account.
    The admin account is rotated with the broker stopped (--offline).
    """
    settings = _settings(ctx)
    try:
        with open_accounts(settings, offline=offline) as accounts:
            if username == policy.ADMIN and not isinstance(accounts.backend, _file_type()):
                raise _fail("rotate admin with the broker stopped: bloomwire accounts rotate admin --offline")
            cred = accounts.rotate(username)
    except BloomwireError as exc:
        raise _fail(str(exc)) from None
    _report("rotated", cred, show_password)
    if cred.kind in (Kind.SERVICE, Kind.PROVISIONER, Kind.PERSISTER, Kind.OPERATOR, Kind.MONITOR):
        console.print("restart that service (it reads its password when it starts)")


def _file_type() -> type:
    from bloomwire.access.dynsec import DynsecFile

    return DynsecFile
