"""Run the whole backbone on one machine: a Mosquitto from ``broker/`` and one process per service.

Two modes (docs/security.md):

* password file (``Stack(settings)``, the default): every identity has a password in
  ``DATA_DIR/secrets/<name>``, nobody is anonymous, but any user may use any topic;
* access control (``Stack(settings, access=True, shops=[...], riders=[...])``): the broker runs
  Mosquitto's dynamic-security plugin with the roles of :mod:`bloomwire.access.policy`,
  bootstrapped on every start (admin, provisioner, operator, persister, one account per service,
  shop and rider; passwords kept in the same secrets folder), and the ``provisioner`` service
  runs too: it gives each order's customer a login of its own.

Addresses are stable (:mod:`bloomwire.runtime.ports`): the broker's MQTT and websockets ports, the
web service's and every metrics port are chosen at the first start and recorded in
``DATA_DIR/ports.json``. Once started, the stack is supervised (:mod:`bloomwire.app.supervision`):
a service that exits is started again, a crash loop is reported, the broker keeps running.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bloomwire.access import Kind, bootstrap, open_accounts
from bloomwire.access.dynsec import DynsecError
from bloomwire.app.restarts import RestartPolicy, Restarts
from bloomwire.app.supervision import Hooks, Monitor, Supervision
from bloomwire.contract import topics
from bloomwire.contract.events import parse_service_status
from bloomwire.errors import BrokerError
from bloomwire.runtime import ports
from bloomwire.runtime.broker import SECRETS_DIR, Mosquitto, ensure_secret
from bloomwire.runtime.log import get_logger
from bloomwire.runtime.metrics import PortInUseError, serve
from bloomwire.runtime.mqtt import Connection
from bloomwire.runtime.settings import Settings

log = get_logger("bloomwire.supervisor")

#: Service name -> module exposing ``build(settings) -> Service``; these run in both modes.
SERVICES: dict[str, str] = {
    "persister": "bloomwire.services.persister",
    "dispatch": "bloomwire.services.dispatch",
    "alerts": "bloomwire.services.alerts",
}
#: Services that need access-control mode: the provisioner administers the dynamic-security
#: plugin, which a password-file broker does not load (its commands would never be answered).
ACCESS_SERVICES: dict[str, str] = {
    "provisioner": "bloomwire.services.provisioner",
}
#: The web service (pages, enrolment, the browsers' MQTT bridge): ``bloomwire up`` and the demo
#: add it; other stacks (most tests) run without it.
WEB = "web"
WEB_SERVICES: dict[str, str] = {WEB: "bloomwire.services.web"}
#: The customers' chat assistant: ``bloomwire up`` and the demo add it; other stacks run without it.
ASSISTANT = "assistant"
ASSISTANT_SERVICES: dict[str, str] = {ASSISTANT: "bloomwire.services.assistant"}
#: The customers' notices (issue 16): ``bloomwire up`` and the demo add it, like the assistant.
NOTICES = "notices"
NOTICES_SERVICES: dict[str, str] = {NOTICES: "bloomwire.services.notices"}
#: Every service ``bloomwire service run`` knows.
ALL_SERVICES: dict[str, str] = {
    **SERVICES,
    **ACCESS_SERVICES,
    **WEB_SERVICES,
    **ASSISTANT_SERVICES,
    **NOTICES_SERVICES,
}
PROVISIONER = "provisioner"
OPERATOR = "operator"
#: The supervisor's own login ($SYS, the services' status; bloomwire.access.policy.monitor_role).
MONITOR = "monitor"
#: Identities that bootstrap creates with roles of their own (not ``service/N`` accounts).
_FIXED_IDENTITIES = frozenset({"persister", PROVISIONER, OPERATOR, MONITOR})
#: Attempts at starting our broker when a port chosen just now is taken before Mosquitto binds it.
_BIND_ATTEMPTS = 3
#: What ``bloomwire up`` provisions in access-control mode unless told otherwise.
DEFAULT_SHOPS: tuple[str, ...] = ("s1", "s2", "s3")
DEFAULT_RIDERS: tuple[str, ...] = tuple(f"r{i}" for i in range(1, 11))
#: Account kinds :meth:`Stack.add_user` can create in access-control mode.
USER_KINDS = ("shop", "rider", "service")


def service_settings(settings: Settings, name: str) -> Settings:
    """Settings for a process acting as ``name``, its password read from the secrets folder."""
    if settings.broker_username == name and settings.broker_password is not None:
        return settings
    return settings.as_identity(name, ensure_secret(settings.data_dir, name))


async def wait_online(settings: Settings, names: Sequence[str], timeout: float = 30.0) -> dict[str, str]:
    """Wait until each service's retained ``services/N/status`` says online; return what was seen."""
    conn = Connection(service_settings(settings, OPERATOR), f"{OPERATOR}-watch-{os.getpid()}")
    conn.subscribe(topics.ALL_SERVICE_STATUS_FILTER, qos=1)
    conn.start()
    seen: dict[str, str] = {}
    try:
        await conn.wait_connected(timeout)
        deadline = time.monotonic() + timeout
        while any(seen.get(n) != "online" for n in names):
            if time.monotonic() > deadline:
                missing = [n for n in names if seen.get(n) != "online"]
                raise BrokerError(f"services not online after {timeout:.0f} s: {', '.join(missing)}")
            await conn.wait_message(0.2)
            for msg in conn.drain(100):
                seen[msg.topic.split("/")[1]] = parse_service_status(msg.payload).state.value
    finally:
        await conn.stop()
    return seen


