"""`bloomwire up` keeps its stack running: the supervisor thread beside :class:`~.supervisor.Stack`.

Every 0.1 s it looks at the service processes: one that exited is started again after the delay
:class:`~bloomwire.app.restarts.Restarts` gives (logged and counted); a crash loop is logged, counted
and published as the service's retained status (``{"state": "offline", "reason": "crash loop: ..."}``),
because a crashed service cannot say so itself and its Last Will says only ``offline``. The
broker is never stopped for a service; if the broker itself dies it is started again on the same
ports. Its own MQTT login (``monitor``) reads ``$SYS/broker/#`` and the services' status, and its
Prometheus exporter serves restarts, crash loops, states and the broker's ``$SYS`` figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from bloomwire.app.restarts import Restarts
from bloomwire.contract import topics
from bloomwire.contract.events import ServiceState, ServiceStatus, now, parse_service_status
from bloomwire.errors import BloomwireError
from bloomwire.runtime.broker import Mosquitto
from bloomwire.runtime.log import get_logger
from bloomwire.runtime.metrics import Exporter, Figure, FiguresCollector
from bloomwire.runtime.mqtt import Connection, Message
from bloomwire.runtime.settings import Settings
from bloomwire.runtime.sysstats import SYS_BROKER_FILTER, BrokerStats

log = get_logger("bloomwire.supervisor")

#: A service exits with this when its metrics port is taken: started again on another port at once.
EXIT_PORT_IN_USE = 75
POLL_S = 0.1
#: A crash loop's status is published this long after the exit, after the Last Will's ``offline``.
REPORT_AFTER_S = 0.3
LOOP_PREFIX = "crash loop"
#: Seconds between tries at starting a broker that died and would not start again.
BROKER_RETRY_S = 5.0


@dataclass
class Hooks:
    """What the supervisor may do to the stack (all called from the supervisor thread)."""

    children: Callable[[], Mapping[str, subprocess.Popen[bytes]]]
    start: Callable[[str, int], subprocess.Popen[bytes]]
    port_taken: Callable[[str], object]
    broker: Callable[[], Mosquitto | None]


@dataclass
class Supervision:
    """Restart bookkeeping over the stack's processes (one :meth:`poll` per tick; thread-safe reads)."""

    hooks: Hooks
    restarts: Restarts = field(default_factory=Restarts)
    report: Callable[[str, str], None] = lambda _name, _reason: None
    clock: Callable[[], float] = time.monotonic
    broker_restarts: int = 0
    #: No new try at starting a dead broker before this (clock time).
    broker_retry_at: float = 0.0
    #: Service -> when to start it again.
    _pending: dict[str, float] = field(default_factory=dict)
    _reports: dict[str, tuple[float, str]] = field(default_factory=dict)
    _reasons: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def poll(self) -> None:
        """Notice exits, start what is due, report crash loops, notice recoveries."""
        now = self.clock()
        for name, proc in list(self.hooks.children().items()):
            code = proc.poll()
            if code is None:
                self._running(name)
            elif name not in self._pending:
                self._exited(name, code, now)
        for name, due in list(self._pending.items()):
            if due <= now:
                del self._pending[name]
                self._start(name)
        for name, (at, reason) in list(self._reports.items()):
            if at <= now:
                del self._reports[name]
                self.report(name, reason)
        self._watch_broker()

    def _running(self, name: str) -> None:
        with self._lock:
            recovered = self.restarts.check_stable(name)
        if recovered:
            log.info("service recovered from its crash loop", service=name)

    def _exited(self, name: str, code: int, now: float) -> None:
        if code == EXIT_PORT_IN_USE:
            log.warning("metrics port taken; starting the service on another", service=name)
            self.hooks.port_taken(name)
            self._pending[name] = now
            return
        with self._lock:
            decision = self.restarts.exited(name)
            if decision.in_loop:
                self._reasons[name] = decision.reason
        self._pending[name] = now + decision.delay
        how = f"exit code {code}" if code >= 0 else f"signal {-code}"
        if decision.in_loop:
            log.error("service in a crash loop", service=name, exited=how, reason=decision.reason)
            self._reports[name] = (now + REPORT_AFTER_S, decision.reason)
        else:
            log.warning("service exited; restarting", service=name, exited=how, delay_s=decision.delay)

    def _start(self, name: str) -> None:
        with self._lock:
            count = self.restarts.restarts(name) + 1
        try:
            proc = self.hooks.start(name, count)
        except (OSError, BloomwireError) as exc:
            log.error("could not restart service", service=name, error=str(exc))
            with self._lock:
                decision = self.restarts.exited(name)
            self._pending[name] = self.clock() + decision.delay
            return
        with self._lock:
            self.restarts.started(name, restart=True)
        log.info("service restarted", service=name, pid=proc.pid, restarts=count)

    def _watch_broker(self) -> None:
        broker = self.hooks.broker()
        if broker is None or broker.running or self.clock() < self.broker_retry_at:
            return
        log.error("broker exited; starting it again on the same ports")
        try:
            broker.start()
        except BloomwireError as exc:
            self.broker_retry_at = self.clock() + BROKER_RETRY_S
            log.error("broker restart failed; retrying", error=str(exc), retry_s=BROKER_RETRY_S)
            return
        self.broker_restarts += 1
        log.info("broker restarted", pid=broker.pid, restarts=self.broker_restarts)

    # --- read from other threads ----------------------------------------------------------------

    def looping(self) -> list[str]:
        """Services in a crash loop now."""
        with self._lock:
            return self.restarts.looping()

    def restart_counts(self, names: list[str]) -> dict[str, int]:
        """How often each of ``names`` was restarted."""
        with self._lock:
            return {n: self.restarts.restarts(n) for n in names}

    def loop_reason(self, name: str) -> str | None:
        """The latest crash-loop reason of ``name`` while it is in the loop, else None."""
        with self._lock:
            return self._reasons.get(name) if self.restarts.in_loop(name) else None


