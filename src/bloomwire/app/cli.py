"""``bloomwire``: the operator's command line. Settings are built here and passed down."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from bloomwire.app.accounts_cli import accounts_app
from bloomwire.app.bench import mqttclients as bench_clients
from bloomwire.app.bench.report import Report, record
from bloomwire.app.clients.commands import register as register_client_commands
from bloomwire.app.supervision import EXIT_PORT_IN_USE
from bloomwire.app.supervisor import DEFAULT_RIDERS, DEFAULT_SHOPS, SERVICES, WEB, Stack
from bloomwire.errors import BloomwireError
from bloomwire.runtime import log
from bloomwire.runtime.metrics import Exporter, PortInUseError, ServiceMetrics, serve
from bloomwire.runtime.mqtt import Service
from bloomwire.runtime.settings import Settings

app = typer.Typer(
    help="Bloomwire: MQTT delivery tracking for flower shops. Every command reads BLOOMWIRE_* "
    "environment variables (see README); options override them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
broker_app = typer.Typer(help="Run the project's Mosquitto broker.", no_args_is_help=True)
service_app = typer.Typer(help="Run one backbone service in the foreground.", no_args_is_help=True)
db_app = typer.Typer(help="Manage the store's schema.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks that print figures.", no_args_is_help=True)
app.add_typer(broker_app, name="broker")
app.add_typer(service_app, name="service")
app.add_typer(db_app, name="db")
app.add_typer(bench_app, name="bench")
app.add_typer(accounts_app, name="accounts")  # broker accounts (bloomwire.app.accounts_cli)
# rider …, shop …, track, simulate, demo: the clients' commands (bloomwire.app.clients.commands).
register_client_commands(app)

console = Console()
err = Console(stderr=True)

DataDir = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Where broker data, the SQLite store and secrets live."),
]


def make_settings(ctx: typer.Context) -> Settings:
    """The settings of this invocation (environment + root options)."""
    settings: Settings = ctx.obj
    return settings


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


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print a clear error and return the exit to raise."""
    err.print(f"[bold red]error:[/bold red] {message}")
    return typer.Exit(code)


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
    from bloomwire.app.supervisor import ALL_SERVICES, service_settings

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
        asyncio.run(_run_until_signalled(service, settings))
    finally:
        exporter.close()


async def _run_until_signalled(service: Service, settings: Settings) -> None:
    """Run ``service`` until SIGINT or SIGTERM: the process's signals are the entry point's."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await service.run(settings, stop=stop, install_signals=False)


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
    from bloomwire.app.status import healthy, metrics_url

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
        stack = Stack(
            settings, services=(*SERVICES, WEB), access=access, shops=_names(shops), riders=_names(riders)
        )
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
    from bloomwire.app.status import gather, render

    report = gather(make_settings(ctx), interval=max(0.1, interval))
    render(report, console)
    if not report.all_online:
        raise typer.Exit(1)


# --- store ----------------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Apply the store's migrations (services also do this at start)."""
    from bloomwire.store import upgrade

    settings = make_settings(ctx)
    upgrade(settings.database_url)
    console.print(f"Store at {settings.database_url} is up to date.")


@app.command()
def history(ctx: typer.Context, order: Annotated[str, typer.Argument(help="The order id.")]) -> None:
    """Print an order's full timeline from the store: status, positions, chat, alerts."""
    from bloomwire.app.history import load_history, render_history

    settings = make_settings(ctx)
    try:
        found = load_history(settings.database_url, order)
    except BloomwireError as exc:
        raise fail(str(exc)) from None
    render_history(found, console)


# --- benchmarks -----------------------------------------------------------------------------------

Record = Annotated[
    str | None,
    typer.Option(
        "--record",
        metavar="KEY",
        help="Also write the figures, this command line, the date and the commit into the block "
        "<!-- measured:KEY --> … <!-- /measured:KEY --> of README.md and docs/*.md.",
    ),
]


