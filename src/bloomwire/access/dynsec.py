"""Ways to run dynamic-security commands: on the plugin's JSON file, or on a live broker.

All take the plugin's own command objects (``{"command": "createClient", ...}``, see
mosquitto's ``plugins/dynamic-security/README.md``) and return its response objects, so the
code above them (:mod:`bloomwire.access.operations`) does not care which one it talks to.

* :class:`DynsecFile` edits ``dynamic-security.json`` while the broker is STOPPED (bootstrap,
  offline ``bloomwire accounts``). The plugin reads the file only at start-up and rewrites it
  whole on every change, so editing it under a running broker would be lost.
* :class:`ControlClient` publishes to ``$CONTROL/dynamic-security/v1`` and waits for the answer
  on ``.../response``, matched by ``correlationData`` (every admin connection receives every
  answer). Changes apply at once; the plugin kicks a client whose password or roles change
  or who is deleted.
* :class:`ControlChannel` does the same without blocking, over a service's own connection (the
  provisioner's).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from bloomwire.contract import topics
from bloomwire.errors import BrokerError
from bloomwire.runtime.mqtt import Connection
from bloomwire.runtime.request import Requests

REQUEST_TOPIC = topics.DYNSEC_CONTROL
RESPONSE_TOPIC = topics.DYNSEC_RESPONSE
#: What the plugin (2.0.11) writes for a new client: PBKDF2-SHA512, 101 rounds, 12-byte salt.
HASH_ITERATIONS = 101
SALT_BYTES = 12
DEFAULT_TIMEOUT_S = 30.0
MAX_UNCLAIMED_PUBACKS = 1000

Command = Mapping[str, Any]
Response = dict[str, Any]


class DynsecError(BrokerError):
    """A dynamic-security command failed (``error`` is the plugin's own message)."""

    def __init__(self, command: str, error: str, detail: str = "") -> None:
        super().__init__(f"{command}: {error}{f' ({detail})' if detail else ''}")
        self.command = command
        self.error = error


class Backend(Protocol):
    """Runs a list of dynamic-security commands and returns one response per command."""

    def execute(self, commands: Sequence[Command]) -> list[Response]:
        """Run ``commands`` in order; each response has ``command`` and maybe ``error``/``data``."""
        ...

    def close(self) -> None:
        """Release the connection or file."""
        ...


def check(responses: Sequence[Response], *, ok: Iterable[str] = ()) -> list[Response]:
    """Raise :class:`DynsecError` for the first response whose error is not in ``ok``."""
    allowed = set(ok)
    for r in responses:
        error = r.get("error")
        if error and error not in allowed:
            raise DynsecError(str(r.get("command", "?")), str(error))
    return list(responses)


def hash_password(password: str, *, salt: bytes | None = None) -> dict[str, Any]:
    """The ``password``/``salt``/``iterations`` fields of a client in the plugin's JSON."""
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, HASH_ITERATIONS)
    return {
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": HASH_ITERATIONS,
    }


def verify_password(password: str, client: Mapping[str, Any]) -> bool:
    """True if ``client`` (a JSON client entry) has ``password``."""
    try:
        salt = base64.b64decode(str(client["salt"]))
        expected = base64.b64decode(str(client["password"]))
        rounds = int(client.get("iterations", HASH_ITERATIONS))
    except (KeyError, ValueError):
        return False
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, rounds)
    return secrets.compare_digest(digest, expected)


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically with mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- the JSON file ------------------------------------------------------------------------------


def _public_client(c: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"username": c["username"]}
    for key in ("clientid", "textname", "textdescription"):
        if c.get(key):
            out[key] = c[key]
    out["roles"] = [dict(r) for r in c.get("roles", [])]
    out["groups"] = [dict(g) for g in c.get("groups", [])]
    if c.get("disabled"):
        out["disabled"] = True
    return out


def _public_role(r: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"rolename": r["rolename"]}
    for key in ("textname", "textdescription"):
        if r.get(key):
            out[key] = r[key]
    out["acls"] = [dict(a) for a in r.get("acls", [])]
    return out


def _role_refs(roles: Any) -> list[dict[str, Any]]:
    refs = []
    for r in roles or []:
        ref: dict[str, Any] = {"rolename": str(r["rolename"])}
        if r.get("priority"):
            ref["priority"] = int(r["priority"])
        refs.append(ref)
    return refs


def _acls(acls: Any) -> list[dict[str, Any]]:
    return [
        {
            "acltype": str(a["acltype"]),
            "topic": str(a["topic"]),
            "priority": int(a.get("priority", 0)),
            "allow": bool(a.get("allow", False)),
        }
        for a in acls or []
    ]


