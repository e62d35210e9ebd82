"""Broker accounts: bootstrap before the broker starts, then add, remove, rotate and list.

Every identity of docs/design.md §1 is a dynamic-security *client* (username + PBKDF2 hash) holding
the role(s) of :mod:`bloomwire.access.policy`; a shop or rider may have device logins
(``s1@till-2``) holding its role too. Passwords of shops, riders, their devices, services and
the fixed identities live in ``DATA_DIR/secrets/<username>`` (0600, directory 0700) and nowhere
else; customer device passwords are never written to disk (they travel once, on the shop-only
access topic or the customer's own inbox).

The provisioning component is the only holder of the dynsec admin credentials: ``admin`` (used
by ``bloomwire accounts``) and ``provisioner`` (the provisioner service), both in that folder.
What each operation sends the plugin is in :mod:`bloomwire.access.operations`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import socket
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bloomwire.access import operations as ops
from bloomwire.access import policy, retired
from bloomwire.access.dynsec import AsyncBackend, Backend, ControlClient, DynsecFile
from bloomwire.access.operations import AccountInfo, Credential, Minted, MintRequest, OrderAccess
from bloomwire.access.policy import Kind, OrderRoleInfo
from bloomwire.errors import BrokerError, TopicError
from bloomwire.runtime.broker import DYNSEC_NAME, SECRETS_DIR, ensure_secret, write_secret
from bloomwire.runtime.settings import Settings

#: The broker's own folder inside DATA_DIR (as the supervisor lays it out).
BROKER_DIR = "broker"
LIST_PAGE = ops.LIST_PAGE


def dynsec_path(data_dir: Path) -> Path:
    """Where the dynamic-security JSON of ``data_dir``'s broker lives."""
    return Path(data_dir) / BROKER_DIR / DYNSEC_NAME


