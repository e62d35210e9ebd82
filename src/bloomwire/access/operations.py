"""Account operations as plans of dynamic-security commands, without I/O.

A plan is a generator: it yields a batch of commands, is sent the plugin's responses to that
batch, and returns its result. :func:`run` carries one out on a blocking
:class:`~bloomwire.access.dynsec.Backend` (the plugin's file, a :class:`ControlClient`),
:func:`run_async` on an :class:`~bloomwire.access.dynsec.AsyncBackend` (a service's own
connection). So what minting a customer access or adding a device means is said once, however
the commands travel. Plans keep no secrets: :class:`~bloomwire.access.accounts.Accounts` does.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bloomwire.access import policy
from bloomwire.access.dynsec import AsyncBackend, Backend, Command, DynsecError, Response, check
from bloomwire.access.policy import Kind
from bloomwire.contract.topics import check_id
from bloomwire.errors import BrokerError, TopicError

#: Page size when listing thousands of clients or roles over MQTT (keeps answers < 256 KiB).
LIST_PAGE = 500

T = TypeVar("T")
Plan = Generator[list[Command], list[Response], T]


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

    @property
    def device(self) -> str | None:
        """The label of a shop's or rider's device login (``s1@till-2``: ``till-2``), else None."""
        split = policy.split_device(self.username) if self.kind in policy.DEVICE_KINDS else None
        return split[1] if split is not None else None

    @property
    def identity(self) -> str:
        """Whom the account acts as: a device's shop or rider, else its own username."""
        split = policy.split_device(self.username) if self.kind in policy.DEVICE_KINDS else None
        return split[0] if split is not None else self.username


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


# --- carrying plans out -------------------------------------------------------------------------


def run(plan: Plan[T], backend: Backend) -> T:
    """Carry ``plan`` out on a blocking backend."""
    try:
        batch = next(plan)
        while True:
            batch = plan.send(backend.execute(batch))
    except StopIteration as done:
        result: T = done.value
        return result


async def run_async(plan: Plan[T], backend: AsyncBackend) -> T:
    """Carry ``plan`` out on a non-blocking backend."""
    try:
        batch = next(plan)
        while True:
            batch = plan.send(await backend.execute(batch))
    except StopIteration as done:
        result: T = done.value
        return result


# --- helpers ------------------------------------------------------------------------------------


def _create_role(role: policy.Role) -> dict[str, Any]:
    return {"command": "createRole", **role.to_json()}


def _customer_roles(order_role: str) -> list[dict[str, Any]]:
    return [
        {"rolename": policy.CUSTOMERS_ROLE, "priority": policy.CUSTOMERS_ROLE_PRIORITY},
        {"rolename": order_role},
    ]


def _info(client: dict[str, Any]) -> AccountInfo:
    roles = tuple(str(x["rolename"]) for x in client.get("roles", []))
    username = str(client["username"])
    return AccountInfo(username, policy.kind_of(username, roles), roles)


def list_all(command: str, key: str) -> Plan[list[dict[str, Any]]]:
    """Every row of a paged ``listClients``/``listRoles`` (verbose)."""
    rows: list[dict[str, Any]] = []
    while True:
        (r,) = check((yield [{"command": command, "verbose": True, "count": LIST_PAGE, "offset": len(rows)}]))
        page = r["data"][key]
        rows += page
        if not page or len(rows) >= int(r["data"]["totalCount"]):
            return rows


# --- shops, riders, services --------------------------------------------------------------------


def add_identity(kind: Kind, name: str) -> Plan[Credential]:
    """A shop, rider or service account with its own role (a leftover role is brought up to date)."""
    policy.check_account_name(name, kind.value)
    if name in policy.RESERVED:
        raise TopicError(f"{kind.value} name {name!r} is reserved for the backbone")
    (role,) = policy.roles_for(kind, name)
    password = policy.new_password()
    client = {
        "command": "createClient",
        "username": name,
        "password": password,
        "roles": [{"rolename": role.name}],
    }
    responses = yield [_create_role(role), client]
    if responses[1].get("error") == "Client already exists":
        raise DynsecError("createClient", f"an account named {name!r} already exists (use rotate)")
    check(responses, ok={"Role already exists"})
    if responses[0].get("error"):  # a role left behind: bring its ACLs to today's policy
        check((yield [{"command": "modifyRole", **role.to_json()}]))
    return Credential(name, password, kind)


def get_account(username: str) -> Plan[AccountInfo]:
    """One account, or :class:`DynsecError` ``Client not found``."""
    (r,) = check((yield [{"command": "getClient", "username": username}]))
    return _info(r["data"]["client"])