class DynsecFile:
    """The plugin's JSON file, edited in place (broker stopped). Saved atomically, mode 0600."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.changed = False
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise BrokerError(f"cannot read dynamic-security file {self.path}: {exc}") from exc
        else:
            data = {"clients": [], "groups": [], "roles": []}
            self.changed = True
        if not isinstance(data, dict):
            raise BrokerError(f"dynamic-security file {self.path} is not a JSON object")
        self.data: dict[str, Any] = data
        self.clients: dict[str, dict[str, Any]] = {c["username"]: c for c in data.setdefault("clients", [])}
        self.roles: dict[str, dict[str, Any]] = {r["rolename"]: r for r in data.setdefault("roles", [])}
        data.setdefault("groups", [])

    # --- direct edits (bootstrap) ---------------------------------------------------------------

    def put_role(self, rolename: str, acls: Sequence[Mapping[str, Any]]) -> None:
        """Create the role or replace its ACLs."""
        wanted = _acls(acls)
        role = self.roles.get(rolename)
        if role is None:
            role = {"rolename": rolename, "acls": wanted}
            self.roles[rolename] = role
            self.data["roles"].append(role)
            self.changed = True
        elif role.get("acls") != wanted:
            role["acls"] = wanted
            self.changed = True

    def put_client(self, username: str, password: str, roles: Sequence[Mapping[str, Any]]) -> None:
        """Create the client or make its password and roles exactly these."""
        refs = _role_refs(roles)
        client = self.clients.get(username)
        if client is None:
            client = {"username": username, "roles": refs, **hash_password(password)}
            self.clients[username] = client
            self.data["clients"].append(client)
            self.changed = True
            return
        if not verify_password(password, client):
            client.update(hash_password(password))
            self.changed = True
        if _role_refs(client.get("roles")) != refs:
            client["roles"] = refs
            self.changed = True
        if client.get("disabled"):
            client.pop("disabled")
            self.changed = True

    def set_default_acl_access(self, access: Mapping[str, bool]) -> None:
        """Set ``defaultACLAccess``."""
        wanted = {k: bool(v) for k, v in access.items()}
        if self.data.get("defaultACLAccess") != wanted:
            self.data["defaultACLAccess"] = wanted
            self.changed = True

    def save(self) -> None:
        """Write the file (0600, atomic) if anything changed."""
        if not self.changed:
            return
        self.data["clients"] = list(self.clients.values())
        self.data["roles"] = list(self.roles.values())
        _write_private(self.path, json.dumps(self.data, indent="\t") + "\n")
        self.changed = False

    # --- the command interpreter (same answers as the plugin) ----------------------------------

    def execute(self, commands: Sequence[Command]) -> list[Response]:
        """Apply ``commands`` like the plugin would, then save once."""
        responses = []
        for cmd in commands:
            name = str(cmd.get("command", ""))
            handler = getattr(self, f"_cmd_{name}", None)
            response: Response = {"command": name}
            if handler is None:
                response["error"] = "Unknown command"
            else:
                try:
                    data = handler(cmd)
                except DynsecError as exc:
                    response["error"] = exc.error
                except (KeyError, TypeError, ValueError) as exc:
                    response["error"] = f"Invalid/missing {exc}"
                else:
                    if data is not None:
                        response["data"] = data
            if "correlationData" in cmd:
                response["correlationData"] = cmd["correlationData"]
            responses.append(response)
        self.save()
        return responses

    def close(self) -> None:
        """Save pending changes."""
        self.save()

    def _client(self, cmd: Command) -> dict[str, Any]:
        client = self.clients.get(str(cmd["username"]))
        if client is None:
            raise DynsecError(str(cmd["command"]), "Client not found")
        return client

    def _role(self, cmd: Command) -> dict[str, Any]:
        role = self.roles.get(str(cmd["rolename"]))
        if role is None:
            raise DynsecError(str(cmd["command"]), "Role not found")
        return role

    def _cmd_createClient(self, cmd: Command) -> None:  # noqa: N802 - the plugin's command names
        username = str(cmd["username"])
        if username in self.clients:
            raise DynsecError("createClient", "Client already exists")
        refs = _role_refs(cmd.get("roles"))
        if any(r["rolename"] not in self.roles for r in refs):
            raise DynsecError("createClient", "Role not found")
        client: dict[str, Any] = {"username": username, "roles": refs}
        for key in ("clientid", "textname", "textdescription"):
            if cmd.get(key):
                client[key] = str(cmd[key])
        if cmd.get("password"):
            client.update(hash_password(str(cmd["password"])))
        self.clients[username] = client
        self.changed = True

    def _cmd_deleteClient(self, cmd: Command) -> None:  # noqa: N802
        self._client(cmd)
        del self.clients[str(cmd["username"])]
        self.changed = True

    def _cmd_setClientPassword(self, cmd: Command) -> None:  # noqa: N802
        client = self._client(cmd)
        if not cmd.get("password"):
            raise DynsecError("setClientPassword", "Empty password is not allowed")
        client.update(hash_password(str(cmd["password"])))
        self.changed = True

    def _cmd_addClientRole(self, cmd: Command) -> None:  # noqa: N802
        client = self._client(cmd)
        self._role(cmd)
        refs = [r for r in client.get("roles", []) if r["rolename"] != cmd["rolename"]]
        refs.append(_role_refs([cmd])[0])
        client["roles"] = refs
        self.changed = True

    def _cmd_removeClientRole(self, cmd: Command) -> None:  # noqa: N802
        client = self._client(cmd)
        self._role(cmd)
        client["roles"] = [r for r in client.get("roles", []) if r["rolename"] != cmd["rolename"]]
        self.changed = True

    def _cmd_getClient(self, cmd: Command) -> dict[str, Any]:  # noqa: N802
        return {"client": _public_client(self._client(cmd))}

    def _cmd_listClients(self, cmd: Command) -> dict[str, Any]:  # noqa: N802
        rows = list(self.clients.values())
        page = _page(rows, cmd)
        clients = [_public_client(c) for c in page] if cmd.get("verbose") else [c["username"] for c in page]
        return {"totalCount": len(rows), "clients": clients}

    def _cmd_createRole(self, cmd: Command) -> None:  # noqa: N802
        name = str(cmd["rolename"])
        if name in self.roles:
            raise DynsecError("createRole", "Role already exists")
        self.roles[name] = {"rolename": name, "acls": _acls(cmd.get("acls"))}
        self.changed = True

    def _cmd_modifyRole(self, cmd: Command) -> None:  # noqa: N802
        role = self._role(cmd)
        if "acls" in cmd:
            role["acls"] = _acls(cmd["acls"])
        self.changed = True

    def _cmd_deleteRole(self, cmd: Command) -> None:  # noqa: N802
        self._role(cmd)
        name = str(cmd["rolename"])
        del self.roles[name]
        for client in self.clients.values():  # the plugin leaves dangling references (2.0.11)
            client["roles"] = [r for r in client.get("roles", []) if r["rolename"] != name]
        self.changed = True

    def _cmd_getRole(self, cmd: Command) -> dict[str, Any]:  # noqa: N802
        return {"role": _public_role(self._role(cmd))}

    def _cmd_listRoles(self, cmd: Command) -> dict[str, Any]:  # noqa: N802
        rows = list(self.roles.values())
        page = _page(rows, cmd)
        roles = [_public_role(r) for r in page] if cmd.get("verbose") else [r["rolename"] for r in page]
        return {"totalCount": len(rows), "roles": roles}

    def _cmd_setDefaultACLAccess(self, cmd: Command) -> None:  # noqa: N802
        access = dict(self.data.get("defaultACLAccess") or {})
        for acl in cmd["acls"]:
            access[str(acl["acltype"])] = bool(acl["allow"])
        self.set_default_acl_access(access)

    def _cmd_getDefaultACLAccess(self, cmd: Command) -> dict[str, Any]:  # noqa: N802
        access = self.data.get("defaultACLAccess") or {}
        return {"acls": [{"acltype": k, "allow": v} for k, v in access.items()]}


def _page(rows: list[dict[str, Any]], cmd: Command) -> list[dict[str, Any]]:
    offset = int(cmd.get("offset", 0) or 0)
    count = int(cmd.get("count", -1) if cmd.get("count") is not None else -1)
    return rows[offset:] if count < 0 else rows[offset : offset + count]


# --- the live broker ----------------------------------------------------------------------------


def request_payload(commands: Sequence[Command], key: str) -> str:
    """One control message for ``commands``, each tagged ``correlationData`` = ``key:index``."""
    tagged = [{**c, "correlationData": f"{key}:{i}"} for i, c in enumerate(commands)]
    return json.dumps({"commands": tagged})


def response_key(payload: bytes) -> str | None:
    """The key (see :func:`request_payload`) a plugin answer names; None if it names none."""
    try:
        responses = json.loads(payload)["responses"]
        corr = responses[0].get("correlationData")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None
    return corr.split(":", 1)[0] if isinstance(corr, str) and corr else None


def parse_responses(payload: bytes, expected: int) -> list[Response]:
    """The plugin's responses in an answer to ``expected`` commands, untagged."""
    try:
        responses = json.loads(payload)["responses"]
    except (ValueError, KeyError, TypeError) as exc:
        raise BrokerError(f"unreadable dynamic-security answer: {exc}") from None
    if not isinstance(responses, list) or len(responses) != expected:
        got = len(responses) if isinstance(responses, list) else "no"
        raise BrokerError(f"dynamic-security answered {got} of {expected} commands")
    out: list[Response] = []
    for r in responses:
        if not isinstance(r, dict):
            raise BrokerError(f"unreadable dynamic-security response: {str(r)[:100]}")
        r.pop("correlationData", None)
        out.append(r)
    return out


