"""``bloomwire``: the operator's command line. Settings are built here and passed down.

The benchmarks (:mod:`bloomwire.app.bench.commands`) and the clients' commands
(:mod:`bloomwire.app.clients.commands`: rider, shop, track, simulate, demo) are loaded on first
use (:class:`LazyGroup`), and each service by name from ``ALL_SERVICES``: a service process
(``bloomwire service run NAME``) imports its own service and none of the rest (not scipy, Starlette
or the simulator), which keeps it smaller and quicker to restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from bloomwire.app.accounts_cli import accounts_app
from bloomwire.app.entry import run_service
from bloomwire.app.status import gather, healthy, metrics_url, render
from bloomwire.app.supervision import EXIT_PORT_IN_USE
from bloomwire.app.supervisor import (
    ALL_SERVICES,
    ASSISTANT,
    DEFAULT_RIDERS,
    DEFAULT_SHOPS,
    NOTICES,
    SERVICES,
    WEB,
    Stack,
    service_settings,
)
from bloomwire.app.terminal import console, err, fail, make_settings
from bloomwire.errors import BloomwireError
from bloomwire.runtime import log
from bloomwire.runtime.metrics import Exporter, PortInUseError, ServiceMetrics, serve
from bloomwire.runtime.settings import Settings

#: Commands loaded on first use -> the module whose ``register(app)`` adds them.
LAZY_COMMANDS: dict[str, str] = {
    "db": "bloomwire.app.store_commands",
    "history": "bloomwire.app.store_commands",
    "store": "bloomwire.app.store_commands",
    "bench": "bloomwire.app.bench.commands",
    **dict.fromkeys(("rider", "shop", "track", "simulate", "demo"), "bloomwire.app.clients.commands"),
}


class LazyGroup(TyperGroup):
    """The root command group: :data:`LAZY_COMMANDS` are imported when run or listed in ``--help``."""

    # ``Any``: Typer's group API takes click's types, which newer Typers vendor under a private name.
    def list_commands(self, ctx: Any) -> list[str]:
        return [*super().list_commands(ctx), *LAZY_COMMANDS]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        module = LAZY_COMMANDS.get(cmd_name)
        if module is None:
            return super().get_command(ctx, cmd_name)
        register: Callable[[typer.Typer], None] = importlib.import_module(module).register
        holder = typer.Typer()
        register(holder)
        return typer.main.get_group(holder).commands.get(cmd_name)


app = typer.Typer(
    help="Bloomwire: MQTT delivery tracking for flower shops. Every command reads BLOOMWIRE_* "
    "environment variables (see README); options override them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=LazyGroup,
)
broker_app = typer.Typer(help="Run the project's Mosquitto broker.", no_args_is_help=True)
service_app = typer.Typer(help="Run one backbone service in the foreground.", no_args_is_help=True)
app.add_typer(broker_app, name="broker")
app.add_typer(service_app, name="service")
app.add_typer(accounts_app, name="accounts")  # broker accounts (bloomwire.app.accounts_cli)

DataDir = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Where broker data, the SQLite store and secrets live."),
]


@app.callback()
def root(
    ctx: typer.Context,
    data_dir: DataDir = None,
    log_level: Annotated[str | None, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = None,
) -> None:
    """Read settings once and hand them to the command."""
    overrides: dict[str, Any] = {}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    if log_level is not None:
        overrides["log_level"] = log_level.upper()
    try:
        settings = Settings(**overrides)
    except Exception as exc:
        err.print(f"[red]invalid settings:[/red] {exc}")
        raise typer.Exit(2) from None
    log.configure(settings.log_level, json=settings.log_json)
    ctx.obj = settings


Access = Annotated[
    bool,
    typer.Option(
        "--access/--no-access",
        help="Access control: Mosquitto's dynamic-security plugin gives every identity only its "
        "own topics (docs/security.md), and the provisioner gives each order's customer a login. "
        "--no-access: a password file (every user may use every topic).",
    ),
]
Shops = Annotated[
    str,
    typer.Option(
        help="Access control: shop accounts to bootstrap, comma-separated (passwords in "
        "DATA_DIR/secrets/<shop>; add more later with `bloomwire accounts add-shop`).",
    ),
]
Riders = Annotated[
    str,
    typer.Option(
        help="Access control: rider accounts to bootstrap, comma-separated (passwords in "
        "DATA_DIR/secrets/<rider>; add more later with `bloomwire accounts add-rider`).",
    ),
]


SHOPS_DEFAULT = ",".join(DEFAULT_SHOPS)
RIDERS_DEFAULT = ",".join(DEFAULT_RIDERS)


def _names(value: str) -> list[str]:
    """``"s1, s2,,s3"`` -> ``["s1", "s2", "s3"]``."""
    return [n.strip() for n in value.split(",") if n.strip()]


# --- broker ---------------------------------------------------------------------------------------


@broker_app.command("run")
def broker_run(
    ctx: typer.Context,
    port: Annotated[
        int | None,
        typer.Option(
            help="MQTT port (default: the recorded one, else BLOOMWIRE_BROKER_LISTEN_PORT; 0 = free)."
        ),
    ] = None,
    ws_port: Annotated[
        int | None,
        typer.Option(
            help="Websockets port (default: recorded, else BLOOMWIRE_BROKER_LISTEN_WS_PORT; 0 = free)."
        ),
    ] = None,
    access: Annotated[
        bool,
        typer.Option(
            "--access/--no-access",
            help="Access control (dynamic-security plugin, accounts bootstrapped: admin, "
            "provisioner, operator, persister, dispatch, alerts and --shops/--riders); default: "
            "a password file with the service accounts.",
        ),
    ] = False,
    shops: Shops = SHOPS_DEFAULT,
    riders: Riders = RIDERS_DEFAULT,
) -> None:
    """Run Mosquitto from broker/ in the foreground (with the service accounts) until Ctrl-C.

    Listens on the ports recorded in DATA_DIR/ports.json (chosen at the first start, as
    `bloomwire up` does), so `up` and `broker run` of one data dir share their addresses.
    """
    settings = make_settings(ctx)
    listen: dict[str, Any] = {}
    if port is not None:
        listen["broker_listen_port"] = port
    if ws_port is not None:
        listen["broker_listen_ws_port"] = ws_port
    try:
        stack = Stack(
            settings.model_copy(update=listen), access=access, shops=_names(shops), riders=_names(riders)
        )
        stack.start_broker()
    except BloomwireError as exc:
        raise fail(str(exc)) from None
    broker = stack.broker
    if broker is None:
        raise fail("BLOOMWIRE_BROKER_PORT names a broker already: unset it to run our own")
    console.print(
        f"Mosquitto running: mqtt://{broker.host}:{broker.port}, ws://{broker.host}:{broker.ws_port} "
        f"(pid {broker.pid}); passwords in {settings.data_dir / 'secrets'}. Ctrl-C stops it."
    )
    console.print(_connect_hint(stack.settings))
    _wait_for_signal(lambda: broker.running)
    broker.stop()
    console.print("Broker stopped cleanly.")


@contextlib.contextmanager
def _stop_signals() -> Iterator[threading.Event]:
    """Inside: SIGINT (Ctrl-C) and SIGTERM set the event instead of interrupting, so a stop that
    has begun is never cut short by a second Ctrl-C."""
    stopping = threading.Event()
    old = {s: signal.signal(s, lambda *_: stopping.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stopping
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _wait_for_signal(alive: Any) -> None:
    with _stop_signals() as stopping:
        while not stopping.is_set() and alive():
            stopping.wait(0.2)


# --- services -------------------------------------------------------------------------------------


@service_app.command("run")
def service_run(
    ctx: typer.Context,
    name: Annotated[
        str,
        typer.Argument(
            help="persister, dispatch, alerts, web (pages and the browsers' MQTT bridge), or "
            "provisioner (access control only)."
        ),
    ],
    metrics_port: Annotated[
        int | None,
        typer.Option(
            help=f"Serve Prometheus metrics on exactly this port, exit {EXIT_PORT_IN_USE} if it is taken "
            "(what `bloomwire up` passes). Default: BLOOMWIRE_METRICS_PORT, or a free port if that is taken.",
        ),
    ] = None,
) -> None:
    """Run one service against the broker named by BLOOMWIRE_BROKER_HOST/PORT.

    Its metrics are at http://BLOOMWIRE_METRICS_HOST:PORT/metrics (the port is logged).
    """
    settings = make_settings(ctx)
    if name not in ALL_SERVICES:
        raise fail(f"unknown service {name!r} (known: {', '.join(ALL_SERVICES)})")
    if not settings.external_broker:
        raise fail("set BLOOMWIRE_BROKER_PORT to the broker's port (or use `bloomwire up`)")
    settings = service_settings(settings, settings.broker_username or name)
    module = importlib.import_module(ALL_SERVICES[name])
    metrics = ServiceMetrics(name)
    try:
        service = module.build(settings, metrics=metrics)
    except BloomwireError as exc:  # e.g. a broken alert rules file: say where, no traceback
        raise fail(str(exc)) from None
    exporter = _serve_metrics(metrics, settings, metrics_port)
    try:
        asyncio.run(run_service(service, settings))
    finally:
        exporter.close()


def _serve_metrics(metrics: ServiceMetrics, settings: Settings, exact: int | None) -> Exporter:
    """The service's exporter: on ``exact`` (exit 75 if taken), else the setting or a free port."""
    host = settings.metrics_host
    try:
        exporter = serve(metrics.registry, host, settings.metrics_port if exact is None else exact)
    except PortInUseError as exc:
        if exact is not None:
            err.print(f"[bold red]error:[/bold red] {exc}")
            raise typer.Exit(EXIT_PORT_IN_USE) from None
        exporter = serve(metrics.registry, host, 0)
        log.get_logger("bloomwire.cli").warning(
            "metrics port taken; serving on a free one", wanted=settings.metrics_port, port=exporter.port
        )
    log.get_logger("bloomwire.cli").info("metrics", url=f"http://{host}:{exporter.port}/metrics")
    return exporter