def list_accounts() -> Plan[list[AccountInfo]]:
    """Every account (customers and devices included), in the broker's order."""
    return [_info(c) for c in (yield from list_all("listClients", "clients"))]


def remove_account(username: str) -> Plan[tuple[AccountInfo, list[str]]]:
    """Delete an account (a connected client is disconnected at once) with its own role and, for a
    shop or rider, its device logins; returns the account and the device usernames deleted."""
    check_id(username, "username")
    info = yield from get_account(username)
    if info.kind in policy.FIXED_KINDS:
        raise BrokerError(f"{username!r} is a fixed backbone identity; rotate it instead")
    devices: list[str] = []
    commands: list[Command] = [{"command": "deleteClient", "username": username}]
    if info.kind in (Kind.SHOP, Kind.RIDER, Kind.SERVICE) and info.device is None:
        if info.kind in policy.DEVICE_KINDS:
            devices = [d.username for d in (yield from list_devices(username))]
        commands += [{"command": "deleteClient", "username": d} for d in devices]
        # Clients first: 2.0.11 leaves dangling role pointers in clients of a deleted role, and a
        # device left pointing at it would get its rights back with a new account of that name.
        commands.append({"command": "deleteRole", "rolename": policy.role_name(info.kind, username)})
    check((yield commands), ok={"Role not found", "Client not found"})
    return info, devices


def rotate_password(username: str) -> Plan[Credential]:
    """A new password (the plugin disconnects the client; it must log in again with it)."""
    check_id(username, "username")
    info = yield from get_account(username)
    password = policy.new_password()
    check((yield [{"command": "setClientPassword", "username": username, "password": password}]))
    return Credential(username, password, info.kind or Kind.SERVICE)


# --- device logins of shops and riders ----------------------------------------------------------


def add_device(identity: str, label: str | None = None) -> Plan[Credential]:
    """A device login ``IDENTITY@LABEL`` holding the shop's or rider's own role.

    Its own username, so its own MQTT session: the shop's terminals and dashboard, the rider's
    app and OwnTracks stay connected side by side, each with exactly the identity's rights.
    """
    username = policy.device_username(identity, label or policy.new_device_label())
    try:
        info = yield from get_account(identity)
    except DynsecError as exc:
        if exc.error != "Client not found":
            raise
        raise BrokerError(f"no shop or rider named {identity!r} (add it first)") from None
    if info.kind not in policy.DEVICE_KINDS or info.device is not None:
        what = info.kind.value if info.kind else "account of unknown kind"
        raise BrokerError(f"{identity!r} is a {what}: only shops and riders have device logins")
    password = policy.new_password()
    role = policy.role_name(info.kind, identity)
    client = {
        "command": "createClient",
        "username": username,
        "password": password,
        "roles": [{"rolename": role}],
        "textname": f"device of {info.kind.value} {identity}",
    }
    responses = yield [client]
    if responses[0].get("error") == "Client already exists":
        raise DynsecError("createClient", f"{username!r} exists already (revoke it, or choose another label)")
    check(responses)
    return Credential(username, password, info.kind)


def list_devices(identity: str | None = None) -> Plan[list[AccountInfo]]:
    """The device logins of ``identity`` (every shop's and rider's if None)."""
    accounts = yield from list_accounts()
    return [a for a in accounts if a.device is not None and identity in (None, a.identity)]


def revoke_device(username: str) -> Plan[AccountInfo]:
    """Delete one device login: the broker disconnects it at once; its identity's other logins
    are untouched."""
    check_id(username, "username")
    info = yield from get_account(username)
    if info.device is None:
        raise BrokerError(
            f"{username!r} is not a device login (those are SHOP@LABEL or RIDER@LABEL; "
            "see `bloomwire accounts device list`)"
        )
    check((yield [{"command": "deleteClient", "username": username}]))
    return info


# --- customers ----------------------------------------------------------------------------------


def mint_customer(shop: str, order: str, customer: str | None = None) -> Plan[tuple[OrderAccess, Credential]]:
    """Create order O's customer role and its first device login (2 commands, 1 message).

    Idempotent for the role (a redelivered ``created`` reuses it); every call mints a new
    login, which the caller hands out.
    """
    customer = policy.customer_id(order) if customer is None else customer
    role = policy.order_role(shop, order, customer)
    login = Credential(policy.new_device_username(), policy.new_password(), Kind.CUSTOMER)
    client = {
        "command": "createClient",
        "username": login.username,
        "password": login.password,
        "roles": _customer_roles(role.name),
    }
    check((yield [_create_role(role), client]), ok={"Role already exists"})
    return OrderAccess(shop, order, customer, {login.username}), login