def _record(key: str | None, reports: list[Any]) -> None:
    """Write ``reports`` into the docs' ``key`` block, if asked; say where."""
    if key is None:
        return
    try:
        paths = record(key, reports)
    except BloomwireError as exc:
        raise fail(str(exc)) from None
    console.print(f"figures recorded in {', '.join(str(p) for p in paths)}")


@bench_app.command("ingest")
def bench_ingest(
    ctx: typer.Context,
    events: Annotated[int, typer.Option(help="How many rider events to publish.")] = 20_000,
    rate: Annotated[int, typer.Option(help="Publish rate, events/s (0 = as fast as possible).")] = 5_000,
    riders: Annotated[int, typer.Option(help="Simulated riders publishing.")] = 50,
    ceiling: Annotated[bool, typer.Option(help="Also measure mosquitto_pub/sub QoS 1.")] = True,
    record: Record = None,
) -> None:
    """Publish rider chat events through a private broker into the persister; print figures.

    One lean QoS 1 connection sends the riders' events at the set rate (one
    write per 2 ms). Printed: events/s persisted, publish→committed (the
    device ack) and publish→canonical P50/P99, lost and duplicated events
    (checked in the store), and the mosquitto_pub→sub QoS 1 ceiling of the
    same broker with the ratio. Start with --rate 5000 for latency and
    --rate 0 for capacity.
    """
    from bloomwire.app.bench import ingest

    reports = ingest.main(
        make_settings(ctx),
        events=events,
        rate=rate,
        riders=riders,
        ceiling=ceiling,
        console=console,
    )
    _record(record, reports)


@bench_app.command("dispatch")
def bench_dispatch(
    ctx: typer.Context,
    orders: Annotated[int, typer.Option(help="Normal mode: orders created one at a time.")] = 200,
    riders: Annotated[int, typer.Option(help="Normal mode: riders online.")] = 50,
    peak_orders: Annotated[int, typer.Option(help="Peak mode: orders waiting at once.")] = 1000,
    peak_riders: Annotated[int, typer.Option(help="Peak mode: riders.")] = 500,
    seed: Annotated[int, typer.Option(help="Random seed of the city layout.")] = 0,
    record: Record = None,
) -> None:
    """Normal-mode decision latency (order created → offer) and the peak-mode batch time."""
    from bloomwire.app.bench import dispatch as bench

    reports = bench.main(
        make_settings(ctx),
        console=console,
        orders=orders,
        riders=riders,
        peak_orders=peak_orders,
        peak_riders=peak_riders,
        seed=seed,
    )
    _record(record, reports)


@bench_app.command("alerts")
def bench_alerts(
    ctx: typer.Context,
    orders: Annotated[int, typer.Option(help="Live orders in the store.")] = 10_000,
    riders: Annotated[int, typer.Option(help="Riders in the store.")] = 2_000,
    ticks: Annotated[int, typer.Option(help="Ticks to time.")] = 20,
    events: Annotated[int, typer.Option(help="Failed deliveries timed event → alert.")] = 100,
    database_url: Annotated[
        str | None, typer.Option(help="Store to seed (default: a temporary SQLite file).")
    ] = None,
    record: Record = None,
) -> None:
    """One alerts tick over many live orders, and event-committed → alert-raised latency."""
    from bloomwire.app.bench import alerts as bench

    reports = bench.main(
        make_settings(ctx),
        orders=orders,
        riders=riders,
        ticks=ticks,
        events=events,
        database_url=database_url,
        console=console,
    )
    _record(record, reports)