@service_app.command("health")
def service_health(
    ctx: typer.Context,
    port: Annotated[int | None, typer.Option(help="Metrics port (default: BLOOMWIRE_METRICS_PORT).")] = None,
) -> None:
    """Exit 0 if the service on this machine's metrics port is started and connected (healthchecks)."""
    settings = make_settings(ctx)
    ok, why = healthy(metrics_url(settings.metrics_host, port or settings.metrics_port))
    console.print(why)
    if not ok:
        raise typer.Exit(1)


@app.command()
def up(
    ctx: typer.Context,
    access: Access = True,
    shops: Shops = SHOPS_DEFAULT,
    riders: Riders = RIDERS_DEFAULT,
) -> None:
    """Start a broker (unless settings name one) and every service; Ctrl-C stops them all.

    With access control (the default) the first start bootstraps the admin
    (for `bloomwire accounts`), the service accounts and the --shops/--riders
    accounts, passwords in DATA_DIR/secrets/<name>; later starts keep them.
    Each order's customer login goes to its shop on shops/S/orders/O/access.
    """
    settings = make_settings(ctx)
    try:
        services = (*SERVICES, ASSISTANT, NOTICES, WEB)
        stack = Stack(settings, services=services, access=access, shops=_names(shops), riders=_names(riders))
        settings = stack.start()  # stops what it started if it fails or is interrupted
    except BloomwireError as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        console.print("Interrupted while starting; stopped cleanly: services, then broker.")
        raise typer.Exit(130) from None
    try:
        with _stop_signals() as stopping:
            _run_until_stopped(stack, settings, access, stopping)
    except KeyboardInterrupt:  # Ctrl-C in the instant before the handlers above took over
        _stop_stack(stack)


