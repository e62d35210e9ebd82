"""``bloomwire status``: the stack at a glance, for an operator.

Two sources, each optional:

* the broker (as ``operator``, a few seconds): every service's retained ``services/N/status``
  (read with :func:`~bloomwire.contract.events.parse_service_status`) and the broker's ``$SYS``
  figures;
* the Prometheus exporters whose ports ``bloomwire up`` recorded in ``DATA_DIR/ports.json``,
  scraped twice ``interval`` apart: rates, failures, queue lag, restarts, open alerts by rule.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from bloomwire.contract import topics
from bloomwire.contract.events import ServiceState, ServiceStatus, parse_service_status
from bloomwire.errors import BloomwireError, BrokerError
from bloomwire.runtime import ports
from bloomwire.runtime.broker import SECRETS_DIR
from bloomwire.runtime.mqtt import Connection
from bloomwire.runtime.settings import Settings
from bloomwire.runtime.sysstats import SYS_BROKER_FILTER, SYS_PREFIX

OPERATOR = "operator"
SCRAPE_TIMEOUT_S = 2.0
#: How long retained messages may take to arrive after subscribing.
READ_S = 1.5

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def scrape(url: str, timeout: float = SCRAPE_TIMEOUT_S) -> Samples:
    """Every sample of one ``/metrics`` page: name -> {sorted labels: value}."""
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        text = answer.read().decode("utf-8", errors="replace")
    out: Samples = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
    return dict(out)


def total(samples: Samples, name: str, **match: str) -> float:
    """The sum of ``name``'s samples whose labels include ``match``."""
    found = samples.get(name, {})
    want = set(match.items())
    return sum(v for labels, v in found.items() if want <= set(labels))