@dataclass
class Stack:
    """A broker (unless settings name one) and the services, as child processes.

    With ``access=True`` the broker is access-controlled (see the module docstring): ``shops``
    and ``riders`` get accounts with their roles at every start, ``services`` gets the
    ``provisioner`` appended, and ``extra_users`` may only repeat shops or riders (a customer
    gets its login from the provisioner, on ``shops/S/orders/O/access``, not from here).
    """

    settings: Settings
    services: Sequence[str] = tuple(SERVICES)
    extra_users: Sequence[str] = ()
    broker: Mosquitto | None = None
    children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    log_dir: Path | None = None
    access: bool = False
    shops: Sequence[str] = ()
    riders: Sequence[str] = ()
    restart_policy: RestartPolicy = field(default_factory=RestartPolicy)
    #: The recorded ports of the data dir (made at the first start).
    book: ports.PortBook | None = None
    monitor: Monitor | None = None
    _accounts_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _children_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __post_init__(self) -> None:
        unknown = [n for n in self.services if n not in ALL_SERVICES]
        if unknown:
            raise BrokerError(f"unknown service(s) {', '.join(unknown)} (known: {', '.join(ALL_SERVICES)})")
        if self.access:
            if PROVISIONER not in self.services:
                self.services = (*self.services, PROVISIONER)
            kinds = set(self.shops) | set(self.riders)
            stray = [n for n in self.extra_users if n not in kinds]
            if stray:
                raise BrokerError(
                    "an access-controlled stack makes accounts by kind: pass shops=[...] and "
                    f"riders=[...] (or add_user(name, kind)), not extra_users ({', '.join(stray[:5])}); "
                    "customers get their login from the provisioner on shops/S/orders/O/access"
                )
        else:
            needs = [n for n in self.services if n in ACCESS_SERVICES]
            if needs:
                raise BrokerError(f"{', '.join(needs)} needs access-control mode (Stack(..., access=True))")

    def start_broker(self) -> Settings:
        """Start Mosquitto on a free port unless settings point at a broker; return the settings.

        The returned settings name the broker's TCP and websockets ports. In access-control mode
        the dynamic-security file is bootstrapped first (idempotent: passwords and customer
        accesses of an earlier run are kept).
        """
        data_dir = self.settings.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        if self.settings.external_broker:
            return self.settings
        if self.access:
            services = [n for n in self.services if n not in _FIXED_IDENTITIES]
            boot = bootstrap(data_dir, shops=self.shops, riders=self.riders, services=services)
            self.broker = self._launch_broker({"dynsec_config": boot.config_path})
        else:
            names = [*self.services, OPERATOR, MONITOR, *self.extra_users]
            users = {n: ensure_secret(data_dir, n) for n in names}
            self.broker = self._launch_broker({"users": users})
        self.settings = self.settings.with_broker(self.broker.host, self.broker.port).model_copy(
            update={"broker_ws_port": self.broker.ws_port}
        )
        return self.settings

    def _ports(self) -> ports.PortBook:
        if self.book is None:
            self.book = ports.PortBook(self.settings.data_dir, self.settings.broker_listen_host)
        return self.book

    def _launch_broker(self, auth: dict[str, Any]) -> Mosquitto:
        """Start Mosquitto on the recorded ports (chosen now at the first start); a port chosen just
        now and taken before Mosquitto bound it is chosen again (a recorded one is an error)."""
        book, s = self._ports(), self.settings
        keys = {ports.MQTT: "broker_listen_port", ports.WEBSOCKETS: "broker_listen_ws_port"}
        for attempt in range(_BIND_ATTEMPTS):
            chosen = {key: self._claim(key, setting) for key, setting in keys.items()}
            for key, port in chosen.items():
                if key not in book.fresh:
                    book.check_free(key, port)
            port, ws_port = chosen[ports.MQTT], chosen[ports.WEBSOCKETS]
            broker = Mosquitto(
                s.data_dir / "broker",
                port=port,
                ws_port=ws_port,
                host=s.broker_listen_host,
                **auth,
            )
            try:
                broker.start()
            except BrokerError as exc:
                fresh = [k for k in keys if k in book.fresh]
                if "in use" not in str(exc) or not fresh or attempt + 1 == _BIND_ATTEMPTS:
                    raise
                for key in fresh:
                    book.replace(key)
                continue
            return broker
        raise BrokerError("unreachable")  # pragma: no cover - the loop returns or raises

    def add_user(self, name: str, kind: str | None = None) -> str:
        """Give ``name`` a password (and, with our own broker, an account); return it.

        Password-file mode: any name, ``kind`` ignored. Access-control mode: an account of
        ``kind`` (``shop``, ``rider`` or ``service``; default: ``shop`` if ``name`` is one of
        :attr:`shops`, ``rider`` if one of :attr:`riders`) with that kind's role, added live
        over ``$CONTROL`` as ``admin`` (or at the next start, before it); an account that
        already exists with that kind keeps its password. Either way the password is in
        ``DATA_DIR/secrets/<name>``. Customers are never added here (the provisioner mints them).
        """
        if not self.access:
            password = ensure_secret(self.settings.data_dir, name)
            if self.broker is not None:
                self.broker.add_user(name, password)
            return password
        if kind is None:
            kind = "shop" if name in self.shops else "rider" if name in self.riders else None
        if kind not in USER_KINDS:
            raise BrokerError(
                f"add_user({name!r}): an access-controlled stack needs the account's kind "
                f"({', '.join(USER_KINDS)}); customers get their login from the provisioner"
            )
        with self._accounts_lock:
            return self._add_account(name, kind)

    def _add_account(self, name: str, kind: str) -> str:
        wanted = Kind(kind)
        if self.broker is None and not self.settings.external_broker:  # bootstrapped at start
            if wanted is Kind.SHOP and name not in self.shops:
                self.shops = (*self.shops, name)
            elif wanted is Kind.RIDER and name not in self.riders:
                self.riders = (*self.riders, name)
            elif wanted is Kind.SERVICE:
                raise BrokerError("add services with Stack(services=...) before start")
            return ensure_secret(self.settings.data_dir, name)
        secret = self.settings.data_dir / "secrets" / name
        with open_accounts(self.settings, offline=False) as accounts:
            try:
                info = accounts.get(name)
            except DynsecError as exc:
                if exc.error != "Client not found":
                    raise
                add = {Kind.SHOP: accounts.add_shop, Kind.RIDER: accounts.add_rider}
                password = add.get(wanted, accounts.add_service)(name).password
            else:
                if info.kind is not wanted:
                    found = info.kind.value if info.kind else "another kind"
                    raise BrokerError(f"an account named {name!r} exists already, as {found}") from None
                password = (
                    secret.read_text(encoding="utf-8").strip()
                    if secret.is_file()
                    else accounts.rotate(name).password
                )
        if wanted is Kind.SHOP and name not in self.shops:
            self.shops = (*self.shops, name)
        elif wanted is Kind.RIDER and name not in self.riders:
            self.riders = (*self.riders, name)
        return password

    def _claim(self, key: str, setting: str, **options: Any) -> int:
        """``key``'s recorded port; a setting given explicitly (not its default) replaces it."""
        wanted = int(getattr(self.settings, setting))
        insist = setting in self.settings.model_fields_set
        return self._ports().claim(key, wanted, insist=insist, **options)

    def metrics_port(self, name: str) -> int:
        """The metrics port to start ``name`` on (``up``: the supervisor's own), chosen and recorded
        once; a recorded port taken now (not by ``name`` itself) is replaced."""
        s = self.settings
        wanted = ports.default_metrics_port(s.metrics_port, name)
        insist = "metrics_port" in s.model_fields_set
        key = ports.metrics_key(name)
        return self._ports().claim(key, wanted, host=s.metrics_host, replace_taken=True, insist=insist)

    def start_service(self, name: str, restart: int = 0) -> subprocess.Popen[bytes]:
        """Launch ``bloomwire service run NAME`` as a child process (``restart``: the how-manieth)."""
        env = {
            **os.environ,
            **self.settings.to_env(),
            "BLOOMWIRE_BROKER_USERNAME": name,
        }
        command = [sys.executable, "-m", "bloomwire", "service", "run", name]
        command += ["--metrics-port", str(self.metrics_port(name))]
        log_dir = self.log_dir or self.settings.data_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        with (log_dir / f"{name}.log").open("ab") as out:
            if restart:
                out.write(f"--- restarted by the supervisor ({restart}) at {time.ctime()} ---\n".encode())
                out.flush()
            proc = subprocess.Popen(
                command,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C goes to us; we stop children in order
            )
        with self._children_lock:
            self.children[name] = proc
        return proc

    def start(self, timeout: float = 60.0) -> Settings:
        """Broker, then every service, then supervision; returns once all services say online."""
        self.start_broker()
        if WEB in self.services:  # its recorded port, known before it starts: `up` prints the address
            self.settings = self.settings.model_copy(
                update={"web_port": self._claim(ports.WEB, "web_listen_port")}
            )
        try:
            for name in self.services:
                self.start_service(name)
            self._supervise()
            asyncio.run(wait_online(self.settings, self.services, timeout))
        except BaseException:
            self.stop()
            raise
        return self.settings

    def _supervise(self) -> None:
        hooks = Hooks(
            children=self._children,
            start=self.start_service,
            port_taken=lambda name: self._ports().replace(
                ports.metrics_key(name), host=self.settings.metrics_host
            ),
            broker=lambda: self.broker,
        )
        supervision = Supervision(hooks, Restarts(self.restart_policy))
        for name in self.services:
            supervision.restarts.started(name)
        login = None if self._no_monitor_login() else service_settings(self.settings, MONITOR)
        self.monitor = Monitor(login, supervision, list(self.services))
        self._serve_metrics(self.monitor)
        self.monitor.start()

    def _no_monitor_login(self) -> bool:
        """An external broker may not know our ``monitor`` (it does if we provisioned its secret)."""
        secret = self.settings.data_dir / SECRETS_DIR / MONITOR
        return self.settings.external_broker and self.broker is None and not secret.is_file()

    def _serve_metrics(self, monitor: Monitor) -> None:
        host = self.settings.metrics_host
        for attempt in range(_BIND_ATTEMPTS):
            try:
                monitor.exporter = serve(monitor.registry, host, self.metrics_port(ports.SUPERVISOR))
                return
            except PortInUseError:
                if attempt + 1 == _BIND_ATTEMPTS:
                    raise
                self._ports().replace(ports.metrics_key(ports.SUPERVISOR), host=host)

    @property
    def supervisor_metrics_port(self) -> int | None:
        """Where the supervisor's own exporter listens (restarts, crash loops, $SYS), if it runs."""
        exporter = self.monitor.exporter if self.monitor is not None else None
        return exporter.port if exporter is not None else None

    def _children(self) -> dict[str, subprocess.Popen[bytes]]:
        with self._children_lock:
            return dict(self.children)

    def check(self) -> list[str]:
        """Services in a crash loop (supervised), or whose process has exited (not supervised)."""
        if self.monitor is not None:
            return self.monitor.supervision.looping()
        return [n for n, p in self._children().items() if p.poll() is not None]

    def restarts(self) -> dict[str, int]:
        """How often the supervisor restarted each service."""
        if self.monitor is None:
            return dict.fromkeys(self.services, 0)
        return self.monitor.supervision.restart_counts(list(self.services))

    def stop(self, timeout: float = 15.0) -> None:
        """Stop supervising, SIGTERM every service, wait (SIGKILL after ``timeout``), stop the broker."""
        if self.monitor is not None:
            self.monitor.stop()
            self.monitor = None
        for proc in self.children.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.children.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.children.clear()
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
