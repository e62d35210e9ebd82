"""Run and provision the project's Mosquitto broker (docs/design.md §5).

:class:`Mosquitto` renders ``broker/mosquitto.conf.template`` into a data directory, writes a
password file and runs ``mosquitto -c`` as a child process. Passwords are hashed here in
Mosquitto 2.0's ``$7$`` format, so adding a user needs no ``mosquitto_passwd`` subprocess.

Opt-in access-controlled mode: ``Mosquitto(..., dynsec_config=path)`` loads the
dynamic-security plugin with that JSON file (written by :func:`bloomwire.access.bootstrap`)
instead of a password file; users and their topics are then managed by :mod:`bloomwire.access`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import glob
import hashlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import string
import subprocess
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from bloomwire.contract.topics import check_id
from bloomwire.errors import BrokerError

#: The config template; it lives beside the package in the repository, not inside it.
TEMPLATE_PATH = Path(__file__).resolve().parents[3] / "broker" / "mosquitto.conf.template"
#: The committed config of the compose broker container, rendered from the same template.
DOCKER_CONFIG_PATH = TEMPLATE_PATH.parent / "mosquitto.docker.conf"

DOCKER_CONFIG_HEADER = (
    "# GENERATED from mosquitto.conf.template by `make broker/mosquitto.docker.conf`\n"
    "# (python -m bloomwire.runtime.broker docker-config). Do not edit; tests check it is current.\n"
    "# Access control as `bloomwire up` runs it: compose.yaml's `access` step bootstraps the\n"
    "# dynamic-security file in the broker's volume before the broker starts.\n\n"
)
#: Where the compose broker keeps its dynamic-security file (in its data volume) ...
DOCKER_DYNSEC_CONFIG = "/mosquitto/data/dynamic-security.json"
#: ... and where the eclipse-mosquitto:2.0 image has the plugin.
DOCKER_DYNSEC_PLUGIN = "/usr/lib/mosquitto_dynamic_security.so"

#: Mosquitto 2.0 ``$7$`` hashes: PBKDF2-HMAC-SHA512, 101 iterations, 12-byte salt, 64-byte key.
HASH_ITERATIONS = 101
SALT_BYTES = 12

#: Well-known MQTT ports (plain, TLS, websockets) that :func:`free_port` never returns.
RESERVED_PORTS = frozenset({1883, 8883, 9001})

#: Where Debian and source installs put the broker; /usr/sbin is often not on a user's PATH.
_FALLBACK_PATHS = (Path("/usr/sbin/mosquitto"), Path("/usr/local/sbin/mosquitto"))

CONFIG_NAME = "mosquitto.conf"
PASSWORD_NAME = "mosquitto.passwd"
#: The dynamic-security plugin's state (users, roles, ACLs) in access-controlled mode.
DYNSEC_NAME = "dynamic-security.json"
#: Where Debian/Ubuntu (any architecture) and source installs put the plugin.
DYNSEC_PLUGIN_GLOBS = (
    "/usr/lib/*/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/*/mosquitto_dynamic_security.so",
)
LOG_NAME = "mosquitto.log"
SECRETS_DIR = "secrets"

_RUNNING_MARK = b" running"
_RELOAD_MARK = b"Reloading config."


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """Hash ``password`` the way ``mosquitto_passwd`` 2.0 does: ``$7$101$<salt>$<hash>``."""
    if salt is None:
        salt = secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, HASH_ITERATIONS)
    b64 = base64.b64encode
    return f"$7${HASH_ITERATIONS}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, hashed: str) -> bool:
    """True if ``password`` matches a ``$7$`` line value written by :func:`hash_password`."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[1] != "7":
        raise BrokerError(f"not a Mosquitto $7$ password hash: {hashed[:12]!r}…")
    salt, expected = base64.b64decode(parts[3]), base64.b64decode(parts[4])
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, int(parts[2]))
    return secrets.compare_digest(digest, expected)


def _check_username(name: str) -> str:
    check_id(name, "username")
    if ":" in name:
        raise BrokerError(f"username {name!r} contains ':', which a Mosquitto password file cannot hold")
    return name


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically with mode 0600."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_password_file(path: Path, users: Mapping[str, str]) -> None:
    """Write a Mosquitto password file (mode 0600) for ``users`` (username -> clear password)."""
    lines = [f"{_check_username(name)}:{hash_password(pw)}\n" for name, pw in sorted(users.items())]
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_private(path, "".join(lines))