class Monitor:
    """The supervisor thread: :class:`Supervision` every tick, the ``monitor`` MQTT login, metrics."""

    def __init__(self, settings: Settings | None, supervision: Supervision, services: list[str]) -> None:
        #: The ``monitor`` login; None: no MQTT (no crash-loop status, no $SYS figures).
        self.settings = settings
        self.supervision = supervision
        self.services = services
        self.stats = BrokerStats()
        self.states: dict[str, ServiceStatus] = {}
        self.registry = CollectorRegistry()
        self.registry.register(self.stats)
        self.registry.register(FiguresCollector(self.figures))
        self.exporter: Exporter | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: Connection | None = None
        supervision.report = self._report

    # --- thread ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Run the supervisor thread (restarts begin now)."""
        self._thread = threading.Thread(target=self._main, name="bloomwire-supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop restarting and disconnect; the stack stops its processes after this."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)
            self._thread = None
        if self.exporter is not None:
            self.exporter.close()
            self.exporter = None

    def _main(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        conn = None
        if self.settings is not None:
            conn = Connection(self.settings, self.settings.broker_username or "monitor")
            conn.subscribe(SYS_BROKER_FILTER, qos=0)
            conn.subscribe(topics.ALL_SERVICE_STATUS_FILTER, qos=1)
            conn.start()
            self._conn = conn
        try:
            while not self._stop.is_set():
                try:
                    self.supervision.poll()
                except Exception:  # the supervisor must outlive any one failure
                    log.exception("supervisor tick failed")
                if conn is None:
                    await asyncio.sleep(POLL_S)
                    continue
                await conn.wait_message(POLL_S)
                for msg in conn.drain(1000):
                    self._on_message(msg)
        finally:
            self._conn = None
            if conn is not None:
                await conn.stop(announce_offline=False)

    # --- MQTT -----------------------------------------------------------------------------------

    def _on_message(self, msg: Message) -> None:
        if msg.topic.startswith("$SYS/"):
            self.stats.update(msg.topic, msg.payload)
            return
        name = msg.topic.split("/")[1] if msg.topic.count("/") == 2 else None
        if name is None:
            return
        status = parse_service_status(msg.payload)
        self.states[name] = status
        reason = self.supervision.loop_reason(name)
        if reason and status.state is ServiceState.OFFLINE and not status.reason.startswith(LOOP_PREFIX):
            self._report(name, reason)  # its Last Will came after our report: say it again

    def _report(self, name: str, reason: str) -> None:
        conn = self._conn
        if conn is None or not conn.connected.is_set():
            return
        status = ServiceStatus(state=ServiceState.OFFLINE, reason=reason, since=now())
        with contextlib.suppress(BloomwireError, RuntimeError, ValueError):
            conn.publish(topics.service_status(name), status.model_dump_json(), qos=1, retain=True)

    # --- metrics --------------------------------------------------------------------------------

    def figures(self) -> Iterator[Figure]:
        """Restarts, crash loops and states of the services, for Prometheus."""
        sup = self.supervision
        looping = set(sup.looping())
        children = sup.hooks.children()
        for name, count in sup.restart_counts(self.services).items():
            labels = {"service": name}
            yield Figure(
                "bloomwire_service_restarts", "Times the supervisor restarted the service", count, labels
            )
            yield Figure(
                "bloomwire_service_crash_loop",
                "1 while in a crash loop",
                float(name in looping),
                labels,
                counter=False,
            )
            proc = children.get(name)
            running = proc is not None and proc.poll() is None
            yield Figure(
                "bloomwire_service_running", "1 while its process runs", float(running), labels, counter=False
            )
            said = self.states.get(name)
            for state in ServiceState:
                value = float(said is not None and said.state is state)
                yield Figure(
                    "bloomwire_service_state",
                    "What the service says on services/N/status (1 = current)",
                    value,
                    {"service": name, "state": state.value},
                    counter=False,
                )
        yield Figure(
            "bloomwire_broker_restarts", "Times the supervisor restarted the broker", sup.broker_restarts
        )
