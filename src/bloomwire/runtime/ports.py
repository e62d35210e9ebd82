"""Stable addresses: the ports Bloomwire listens on, chosen once per data dir and kept.

The first start of ``bloomwire up`` (or ``broker run``) takes the configured port of each
listener (``BLOOMWIRE_BROKER_LISTEN_PORT``, ...), or a free one when it is taken or configured
as 0, and records it in ``DATA_DIR/ports.json``. Later starts reuse the recorded port, so the
retained access messages, the printed commands and a Prometheus scrape configuration stay right.
A recorded port found taken later is an error for the addresses devices hold (the broker, the web
service) and is replaced for the metrics exporters (see :meth:`PortBook.claim`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from pathlib import Path

from bloomwire.errors import BrokerError
from bloomwire.runtime.broker import RESERVED_PORTS, free_port

PORTS_FILE = "ports.json"

MQTT = "mqtt"
WEBSOCKETS = "websockets"
WEB = "web"
#: ``metrics/<name>``: ``metrics/up`` is the supervisor's own exporter.
METRICS_PREFIX = "metrics/"
SUPERVISOR = "up"
#: Offsets from ``BLOOMWIRE_METRICS_PORT`` of each process's default metrics port.
METRICS_OFFSETS: dict[str, int] = {
    SUPERVISOR: 0,
    "persister": 1,
    "dispatch": 2,
    "alerts": 3,
    "provisioner": 4,
    "web": 5,
}


def metrics_key(name: str) -> str:
    """The ports.json key of ``name``'s metrics exporter."""
    return METRICS_PREFIX + name


def default_metrics_port(base: int, name: str) -> int:
    """``name``'s default metrics port: ``base`` + its offset; 0 (a free one) when ``base`` is 0 or
    ``name`` has no offset."""
    if base == 0:
        return 0
    offset = METRICS_OFFSETS.get(name)
    if offset is None or base + offset > 65535:
        return 0
    return base + offset


def is_free(host: str, port: int) -> bool:
    """True if a listener could bind ``host:port`` now (SO_REUSEADDR, as Mosquitto binds)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def read_ports(data_dir: Path) -> dict[str, int]:
    """The ports recorded for ``data_dir`` (empty when none are)."""
    path = Path(data_dir) / PORTS_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise BrokerError(f"{path} is unreadable ({exc}); fix or delete it to choose ports again") from None
    if not isinstance(raw, dict):
        raise BrokerError(f"{path} is not a JSON object; fix or delete it to choose ports again")
    return {str(k): int(v) for k, v in raw.items() if isinstance(v, int) and 0 < v <= 65535}


class PortBook:
    """The recorded ports of one data dir (``DATA_DIR/ports.json``); thread-safe."""

    def __init__(self, data_dir: Path, host: str = "127.0.0.1") -> None:
        self.path = Path(data_dir) / PORTS_FILE
        self.host = host
        self._lock = threading.Lock()
        self._ports = read_ports(Path(data_dir))
        #: Keys first given a port by this book (a lost bind race may choose again for those).
        self.fresh: set[str] = set()

    @property
    def ports(self) -> dict[str, int]:
        """A copy of what is recorded."""
        with self._lock:
            return dict(self._ports)

    def claim(
        self,
        key: str,
        wanted: int,
        *,
        host: str | None = None,
        replace_taken: bool = False,
        insist: bool = False,
    ) -> int:
        """The port of ``key``: the recorded one, else ``wanted`` if free, else a free one; recorded.

        ``insist`` (a port set explicitly, not a default): ``wanted`` replaces a different port
        recorded by an earlier start. A recorded port that is taken now is left to
        :meth:`check_free` (devices hold that address), unless ``replace_taken``: then a free port
        replaces it (metrics exporters).
        """
        where = host or self.host
        with self._lock:
            recorded = self._ports.get(key)
            if recorded is not None and insist and wanted and wanted != recorded and key not in self.fresh:
                return self._choose(key, wanted, where)
            if recorded is not None:
                if replace_taken and not is_free(where, recorded):
                    return self._choose(key, 0, where)
                return recorded
            return self._choose(key, wanted, where)

    def replace(self, key: str, *, host: str | None = None) -> int:
        """Give ``key`` another free port (its port was taken between the check and the bind)."""
        with self._lock:
            return self._choose(key, 0, host or self.host)

    def check_free(self, key: str, port: int, *, host: str | None = None) -> None:
        """Raise a clear :class:`BrokerError` if the recorded ``port`` of ``key`` is taken."""
        where = host or self.host
        if not is_free(where, port):
            raise BrokerError(
                f"port {port} ({key}, recorded in {self.path}) is in use on {where}: stop whatever "
                "holds it (an earlier broker of this data dir still running?), or delete that entry "
                "of the file to choose a new port (devices told the old one will need the new one)"
            )

    def _choose(self, key: str, wanted: int, host: str) -> int:
        used = {p for k, p in self._ports.items() if k != key}
        port = wanted
        if not port or port in used or not is_free(host, port):
            port = free_port(host)
            while port in used or port in RESERVED_PORTS:
                port = free_port(host)
        self._ports[key] = port
        self.fresh.add(key)
        self._save()
        return port

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(self._ports, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            os.replace(tmp, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
