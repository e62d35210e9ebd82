"""Broker accounts: bootstrap before the broker starts, then add, remove, rotate and list.

Every identity of DESIGN.md §1 is a dynamic-security *client* (username + PBKDF2 hash) holding
the role(s) of :mod:`bloomwire.access.policy`. Passwords of shops, riders, services and the
fixed identities live in ``DATA_DIR/secrets/<username>`` (0600, directory 0700) and nowhere
else; customer device passwords are never written to disk (they travel once, on the shop-only
access topic or the customer's own inbox).

The provisioning component is the only holder of the dynsec admin credentials: ``admin`` (used
by ``bloomwire accounts``) and ``provisioner`` (the provisioner service), both in that folder.
"""

from __future__ import annotations

import contextlib
import re
import socket
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bloomwire.access import policy
from bloomwire.access.dynsec import Backend, ControlClient, DynsecError, DynsecFile, check
from bloomwire.access.policy import Kind, OrderRoleInfo
from bloomwire.contract.topics import check_id
from bloomwire.errors import BrokerError, TopicError
from bloomwire.runtime.broker import DYNSEC_NAME, SECRETS_DIR, ensure_secret, write_secret
from bloomwire.runtime.settings import Settings

#: The broker's own folder inside DATA_DIR (as the supervisor lays it out).
BROKER_DIR = "broker"
#: Page size when listing thousands of clients or roles over MQTT (keeps answers < 256 KiB).
LIST_PAGE = 500


def dynsec_path(data_dir: Path) -> Path:
    """Where the dynamic-security JSON of ``data_dir``'s broker lives."""
    return Path(data_dir) / BROKER_DIR / DYNSEC_NAME


@dataclass(frozen=True, slots=True)
class Credential:
    """A username, its password and where the password is kept (None: handed out, not kept)."""

    username: str
    password: str = field(repr=False)
    kind: Kind
    secret_path: Path | None = None


@dataclass(frozen=True, slots=True)
class AccountInfo:
    """One account as the broker knows it."""

    username: str
    kind: Kind | None
    roles: tuple[str, ...]


@dataclass
class OrderAccess:
    """The customer access of one order: its role and the device logins holding it."""

    shop: str
    order: str
    customer: str
    usernames: set[str] = field(default_factory=set)

    @property
    def role(self) -> str:
        """The order role's name."""
        return policy.role_name(Kind.CUSTOMER, self.shop, self.order)


def _create_role(role: policy.Role) -> dict[str, Any]:
    return {"command": "createRole", **role.to_json()}


def _customer_roles(order_role: str) -> list[dict[str, Any]]:
    return [
        {"rolename": policy.CUSTOMERS_ROLE, "priority": policy.CUSTOMERS_ROLE_PRIORITY},
        {"rolename": order_role},
    ]