def metrics_url(host: str, port: int) -> str:
    """``http://host:port/metrics`` (an exporter on every interface is asked on loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    where = f"[{host}]" if ":" in host else host
    return f"http://{where}:{port}/metrics"


def healthy(url: str) -> tuple[bool, str]:
    """Whether the service behind ``url`` says it is started and connected (compose healthchecks)."""
    try:
        samples = scrape(url)
    except (OSError, urllib.error.URLError, ValueError) as exc:
        return False, f"no metrics at {url}: {exc}"
    ready = samples.get("bloomwire_service_ready", {})
    if ready and all(v == 1 for v in ready.values()):
        return True, "ready"
    return False, "not ready (not started or not connected to the broker)"


@dataclass
class ServiceView:
    """One row of the status table."""

    name: str
    status: ServiceStatus | None = None
    metrics: bool = False
    received_per_s: float | None = None
    handled_per_s: float | None = None
    failures: float | None = None
    queued: float | None = None
    lag_s: float | None = None
    restarts: float | None = None
    crash_loop: bool = False


@dataclass
class StatusReport:
    """What ``bloomwire status`` found."""

    broker: str
    broker_reachable: bool = False
    broker_error: str = ""
    services: dict[str, ServiceView] = field(default_factory=dict)
    sys: dict[str, str] = field(default_factory=dict)
    alerts_open: dict[str, float] = field(default_factory=dict)
    #: True when the alerts service's metrics answered (so no open alert means none).
    alerts_reporting: bool = False
    persister: dict[str, float] = field(default_factory=dict)

    @property
    def all_online(self) -> bool:
        """True when every service known says online and none is in a crash loop."""
        views = self.services.values()
        return bool(views) and all(
            v.status is not None and v.status.state is ServiceState.ONLINE and not v.crash_loop for v in views
        )


def broker_address(settings: Settings) -> tuple[str, int] | None:
    """The broker to read: the one the settings name, else the port ``up`` recorded."""
    if settings.external_broker:
        return settings.broker_host, settings.broker_port
    port = ports.read_ports(settings.data_dir).get(ports.MQTT)
    return (settings.broker_host, port) if port else None


def operator_login(settings: Settings) -> Settings:
    """Settings that log in as ``operator`` (its password from the environment or the secrets)."""
    if settings.broker_username == OPERATOR and settings.broker_password is not None:
        return settings
    path = settings.data_dir / SECRETS_DIR / OPERATOR
    try:
        password = path.read_text(encoding="utf-8").strip()
    except OSError:
        raise BrokerError(f"no operator password in {path} (BLOOMWIRE_DATA_DIR of the stack?)") from None
    return settings.as_identity(OPERATOR, password)


async def read_broker(
    settings: Settings, wait: float = READ_S
) -> tuple[dict[str, ServiceStatus], dict[str, str]]:
    """The services' retained status and the broker's ``$SYS`` values (read as ``operator``)."""
    conn = Connection(operator_login(settings), OPERATOR)
    conn.subscribe(topics.ALL_SERVICE_STATUS_FILTER, qos=1)
    conn.subscribe(SYS_BROKER_FILTER, qos=0)
    conn.start()
    statuses: dict[str, ServiceStatus] = {}
    sys_values: dict[str, str] = {}
    try:
        await conn.wait_connected(5.0)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            await conn.wait_message(0.1)
            for msg in conn.drain(1000):
                if msg.topic.startswith(SYS_PREFIX):
                    sys_values[msg.topic[len(SYS_PREFIX) :]] = msg.payload.decode("utf-8", "replace")
                elif msg.topic.count("/") == 2:
                    statuses[msg.topic.split("/")[1]] = parse_service_status(msg.payload)
    finally:
        await conn.stop(announce_offline=False)
    return statuses, sys_values


def _scrape_all(urls: Mapping[str, str]) -> dict[str, Samples]:
    out: dict[str, Samples] = {}
    for name, url in urls.items():
        with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
            out[name] = scrape(url)
    return out


def _rate(after: Samples, before: Samples, name: str, seconds: float) -> float:
    return max(0.0, total(after, name) - total(before, name)) / seconds


def _fill_from_metrics(view: ServiceView, first: Samples, second: Samples, seconds: float) -> None:
    view.metrics = True
    view.received_per_s = _rate(second, first, "bloomwire_messages_received_total", seconds)
    view.handled_per_s = _rate(second, first, "bloomwire_messages_handled_total", seconds)
    view.failures = total(second, "bloomwire_handler_failures_total") + total(
        second, "bloomwire_messages_dead_lettered_total"
    )
    view.queued = total(second, "bloomwire_queue_messages")
    view.lag_s = total(second, "bloomwire_queue_lag_seconds")


def _fill_from_supervisor(report: StatusReport, samples: Samples) -> None:
    for labels, value in samples.get("bloomwire_service_restarts_total", {}).items():
        name = dict(labels)["service"]
        report.services.setdefault(name, ServiceView(name)).restarts = value
    for labels, value in samples.get("bloomwire_service_crash_loop", {}).items():
        name = dict(labels)["service"]
        report.services.setdefault(name, ServiceView(name)).crash_loop = value == 1


def gather(settings: Settings, interval: float = 1.0) -> StatusReport:
    """Read the broker and scrape the recorded exporters (twice, ``interval`` apart)."""
    address = broker_address(settings)
    report = StatusReport(broker=f"mqtt://{address[0]}:{address[1]}" if address else "(none recorded)")
    recorded = ports.read_ports(settings.data_dir)
    urls = {
        key[len(ports.METRICS_PREFIX) :]: metrics_url(settings.metrics_host, port)
        for key, port in recorded.items()
        if key.startswith(ports.METRICS_PREFIX)
    }
    started = time.monotonic()
    first = _scrape_all(urls)
    if address is not None:
        try:
            statuses, report.sys = asyncio.run(read_broker(settings.with_broker(*address)))
            report.broker_reachable = True
        except BloomwireError as exc:
            statuses, report.broker_error = {}, str(exc)
        for name, status in statuses.items():
            report.services.setdefault(name, ServiceView(name)).status = status
    time.sleep(max(0.0, interval - (time.monotonic() - started)))
    second = _scrape_all(urls)
    seconds = max(0.001, time.monotonic() - started)
    for name, samples in second.items():
        if name == ports.SUPERVISOR:
            _fill_from_supervisor(report, samples)
            continue
        view = report.services.setdefault(name, ServiceView(name))
        _fill_from_metrics(view, first.get(name, {}), samples, seconds)
    alerts = second.get("alerts", {})
    report.alerts_reporting = "alerts" in second
    for labels, value in alerts.get("bloomwire_alerts_open", {}).items():
        rule = dict(labels)["rule"]
        report.alerts_open[rule] = report.alerts_open.get(rule, 0) + value
    persister = second.get("persister", {})
    for labels, value in persister.get("bloomwire_persister_events_total", {}).items():
        report.persister[dict(labels)["result"]] = value
    return report


# --- rendering -----------------------------------------------------------------------------------


def _num(value: float | None, fmt: str = "{:,.0f}") -> str:
    return "—" if value is None else fmt.format(value)


def _state(view: ServiceView) -> str:
    if view.crash_loop:
        return "[bold red]crash loop[/bold red]"
    if view.status is None:
        return "[dim]unknown[/dim]"
    colour = {"online": "green", "degraded": "yellow", "offline": "red"}[view.status.state.value]
    return f"[{colour}]{view.status.state.value}[/{colour}]"


def render(report: StatusReport, console: Console) -> None:
    """Print the report: services, broker, alerts, persister outcomes."""
    table = Table(title=f"Bloomwire status · broker {report.broker}")
    for column in ("service", "state", "reason", "restarts", "in/s", "handled/s", "failed", "queued", "lag"):
        table.add_column(column, justify="left" if column in ("service", "state", "reason") else "right")
    for name in sorted(report.services):
        v = report.services[name]
        reason = v.status.reason if v.status is not None else ""
        table.add_row(
            name,
            _state(v),
            reason[:60],
            _num(v.restarts),
            _num(v.received_per_s, "{:,.1f}"),
            _num(v.handled_per_s, "{:,.1f}"),
            _num(v.failures),
            _num(v.queued),
            _num(v.lag_s, "{:.2f} s"),
        )
    console.print(table)
    console.print(_broker_line(report))
    console.print(_alerts_line(report.alerts_open, report.alerts_reporting))
    if report.persister:
        parts = [f"{k} {v:,.0f}" for k, v in sorted(report.persister.items())]
        console.print("persister events: " + " · ".join(parts))
    if not any(v.metrics for v in report.services.values()):
        console.print("[dim]no metrics answered (is `bloomwire up` running for this data dir?)[/dim]")


def _broker_line(report: StatusReport) -> str:
    if not report.broker_reachable:
        why = (
            report.broker_error or "no broker recorded for this data dir (BLOOMWIRE_BROKER_PORT to name one)"
        )
        return f"[red]broker not reachable:[/red] {why}"
    s = report.sys

    def get(key: str, per_s: bool = False) -> str:
        words = s.get(key, "").split()
        try:
            value = float(words[0])
        except (IndexError, ValueError):
            return "?"
        return f"{value / 60:,.1f}" if per_s else f"{value:,.0f}"

    return (
        f"broker: {get('clients/connected')} clients · publishes "
        f"{get('load/publish/received/1min', True)}/s in, {get('load/publish/sent/1min', True)}/s out "
        "(1-min average) · "
        f"{get('publish/messages/dropped')} dropped · {get('retained messages/count')} retained"
    )


def _alerts_line(open_by_rule: Mapping[str, float], reporting: bool) -> str:
    if not open_by_rule:
        return (
            "alerts open: none" if reporting else "alerts open: unknown (no metrics from the alerts service)"
        )
    parts: Iterable[str] = (f"{rule} {n:,.0f}" for rule, n in sorted(open_by_rule.items()))
    return f"alerts open ({sum(open_by_rule.values()):,.0f}): " + " · ".join(parts)