class Accounts:
    """Account operations over a blocking :class:`~bloomwire.access.dynsec.Backend` (live or
    file); with ``data_dir`` the passwords of shops, riders, devices and services are kept in
    its secrets folder."""

    def __init__(self, backend: Backend, data_dir: Path | None = None) -> None:
        self.backend = backend
        self.data_dir = Path(data_dir) if data_dir is not None else None
        #: The retained topics the last removal cleared.
        self.cleared: list[str] = []

    def close(self) -> None:
        """Close the backend (saves the file / disconnects)."""
        self.backend.close()

    def __enter__(self) -> Accounts:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _keep(self, cred: Credential) -> Credential:
        if self.data_dir is None or cred.kind is Kind.CUSTOMER:
            return cred
        return dataclasses.replace(
            cred, secret_path=write_secret(self.data_dir, cred.username, cred.password)
        )

    def _forget(self, username: str) -> None:
        if self.data_dir is not None:
            (self.data_dir / SECRETS_DIR / username).unlink(missing_ok=True)

    # --- shops, riders, services ------------------------------------------------------------

    def add_shop(self, shop: str) -> Credential:
        """A new shop terminal account: writes ``shops/S/commands/#``, reads ``shops/S/#``."""
        return self._keep(ops.run(ops.add_identity(Kind.SHOP, shop), self.backend))

    def add_rider(self, rider: str) -> Credential:
        """A new rider account: writes ``riders/R/#``, ``owntracks/R/#``; reads its inbox."""
        return self._keep(ops.run(ops.add_identity(Kind.RIDER, rider), self.backend))

    def add_service(self, name: str) -> Credential:
        """A new backbone service account (``services/N/events``, reads canonical topics)."""
        return self._keep(ops.run(ops.add_identity(Kind.SERVICE, name), self.backend))

    def get(self, username: str) -> AccountInfo:
        """One account, or :class:`DynsecError` ``Client not found``."""
        return ops.run(ops.get_account(username), self.backend)

    def remove(self, username: str) -> AccountInfo:
        """Delete an account (a connected client is disconnected at once) and its own role; a
        shop's or rider's device logins go with it, and so does what a rider left retained."""
        info, devices = ops.run(ops.remove_account(username), self.backend)
        for name in (username, *devices):
            self._forget(name)
        self._clear_retained(username, info.kind)
        return info

    def _clear_retained(self, username: str, kind: Kind | None) -> None:
        """Clear a removed rider's or device's retained messages (:mod:`.retired`); on a live
        broker only (offline, the broker holding them is not running)."""
        if isinstance(self.backend, ControlClient):
            self.cleared = retired.clear(self.backend, retired.filters_of(username, kind))

    def rotate(self, username: str) -> Credential:
        """A new password (the plugin disconnects the client; it must log in again with it)."""
        return self._keep(ops.run(ops.rotate_password(username), self.backend))

    # --- device logins of shops and riders ----------------------------------------------------

    def add_device(self, identity: str, label: str | None = None) -> Credential:
        """A device login ``IDENTITY@LABEL`` with the shop's or rider's rights (label made up if
        None); its password is kept like the identity's."""
        return self._keep(ops.run(ops.add_device(identity, label), self.backend))

    def devices(self, identity: str | None = None) -> list[AccountInfo]:
        """The device logins of ``identity`` (of every shop and rider if None)."""
        return ops.run(ops.list_devices(identity), self.backend)

    def revoke_device(self, username: str) -> AccountInfo:
        """Delete one device login (disconnected at once); the identity's others stay."""
        info = ops.run(ops.revoke_device(username), self.backend)
        self._forget(username)
        self._clear_retained(username, info.kind)
        return info

    # --- customers ------------------------------------------------------------------------------

    def mint_customer(
        self, shop: str, order: str, customer: str | None = None
    ) -> tuple[OrderAccess, Credential]:
        """Order O's customer role and first device login (see :func:`operations.mint_customer`)."""
        return ops.run(ops.mint_customer(shop, order, customer), self.backend)

    def add_customer_device(self, access: OrderAccess) -> Credential:
        """One more device login for an order that already has its role."""
        return ops.run(ops.add_customer_device(access), self.backend)

    def revoke_customer(self, access: OrderAccess) -> None:
        """Delete every device login of the order (each is disconnected at once), then its role."""
        ops.run(ops.revoke_customer(access), self.backend)

    def order_accesses(self) -> dict[str, OrderAccess]:
        """Every order role and its device logins, by role name (read from the broker)."""
        return ops.run(ops.order_accesses(), self.backend)

    def order_access(self, shop: str, order: str) -> OrderAccess | None:
        """The access of one order (scans the clients: slow with thousands; prefer an index)."""
        return ops.run(ops.order_access(shop, order), self.backend)

    # ``list`` last: below it, ``list[...]`` in an annotation would name this method.
    def list(self) -> list[AccountInfo]:
        """Every account (customers and devices included), in the broker's order."""
        return ops.run(ops.list_accounts(), self.backend)


class AsyncAccounts:
    """The customer-access operations over a non-blocking backend (the provisioner's own
    connection, :class:`~bloomwire.access.dynsec.ControlChannel`)."""

    def __init__(self, backend: AsyncBackend) -> None:
        self.backend = backend

    async def mint_customer(
        self, shop: str, order: str, customer: str | None = None
    ) -> tuple[OrderAccess, Credential]:
        """Order O's customer role and first device login (see :func:`operations.mint_customer`)."""
        return await ops.run_async(ops.mint_customer(shop, order, customer), self.backend)

    async def mint_customers(self, requests: Sequence[MintRequest]) -> list[Minted]:
        """Several orders' accesses in one control message (see :func:`operations.mint_customers`)."""
        return await ops.run_async(ops.mint_customers(requests), self.backend)

    async def add_customer_device(self, access: OrderAccess) -> Credential:
        """One more device login for an order that already has its role."""
        return await ops.run_async(ops.add_customer_device(access), self.backend)

    async def revoke_customer(self, access: OrderAccess) -> None:
        """Delete every device login of the order (each is disconnected at once), then its role."""
        await ops.run_async(ops.revoke_customer(access), self.backend)

    async def order_accesses(self) -> dict[str, OrderAccess]:
        """Every order role and its device logins, by role name (read from the broker)."""
        return await ops.run_async(ops.order_accesses(), self.backend)


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
    "AsyncAccounts",
    "Bootstrap",
    "Credential",
    "MintRequest",
    "Minted",
    "OrderAccess",
    "OrderRoleInfo",
    "bootstrap",
    "connect_admin",
    "dynsec_path",
    "open_accounts",
    "running_broker",
]