class Accounts:
    """Account operations over a :class:`~bloomwire.access.dynsec.Backend` (live or file)."""

    def __init__(self, backend: Backend, data_dir: Path | None = None) -> None:
        self.backend = backend
        self.data_dir = Path(data_dir) if data_dir is not None else None

    def close(self) -> None:
        """Close the backend (saves the file / disconnects)."""
        self.backend.close()

    def __enter__(self) -> Accounts:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # --- shops, riders, services ------------------------------------------------------------

    def add_shop(self, shop: str) -> Credential:
        """A new shop terminal account: writes ``shops/S/commands/#``, reads ``shops/S/#``."""
        return self._add(Kind.SHOP, shop)

    def add_rider(self, rider: str) -> Credential:
        """A new rider account: writes ``riders/R/#``, ``owntracks/R/#``; reads its inbox."""
        return self._add(Kind.RIDER, rider)

    def add_service(self, name: str) -> Credential:
        """A new backbone service account (``services/N/events``, reads canonical topics)."""
        return self._add(Kind.SERVICE, name)

    def _add(self, kind: Kind, name: str) -> Credential:
        policy.check_account_name(name, kind.value)
        if name in policy.RESERVED:
            raise TopicError(f"{kind.value} name {name!r} is reserved for the backbone")
        (role,) = policy.roles_for(kind, name)
        password = policy.new_password()
        responses = self.backend.execute(
            [
                _create_role(role),
                {
                    "command": "createClient",
                    "username": name,
                    "password": password,
                    "roles": [{"rolename": role.name}],
                },
            ]
        )
        if responses[1].get("error") == "Client already exists":
            raise DynsecError("createClient", f"an account named {name!r} already exists (use rotate)")
        check(responses, ok={"Role already exists"})
        if responses[0].get("error"):  # a role left behind: bring its ACLs to today's policy
            check(self.backend.execute([{"command": "modifyRole", **role.to_json()}]))
        return Credential(name, password, kind, self._keep(name, password))

    def _keep(self, username: str, password: str) -> Path | None:
        if self.data_dir is None:
            return None
        return write_secret(self.data_dir, username, password)

    def _forget(self, username: str) -> None:
        if self.data_dir is not None:
            (self.data_dir / SECRETS_DIR / username).unlink(missing_ok=True)

    def get(self, username: str) -> AccountInfo:
        """One account, or :class:`DynsecError` ``Client not found``."""
        (r,) = check(self.backend.execute([{"command": "getClient", "username": username}]))
        client = r["data"]["client"]
        roles = tuple(str(x["rolename"]) for x in client.get("roles", []))
        return AccountInfo(username, policy.kind_of(username, roles), roles)

    def remove(self, username: str) -> AccountInfo:
        """Delete an account (a connected client is disconnected at once) and its own role."""
        check_id(username, "username")
        info = self.get(username)
        if info.kind in policy.FIXED_KINDS:
            raise BrokerError(f"{username!r} is a fixed backbone identity; rotate it instead")
        commands: list[dict[str, Any]] = [{"command": "deleteClient", "username": username}]
        if info.kind in (Kind.SHOP, Kind.RIDER, Kind.SERVICE):
            # Clients first: 2.0.11 leaves dangling role pointers in clients of a deleted role.
            commands.append({"command": "deleteRole", "rolename": policy.role_name(info.kind, username)})
        check(self.backend.execute(commands), ok={"Role not found"})
        self._forget(username)
        return info

    def rotate(self, username: str) -> Credential:
        """A new password (the plugin disconnects the client; it must log in again with it)."""
        check_id(username, "username")
        info = self.get(username)
        password = policy.new_password()
        check(
            self.backend.execute(
                [{"command": "setClientPassword", "username": username, "password": password}]
            )
        )
        kept = None if info.kind is Kind.CUSTOMER else self._keep(username, password)
        return Credential(username, password, info.kind or Kind.SERVICE, kept)

    def list(self) -> list[AccountInfo]:
        """Every account (customers included), in the broker's order."""
        out = []
        for client in self._all("listClients", "clients"):
            roles = tuple(str(x["rolename"]) for x in client.get("roles", []))
            out.append(AccountInfo(client["username"], policy.kind_of(client["username"], roles), roles))
        return out

    def _all(self, command: str, key: str) -> Iterator[dict[str, Any]]:
        offset = 0
        while True:
            (r,) = check(
                self.backend.execute(
                    [{"command": command, "verbose": True, "count": LIST_PAGE, "offset": offset}]
                )
            )
            rows = r["data"][key]
            yield from rows
            offset += len(rows)
            if not rows or offset >= int(r["data"]["totalCount"]):
                return

    # --- customers ------------------------------------------------------------------------------

    def mint_customer(
        self, shop: str, order: str, customer: str | None = None
    ) -> tuple[OrderAccess, Credential]:
        """Create order O's customer role and its first device login (2 commands, 1 message).

        Idempotent for the role (a redelivered ``created`` reuses it); every call mints a new
        login, which the caller hands out.
        """
        customer = policy.customer_id(order) if customer is None else customer
        role = policy.order_role(shop, order, customer)
        login = Credential(policy.new_device_username(), policy.new_password(), Kind.CUSTOMER)
        responses = self.backend.execute(
            [
                _create_role(role),
                {
                    "command": "createClient",
                    "username": login.username,
                    "password": login.password,
                    "roles": _customer_roles(role.name),
                },
            ]
        )
        check(responses, ok={"Role already exists"})
        return OrderAccess(shop, order, customer, {login.username}), login

    def add_device(self, access: OrderAccess) -> Credential:
        """One more device login for an order that already has its role."""
        login = Credential(policy.new_device_username(), policy.new_password(), Kind.CUSTOMER)
        check(
            self.backend.execute(
                [
                    {
                        "command": "createClient",
                        "username": login.username,
                        "password": login.password,
                        "roles": _customer_roles(access.role),
                    }
                ]
            )
        )
        access.usernames.add(login.username)
        return login

    def revoke_customer(self, access: OrderAccess) -> None:
        """Delete every device login of the order (each is disconnected at once), then its role."""
        commands: list[dict[str, Any]] = [
            {"command": "deleteClient", "username": u} for u in sorted(access.usernames)
        ]
        commands.append({"command": "deleteRole", "rolename": access.role})
        check(self.backend.execute(commands), ok={"Client not found", "Role not found"})
        access.usernames.clear()

    def order_accesses(self) -> dict[str, OrderAccess]:
        """Every order role and its device logins, by role name (read from the broker)."""
        found: dict[str, OrderAccess] = {}
        for role in self._all("listRoles", "roles"):
            info = policy.parse_order_role(str(role["rolename"]), role.get("acls", []))
            if info is not None:
                found[role["rolename"]] = OrderAccess(info.shop, info.order, info.customer)
        for client in self._all("listClients", "clients"):
            for ref in client.get("roles", []):
                access = found.get(str(ref["rolename"]))
                if access is not None:
                    access.usernames.add(str(client["username"]))
        return found

    def order_access(self, shop: str, order: str) -> OrderAccess | None:
        """The access of one order (scans the clients: slow with thousands; prefer an index)."""
        name = policy.role_name(Kind.CUSTOMER, check_id(shop, "shop"), check_id(order, "order"))
        (r,) = self.backend.execute([{"command": "getRole", "rolename": name}])
        if r.get("error") == "Role not found":
            return None
        check([r])
        info = policy.parse_order_role(name, r["data"]["role"].get("acls", []))
        assert info is not None
        access = OrderAccess(info.shop, info.order, info.customer)
        for client in self._all("listClients", "clients"):
            if any(ref["rolename"] == name for ref in client.get("roles", [])):
                access.usernames.add(str(client["username"]))
        return access