def write_secret(data_dir: Path, username: str, password: str) -> Path:
    """Replace the password of ``username`` in ``data_dir/secrets/`` (0600; directory 0700)."""
    _check_username(username)
    if not password or any(c in password for c in "\r\n\x00"):
        raise BrokerError(f"refusing an empty or multi-line password for {username!r}")
    folder = data_dir / SECRETS_DIR
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    path = folder / username
    _write_private(path, password + "\n")
    return path


def ensure_secret(data_dir: Path, username: str) -> str:
    """Return the password of ``username`` kept in ``data_dir/secrets/``, creating it if absent.

    The directory is mode 0700 and each file 0600; a new password is ``secrets.token_urlsafe``.
    """
    _check_username(username)
    folder = data_dir / SECRETS_DIR
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    path = folder / username
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        password = path.read_text(encoding="utf-8").strip()
        if not password:
            raise BrokerError(f"secret file {path} is empty; delete it to get a new one") from None
        return password
    password = secrets.token_urlsafe(24)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(password + "\n")
    return password


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free right now (never 1883, 8883 or 9001)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port: int = sock.getsockname()[1]
        if port not in RESERVED_PORTS:
            return port


def find_mosquitto() -> Path:
    """Path of the ``mosquitto`` executable, or :class:`BrokerError` saying how to install it."""
    found = shutil.which("mosquitto")
    if found:
        return Path(found)
    for candidate in _FALLBACK_PATHS:
        if os.access(candidate, os.X_OK):
            return candidate
    raise BrokerError(
        "the mosquitto broker is not installed: run `make setup` or "
        "`apt-get install mosquitto mosquitto-clients`"
    )


def find_dynsec_plugin() -> Path:
    """Path of ``mosquitto_dynamic_security.so``, or :class:`BrokerError` saying how to get it."""
    for pattern in DYNSEC_PLUGIN_GLOBS:
        for found in sorted(glob.glob(pattern)):
            if os.access(found, os.R_OK):
                return Path(found)
    raise BrokerError(
        "the Mosquitto dynamic-security plugin (mosquitto_dynamic_security.so, shipped with the "
        "mosquitto package since 2.0) was not found under /usr/lib or /usr/local/lib"
    )


def render_config(
    *,
    port: int,
    ws_port: int,
    data_dir: str,
    log_dest: str,
    password_file: str = "",
    dynsec_config: str | None = None,
    dynsec_plugin: str | None = None,
    bind_address: str = "127.0.0.1",
    ws_interface: str = "lo",
    run_user: str | None = None,
    template: Path = TEMPLATE_PATH,
) -> str:
    """Render the Mosquitto config template with these values.

    With ``dynsec_config`` the broker authenticates and authorises with the dynamic-security
    plugin (``dynsec_plugin``, found automatically when None) and that JSON file; otherwise
    with ``password_file``.
    """
    if dynsec_config is None:
        if not password_file:
            raise BrokerError("render_config needs a password_file or a dynsec_config")
        auth = f"password_file {password_file}"
        checked: dict[str, object] = {"password_file": password_file}
    else:
        plugin = dynsec_plugin or str(find_dynsec_plugin())
        auth = f"plugin {plugin}\nplugin_opt_config_file {dynsec_config}"
        checked = {"dynsec_plugin": plugin, "dynsec_config": dynsec_config}
    values: dict[str, object] = {
        "port": port,
        "ws_port": ws_port,
        "data_dir": data_dir,
        "log_dest": log_dest,
        "bind_address": bind_address,
        "ws_interface": ws_interface,
        "run_user": run_user or pwd.getpwuid(os.geteuid()).pw_name,
    }
    for key, value in {**values, **checked}.items():
        if any(c in str(value) for c in "\r\n"):
            raise BrokerError(f"broker config value {key}={value!r} contains a line break")
    values["auth"] = auth
    try:
        text = template.read_text(encoding="utf-8")
    except OSError as exc:
        raise BrokerError(f"cannot read the broker config template {template}: {exc}") from exc
    try:
        return string.Template(text).substitute(values)
    except (KeyError, ValueError) as exc:
        raise BrokerError(f"broker config template {template} is invalid: {exc}") from exc


def render_docker_config() -> str:
    """The config of the compose broker container (``broker/mosquitto.docker.conf``)."""
    return DOCKER_CONFIG_HEADER + render_config(
        port=1883,
        ws_port=9001,
        data_dir="/mosquitto/data",
        dynsec_config=DOCKER_DYNSEC_CONFIG,
        dynsec_plugin=DOCKER_DYNSEC_PLUGIN,
        log_dest="stdout",
        bind_address="0.0.0.0",  # inside the container; compose decides what is exposed
        ws_interface="0.0.0.0",  # an address makes libwebsockets bind every interface
        run_user="mosquitto",
    )