@bench_app.command("web")
def bench_web(
    ctx: typer.Context,
    orders: Annotated[int, typer.Option(help="Open orders on the dashboard (0 = skip the dashboard).")] = 500,
    riders: Annotated[int, typer.Option(help="Riders moving, a position every 5 s each.")] = 200,
    seconds: Annotated[float, typer.Option(help="How long the riders move.")] = 30.0,
    pages: Annotated[int, typer.Option(help="Most customer tracking pages to open at once (0 = skip).")] = 50,
    profile: Annotated[bool, typer.Option(help="Also print the dashboard's CPU profile.")] = False,
    record: Record = None,
) -> None:
    """The shop dashboard under load and many customer pages, measured inside Chromium.

    Prints publish → DOM updated P50/P99, frames dropped, long tasks, main-thread
    time and JS heap of the dashboard, the web service's and broker's CPU; and
    for customer pages (opened 10 at a time until --pages, the memory reserve or
    the CPU stops it) how many, the time until all are live, shop chat → page
    latency and renderer memory.
    """
    from bloomwire.app.bench import web as bench

    try:
        reports = bench.main(
            make_settings(ctx),
            console,
            orders=orders,
            riders=riders,
            seconds=seconds,
            pages=pages,
            profile=profile,
        )
    except BloomwireError as exc:
        raise fail(str(exc)) from None
    _record(record, reports)


@bench_app.command("restart")
def bench_restart(
    ctx: typer.Context,
    kills: Annotated[int, typer.Option(help="kill -9 of each service, one after the other.")] = 2,
    record: Record = None,
) -> None:
    """Seconds a service killed under a supervised stack is away (new process, online again)."""
    from bloomwire.app.bench import restart as bench

    try:
        reports = bench.main(make_settings(ctx), kills=kills, console=console)
    except BloomwireError as exc:
        raise fail(str(exc)) from None
    _record(record, reports)


@bench_app.command("metrics")
def bench_metrics(
    events: Annotated[int, typer.Option(help="Events counted per batch size.")] = 200_000,
    record: Record = None,
) -> None:
    """CPU per event of the Prometheus figures (the Service hook and the persister's), no broker."""
    from bloomwire.app.bench import metrics as bench

    _record(record, bench.main(events=events, console=console))


@bench_app.command("access")
def bench_access(
    orders: Annotated[int, typer.Option(help="Customer accesses already live on the broker.")] = 5_000,
    repeat: Annotated[int, typer.Option(help="Mint/revoke rounds to time.")] = 15,
    record: Record = None,
) -> None:
    """Time minting and revoking one customer access (and the cut-off) with N live orders."""
    from bloomwire.app.bench.access import bench_access as run_bench
    from bloomwire.runtime.broker import find_dynsec_plugin, find_mosquitto

    try:
        find_mosquitto()
        find_dynsec_plugin()
        result = run_bench(orders, repeat, echo=console.print)
    except BloomwireError as exc:
        raise fail(str(exc)) from None
    _record(record, [Report("bloomwire bench access", ("figure",), [(line,) for line in result.lines()])])


@bench_app.command("mqtt-clients")
def bench_mqtt_clients(
    clients: Annotated[
        str, typer.Option(help="Comma-separated: tuned (paho tuned), paho (plain paho), mqtt5 (prototype).")
    ] = "tuned,paho,mqtt5",
    events: Annotated[int, typer.Option(help="Events per run.")] = 30_000,
    runs: Annotated[int, typer.Option(help="Runs per client, interleaved.")] = 3,
    rate: Annotated[int, typer.Option(help="Load rate, events/s (0 = as fast as possible).")] = 0,
    persist_us: Annotated[float, typer.Option(help="Busy 'persist' cost per batch, µs.")] = 0.0,
    record: Record = None,
) -> None:
    """paho plain, paho tuned and an mqtt5-codec prototype on one persist-and-republish pipeline.

    Each run is a child process receiving QoS 1 events on a persistent session from a private
    Mosquitto, republishing each at QoS 1 and acking after; printed: its CPU µs per event and
    events/s, per client (median and range of the interleaved runs), and the host's load.
    """
    try:
        reports = bench_clients.main(
            clients=[c.strip() for c in clients.split(",") if c.strip()],
            events=events,
            runs=runs,
            rate=rate,
            persist_us=persist_us,
            console=console,
        )
    except BloomwireError as exc:
        raise fail(str(exc)) from None
    _record(record, reports)


def main() -> None:
    """Console-script entry point."""
    app()