# --- bootstrap (broker stopped) -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bootstrap:
    """What :func:`bootstrap` set up."""

    config_path: Path
    secrets_dir: Path
    accounts: dict[str, Kind]


def _fixed(services: Iterable[str]) -> list[tuple[str, Kind]]:
    out = [
        (policy.ADMIN, Kind.ADMIN),
        (policy.PROVISIONER, Kind.PROVISIONER),
        (policy.OPERATOR, Kind.OPERATOR),
        (policy.PERSISTER, Kind.PERSISTER),
        (policy.MONITOR, Kind.MONITOR),
    ]
    for name in services:
        if name not in policy.RESERVED:
            out.append((policy.check_account_name(name, "service"), Kind.SERVICE))
    return out


def bootstrap(
    data_dir: Path,
    *,
    shops: Sequence[str] = (),
    riders: Sequence[str] = (),
    services: Sequence[str] = policy.DEFAULT_SERVICES,
    config_path: Path | None = None,
) -> Bootstrap:
    """Create or update the dynamic-security file BEFORE the broker starts; idempotent.

    Makes sure the admin, the provisioner, the operator, the persister, each service, shop and
    rider exist with today's roles and the password kept in ``data_dir/secrets/<name>``
    (created 0600 on first run, kept afterwards). Sets every default ACL access to deny (except
    unsubscribe). Customer roles and logins already in the file are left alone. Never run it
    while a broker uses the file: the plugin reads it only at start and rewrites it whole.
    """
    data_dir = Path(data_dir)
    path = config_path or dynsec_path(data_dir)
    wanted = _fixed(services)
    wanted += [(policy.check_account_name(s, "shop"), Kind.SHOP) for s in shops]
    wanted += [(policy.check_account_name(r, "rider"), Kind.RIDER) for r in riders]
    clash = [
        n for n, k in wanted[len(policy.FIXED_KINDS) :] if n in policy.RESERVED and k is not Kind.SERVICE
    ]
    if clash:
        raise TopicError(f"reserved names cannot be shops or riders: {', '.join(clash)}")
    seen: dict[str, Kind] = {}
    for name, kind in wanted:
        if seen.setdefault(name, kind) is not kind:
            raise TopicError(f"{name!r} is asked for as both {seen[name].value} and {kind.value}")
    store = DynsecFile(path)
    store.put_role(policy.CUSTOMERS_ROLE, [a.to_json() for a in policy.customers_role().acls])
    for name, kind in wanted:
        roles = policy.roles_for(kind, name)
        for role in roles:
            store.put_role(role.name, [a.to_json() for a in role.acls])
        store.put_client(name, ensure_secret(data_dir, name), [{"rolename": r.name} for r in roles])
    store.set_default_acl_access(policy.DEFAULT_ACL_ACCESS)
    store.save()
    return Bootstrap(path, data_dir / SECRETS_DIR, dict(wanted))


