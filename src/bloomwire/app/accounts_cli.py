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
from bloomwire.access.dynsec import DynsecFile
from bloomwire.access.policy import Kind
from bloomwire.errors import BloomwireError
from bloomwire.runtime.settings import Settings

accounts_app = typer.Typer(
    help=(
        "Broker accounts: add shops, riders and services; device logins of shops and riders; "
        "list, remove, rotate passwords."
    ),
    no_args_is_help=True,
)
DEVICE_HELP = (
    "Device logins of shops and riders: one per terminal, dashboard, phone app or OwnTracks."
    "\n\n"
    "The broker uses a login's username as its MQTT client id, so two devices sharing the shop's "
    "(or rider's) login would keep disconnecting each other. A device login is IDENTITY@LABEL "
    "(s1@till-2, r7@owntracks): a username and password of its own, with exactly the rights of "
    "its shop or rider. Every device of a shop sees everything the shop sees, live; every device "
    "of a rider gets the rider's offers, acks and chat. Revoking one disconnects it at once and "
    "leaves the others connected."
    "\n\n"
    "Use it where a login is asked for; the password is in DATA_DIR/secrets/IDENTITY@LABEL (or "
    "printed with --show-password): `bloomwire shop watch --shop s1 --device till-2`; "
    "`bloomwire rider run r7 --device phone`; the shop dashboard and the rider web app take "
    "username s1@till-2 and its password; OwnTracks takes username r7@owntracks, its password "
    "and pubTopicBase owntracks/r7/%d (its default owntracks/%u/%d would name the device login, "
    "not the rider, and is refused)."
    "\n\n"
    "Change a device's password with `bloomwire accounts rotate s1@till-2`; removing the shop "
    "or rider removes its devices too."
)
device_app = typer.Typer(help=DEVICE_HELP, no_args_is_help=True)
accounts_app.add_typer(device_app, name="device")
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


Identity = Annotated[str, typer.Argument(help="The shop or rider the device acts as.")]
Label = Annotated[
    str | None,
    typer.Option(
        "--label",
        help="Names the device (letters, digits, _ . : -): the login is IDENTITY@LABEL. Default: d-<random>.",
        show_default=False,
    ),
]


@device_app.command("add")
def device_add(
    ctx: typer.Context,
    identity: Identity,
    label: Label = None,
    show_password: Show = False,
    offline: Offline = None,
) -> None:
    """A new device login IDENTITY@LABEL with the shop's or rider's rights."""
    try:
        with open_accounts(_settings(ctx), offline=offline) as accounts:
            cred = accounts.add_device(identity, label)
    except BloomwireError as exc:
        raise _fail(str(exc)) from None
    _report("added device login of", cred, show_password)


@device_app.command("list")
def device_list(
    ctx: typer.Context,
    identity: Annotated[
        str | None, typer.Argument(help="A shop or rider (default: every one).", show_default=False)
    ] = None,
    offline: Offline = None,
) -> None:
    """The device logins of a shop or rider (of all of them without IDENTITY)."""
    try:
        with open_accounts(_settings(ctx), offline=offline) as accounts:
            rows = accounts.devices(identity)
    except BloomwireError as exc:
        raise _fail(str(exc)) from None
    table = Table("username", "of", "label", title="Device logins")
    for row in rows:
        kind = row.kind.value if row.kind else "?"
        table.add_row(row.username, f"{kind} {row.identity}", row.device or "")
    console.print(table)
    console.print(f"{len(rows)} device login(s)")


@device_app.command("revoke")
def device_revoke(
    ctx: typer.Context,
    username: Annotated[str, typer.Argument(help="The device login, IDENTITY@LABEL.")],
    offline: Offline = None,
) -> None:
    """Delete one device login: disconnected at once, refused afterwards; the others stay."""
    try:
        with open_accounts(_settings(ctx), offline=offline) as accounts:
            info = accounts.revoke_device(username)
    except BloomwireError as exc:
        raise _fail(str(exc)) from None
    kind = info.kind.value if info.kind else "account"
    console.print(f"revoked device login {username} of {kind} {info.identity}")
    if accounts.cleared:
        console.print(f"cleared {len(accounts.cleared)} retained message(s) it left on the broker")


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
        kind = row.kind.value if row.kind else "?"
        table.add_row(row.username, f"{kind} device" if row.device else kind, ", ".join(row.roles))
    console.print(table)
    if hidden:
        console.print(f"and {hidden} customer device logins (--customers to list them)")


@accounts_app.command("remove")
def remove(ctx: typer.Context, username: Name, offline: Offline = None) -> None:
    """Delete an account and its role (a shop's or rider's device logins too); a connected
    client is disconnected at once."""
    try:
        with open_accounts(_settings(ctx), offline=offline) as accounts:
            devices = accounts.devices(username) if "@" not in username else []
            info = accounts.remove(username)
    except BloomwireError as exc:
        raise _fail(str(exc)) from None
    also = f" and its {len(devices)} device login(s)" if devices else ""
    console.print(f"removed {info.kind.value if info.kind else 'account'} {username}{also}")
    if accounts.cleared:
        console.print(f"cleared {len(accounts.cleared)} retained message(s) it left on the broker")


@accounts_app.command("rotate")
def rotate(ctx: typer.Context, username: Name, show_password: Show = False, offline: Offline = None) -> None:
    """A new password; the client is disconnected and must log in with the new one.

    A running service reads its password at start: restart it after rotating its account.
    The admin account is rotated with the broker stopped (--offline).
    """
    settings = _settings(ctx)
    try:
        with open_accounts(settings, offline=offline) as accounts:
            if username == policy.ADMIN and not isinstance(accounts.backend, DynsecFile):
                raise _fail("rotate admin with the broker stopped: bloomwire accounts rotate admin --offline")
            cred = accounts.rotate(username)
    except BloomwireError as exc:
        raise _fail(str(exc)) from None
    _report("rotated", cred, show_password)
    if cred.kind in (Kind.SERVICE, Kind.PROVISIONER, Kind.PERSISTER, Kind.OPERATOR, Kind.MONITOR):
        console.print("restart that service (it reads its password when it starts)")