def _run_until_stopped(stack: Stack, settings: Settings, access: bool, stopping: threading.Event) -> None:
    """Say what runs where, wait for Ctrl-C (or SIGTERM), then stop everything and say so."""
    mode = (
        f"access control ({len(stack.shops)} shops, {len(stack.riders)} riders)"
        if access
        else "password file"
    )
    console.print(
        f"Bloomwire up: broker mqtt://{settings.broker_host}:{settings.broker_port} "
        f"(ws {settings.broker_ws_port}, {mode}); services "
        f"{', '.join(stack.children)} online and supervised; store {settings.database_url}; passwords in "
        f"{settings.data_dir / 'secrets'}; logs in {settings.data_dir / 'logs'}; ports kept in "
        f"{settings.data_dir / 'ports.json'}. Ctrl-C stops everything."
    )
    console.print(
        f"Shop dashboard: {settings.web_url}/shop (log in as a shop, password in "
        f"{settings.data_dir / 'secrets'}/<shop>); customers open the tracking links "
        "`bloomwire shop order create` prints.",
        soft_wrap=True,
    )
    console.print(_connect_hint(settings, metrics=stack.supervisor_metrics_port))
    while not stopping.wait(0.5):
        pass
    _stop_stack(stack)


def _stop_stack(stack: Stack) -> None:
    console.print("Stopping: services, then broker …")
    looping = stack.check()
    restarts = {n: c for n, c in stack.restarts().items() if c}
    stack.stop()
    note = ", ".join(f"{n} restarted {c}x" for n, c in restarts.items())
    console.print("Stopped cleanly: services, then broker" + (f" ({note})." if note else "."))
    if looping:
        raise fail(f"service(s) in a crash loop at the end: {', '.join(looping)}; see their logs")


def _connect_hint(settings: Settings, metrics: int | None = None) -> str:
    """Commands with this stack's real addresses, for another terminal."""
    data = settings.data_dir
    lines = [
        "In another terminal:",
        f"  export BLOOMWIRE_DATA_DIR={data} BLOOMWIRE_BROKER_HOST={settings.broker_host} "
        f"BLOOMWIRE_BROKER_PORT={settings.broker_port}",
        "  bloomwire shop watch --shop s1   # a shop terminal (passwords in DATA_DIR/secrets)",
        "  bloomwire status                 # services, rates, lag, alerts at a glance",
        f"  mosquitto_sub -h {settings.broker_host} -p {settings.broker_port} -u operator "
        f"-P \"$(cat {data / 'secrets' / 'operator'})\" -t 'services/+/status' -v",
    ]
    if metrics is not None:
        lines.append(f"  curl -s http://{settings.metrics_host}:{metrics}/metrics   # supervisor, $SYS")
    return "\n".join(lines)


@app.command()
def status(
    ctx: typer.Context,
    interval: Annotated[float, typer.Option(help="Seconds between the two metric scrapes (rates).")] = 1.0,
) -> None:
    """Services online/degraded/offline, rates, lag, restarts, open alerts and the broker's figures.

    Reads the services' retained status and $SYS as `operator` from the broker of this data dir
    (or BLOOMWIRE_BROKER_PORT), and scrapes the metrics ports `bloomwire up` recorded in
    DATA_DIR/ports.json. Exit code 0 when every service is online, 1 otherwise.
    """
    report = gather(make_settings(ctx), interval=max(0.1, interval))
    render(report, console)
    if not report.all_online:
        raise typer.Exit(1)


def main() -> None:
    """Console-script entry point."""
    app()