# --- opening a backend --------------------------------------------------------------------------

_LISTENER_RE = re.compile(r"^listener (\d+) (\S+)$", re.MULTILINE)


def running_broker(data_dir: Path) -> tuple[str, int] | None:
    """Host and port of the broker the supervisor runs for ``data_dir``, if it accepts connections."""
    conf = Path(data_dir) / BROKER_DIR / "mosquitto.conf"
    try:
        found = _LISTENER_RE.search(conf.read_text(encoding="utf-8"))
    except OSError:
        return None
    if found is None:
        return None
    port, address = int(found.group(1)), found.group(2)
    host = "127.0.0.1" if address in ("0.0.0.0", "") else address
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return host, port
    except OSError:
        return None


def connect_admin(settings: Settings, host: str, port: int, username: str = policy.ADMIN) -> ControlClient:
    """A live control connection as ``username`` (password from the secrets folder)."""
    secret = Path(settings.data_dir) / SECRETS_DIR / username
    try:
        password = secret.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise BrokerError(
            f"no {username} password in {secret}: this data dir was never bootstrapped for access "
            "control (run `bloomwire up` once)"
        ) from exc
    return ControlClient(
        host, port, username, password, tls=settings.broker_tls, ca_file=settings.broker_ca_file
    ).connect()


@contextlib.contextmanager
def open_accounts(settings: Settings, *, offline: bool | None = None) -> Iterator[Accounts]:
    """Accounts on the running broker (settings' port, else the supervisor's), else on the file.

    ``offline=True`` forces editing the file (the broker must be stopped); ``False`` forces live.
    """
    data_dir = Path(settings.data_dir)
    where: tuple[str, int] | None = None
    if offline is not True:
        if settings.external_broker:
            where = (settings.broker_host, settings.broker_port)
        else:
            where = running_broker(data_dir)
        if where is None and offline is False:
            raise BrokerError(
                "no running broker found: start it (`bloomwire up`) or set BLOOMWIRE_BROKER_PORT"
            )
    backend: Backend
    if where is not None:
        backend = connect_admin(settings, *where)
    else:
        bootstrap(data_dir)
        backend = DynsecFile(dynsec_path(data_dir))
    accounts = Accounts(backend, data_dir)
    try:
        yield accounts
    finally:
        accounts.close()


__all__ = [
    "AccountInfo",
    "Accounts",
    "Bootstrap",
    "Credential",
    "OrderAccess",
    "OrderRoleInfo",
    "bootstrap",
    "connect_admin",
    "dynsec_path",
    "open_accounts",
    "running_broker",
]