class AsyncBackend(Protocol):
    """Runs a list of dynamic-security commands without blocking the event loop."""

    async def execute(self, commands: Sequence[Command]) -> list[Response]:
        """Run ``commands`` in order; each response has ``command`` and maybe ``error``/``data``."""
        ...


class ControlChannel:
    """Dynamic-security commands over a service's own connection (an :class:`AsyncBackend`).

    Create it in a service's start-up hook on :attr:`Service.conn
    <bloomwire.runtime.mqtt.Service.conn>`: answers on ``.../response`` go straight to the
    waiting command (:class:`~bloomwire.runtime.request.Requests`), never to the handlers.
    """

    def __init__(self, conn: Connection, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.requests = Requests(conn, RESPONSE_TOPIC, response_key, timeout=timeout)

    async def execute(self, commands: Sequence[Command]) -> list[Response]:
        """Send ``commands`` in ONE control message and return the plugin's responses."""
        if not commands:
            return []
        key = uuid.uuid4().hex
        answer = await self.requests.request(REQUEST_TOPIC, request_payload(commands, key), key)
        return parse_responses(answer, len(commands))


@dataclass
class _Waiter:
    event: threading.Event = field(default_factory=threading.Event)
    payload: bytes | None = None


class ControlClient:
    """A blocking MQTT 5 admin connection that runs dynamic-security commands (thread-safe).

    For ``bloomwire accounts``, the benchmark and tests; a service uses :class:`ControlChannel`
    on its own connection. Every admin connection receives every answer; each caller gets the
    one naming its commands. paho reconnects by itself after a connection that once worked is
    lost.
    """

    def __init__(
        self,
        host: str,
        port: int,
        username: str,
        password: str,
        *,
        tls: bool = False,
        ca_file: Path | None = None,
        transport: str = "tcp",
        timeout: float = DEFAULT_TIMEOUT_S,
        keepalive: int = 30,
    ) -> None:
        self.host, self.port, self.username = host, port, username
        self.timeout = timeout
        self.keepalive = keepalive
        self.connected = threading.Event()
        self.generation = 0
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._waiters: dict[str, _Waiter] = {}
        self._pubacks: dict[int, ReasonCode | None] = {}
        #: topic -> when a retained message on it arrived (:meth:`retained_topics`)
        self._retained_seen: dict[str, float] = {}
        self._puback_cv = threading.Condition()
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=username,  # the broker makes it the username anyway (use_username_as_clientid)
            protocol=MQTTProtocolVersion.MQTTv5,
            transport="websockets" if transport == "websockets" else "tcp",
        )
        client.username_pw_set(username, password)
        if tls:
            client.tls_set(ca_certs=str(ca_file) if ca_file else None, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_socket_open = self._on_socket_open
        self.client = client

    # --- paho callbacks: never raise (an exception kills paho's network thread) ----------------

    def _on_socket_open(self, _c: paho.Client, _u: Any, sock: Any) -> None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_connect(self, client: paho.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        try:
            if reason.is_failure:
                self.last_error = f"broker refused {self.username!r}: {reason}"
                if not self.connected.is_set() and self.generation == 0:
                    client.disconnect()  # never retry bad credentials at start-up
            else:
                self.generation += 1
                self.last_error = None
                client.subscribe(RESPONSE_TOPIC, qos=0)
                self.connected.set()
        except Exception:  # pragma: no cover - defensive
            pass

    def _on_disconnect(self, _c: paho.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        self.connected.clear()
        if reason.value != 0:
            self.last_error = f"disconnected: {reason}"
        with self._lock:
            for waiter in self._waiters.values():
                waiter.event.set()  # wake callers: their answer will never come
        with self._puback_cv:
            self._puback_cv.notify_all()

    def _on_message(self, _client: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        if msg.topic != RESPONSE_TOPIC:
            if msg.retain and msg.payload:
                with self._lock:
                    self._retained_seen[msg.topic] = time.monotonic()
            return
        payload = bytes(msg.payload)
        key = response_key(payload)
        with self._lock:
            waiter = self._waiters.get(key) if key is not None else None
        if waiter is not None:
            waiter.payload = payload
            waiter.event.set()

    def _on_publish(self, _c: paho.Client, _u: Any, mid: int, reason: ReasonCode, _p: Any) -> None:
        with self._puback_cv:
            self._pubacks[mid] = reason
            while len(self._pubacks) > MAX_UNCLAIMED_PUBACKS:  # acks nobody waits for
                del self._pubacks[next(iter(self._pubacks))]
            self._puback_cv.notify_all()

    # --- public API -----------------------------------------------------------------------------

    def connect(self, timeout: float = 10.0) -> ControlClient:
        """Connect (waiting for CONNACK); raise :class:`BrokerError` if refused or unreachable."""
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 0
        try:
            self.client.connect_async(
                self.host, self.port, keepalive=self.keepalive, clean_start=True, properties=props
            )
        except (OSError, ValueError) as exc:
            raise BrokerError(f"cannot reach the broker at {self.host}:{self.port}: {exc}") from exc
        self.client.loop_start()
        deadline = time.monotonic() + timeout
        while not self.connected.is_set():
            if self.last_error and self.generation == 0 and "refused" in self.last_error:
                self.close()
                raise BrokerError(self.last_error)
            if time.monotonic() > deadline:
                self.close()
                raise BrokerError(
                    f"no answer from the broker at {self.host}:{self.port} as {self.username!r} "
                    f"within {timeout:.0f} s ({self.last_error or 'not reachable'})"
                )
            self.connected.wait(0.05)
        return self

    def execute(self, commands: Sequence[Command], timeout: float | None = None) -> list[Response]:
        """Send ``commands`` in ONE control message and return the plugin's responses."""
        if not commands:
            return []
        limit = timeout or self.timeout
        key = uuid.uuid4().hex
        waiter = _Waiter()
        with self._lock:
            self._waiters[key] = waiter
        try:
            if not self.connected.wait(limit):
                raise BrokerError(f"not connected to the broker ({self.last_error or 'no answer'})")
            info = self.client.publish(REQUEST_TOPIC, request_payload(commands, key), qos=1)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise BrokerError(f"could not send dynamic-security commands: {paho.error_string(info.rc)}")
            deadline = time.monotonic() + limit
            while waiter.payload is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BrokerError(f"no dynamic-security answer within {limit:.0f} s")
                waiter.event.wait(left)
                waiter.event.clear()
                if waiter.payload is None and not self.connected.is_set():
                    raise BrokerError(
                        "lost the broker connection while waiting for a dynamic-security answer; "
                        "the commands may or may not have been applied"
                    )
            payload = waiter.payload
        finally:
            with self._lock:
                self._waiters.pop(key, None)
        return parse_responses(payload, len(commands))

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 1,
        retain: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Publish and wait for the PUBACK; :class:`BrokerError` if the broker refused it (0x87)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise BrokerError(f"could not publish to {topic!r}: {paho.error_string(info.rc)}")
        if qos == 0:
            return
        deadline = time.monotonic() + (timeout or self.timeout)
        with self._puback_cv:
            while info.mid not in self._pubacks:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BrokerError(f"no PUBACK for {topic!r} within {timeout or self.timeout:.0f} s")
                self._puback_cv.wait(min(left, 0.5))
            reason = self._pubacks.pop(info.mid)
        if reason is not None and reason.is_failure:
            raise BrokerError(f"broker refused the publish to {topic!r}: {reason}")

    def retained_topics(self, filters: Sequence[str], quiet_s: float = 0.5) -> list[str]:
        """The topics under ``filters`` on which the broker holds a retained message: subscribed
        for a moment (the broker sends them right after the SUBACK), until ``quiet_s`` passes
        without a new one."""
        with self._lock:
            self._retained_seen.clear()
        subscribed = time.monotonic()
        self.client.subscribe([(f, 0) for f in filters])
        try:
            while True:
                time.sleep(quiet_s / 5)
                with self._lock:
                    last = max(self._retained_seen.values(), default=subscribed)
                if time.monotonic() - max(last, subscribed + quiet_s) >= quiet_s:
                    break
        finally:
            self.client.unsubscribe(list(filters))
        with self._lock:
            return sorted(self._retained_seen)

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()
        self.connected.clear()
        # paho closes its wake-up socket pair only in Client.__del__; without this cycle
        # (client -> bound method -> self) the client goes, sockets closed, with this object.
        client = self.client
        client.on_connect = client.on_disconnect = client.on_message = None
        client.on_publish = client.on_socket_open = None

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