@dataclass(frozen=True, slots=True)
class MintRequest:
    """One order whose customer access is wanted (``customer`` None: the default id)."""

    shop: str
    order: str
    customer: str | None = None


@dataclass(frozen=True, slots=True)
class Minted:
    """What became of one :class:`MintRequest`: its access and first login, or the error."""

    request: MintRequest
    access: OrderAccess | None = None
    login: Credential | None = None
    error: str | None = None


def _mint_commands(req: MintRequest) -> tuple[list[Command], OrderAccess, Credential]:
    customer = policy.customer_id(req.order) if req.customer is None else req.customer
    role = policy.order_role(req.shop, req.order, customer)  # refuses bad ids: nothing is sent
    login = Credential(policy.new_device_username(), policy.new_password(), Kind.CUSTOMER)
    client = {
        "command": "createClient",
        "username": login.username,
        "password": login.password,
        "roles": _customer_roles(role.name),
    }
    return [_create_role(role), client], OrderAccess(req.shop, req.order, customer, {login.username}), login


def _mint_error(role: Response, client: Response) -> str | None:
    """The first error of one order's two answers (a role already there is fine: a retry)."""
    if role.get("error") and role["error"] != "Role already exists":
        return f"createRole: {role['error']}"
    if client.get("error"):
        return f"createClient: {client['error']}"
    return None


def mint_customers(requests: Sequence[MintRequest]) -> Plan[list[Minted]]:
    """Several orders' customer roles and first logins in ONE control message (2 commands each).

    Each order's result stands on its own: a refused id or a command the plugin refused fails
    that order only (``Minted.error``), the others are minted. Why one message: the plugin
    answers it in one pass, so the round trip and the provisioner's own work are paid once per
    batch; it still rewrites its file after every command (Mosquitto 2.0.11), so the broker's
    work per order is the same.
    """
    commands: list[Command] = []
    sent: list[tuple[int, OrderAccess, Credential]] = []
    out = [Minted(req) for req in requests]
    for i, req in enumerate(requests):
        try:
            cmds, access, login = _mint_commands(req)
        except TopicError as exc:
            out[i] = Minted(req, error=str(exc))
            continue
        commands += cmds
        sent.append((i, access, login))
    responses = (yield commands) if commands else []
    for k, (i, access, login) in enumerate(sent):
        error = _mint_error(responses[2 * k], responses[2 * k + 1])
        out[i] = Minted(requests[i], error=error) if error else Minted(requests[i], access, login)
    return out


def add_customer_device(access: OrderAccess) -> Plan[Credential]:
    """One more device login for an order that already has its role (added to ``access``)."""
    login = Credential(policy.new_device_username(), policy.new_password(), Kind.CUSTOMER)
    client = {
        "command": "createClient",
        "username": login.username,
        "password": login.password,
        "roles": _customer_roles(access.role),
    }
    check((yield [client]))
    access.usernames.add(login.username)
    return login


def revoke_customer(access: OrderAccess) -> Plan[None]:
    """Delete every device login of the order (each is disconnected at once), then its role."""
    commands: list[Command] = [{"command": "deleteClient", "username": u} for u in sorted(access.usernames)]
    commands.append({"command": "deleteRole", "rolename": access.role})
    check((yield commands), ok={"Client not found", "Role not found"})
    access.usernames.clear()


def order_accesses() -> Plan[dict[str, OrderAccess]]:
    """Every order role and its device logins, by role name (read from the broker)."""
    found: dict[str, OrderAccess] = {}
    for role in (yield from list_all("listRoles", "roles")):
        info = policy.parse_order_role(str(role["rolename"]), role.get("acls", []))
        if info is not None:
            found[role["rolename"]] = OrderAccess(info.shop, info.order, info.customer)
    for client in (yield from list_all("listClients", "clients")):
        for ref in client.get("roles", []):
            access = found.get(str(ref["rolename"]))
            if access is not None:
                access.usernames.add(str(client["username"]))
    return found


def order_access(shop: str, order: str) -> Plan[OrderAccess | None]:
    """The access of one order (scans the clients: slow with thousands; prefer an index)."""
    name = policy.role_name(Kind.CUSTOMER, check_id(shop, "shop"), check_id(order, "order"))
    (r,) = yield [{"command": "getRole", "rolename": name}]
    if r.get("error") == "Role not found":
        return None
    check([r])
    info = policy.parse_order_role(name, r["data"]["role"].get("acls", []))
    assert info is not None
    access = OrderAccess(info.shop, info.order, info.customer)
    for client in (yield from list_all("listClients", "clients")):
        if any(ref["rolename"] == name for ref in client.get("roles", [])):
            access.usernames.add(str(client["username"]))
    return access
