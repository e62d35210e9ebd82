"""Run the whole backbone on one machine: a Mosquitto from ``broker/`` and one process per service."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bloomwire import topics
from bloomwire.broker import Mosquitto, ensure_secret
from bloomwire.errors import BrokerError
from bloomwire.mqtt import Connection
from bloomwire.settings import Settings

#: Service name -> module exposing ``build(settings) -> Service``.
SERVICES: dict[str, str] = {
    "persister": "services.persister",
    "dispatch": "services.dispatch",
    "alerts": "services.alerts",
}
OPERATOR = "operator"


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
                seen[msg.topic.split("/")[1]] = msg.payload.decode(errors="replace")
    finally:
        await conn.stop()
    return seen


@dataclass
class Stack:
    """A broker (unless settings name one) and the services, as child processes."""

    settings: Settings
    services: Sequence[str] = tuple(SERVICES)
    extra_users: Sequence[str] = ()
    broker: Mosquitto | None = None
    children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    log_dir: Path | None = None

    def start_broker(self) -> Settings:
        """Start Mosquitto on a free port unless settings point at a broker; return the settings."""
        data_dir = self.settings.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        if self.settings.external_broker:
            return self.settings
        names = [*self.services, OPERATOR, *self.extra_users]
        users = {n: ensure_secret(data_dir, n) for n in names}
        self.broker = Mosquitto(data_dir / "broker", users=users, ws_port=self.settings.broker_ws_port)
        self.broker.start()
        self.settings = self.settings.with_broker(self.broker.host, self.broker.port)
        return self.settings

    def add_user(self, name: str) -> str:
        """Give ``name`` a password (and, with our own broker, an account); return it."""
        password = ensure_secret(self.settings.data_dir, name)
        if self.broker is not None:
            self.broker.add_user(name, password)
        return password

    def start_service(self, name: str) -> subprocess.Popen[bytes]:
        """Launch ``bloomwire service run NAME`` as a child process."""
        env = {**os.environ, **self.settings.to_env(), "BLOOMWIRE_BROKER_USERNAME": name}
        log_dir = self.log_dir or self.settings.data_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        with (log_dir / f"{name}.log").open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "bloomwire", "service", "run", name],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C goes to us; we stop children in order
            )
        self.children[name] = proc
        return proc

    def start(self, timeout: float = 60.0) -> Settings:
        """Broker, then every service; returns once all say online."""
        self.start_broker()
        for name in self.services:
            self.start_service(name)
        try:
            asyncio.run(wait_online(self.settings, self.services, timeout))
        except BaseException:
            self.stop()
            raise
        return self.settings

    def check(self) -> list[str]:
        """Names of services whose process has exited."""
        return [n for n, p in self.children.items() if p.poll() is not None]

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM every service, wait (SIGKILL after ``timeout``), then stop the broker."""
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