#: glibc's fast bins off in the broker: the dynamic-security plugin builds, prints and frees a
#: cJSON tree of every login after each change, and glibc spent a third of that consolidating
#: fast bins (perf); off, the broker's CPU per plugin write with 5,000 logins fell from 75-78 to
#: 51-55 ms (same run, alternating). Its own packet handling was 0.2 % of the samples.
BROKER_GLIBC_TUNABLES = "glibc.malloc.mxfast=0"


def broker_env() -> dict[str, str]:
    """The broker's environment: ours, plus :data:`BROKER_GLIBC_TUNABLES` unless tunables are set."""
    env = dict(os.environ)
    env.setdefault("GLIBC_TUNABLES", BROKER_GLIBC_TUNABLES)
    return env


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Kill and wait for a broker left running when its owner is garbage-collected or exits."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()


class Mosquitto:
    """A Mosquitto child process with its own config, password file, persistence and log.

    Port 0 picks a free port at the first :meth:`start`; later restarts keep the same ports,
    so clients can reconnect and persistent sessions find their queued messages.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int = 0,
        ws_port: int = 0,
        host: str = "127.0.0.1",
        users: Mapping[str, str] | None = None,
        *,
        executable: Path | None = None,
        start_timeout: float = 10.0,
        dynsec_config: Path | None = None,
        dynsec_plugin: Path | None = None,
    ) -> None:
        self._data_dir = Path(data_dir)
        self._dynsec_config = Path(dynsec_config) if dynsec_config is not None else None
        self._dynsec_plugin = dynsec_plugin
        if self._dynsec_config is not None and users:
            raise BrokerError(
                "an access-controlled broker takes no password-file users: provision them with "
                "bloomwire.access (bootstrap, Accounts)"
            )
        self._port = port
        self._ws_port = ws_port
        self._auto_ports = port == 0 and ws_port == 0
        self._host = host
        self._users: dict[str, str] = {}
        for name, password in (users or {}).items():
            self._users[_check_username(name)] = password
        self._executable = executable
        self._start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[[subprocess.Popen[bytes]], Mosquitto] | None = None
        self._log_offset = 0

    # --- properties ---------------------------------------------------------------------------

    @property
    def host(self) -> str:
        """Address clients connect to."""
        return "127.0.0.1" if self._host in ("0.0.0.0", "") else self._host

    @property
    def port(self) -> int:
        """MQTT TCP port (0 until the first start when chosen automatically)."""
        return self._port

    @property
    def ws_port(self) -> int:
        """MQTT-over-websockets port (0 until the first start when chosen automatically)."""
        return self._ws_port

    @property
    def pid(self) -> int | None:
        """PID of the running broker, None when stopped."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the broker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def data_dir(self) -> Path:
        """Directory holding config, password file, persistence file and log."""
        return self._data_dir

    @property
    def config_path(self) -> Path:
        """The rendered config file."""
        return self._data_dir / CONFIG_NAME

    @property
    def password_path(self) -> Path:
        """The password file."""
        return self._data_dir / PASSWORD_NAME

    @property
    def log_path(self) -> Path:
        """The broker log (Mosquitto's own log plus its stderr)."""
        return self._data_dir / LOG_NAME

    @property
    def users(self) -> Mapping[str, str]:
        """A copy of the password-file users (username -> clear password); empty in
        access-controlled mode, whose users live in :attr:`dynsec_config`."""
        return dict(self._users)

    @property
    def access_controlled(self) -> bool:
        """True when the dynamic-security plugin, not a password file, decides who may do what."""
        return self._dynsec_config is not None

    @property
    def dynsec_config(self) -> Path | None:
        """The dynamic-security JSON file (access-controlled mode), else None."""
        return self._dynsec_config

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Render the config, write the password file, launch mosquitto, wait until it serves."""
        if self.running:
            raise BrokerError(f"broker already running (pid {self.pid})")
        executable = self._executable or find_mosquitto()
        self._data_dir.mkdir(parents=True, exist_ok=True)
        attempts = 3 if self._auto_ports else 1
        for attempt in range(attempts):
            if self._port == 0:
                self._port = free_port(self.host)
            if self._ws_port == 0:
                self._ws_port = free_port(self.host)
            try:
                self._launch(executable)
                return
            except BrokerError:
                if attempt + 1 < attempts and b"in use" in self._log_since_start():
                    self._port = self._ws_port = 0  # lost a race for the port: pick new ones
                    continue
                raise

    def _launch(self, executable: Path) -> None:
        if self._dynsec_config is not None:
            if not self._dynsec_config.is_file():
                raise BrokerError(
                    f"dynamic-security file {self._dynsec_config} is missing: create it with "
                    "bloomwire.access.bootstrap(data_dir) before starting the broker"
                )
            auth: dict[str, Any] = {
                "dynsec_config": str(self._dynsec_config.resolve()),
                "dynsec_plugin": str(self._dynsec_plugin or find_dynsec_plugin()),
            }
        else:
            auth = {"password_file": str(self.password_path.resolve())}
        self.config_path.write_text(
            render_config(
                port=self._port,
                ws_port=self._ws_port,
                data_dir=str(self._data_dir.resolve()),
                log_dest=f"file {self.log_path.resolve()}",
                bind_address=self._host,
                # libwebsockets binds an interface NAME: loopback, or every interface (template)
                ws_interface="lo" if self._host.startswith(("127.", "localhost")) else "0.0.0.0",
                **auth,
            ),
            encoding="utf-8",
        )
        if self._dynsec_config is None:
            write_password_file(self.password_path, self._users)
        self.log_path.touch()
        self._log_offset = self.log_path.stat().st_size
        with self.log_path.open("ab") as log:
            proc = subprocess.Popen(
                [str(executable), "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # Ctrl-C in a terminal reaches us, not the broker
                env=broker_env(),
            )
        self._proc = proc
        self._finalizer = weakref.finalize(self, _reap, proc)
        self._wait_ready(proc)

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self._start_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self._forget()
                raise BrokerError(
                    f"mosquitto exited with status {proc.returncode} while starting on "
                    f"{self.host}:{self._port} (ws {self._ws_port}); log tail:\n{self.log_tail()}"
                )
            if _RUNNING_MARK in self._log_since_start() and all(
                _accepts(self.host, p) for p in (self._port, self._ws_port)
            ):
                return
            time.sleep(0.02)
        self.stop()
        raise BrokerError(
            f"mosquitto did not accept connections on {self.host}:{self._port} within "
            f"{self._start_timeout:.0f} s; log tail:\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the broker (it saves its persistence file), SIGKILL it after ``timeout``."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._forget()

    def kill(self) -> None:
        """SIGKILL the broker to simulate a crash (state since the last autosave is lost)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        self._forget()

    def restart(self) -> None:
        """Stop and start again on the same ports and data directory."""
        self.stop()
        self.start()

    def _forget(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # reaps the process if still needed, then detaches
            self._finalizer = None
        self._proc = None

    # --- users --------------------------------------------------------------------------------

    def _password_mode(self, what: str) -> None:
        if self._dynsec_config is not None:
            raise BrokerError(
                f"cannot {what} on an access-controlled broker: use bloomwire.access.Accounts "
                "(or `bloomwire accounts`)"
            )

    def add_user(self, name: str, password: str, *, timeout: float = 5.0) -> None:
        """Add or change a user; a running broker reloads its password file (SIGHUP)."""
        self._password_mode("add a password-file user")
        self._users[_check_username(name)] = password
        write_password_file(self.password_path, self._users)
        self.reload(timeout=timeout)

    def remove_user(self, name: str, *, timeout: float = 5.0) -> None:
        """Remove a user (connected clients stay connected until they reconnect)."""
        self._password_mode("remove a password-file user")
        self._users.pop(name, None)
        write_password_file(self.password_path, self._users)
        self.reload(timeout=timeout)

    def reload(self, *, timeout: float = 5.0) -> None:
        """SIGHUP the broker and wait until its log says it reloaded (no-op when stopped)."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        before = self._log_since_start().count(_RELOAD_MARK)
        os.kill(proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while self._log_since_start().count(_RELOAD_MARK) <= before:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BrokerError(f"mosquitto did not reload its config; log tail:\n{self.log_tail()}")
            time.sleep(0.01)

    # --- logs ---------------------------------------------------------------------------------

    def _log_since_start(self) -> bytes:
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(self._log_offset)
                return fh.read()
        except FileNotFoundError:
            return b""

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines the broker logged since its latest start."""
        text = self._log_since_start().decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])

    # --- context manager ----------------------------------------------------------------------

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        mode = ", access-controlled" if self.access_controlled else ""
        return f"Mosquitto({self.host}:{self._port}, ws {self._ws_port}, {state}{mode}, {self._data_dir})"


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bloomwire.runtime.broker docker-config``: the compose broker's config (Makefile)."""
    parser = argparse.ArgumentParser(prog="python -m bloomwire.runtime.broker", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("docker-config", help="print the compose broker config")
    parser.parse_args(argv)
    print(render_docker_config(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
